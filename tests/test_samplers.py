"""The diffusion samplers and `Multilevel` inside them, checked against closed forms.

Gaussian data x_0 ~ N(M, S^2) per coordinate makes the VP denoiser and the
probability-flow map exact (docs/samplers.md); levels that differ from it by
state-independent corrections keep every sampler affine, so the mean over level keys of
an unbiased multilevel run is the top level's run.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_solvers import _count_primitive

from mlem_jax import (
    BatchedLevelKeyWarning,
    BiasedEstimatorWarning,
    Multilevel,
    euler_maruyama,
    heun,
    multilevel_euler_maruyama,
)
from mlem_jax.diffusion import (
    VP,
    ddim,
    dpm_solver_pp,
    edm_euler,
    edm_heun,
    karras_grid,
    logsnr_grid,
    reverse_diffusion,
    reverse_drift,
    score_from_denoiser,
    sde_dpm_solver_pp,
    uniform_grid,
    unipc,
)

SDE = VP()
M, S = 0.3, 0.5


def gaussian_denoiser(t, x, args):
    a, s = SDE.alpha(t), SDE.std(t)
    return M + a * S**2 / (a**2 * S**2 + s**2) * (x - a * M)


def exact_flow(x, t, t_end):
    a, s, a2, s2 = SDE.alpha(t), SDE.std(t), SDE.alpha(t_end), SDE.std(t_end)
    return a2 * M + jnp.sqrt((a2**2 * S**2 + s2**2) / (a**2 * S**2 + s**2)) * (x - a * M)


ODE_SAMPLERS = {
    # UniPC of predictor order p with its corrector has order p + 1 (Zhao et al. 2023); measured here
    # 2.10, 3.16, 3.06 and 4.20 (the Gaussian's slight superconvergence), so a tolerance of 0.25
    "unipc-bh1-1": (lambda *a, **k: unipc(*a, order=1, variant="bh1", **k), "karras", 2.0, (32, 64, 128), 0.25),
    "unipc-bh1-2": (lambda *a, **k: unipc(*a, order=2, variant="bh1", **k), "karras", 3.0, (32, 64, 128), 0.25),
    "unipc-bh2-2": (lambda *a, **k: unipc(*a, order=2, variant="bh2", **k), "karras", 3.0, (32, 64, 128), 0.25),
    "unipc-bh2-3": (lambda *a, **k: unipc(*a, order=3, variant="bh2", **k), "karras", 4.0, (16, 32, 64), 0.25),
    "ddim": (ddim, "logsnr", 1.0, (32, 64, 128)),
    "dpm++2m": (lambda *a, **k: dpm_solver_pp(*a, order=2, **k), "logsnr", 2.0, (32, 64, 128)),
    # on the log-SNR grid the Gaussian makes 3M superconvergent (order ~4): the Karras grid has unequal steps
    "dpm++3m": (lambda *a, **k: dpm_solver_pp(*a, order=3, **k), "karras", 3.0, (32, 64, 128)),
    "edm-heun": (edm_heun, "karras", 2.0, (16, 32, 64)),
    "edm-euler": (edm_euler, "karras", 1.0, (32, 64, 128)),
}


def grid(kind, n):
    return logsnr_grid(SDE, n) if kind == "logsnr" else karras_grid(SDE, n)


@pytest.mark.parametrize("name", sorted(ODE_SAMPLERS))
def test_global_order_on_gaussian_data(name):
    sampler, kind, order, steps, *tol = ODE_SAMPLERS[name]
    x = jax.random.normal(jax.random.key(0), (2048,))
    errors = []
    for n in steps:
        ts = grid(kind, n)
        y = jax.jit(lambda x: sampler(gaussian_denoiser, SDE, x, ts))(x)
        errors.append(float(jnp.sqrt(jnp.mean((y - exact_flow(x, ts[0], ts[-1])) ** 2))))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < (tol[0] if tol else 0.15), (name, errors, slope)


def test_edm_euler_is_ddim():
    """Euler in s = sigma / alpha and DDIM are the same step written two ways."""
    ts = karras_grid(SDE, 12)
    x = jax.random.normal(jax.random.key(1), (64,))
    np.testing.assert_allclose(edm_euler(gaussian_denoiser, SDE, x, ts), ddim(gaussian_denoiser, SDE, x, ts),
                               rtol=1e-4, atol=1e-5)


def test_sde_solver_ends_at_the_exact_marginal():
    """From the exact prior at t = 1, SDE-DPM-Solver++(2M) ends near N(alpha M, alpha^2 S^2 + std^2)."""
    ts = logsnr_grid(SDE, 100)
    n = 20000
    t0, t1 = ts[0], ts[-1]
    prior_sd = jnp.sqrt(SDE.alpha(t0) ** 2 * S**2 + SDE.std(t0) ** 2)
    x = SDE.alpha(t0) * M + prior_sd * jax.random.normal(jax.random.key(2), (n,))
    y = np.asarray(sde_dpm_solver_pp(gaussian_denoiser, SDE, x, ts, jax.random.key(3)), np.float64)
    mean, var = float(SDE.alpha(t1) * M), float(SDE.alpha(t1) ** 2 * S**2 + SDE.std(t1) ** 2)
    assert abs(y.mean() - mean) < 4 * np.sqrt(var / n)
    assert abs(y.var() - var) < 4 * var * np.sqrt(2 / n)


def levels_with_constant_corrections(dim=4):
    """D^k = D + c_k(t), c_k independent of the state: D^3 is the exact denoiser."""
    v1 = jnp.linspace(-1.0, 1.0, dim)
    v2 = jnp.cos(jnp.arange(dim) + 1.0)
    return (
        lambda t, x, a: gaussian_denoiser(t, x, a) + 0.3 * jnp.sin(3 * t) * v1 + 0.2 * v2,
        lambda t, x, a: gaussian_denoiser(t, x, a) + 0.1 * t * v2,
        gaussian_denoiser,
    )


MULTILEVEL_SAMPLERS = {
    "em": lambda m, x, ts, key: euler_maruyama(
        m if isinstance(m, Multilevel) else _drift(m), reverse_diffusion(SDE), x, ts, key),
    "heun": lambda m, x, ts, key: heun(
        Multilevel([_drift(f, True) for f in m.levels], m.probs, coins=m.coins, level_key=m.level_key,
                   control=m.control) if isinstance(m, Multilevel) else _drift(m, True), None, x, ts, key),
    "ddim": lambda m, x, ts, key: ddim(m, SDE, x, ts, key),
    "dpm++2m": lambda m, x, ts, key: dpm_solver_pp(m, SDE, x, ts, key),
    "dpm++3m": lambda m, x, ts, key: dpm_solver_pp(m, SDE, x, ts, key, order=3),
    "sde-dpm++2m": lambda m, x, ts, key: sde_dpm_solver_pp(m, SDE, x, ts, key),
    "edm-heun": lambda m, x, ts, key: edm_heun(m, SDE, x, ts, key),
    "unipc": lambda m, x, ts, key: unipc(m, SDE, x, ts, key),
    "unipc-bh1-3": lambda m, x, ts, key: unipc(m, SDE, x, ts, key, order=3, variant="bh1"),
}


def _drift(denoiser, probability_flow=False):
    return reverse_drift(SDE, score_from_denoiser(SDE, denoiser), probability_flow)


def _em_levels(m):
    return Multilevel([_drift(f) for f in m.levels], m.probs, coins=m.coins, level_key=m.level_key, control=m.control)


@pytest.mark.parametrize("name,control", [(name, None) for name in sorted(MULTILEVEL_SAMPLERS)] + [
    (name, "cached") for name in ("em", "dpm++2m", "sde-dpm++2m", "edm-heun")])
def test_multilevel_at_p_one_equals_the_finest_level(name, control):
    levels = levels_with_constant_corrections()
    run = MULTILEVEL_SAMPLERS[name]
    ts = uniform_grid(8)
    x = jax.random.normal(jax.random.key(4), (4,))
    ml = Multilevel(levels, jnp.ones(3), level_key=jax.random.key(5), control=control)
    if name == "em":
        ml = _em_levels(ml)
    sol = jax.jit(lambda x: run(ml, x, ts, jax.random.key(6)))(x)
    single = jax.jit(lambda x: run(levels[-1], x, ts, jax.random.key(6)))(x)
    # the same arithmetic up to XLA's fusion of a different program (bitwise in most samplers)
    np.testing.assert_allclose(sol.y, single, rtol=1e-5, atol=1e-6)
    calls = (2 if "heun" in name else 1) * 8
    np.testing.assert_array_equal(sol.evaluations, [calls] * 3)


@pytest.mark.parametrize("name,coins,control", [
    (name, coins, control) for name in ("dpm++2m", "sde-dpm++2m", "edm-heun", "em")
    for coins, control in (("iid", None), ("iid", "cached"))
] + [("dpm++2m", "stratified", None), ("sde-dpm++2m", "stratified", None), ("dpm++2m", "iid", "extrapolated"),
     ("edm-heun", "iid", "extrapolated"), ("unipc", "iid", None), ("unipc", "iid", "cached"),
     ("unipc", "stratified", None), ("unipc-bh1-3", "iid", None)])
def test_mean_over_level_keys_is_the_finest_level(name, coins, control):
    """Affine levels: E over level keys of the multilevel run = the finest level's run."""
    levels = levels_with_constant_corrections()
    run = MULTILEVEL_SAMPLERS[name]
    ts = uniform_grid(10, t_min=0.2)  # where EM's 10 steps stay stable (any grid has the property)
    x = jax.random.normal(jax.random.key(7), (4,))
    probs = jnp.array([1.0, 0.5, 0.25])

    def one(level_key):
        ml = Multilevel(levels, probs, coins=coins, level_key=level_key, control=control)
        return run(_em_levels(ml) if name == "em" else ml, x, ts, jax.random.key(8)).y

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchedLevelKeyWarning)  # per-key coins: every level runs, as wanted here
        ys = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(9), 2000)), np.float64)
    top = np.asarray(run(levels[-1], x, ts, jax.random.key(8)), np.float64)
    se = ys.std(0) / np.sqrt(ys.shape[0])
    assert np.all(se > 0)
    z = (ys.mean(0) - top) / se
    assert np.all(np.abs(z) < 4.0), z


