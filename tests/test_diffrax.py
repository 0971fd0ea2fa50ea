"""ML-EM inside diffrax.diffeqsolve."""

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

from mlem_jax import MultilevelDrift, MultilevelEuler, multilevel_diffeqsolve, multilevel_euler_maruyama

from recursions import affine_moments

A, B, SIGMA = (0.5, 1.5, 1.0), (0.0, 0.5, 0.3), 0.3
LEVELS = tuple((lambda t, y, args, a=a, b=b: -a * y + b) for a, b in zip(A, B))


def g(t, y, args):
    return lx.DiagonalLinearOperator(SIGMA * jnp.ones_like(y))


def solve(probs, key, bm, t0=0.0, t1=1.0, dt0=0.1, y0=None, solver=None, **kw):
    y0 = jnp.ones(3) if y0 is None else y0
    terms = diffrax.MultiTerm(MultilevelDrift(LEVELS, probs, key), diffrax.ControlTerm(g, bm))
    return diffrax.diffeqsolve(terms, solver or MultilevelEuler(), t0, t1, dt0, y0,
                               adjoint=diffrax.ForwardMode(), **kw)


@pytest.mark.parametrize("t0, t1", [(0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("solver", [MultilevelEuler(), diffrax.Euler()], ids=["MultilevelEuler", "Euler"])
def test_all_ones_equals_diffrax_euler_on_finest(t0, t1, solver):
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-4, shape=(3,), key=jax.random.key(0))
    ts = jnp.linspace(t0, t1, 6)
    kw = dict(saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.StepTo(jnp.linspace(t0, t1, 11)))
    ml = solve(jnp.ones(3), jax.random.key(1), bm, t0, t1, dt0=None, solver=solver, **kw)
    ref = diffrax.diffeqsolve(diffrax.MultiTerm(diffrax.ODETerm(LEVELS[-1]), diffrax.ControlTerm(g, bm)),
                              diffrax.Euler(), t0, t1, None, jnp.ones(3), **kw)
    np.testing.assert_array_equal(ml.ys, ref.ys)


def test_agrees_with_the_scan_route_on_one_path():
    """Same VirtualBrownianTree, same grid, every p = 1: the two routes give the same path."""
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-4, shape=(3,), key=jax.random.key(0))
    ml = solve(jnp.ones(3), jax.random.key(1), bm, saveat=diffrax.SaveAt(t1=True))
    scan = multilevel_euler_maruyama(LEVELS, jnp.ones(3), lambda t, y, a: SIGMA, jnp.ones(3),
                                     jnp.linspace(0.0, 1.0, 11), bm, level_key=jax.random.key(2))
    np.testing.assert_allclose(ml.ys[0], scan.y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coupling", ["independent", "nested"])
@pytest.mark.parametrize("time_dependent", [False, True])
def test_same_law_as_the_scan_route(coupling, time_dependent):
    """The coin streams differ by design (keyed by t, not by step), so compare laws:
    mean, second moment and coupled difference against the exact recursions."""
    if time_dependent:
        probs = lambda t: jnp.array([1.0, 0.6 - 0.4 * t, 0.4 - 0.3 * t])
        probs_np = lambda t: np.array([1.0, 0.6 - 0.4 * t, 0.4 - 0.3 * t])
    else:
        probs = probs_np = np.array([1.0, 0.5, 0.25])
    M = 20_000

    def one(key):
        kb, kc = jax.random.split(key)
        bm = diffrax.UnsafeBrownianPath(shape=(), key=kb)
        terms = diffrax.MultiTerm(MultilevelDrift(LEVELS, probs, kc, coupling=coupling),
                                  diffrax.ControlTerm(lambda t, y, a: SIGMA, bm))
        ref_terms = diffrax.MultiTerm(diffrax.ODETerm(LEVELS[-1]), diffrax.ControlTerm(lambda t, y, a: SIGMA, bm))
        kw = dict(saveat=diffrax.SaveAt(t1=True), adjoint=diffrax.ForwardMode())
        ml = diffrax.diffeqsolve(terms, MultilevelEuler(), 0.0, 1.0, 0.1, jnp.float32(1.0), **kw).ys[0]
        em = diffrax.diffeqsolve(ref_terms, diffrax.Euler(), 0.0, 1.0, 0.1, jnp.float32(1.0), **kw).ys[0]
        return ml, em

    ml, em = map(lambda a: np.asarray(a, np.float64), jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(3), M)))
    m, q, d = affine_moments(A, B, probs_np, np.linspace(0.0, 1.0, 11), 1.0, SIGMA, coupling)
    for samples, exact in ((ml, m), (ml**2, q), ((ml - em) ** 2, d)):
        assert abs(samples.mean() - exact) < 4 * samples.std() / np.sqrt(M), (samples.mean(), exact)


