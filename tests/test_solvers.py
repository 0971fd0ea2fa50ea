"""Exact and statistical properties of euler_maruyama and multilevel_euler_maruyama."""

import chex
import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from mlem_jax import euler_maruyama, multilevel_euler_maruyama

import recursions
from recursions import affine_moments

A = (0.5, 1.5, 1.0)
B = (0.0, 0.5, 0.3)
SIGMA = 0.3
X0 = 1.0


def affine_levels(a=A, b=B):
    return recursions.affine_levels(a, b)


def const_sigma(t, y, args):
    return SIGMA


def mlp_levels():
    """Three small nonlinear levels with matrices, for exactness tests."""
    ks = jax.random.split(jax.random.key(42), 3)
    ws = [0.3 * jax.random.normal(k, (4, 4)) for k in ks]
    return tuple((lambda t, y, args, w=w: jnp.tanh(w @ y) - y * (1 + t)) for w in ws)


class EqualityTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("independent", "nested")
    def test_all_ones_equals_em_on_finest(self, coupling):
        drifts = mlp_levels()
        ts = jnp.linspace(0.0, 1.0, 21)
        y0 = jnp.arange(4.0) / 4
        key = jax.random.key(3)
        em = self.variant(lambda k: euler_maruyama(drifts[-1], const_sigma, y0, ts, k))(key)
        ml = self.variant(
            lambda k: multilevel_euler_maruyama(
                drifts, jnp.ones(3), const_sigma, y0, ts, k, coupling=coupling
            )
        )(key)
        np.testing.assert_array_equal(np.asarray(em), np.asarray(ml.y))
        np.testing.assert_array_equal(np.asarray(ml.evaluations), [20, 20, 20])

    @chex.variants(with_jit=True, without_jit=True)
    def test_decreasing_grid_and_saveat(self):
        drifts = mlp_levels()
        ts = jnp.linspace(1.0, 1e-3, 11)
        y0 = jnp.ones(4)
        key = jax.random.key(0)
        fn = self.variant(
            lambda k: (
                euler_maruyama(drifts[-1], const_sigma, y0, ts, k, saveat="all"),
                euler_maruyama(drifts[-1], const_sigma, y0, ts, k, saveat=[0, 5, -1]),
                euler_maruyama(drifts[-1], const_sigma, y0, ts, k),
            )
        )
        all_states, some, final = fn(key)
        assert all_states.shape == (11, 4)
        np.testing.assert_array_equal(all_states[0], y0)
        np.testing.assert_array_equal(all_states[-1], final)
        np.testing.assert_array_equal(some, all_states[jnp.array([0, 5, 10])])

    def test_ode_without_diffusion_needs_no_key(self):
        ts = jnp.linspace(0.0, 1.0, 1001)
        y = euler_maruyama(lambda t, y, a: -y, None, jnp.ones(()), ts, None)
        np.testing.assert_allclose(y, (1 - 1e-3) ** 1000, rtol=1e-5)

    def test_pytree_state(self):
        y0 = {"x": jnp.ones(3), "v": jnp.zeros((2, 2))}
        drift = lambda t, y, a: {"x": -y["x"], "v": y["v"] + 1.0}
        ts = jnp.linspace(0.0, 1.0, 5)
        key = jax.random.key(1)
        em = euler_maruyama(drift, lambda t, y, a: 0.1, y0, ts, key)
        ml = multilevel_euler_maruyama((drift, drift), jnp.ones(2), lambda t, y, a: 0.1, y0, ts, key)
        chex.assert_trees_all_equal(em, ml.y)

    def test_same_brownian_path_three_ways(self):
        """A VirtualBrownianTree, its increments, and EM / ML-EM driven by either agree."""
        ts = jnp.linspace(0.0, 1.0, 17)
        y0 = jnp.ones(4)
        path = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-4, shape=(4,), key=jax.random.key(5))
        incs = jax.vmap(path.evaluate)(ts[:-1], ts[1:])
        drifts = mlp_levels()
        a = euler_maruyama(drifts[-1], const_sigma, y0, ts, path)
        b = euler_maruyama(drifts[-1], const_sigma, y0, ts, incs)
        c = multilevel_euler_maruyama(
            drifts, jnp.ones(3), const_sigma, y0, ts, path, level_key=jax.random.key(0)
        )
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(a, c.y)

    def test_key_and_increments_agree(self):
        """The noise a key produces is N(0, |h|) per step, reproducible as increments."""
        ts = jnp.linspace(0.0, 2.0, 9)
        key = jax.random.key(11)
        y0 = jnp.zeros(3)
        path_y = euler_maruyama(lambda t, y, a: jnp.zeros_like(y), lambda t, y, a: 1.0, y0, ts, key, saveat="all")
        incs = jnp.diff(path_y, axis=0)
        again = euler_maruyama(lambda t, y, a: jnp.zeros_like(y), lambda t, y, a: 1.0, y0, ts, incs)
        np.testing.assert_allclose(again, path_y[-1], atol=1e-6)

    def test_evaluations_count_the_coins(self):
        """With independent coins, level k runs when coin k or k+1 fires."""
        K, N = 4, 200
        probs = jnp.array([1.0, 0.5, 0.2, 0.05])
        drifts = affine_levels((1.0, 1.1, 1.2, 1.3), (0.0, 0.0, 0.0, 0.0))
        ts = jnp.linspace(0.0, 1.0, N + 1)
        lk = jax.random.key(9)
        sol = multilevel_euler_maruyama(drifts, probs, const_sigma, 1.0, ts, jax.random.key(1), level_key=lk)
        coins = jax.vmap(lambda n: jax.random.uniform(jax.random.fold_in(lk, n), (K,)) < probs)(jnp.arange(N))
        needed = coins | jnp.concatenate([coins[:, 1:], jnp.zeros((N, 1), bool)], axis=1)
        np.testing.assert_array_equal(sol.evaluations, needed.sum(0))
        assert sol.evaluations[0] == N