@pytest.mark.parametrize("sampler,coins", [(ddim, "iid"), (sde_dpm_solver_pp, "stratified"), (edm_heun, "iid")])
def test_a_correction_that_scales_like_sigma_over_alpha_is_cancelled_exactly(sampler, coins):
    """eps-levels off by a constant v_k: D^k - D^{k-1} = (sigma / alpha) v, so the cache rescaled
    by sigma / alpha (the samplers' default) predicts every correction exactly after the first
    call, and the multilevel run is the finest level's whatever the coins."""
    v = (0.3, -0.2)
    levels = tuple((lambda t, x, a, c=c: gaussian_denoiser(t, x, a) + SDE.noise_to_signal(t) * c) for c in v) + (
        gaussian_denoiser,)
    ts, x = logsnr_grid(SDE, 12), jax.random.normal(jax.random.key(14), (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BiasedEstimatorWarning)
        ml = Multilevel(levels, jnp.array([1.0, 0.3, 0.1]), coins=coins, level_key=jax.random.key(15),
                        control="cached")
        sol = sampler(ml, SDE, x, ts, jax.random.key(16))
    assert sol.evaluations[2] < sol.evaluations[0]  # the top level was skipped on some calls
    np.testing.assert_allclose(sol.y, sampler(levels[-1], SDE, x, ts, jax.random.key(16)), rtol=2e-4, atol=2e-5)
    unscaled = sampler(Multilevel(levels, jnp.array([1.0, 0.3, 0.1]), level_key=jax.random.key(15),
                                  control="cached", control_scale=lambda t: 1.0), SDE, x, ts, jax.random.key(16))
    assert not np.allclose(unscaled.y, sol.y, rtol=1e-2)  # without the rescaling the cache is stale


def test_stratified_with_cache_is_biased_and_warns():
    """The warning is real: stratified coins with a cache miss the finest level's mean."""
    levels = levels_with_constant_corrections(1)
    ts = uniform_grid(10)
    x = jnp.zeros(1)
    with pytest.warns(BiasedEstimatorWarning):
        Multilevel(levels, jnp.array([1.0, 0.5, 0.25]), coins="stratified", control="cached")

    def one(level_key):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ml = Multilevel(levels, jnp.array([1.0, 0.5, 0.25]), coins="stratified", level_key=level_key,
                            control="cached")
        return dpm_solver_pp(ml, SDE, x, ts).y

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchedLevelKeyWarning)
        ys = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(10), 4000)), np.float64)
    top = np.asarray(dpm_solver_pp(levels[-1], SDE, x, ts), np.float64)
    z = (ys.mean(0) - top) / (ys.std(0) / np.sqrt(ys.shape[0]))
    assert np.all(np.abs(z) > 4.0), z


