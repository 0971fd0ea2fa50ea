"""Stratified level coins: exact marginals, even firings, prefix property, exact means,
coupled error and its strong order, the O(h) bias, and skipping under jit(vmap)."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm
from test_solvers import _count_primitive

from mlem_jax import (
    FixedFirings,
    MultilevelDrift,
    MultilevelEuler,
    PiecewiseConstant,
    euler_maruyama,
    multilevel_diffeqsolve,
    multilevel_euler_maruyama,
)
from mlem_jax._coins import lattice_generator, stratified_coins, stratified_fixed_firings

SCHEDULE = PiecewiseConstant(jnp.array([0.0, 0.3, 0.7, 1.0]),
                             jnp.array([[1.0, 0.8, 0.3], [1.0, 0.45, 0.2], [1.0, 0.1, 0.05]]))


def _z_limit(num_cells, alpha=1e-3):
    """Two-sided Bonferroni bound on |z| over `num_cells` cells at family-wise level alpha."""
    return norm.ppf(1 - alpha / (2 * num_cells))


def _plan(probs_grid, coupling, num_keys, seed=0):
    keys = jax.random.split(jax.random.key(seed), num_keys)
    return np.asarray(jax.jit(jax.vmap(lambda k: stratified_coins(k, probs_grid, coupling)))(keys))


@pytest.mark.parametrize("coupling", ["independent", "nested"])
def test_every_step_keeps_its_marginal(coupling):
    """P(B_nk) = p_k(t_n) at every step of a time-dependent schedule, over level keys."""
    ts = jnp.linspace(0.0, 1.0, 41)
    p = np.asarray(jax.vmap(SCHEDULE)(ts[:-1]))
    M = 20_000
    freq = _plan(jnp.asarray(p), coupling, M).mean(0)
    se = np.sqrt(p * (1 - p) / M)
    np.testing.assert_array_equal(freq[:, 0], 1.0)
    z = np.abs(freq[:, 1:] - p[:, 1:]) / se[:, 1:]
    assert z.max() < _z_limit(z.size), z.max()


@pytest.mark.parametrize("coupling", ["independent", "nested"])
@pytest.mark.parametrize("num_steps", [37, 100, 101])
def test_constant_probability_fires_floor_or_ceil_times(coupling, num_steps):
    """p = (1, 5/16, 3/16) (exact in binary) fires floor(N p) or ceil(N p) times, for every key."""
    p = np.array([1.0, 5 / 16, 3 / 16])
    counts = _plan(jnp.asarray(np.tile(p, (num_steps, 1)), jnp.float32), coupling, 2000).sum(1)
    for k in (1, 2):
        assert set(np.unique(counts[:, k])) <= {np.floor(num_steps * p[k]), np.ceil(num_steps * p[k])}
    # and the gaps between firings are as even as they can be: at most ceil(1/p) steps
    plan = _plan(jnp.asarray(np.tile(p, (num_steps, 1)), jnp.float32), coupling, 200)
    if coupling == "independent":
        for row in plan[:, :, 1]:
            gaps = np.diff(np.flatnonzero(row))
            assert gaps.max() <= np.ceil(1 / p[1]) and gaps.min() >= np.floor(1 / p[1])


def test_nested_fired_levels_form_a_prefix():
    ts = jnp.linspace(0.0, 1.0, 101)
    plan = _plan(jax.vmap(SCHEDULE)(ts[:-1]), "nested", 500)
    assert np.all(plan[:, :, 1:] <= plan[:, :, :-1])


def test_lattice_generator_is_coprime_and_visits_every_cell():
    for n in (1, 2, 3, 10, 64, 97, 100, 1000):
        j = lattice_generator(n)
        assert np.gcd(j, n) == 1
        assert sorted((np.arange(n) * j) % n) == list(range(n))
        coprime = [i for i in range(1, n) if np.gcd(i, n) == 1] or [1]
        assert abs(j - 0.618034 * n) == min(abs(i - 0.618034 * n) for i in coprime)


@pytest.mark.parametrize("coupling", ["independent", "nested"])
def test_fixed_budget_fires_exactly_and_keeps_marginals(coupling):
    N, firings, M = 50, (20, 7, 3), 20_000
    keys = jax.random.split(jax.random.key(5), M)
    plan = np.asarray(jax.vmap(lambda k: stratified_fixed_firings(k, firings, N, coupling))(keys))
    np.testing.assert_array_equal(plan.sum(1), np.tile([N, *firings], (M, 1)))
    p = np.array(firings) / N
    z = np.abs(plan[:, :, 1:].mean(0) - p) / np.sqrt(p * (1 - p) / M)
    assert z.max() < _z_limit(z.size)
    if coupling == "nested":
        assert np.all(plan[:, :, 1:] <= plan[:, :, :-1])


def test_fixed_budget_through_the_solver():
    ts = jnp.linspace(0.0, 1.0, 51)
    levels = tuple((lambda t, y, a, k=k: -y * (1 + 0.1 * k)) for k in range(4))
    for coupling in ("independent", "nested"):
        sol = multilevel_euler_maruyama(levels, FixedFirings((20, 7, 3)), lambda t, y, a: 0.3, 1.0, ts,
                                        jax.random.key(1), coupling=coupling, coins="stratified")
        ev = np.asarray(sol.evaluations)
        if coupling == "nested":  # prefix: level k runs exactly when coin k fires
            np.testing.assert_array_equal(ev, [50, 20, 7, 3])
        else:  # level k runs when coin k or coin k + 1 fires
            assert ev[0] == 50 and ev[3] == 3 and 20 <= ev[1] <= 27 and 7 <= ev[2] <= 10


# ----------------------------------------------------------------- trajectories


def smooth_levels(num=3):
    """f^k(t, y) = -y + (1 - 2^-k)(sin 2y + 0.3 cos 3t): smooth, nonlinear, state-dependent
    corrections."""
    return tuple((lambda t, y, a, k=k: -y + (1 - 0.5**k) * (jnp.sin(2 * y) + 0.3 * jnp.cos(3 * t)))
                 for k in range(1, num + 1))


def _coupled(levels, probs, coins, num_steps, M, seed=0, coupling="independent"):
    """Differences X^ML_N - X^EM_N on the same noise, one level key per path."""
    ts = jnp.linspace(0.0, 1.0, num_steps + 1)
    keys = jax.random.split(jax.random.key(seed), M)
    level_keys = jax.random.split(jax.random.key(seed + 1), M)
    g = lambda t, y, a: 0.5

    @jax.jit
    def run(keys, level_keys):
        em = jax.vmap(lambda k: euler_maruyama(levels[-1], g, jnp.float32(0.5), ts, k))(keys)
        ml = jax.vmap(lambda k, lk: multilevel_euler_maruyama(
            levels, probs, g, jnp.float32(0.5), ts, k, level_key=lk, coupling=coupling, coins=coins).y)(
            keys, level_keys)
        return ml - em

    return np.asarray(run(keys, level_keys), np.float64)


def _mse(d):
    return (d**2).mean(), (d**2).std(ddof=1) / np.sqrt(d.size)


def test_mean_is_exact_when_corrections_do_not_depend_on_the_state():
    """f^k = -y + c_k(t): X^ML - X^EM = sum_n h (1 - h)^(N-1-n) sum_k (B_nk/p_k - 1) dc_k(t_n),
    whose mean is exactly 0 because every coin keeps its marginal."""
    levels = tuple((lambda t, y, a, k=k: -y + (k + 1) * jnp.cos(3 * t + k)) for k in range(3))
    d = _coupled(levels, SCHEDULE, "stratified", 40, 20_000)
    assert abs(d.mean()) < 3.3 * d.std(ddof=1) / np.sqrt(d.size)
    assert d.std() > 1e-3  # the coins do inject an error: the test is not vacuous


def test_stratified_beats_iid_and_has_strong_order_one():
    """Coupled MSE against EM on f^K: stratified falls like h^2 (order 1), iid like h (1/2),
    and at N = 100 stratified is far below iid at the same probabilities."""
    levels, p, M = smooth_levels(), jnp.array([1.0, 0.3, 0.1]), 2000
    mse = {(c, n): _mse(_coupled(levels, p, c, n, M)) for c in ("iid", "stratified") for n in (100, 400)}

    def order(c):
        (a, sa), (b, sb) = mse[(c, 100)], mse[(c, 400)]
        return 0.5 * np.log(a / b) / np.log(4), 0.5 * np.hypot(sa / a, sb / b) / np.log(4)

    o_s, se_s = order("stratified")
    o_i, se_i = order("iid")
    # 0.1 of slack for the pre-asymptotic regime on top of 3 standard errors
    assert abs(o_s - 1.0) < 3 * se_s + 0.1, (o_s, se_s)
    assert abs(o_i - 0.5) < 3 * se_i + 0.1, (o_i, se_i)
    (a, sa), (b, sb) = mse[("iid", 100)], mse[("stratified", 100)]
    ratio, se_ratio = a / b, a / b * np.hypot(sa / a, sb / b)
    assert ratio - 3 * se_ratio > 10, (ratio, se_ratio)


def test_bias_is_order_h():
    """Firings depend on earlier firings, so a step is not unbiased given its state: the mean
    difference from EM on f^K is O(h). bias / h must not grow as h shrinks, and must stay
    below a tenth of h (EM's own weak error on this problem is of order h too)."""
    levels, p, M = smooth_levels(), jnp.array([1.0, 0.3, 0.1]), 8000
    scaled = {}
    for n in (100, 400):
        d = _coupled(levels, p, "stratified", n, M, seed=7)
        h = 1.0 / n
        scaled[n] = (d.mean() / h, d.std(ddof=1) / np.sqrt(M) / h)
        assert abs(scaled[n][0]) < 0.1 + 3 * scaled[n][1], (n, scaled[n])
    assert abs(scaled[400][0]) < abs(scaled[100][0]) + 3 * np.hypot(scaled[100][1], scaled[400][1])


@pytest.mark.parametrize("coupling", ["independent", "nested"])
def test_jit_vmap_keeps_the_cond_and_skips(coupling):
    levels = smooth_levels()
    ts = jnp.linspace(0.0, 1.0, 101)
    probs = jnp.array([1.0, 0.3125, 0.1875])

    def sample(key, level_key):
        return multilevel_euler_maruyama(levels, probs, lambda t, y, a: 0.5, jnp.float32(0.5), ts, key,
                                         level_key=level_key, coupling=coupling, coins="stratified")

    keys = jax.random.split(jax.random.key(0), 16)
    jaxpr = jax.make_jaxpr(jax.vmap(sample, in_axes=(0, None)))(keys, jax.random.key(1))
    assert _count_primitive(jaxpr.jaxpr, "cond") == 2
    sol = jax.jit(jax.vmap(sample, in_axes=(0, None)))(keys, jax.random.key(1))
    ev = np.asarray(sol.evaluations)
    assert np.all(ev == ev[0])  # the whole batch shares the coins
    # N p = 31.25 and 18.75: each coin fires floor or ceil of that
    assert ev[0, 0] == 100 and ev[0, 2] in (18, 19)
    if coupling == "nested":  # prefix: level 2 runs exactly when coin 2 fires
        assert ev[0, 1] in (31, 32)
    else:  # level 2 runs when coin 2 or coin 3 fires
        assert 31 <= ev[0, 1] <= 32 + 19
    assert np.all(np.isfinite(np.asarray(sol.y)))


def test_bad_coins_argument():
    with pytest.raises(ValueError, match=r"coins: expected one of \('iid', 'stratified'\), got 'sobol'"):
        multilevel_euler_maruyama(smooth_levels(), jnp.array([1.0, 0.5, 0.2]), None, 1.0,
                                  jnp.linspace(0, 1, 5), jax.random.key(0), coins="sobol")


# ------------------------------------------------------------------ diffrax route


@pytest.mark.parametrize("coins", ["iid", "stratified"])
@pytest.mark.parametrize("coupling", ["independent", "nested"])
def test_diffrax_route_gives_the_scan_routes_coins(coins, coupling):
    """With the grid given, the same level key gives the same coins on both routes, so an ODE
    solve is the same trajectory and the same evaluation counts."""
    levels = smooth_levels()
    ts = jnp.linspace(0.0, 1.0, 31)
    lk = jax.random.key(4)
    scan = multilevel_euler_maruyama(levels, SCHEDULE, None, jnp.float32(0.5), ts, None, level_key=lk,
                                     coupling=coupling, coins=coins)
    term = MultilevelDrift(levels, SCHEDULE, lk, coupling=coupling, coins=coins, ts=ts)
    sol = multilevel_diffeqsolve(term, MultilevelEuler(), ts[0], ts[-1], None, jnp.float32(0.5),
                                 stepsize_controller=diffrax.StepTo(ts),
                                 saveat=diffrax.SaveAt(t1=True, solver_state=True))
    np.testing.assert_allclose(sol.ys[0], scan.y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sol.solver_state[0] if sol.solver_state.ndim > 1 else sol.solver_state,
                                  scan.evaluations)


def test_diffrax_stratified_with_constant_step():
    levels = smooth_levels()
    ts = jnp.linspace(0.0, 1.0, 21)
    term = MultilevelDrift(levels, jnp.array([1.0, 0.3125, 0.1875]), jax.random.key(0), coins="stratified", ts=ts)
    sol = multilevel_diffeqsolve(term, MultilevelEuler(), 0.0, 1.0, 0.05, jnp.float32(0.5),
                                 saveat=diffrax.SaveAt(t1=True, solver_state=True))
    scan = multilevel_euler_maruyama(levels, jnp.array([1.0, 0.3125, 0.1875]), None, jnp.float32(0.5), ts,
                                     None, level_key=jax.random.key(0), coins="stratified")
    np.testing.assert_allclose(sol.ys[0], scan.y, rtol=1e-5, atol=1e-6)


def test_diffrax_stratified_errors():
    levels = smooth_levels()
    p = jnp.array([1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"ts: coins='stratified' plans the firings over the whole grid"):
        MultilevelDrift(levels, p, jax.random.key(0), coins="stratified")
    with pytest.raises(ValueError, match=r"coins: expected one of"):
        MultilevelDrift(levels, p, jax.random.key(0), coins="halton")
    term = MultilevelDrift(levels, p, jax.random.key(0), coins="stratified", ts=jnp.linspace(0, 1, 11))
    with pytest.raises(ValueError, match=r"ts: the MultilevelDrift was built for a grid of 10 steps"):
        multilevel_diffeqsolve(term, MultilevelEuler(), 0.0, 1.0, 0.05, jnp.float32(0.5))
    with pytest.raises(ValueError, match=r"ts: the MultilevelDrift was built for a grid of 10 steps"):
        multilevel_diffeqsolve(term, MultilevelEuler(), 0.0, 1.0, None, jnp.float32(0.5),
                               stepsize_controller=diffrax.StepTo(jnp.linspace(0, 1, 21)))
    # the stock diffeqsolve does not check the grid; the term itself refuses an off-grid time
    with pytest.raises(Exception, match=r"not on the grid ts"):
        diffrax.diffeqsolve(term, MultilevelEuler(), 0.0, 1.0, 0.07, jnp.float32(0.5),
                            adjoint=diffrax.ForwardMode())


@pytest.mark.parametrize("coins", ["iid", "stratified"])
@pytest.mark.parametrize("coupling", ["independent", "nested"])
def test_planned_evaluations_are_the_evaluations_that_run(coins, coupling):
    """planned_evaluations replays the coins alone: the same counts as the sampler with the
    same (shared) level key, for iid, stratified and FixedFirings schedules."""
    from mlem_jax import FixedFirings, planned_evaluations

    levels = tuple((lambda t, y, a, c=c: -c * y) for c in (1.0, 1.1, 1.2))
    ts = jnp.linspace(0.0, 1.0, 41)
    for probs in (jnp.array([1.0, 0.4, 0.1]), FixedFirings((9, 3))):
        for seed in range(3):
            lk = jax.random.key(seed)
            sol = multilevel_euler_maruyama(levels, probs, lambda t, y, a: 0.2, jnp.ones(2), ts, jax.random.key(9),
                                            level_key=lk, coupling=coupling, coins=coins)
            planned = planned_evaluations(probs, ts, lk, 3, coupling=coupling, coins=coins)
            np.testing.assert_array_equal(np.asarray(planned), np.asarray(sol.evaluations))