def test_vmap_keeps_the_cond_and_counts_evaluations():
    probs = jnp.array([1.0, 0.3, 0.1])

    grid = jnp.linspace(0.0, 1.0, 11)

    def one(bkey, level_key):
        bm = diffrax.UnsafeBrownianPath(shape=(3,), key=bkey)
        return solve(probs, level_key, bm, dt0=None, stepsize_controller=diffrax.StepTo(grid),
                     saveat=diffrax.SaveAt(t1=True, solver_state=True))

    keys = jax.random.split(jax.random.key(0), 4)
    jaxpr = jax.make_jaxpr(jax.vmap(one, in_axes=(0, None)))(keys, jax.random.key(1))
    from test_solvers import _count_primitive

    assert _count_primitive(jaxpr.jaxpr, "cond") >= 2
    sol = jax.vmap(one, in_axes=(0, None))(keys, jax.random.key(1))
    counts = np.asarray(sol.solver_state)
    assert np.all(counts == counts[0]) and counts[0, 0] == 10 and counts[0, 2] < 10
    # the counts are those of the coins drawn at the step times
    from mlem_jax import level_coins
    from mlem_jax._diffrax import _time_key

    coins = np.array([np.asarray(level_coins(_time_key(jax.random.key(1), t), probs)) for t in grid[:-1]])
    needed = coins | np.concatenate([coins[:, 1:], np.zeros((10, 1), bool)], 1)
    np.testing.assert_array_equal(counts[0], needed.sum(0))  # StepTo: the step times are the grid


def test_ode_mean_converges_at_order_one():
    """Without noise (a probability-flow-like ODE) the mean over coin keys converges to
    the exact solution x0 exp(-a_K t) at order 1 in the step."""
    probs = jnp.array([1.0, 0.5, 0.5])
    steps = [4, 8, 16, 32, 64]
    errs = []
    for n in steps:
        def one(key):
            return multilevel_diffeqsolve(MultilevelDrift(LEVELS, probs, key), MultilevelEuler(), 0.0, 1.0,
                                          1.0 / n, jnp.float32(1.0), saveat=diffrax.SaveAt(t1=True)).ys[0]
        x = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(n), 20_000)), np.float64)
        exact = np.exp(-A[-1]) + B[-1] / A[-1] * (1 - np.exp(-A[-1]))
        errs.append(abs(x.mean() - exact))
        assert errs[-1] > 4 * x.std() / np.sqrt(x.size)
    slope = np.polyfit(np.log(1.0 / np.array(steps)), np.log(errs), 1)[0]
    assert abs(slope - 1.0) < 0.15, (slope, errs)