# the toy of docs/samplers.md: f^3 = -y + sin 3y + cos 2t, f^2 = -y + 0.8 sin 3y + 0.9 cos 2t, f^1 = -y
TOY = (lambda t, y, a: -y, lambda t, y, a: -y + 0.8 * jnp.sin(3 * y) + 0.9 * jnp.cos(2 * t),
       lambda t, y, a: -y + jnp.sin(3 * y) + jnp.cos(2 * t))


def coupled_rms(steps, control, diffusion, paths=2000):
    """RMS over level keys of ML-EM minus EM on f^3, with the same Brownian increments."""
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    g = None if diffusion is None else (lambda t, y, a: diffusion)
    probs = jnp.array([1.0, 0.3, 0.1])

    def one(key):
        noise_key, level_key = jax.random.split(key)
        ref = euler_maruyama(TOY[-1], g, jnp.zeros(()), ts, noise_key)
        sol = multilevel_euler_maruyama(TOY, probs, g, jnp.zeros(()), ts, noise_key, level_key=level_key,
                                        control=control)
        return sol.y - ref

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchedLevelKeyWarning)
        d = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(11), paths))
    return float(jnp.sqrt(jnp.mean(d**2)))


@pytest.mark.parametrize("diffusion,cached_order", [(0.5, 1.0), (None, 1.5)])
def test_strong_orders_cached_and_uncached(diffusion, cached_order):
    """iid coins: strong order 1/2; with the cache, order 1 on the SDE and 3/2 on the ODE."""
    steps = (100, 400)
    plain = [coupled_rms(n, None, diffusion) for n in steps]
    cached = [coupled_rms(n, "cached", diffusion) for n in steps]
    order = lambda e: np.log(e[0] / e[1]) / np.log(steps[1] / steps[0])
    assert abs(order(plain) - 0.5) < 0.15, plain
    assert abs(order(cached) - cached_order) < 0.2, cached
    assert cached[1] < plain[1] / 3