def _moments_case(coupling, time_dependent):
    if time_dependent:
        probs = lambda t: jnp.array([1.0, 0.6 - 0.4 * t, 0.4 - 0.3 * t])
        probs_np = lambda t: np.array([1.0, 0.6 - 0.4 * t, 0.4 - 0.3 * t])
    else:
        probs = probs_np = np.array([1.0, 0.5, 0.25])
    return probs, probs_np


@pytest.mark.parametrize("coupling", ["independent", "nested"])
@pytest.mark.parametrize("time_dependent", [False, True])
def test_unbiased_moments_and_coupled_error(coupling, time_dependent):
    """Mean, second moment and coupled mean-square difference against exact recursions,
    over independent noise and level keys, within 4 standard errors."""
    probs, probs_np = _moments_case(coupling, time_dependent)
    drifts = affine_levels()
    ts = jnp.linspace(0.0, 1.0, 11)
    M = 40_000

    def one(key, level_key):
        ml = multilevel_euler_maruyama(
            drifts, probs, const_sigma, jnp.float32(X0), ts, key, level_key=level_key, coupling=coupling
        ).y
        em = euler_maruyama(drifts[-1], const_sigma, jnp.float32(X0), ts, key)
        return ml, em

    keys = jax.random.split(jax.random.key(2024), M)
    level_keys = jax.random.split(jax.random.key(7), M)
    ml, em = jax.jit(jax.vmap(one))(keys, level_keys)
    ml, em = np.asarray(ml, np.float64), np.asarray(em, np.float64)
    m, q, d = affine_moments(A, B, probs_np, np.asarray(ts), X0, SIGMA, coupling)

    def within(samples, exact):
        se = samples.std() / np.sqrt(M)
        assert abs(samples.mean() - exact) < 4 * se, (samples.mean(), exact, se)

    within(ml, m)
    within(ml**2, q)
    within((ml - em) ** 2, d)
    # the injected variance is real: ML-EM is not secretly EM
    assert d > 10 * ((ml - em) ** 2).std() / np.sqrt(M)


def test_vmapped_sampler_keeps_the_cond():
    """Per-sample keys with an unbatched level key keep lax.cond; a batched level key
    turns it into select (the trap this API is designed around)."""
    drifts = mlp_levels()
    ts = jnp.linspace(0.0, 1.0, 5)
    probs = jnp.array([1.0, 0.3, 0.1])

    def sample(key, level_key):
        return multilevel_euler_maruyama(drifts, probs, const_sigma, jnp.ones(4), ts, key, level_key=level_key).y

    keys = jax.random.split(jax.random.key(0), 8)
    good = jax.make_jaxpr(jax.vmap(sample, in_axes=(0, None)))(keys, jax.random.key(1))
    bad = jax.make_jaxpr(jax.vmap(sample, in_axes=(0, 0)))(keys, keys)
    assert _count_primitive(good.jaxpr, "cond") == 2
    assert _count_primitive(bad.jaxpr, "cond") == 0


def _count_primitive(jaxpr, name):
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += _count_primitive(sub.jaxpr, name)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += _count_primitive(sub, name)
    return count


@pytest.mark.parametrize("coupling", ["independent", "nested"])
def test_seeded_sample_is_batch_independent(coupling):
    drifts = mlp_levels()
    ts = jnp.linspace(1.0, 0.0, 13)
    probs = jnp.array([1.0, 0.4, 0.2])
    level_key = jax.random.key(77)

    def sample(key):
        return multilevel_euler_maruyama(
            drifts, probs, const_sigma, jnp.ones(4), ts, key, level_key=level_key, coupling=coupling
        ).y

    keys = jax.random.split(jax.random.key(0), 7)
    batch7 = jax.jit(jax.vmap(sample))(keys)
    batch3 = jax.jit(jax.vmap(sample))(keys[2:5])
    alone = [jax.jit(sample)(k) for k in keys[2:5]]
    np.testing.assert_array_equal(batch7[2:5], batch3)
    # unbatched, XLA evaluates the MLP as matrix-vector products instead of one matrix
    # product, which reassociates float32 sums (a few ulps); a key whose noise or coins
    # depended on the batch would differ by O(1)
    for i, a in enumerate(alone):
        np.testing.assert_allclose(a, batch3[i], rtol=2e-6, atol=0)


def test_callback_and_progress_under_jit():
    seen = []
    ts = jnp.linspace(0.0, 1.0, 6)
    run = jax.jit(
        lambda k: multilevel_euler_maruyama(
            mlp_levels(), jnp.array([1.0, 0.5, 0.5]), const_sigma, jnp.ones(4), ts, k,
            callback=lambda info: seen.append((int(info.step), float(info.t), np.asarray(info.y))),
            progress=True,
        )
    )
    for seed in range(2):  # the compiled loop reports again on a second call
        seen.clear()
        sol = run(jax.random.key(seed))
        jax.block_until_ready(sol)
        jax.effects_barrier()
        assert sorted(s for s, _, _ in seen) == list(range(5))
        last = max(seen, key=lambda x: x[0])
        assert last[1] == pytest.approx(1.0)
        np.testing.assert_array_equal(last[2], sol.y)