def test_bad_combinations():
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(3,), key=jax.random.key(0))
    terms = diffrax.MultiTerm(MultilevelDrift(LEVELS, jnp.array([1.0, 0.5, 0.5]), jax.random.key(1)),
                              diffrax.ControlTerm(g, bm))
    for solver in (diffrax.Heun(), diffrax.ItoMilstein(), diffrax.SRA1() if hasattr(diffrax,
                                                                                    "SRA1") else diffrax.Heun()):
        with pytest.raises(ValueError, match=r"solver: .* evaluates the drift more than once"):
            multilevel_diffeqsolve(terms, solver, 0.0, 1.0, 0.1, jnp.ones(3))
    with pytest.raises(ValueError, match=r"stepsize_controller: PIDController adapts"):
        multilevel_diffeqsolve(terms, MultilevelEuler(), 0.0, 1.0, 0.1, jnp.ones(3),
                               stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3))
    # even a plain diffeqsolve refuses Runge-Kutta solvers, at trace time
    for solver in (diffrax.Heun(), diffrax.Tsit5()):
        with pytest.raises(ValueError,
                           match=r"solver: a Runge-Kutta solver .* evaluates a MultilevelDrift at several stages"):
            diffrax.diffeqsolve(terms, solver, 0.0, 1.0, 0.1, jnp.ones(3))
    with pytest.raises(RuntimeError, match=r"adaptive step sizes"):  # diffrax's own check
        diffrax.diffeqsolve(terms, MultilevelEuler(), 0.0, 1.0, 0.1, jnp.ones(3),
                            stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-3))
    with pytest.raises(TypeError, match=r"MultilevelEuler: terms must contain exactly one MultilevelDrift"):
        diffrax.diffeqsolve(diffrax.ODETerm(LEVELS[0]), MultilevelEuler(), 0.0, 1.0, 0.1, jnp.ones(3))
    with pytest.raises(ValueError, match=r"probs: the first \(cheapest\) level must have probability 1"):
        MultilevelDrift(LEVELS, jnp.array([0.5, 0.5, 0.5]), jax.random.key(0))
    with pytest.raises(ValueError, match=r"probs: expected one probability per level, shape \(3,\)"):
        MultilevelDrift(LEVELS, jnp.array([1.0, 0.5]), jax.random.key(0))


def test_a_drift_of_the_wrong_shape_is_named_on_the_diffrax_route():
    term = MultilevelDrift((lambda t, y, a: -y, lambda t, y, a: -y[:1]), jnp.array([1.0, 0.5]), jax.random.key(0))
    with pytest.raises(ValueError, match=r"drifts\[1\]: its output must match y0"):
        multilevel_diffeqsolve(term, MultilevelEuler(), 0.0, 1.0, 0.1, jnp.ones(2))
    with pytest.raises(TypeError, match=r"y0: expected floating-point states"):
        multilevel_diffeqsolve(term, MultilevelEuler(), 0.0, 1.0, 0.1, jnp.ones(2, jnp.int32))


def test_the_term_checks_probabilities_like_the_scan_route():
    same = (lambda t, y, a: -y,) * 3
    with pytest.raises(ValueError, match=r"probs: the nested coupling needs non-increasing"):
        MultilevelDrift(same, jnp.array([1.0, 0.2, 0.5]), jax.random.key(0), coupling="nested")
    with pytest.raises(ValueError, match=r"probs\(t\): every probability must lie in \(0, 1\]"):
        MultilevelDrift(same[:2], lambda t: jnp.array([1.0, 2.0]), jax.random.key(0))


def test_a_schedule_without_ts_is_checked_at_every_time_the_solver_steps_to():
    """Without ts the term sees a schedule at t = 0 only when built; a schedule bad later on (p_2 > 1 after
    t = 0.5) is an error where the solver steps there, not a silent run."""
    bm = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-4, shape=(3,), key=jax.random.key(0))
    later_bad = lambda t: jnp.array([1.0, jnp.where(t > 0.5, 1.5, 0.5), 0.3])
    with pytest.raises(Exception, match=r"probs\(t\): at a time the solver stepped to"):
        jax.block_until_ready(solve(later_bad, jax.random.key(1), bm).ys)
    good = lambda t: jnp.array([1.0, jnp.where(t > 0.5, 0.9, 0.5), 0.3])
    assert np.all(np.isfinite(solve(good, jax.random.key(1), bm).ys))