def test_skipping_survives_jit_vmap_in_a_multistep_sampler():
    levels = levels_with_constant_corrections()
    ts = logsnr_grid(SDE, 20)
    probs = jnp.array([1.0, 0.3, 0.1])

    def sample(x, level_key):
        return dpm_solver_pp(Multilevel(levels, probs, level_key=level_key, control="cached"), SDE, x, ts)

    xs = jax.random.normal(jax.random.key(12), (8, 4))
    jaxpr = jax.make_jaxpr(jax.vmap(sample, in_axes=(0, None)))(xs, jax.random.key(13))
    assert _count_primitive(jaxpr.jaxpr, "cond") == 2
    sol = jax.jit(jax.vmap(sample, in_axes=(0, None)))(xs, jax.random.key(13))
    ev = np.asarray(sol.evaluations)
    assert np.all(ev == ev[0]) and ev[0, 0] == 20 and ev[0, 2] < 20  # shared coins, the top level skipped


def test_bad_input_is_named():
    levels = levels_with_constant_corrections()
    x, ts = jnp.zeros(4), uniform_grid(5)
    with pytest.raises(TypeError, match="Multilevel: levels must be a non-empty sequence"):
        Multilevel(levels[0], jnp.ones(1))
    with pytest.raises(ValueError, match="control: expected None, 'cached' or 'extrapolated'"):
        Multilevel(levels, jnp.ones(3), control="lagged")
    with pytest.raises(ValueError, match="order: DPM-Solver"):
        dpm_solver_pp(levels[0], SDE, x, ts, order=4)
    with pytest.raises(ValueError, match="denoiser"):
        ddim(lambda t, x, a: x[:2], SDE, x, ts)
    with pytest.raises(TypeError, match="level_key: required"):
        ddim(Multilevel(levels, jnp.ones(3)), SDE, x, ts)  # an ODE sampler has no key to derive coins from
    with pytest.raises(ValueError, match="probs"):
        ddim(Multilevel(levels, jnp.ones(2), level_key=jax.random.key(0)), SDE, x, ts)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_lowers_its_order_where_steps_grow_fast(order):
    """On a uniform-in-t grid the last steps span most of the log-SNR range. Before the order
    was lowered there, 2M/3M erred 0.13/2.1 at 50 steps to t_min = 1e-9 and 0.027/0.070 to
    1e-3, worse than DDIM's 0.029/0.028 (issue 45). Now each is several times better than DDIM,
    and the first-order step's limit still converges: halving t_min does not change the error
    much."""
    x = jax.random.normal(jax.random.key(0), (2048,))
    for t_min in (1e-9, 1e-3):
        ts = uniform_grid(50, t_min=t_min)
        exact = exact_flow(x, ts[0], ts[-1])
        err = lambda o: float(jnp.sqrt(jnp.mean((dpm_solver_pp(gaussian_denoiser, SDE, x, ts, order=o) - exact) ** 2)))
        assert err(order) < 0.2 * err(1), (t_min, err(order), err(1))


def test_grids_and_samplers_refuse_zero_noise_and_wrong_directions():
    with pytest.raises(ValueError, match="t_min: expected 0 < t_min.*noise level is zero"):
        uniform_grid(10, t_min=0.0)
    with pytest.raises(ValueError, match="t_min: expected 0 < t_min"):
        logsnr_grid(SDE, 10, t_min=0)
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="ts: the diffusion samplers integrate from noise to data"):
        sde_dpm_solver_pp(gaussian_denoiser, SDE, x, jnp.linspace(1e-3, 1.0, 5), jax.random.key(0))
    with pytest.raises(ValueError, match=r"ts: the noise level std\(t\) is 0 at ts\[4\]"):
        dpm_solver_pp(gaussian_denoiser, SDE, x, jnp.linspace(1.0, 0.0, 5))
    # a traced grid cannot be checked at trace time, and still runs
    y = jax.jit(lambda ts: ddim(gaussian_denoiser, SDE, x, ts))(uniform_grid(4))
    assert np.all(np.isfinite(np.asarray(y)))
