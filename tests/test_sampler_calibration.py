"""Calibration for any sampler (issue 22, item 3): where a sampler calls its model and with
what weight, and the variance its multilevel estimate injects, with and without the cached
control variate, against exact values on levels whose corrections do not depend on the
state (then every sampler is affine in the coin noise and the variance is exact)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax import Multilevel, euler_maruyama, heun
from mlem_jax.calibrate import (
    cached_variances,
    calibrated_probabilities,
    calibration_report,
    injected_variance,
    level_statistics,
    solver_calls,
    stratified_probabilities,
)
from mlem_jax.diffusion import VP, ddim, dpm_solver_pp, edm_heun, logsnr_grid

SDE = VP()
DIM = 8
DIRECTIONS = jax.random.normal(jax.random.key(5), (4, DIM))


def state_free_levels(K=4):
    """D^k(t, x) = s(t) sum_{j <= k} 0.5^j u_j cos(t / 2 + j) with s = sigma / alpha (an
    eps-network's error enters D so): independent of x, so the corrections
    c_k(t) = s(t) 0.5^k u_k cos(t / 2 + k) are deterministic."""
    def level(k):
        def D(t, x, args):
            parts = [0.5**j * DIRECTIONS[j] * jnp.cos(t / 2 + j) for j in range(k + 1)]
            return (SDE.noise_to_signal(t) * sum(parts)).astype(x.dtype)
        return D
    return tuple(level(k) for k in range(K))


def test_solver_calls_give_each_solvers_own_coefficients():
    ts = jnp.linspace(1.0, 0.0, 11)
    f = lambda t, y, a: -y + t
    y0, key = jnp.ones(3), jax.random.key(0)
    t, c, states = solver_calls(lambda m, y, k: euler_maruyama(m, lambda t, y, a: 0.5, y, ts, k), f, y0, key)
    np.testing.assert_allclose(t, ts[:-1])
    np.testing.assert_allclose(c, np.diff(np.asarray(ts)), rtol=1e-5)  # EM: h_n
    path = euler_maruyama(f, lambda t, y, a: 0.5, y0, ts, key, saveat="all")
    np.testing.assert_allclose(states, path[:-1], rtol=1e-6)  # the states the calls were made at
    t, c, _ = solver_calls(lambda m, y, k: heun(m, None, y, ts, k), f, y0, key)
    assert t.shape == (20,)
    np.testing.assert_allclose(c, np.repeat(np.diff(np.asarray(ts)), 2) / 2, rtol=1e-5)  # h / 2 per call
    # DDIM: D_n enters x_{n+1} with alpha_{n+1}(1 - e^{-h_n}), carried to the end by sigma_N / sigma_{n+1}
    g = logsnr_grid(SDE, 10)
    D = lambda t, x, a: 0.3 * x
    _, c, _ = solver_calls(lambda m, y, k: ddim(m, SDE, y, g, k), D, y0, key)
    a, s = np.asarray(SDE.alpha(g), np.float64), np.asarray(SDE.std(g), np.float64)
    h = np.diff(np.log(a / s))
    np.testing.assert_allclose(c, a[1:] * -np.expm1(-h) * s[-1] / s[1:], rtol=1e-4)
    # every sampler reproduces a constant data prediction: the coefficients sum to ~alpha / alpha = 1
    for solve in (lambda m, y, k: dpm_solver_pp(m, SDE, y, g, k, order=3), lambda m, y, k: edm_heun(m, SDE, y, g, k)):
        _, c, _ = solver_calls(solve, D, y0, key)
        assert float(jnp.sum(c)) == pytest.approx(1.0, abs=1e-3)


def _measured_variance(levels, probs, solve, y0, num_keys, control=None):
    """E|y - y_K|^2 over level keys (one trajectory), with its standard error."""
    exact = solve(levels[-1], y0, jax.random.key(0))
    run = jax.jit(jax.vmap(lambda lk: solve(Multilevel(levels, probs, level_key=lk, control=control), y0,
                                            jax.random.key(0)).y))
    sq = np.sum(np.asarray(run(jax.random.split(jax.random.key(11), num_keys)) - exact, np.float64) ** 2, axis=1)
    return sq.mean(), sq.std(ddof=1) / np.sqrt(num_keys)


@pytest.mark.parametrize("control", [None, "cached"])
@pytest.mark.parametrize("name", ["dpm++2m", "edm-heun"])
def test_predicted_variance_is_exact_for_state_free_corrections(name, control):
    """span * nu^2 from the statistics at the sampler's calls equals the measured variance of
    its multilevel result over level keys (4 standard errors): the weights, the bins and, with
    the cache, the geometric gaps and the sigma/alpha rescaling are all exact here."""
    levels = state_free_levels()
    g = logsnr_grid(SDE, 12)
    if name == "dpm++2m":
        solve = lambda m, y, k: dpm_solver_pp(m, SDE, y, g, k)
    else:
        solve = lambda m, y, k: edm_heun(m, SDE, y, g, k)
    M = 6
    y0 = jax.random.normal(jax.random.key(1), (M, DIM))
    stats = level_statistics(levels, None, y0, g, jax.random.split(jax.random.key(2), M), num_bins=3,
                             solver=solve, control=control, control_scale=SDE.noise_to_signal)
    assert stats.num_calls == (12 if name == "dpm++2m" else 24)
    p = jnp.array([1.0, 0.5, 0.3, 0.2])
    p_bins = np.tile(np.asarray(p, np.float64), (3, 1))
    V = stats.variances if control is None else np.concatenate(
        [stats.variances[:, :1], cached_variances(stats.residuals, p_bins)[:, 1:]], axis=1)
    span = float(abs(g[-1] - g[0]))
    predicted = span * injected_variance(V, p_bins, stats.step_size, bin_weights=stats.bin_weights)
    measured, se = _measured_variance(levels, p, solve, y0[0], 4000, control)
    assert abs(measured - predicted) < 4 * se, (measured, predicted, se)
    if control is not None:  # smooth corrections: the cache injects much less than the plain estimator
        assert predicted < 0.5 * span * injected_variance(stats.variances, p_bins, stats.step_size,
                                                          bin_weights=stats.bin_weights)


def test_cached_allocation_meets_its_target_at_a_lower_cost():
    """The fixed point's cached variance meets the target variance, and costs less than the
    closed-form allocation without the control for the same target."""
    from mlem_jax.calibrate import correction_costs, expected_cost

    levels = state_free_levels()
    g = logsnr_grid(SDE, 16)
    solve = lambda m, y, k: dpm_solver_pp(m, SDE, y, g, k)
    M = 6
    y0 = jax.random.normal(jax.random.key(1), (M, DIM))
    stats = level_statistics(levels, None, y0, g, jax.random.split(jax.random.key(2), M), num_bins=4,
                             solver=solve, control="cached", control_scale=SDE.noise_to_signal)
    costs = np.array([1.0, 4.0, 16.0, 64.0])
    target = 0.2 * injected_variance(stats.variances, np.full((4, 4), 0.5), stats.step_size, stats.bin_weights)
    plain = calibrated_probabilities(stats, costs, stats.step_size, target)
    cached = calibrated_probabilities(stats, costs, stats.step_size, target, control="cached")
    p = np.asarray(cached.values, np.float64)
    assert np.all(p[:, 0] == 1) and np.all((p > 0) & (p <= 1))
    V = np.concatenate([stats.variances[:, :1], cached_variances(stats.residuals, p)[:, 1:]], axis=1)
    assert injected_variance(V, p, stats.step_size, stats.bin_weights) == pytest.approx(target, rel=1e-3)
    Ct = correction_costs(costs)
    cost = lambda q: expected_cost(np.asarray(q.values), Ct, stats.num_calls, bin_weights=stats.bin_weights)
    assert cost(cached) < 0.8 * cost(plain)
    # with a budget, the first call (every level fires) is charged: the total stays within it
    budget = 0.5 * stats.num_calls * costs[-1]
    q = np.asarray(calibrated_probabilities(stats, costs, stats.step_size, budget=budget, num_steps=stats.num_calls,
                                            control="cached").values, np.float64)
    first = q[-1]  # the bin of t = 1, where the sampler starts
    total = expected_cost(q, Ct, stats.num_calls, bin_weights=stats.bin_weights) + np.sum(Ct[1:] * (1 - first[1:]))
    assert 0.9 * budget < total <= budget * (1 + 1e-9)


@pytest.mark.filterwarnings("ignore:costs")
def test_stratified_pilots_are_coupled_to_the_same_sampler():
    """With a solver, the pilots measure the multilevel sampler against the same sampler on
    the finest level: the chosen schedule's error, measured again on fresh level keys,
    matches the prediction (3 standard errors plus 25% for the interpolation), and the
    report counts the sampler's calls."""
    levels = state_free_levels()
    g = logsnr_grid(SDE, 20)
    solve = lambda m, y, k: ddim(m, SDE, y, g, k)
    M = 64
    y0 = jax.random.normal(jax.random.key(1), (M, DIM))
    keys = jax.random.split(jax.random.key(2), M)
    stats = level_statistics(levels, None, y0, g, keys, num_bins=2, solver=solve)
    costs = np.array([1.0, 4.0, 16.0, 64.0])
    cal = stratified_probabilities(levels, None, y0, g, keys, stats, costs, budget=0.4 * 20 * 64, solver=solve)
    exact = solve(levels[-1], y0[0], None)
    run = jax.jit(jax.vmap(lambda lk: solve(Multilevel(levels, cal.probs, coins="stratified", level_key=lk),
                                            y0[0], None).y))
    mse = np.mean(np.asarray(run(jax.random.split(jax.random.key(8), 64)) - exact, np.float64) ** 2, axis=1)
    measured = np.sqrt(mse.mean())
    se = mse.std(ddof=1) / np.sqrt(mse.size) / (2 * measured)
    se_pred = np.interp(np.log(cal.scale), np.log(cal.pilots[:, 0]), cal.pilots[:, 3])
    assert abs(measured - cal.predicted_error) < 3 * np.hypot(se, se_pred) + 0.25 * cal.predicted_error
    report = calibration_report(levels, None, y0[:8], g, keys[:8], costs=None, num_bins=2, speedup=2.0,
                                solver=solve, solver_name="ddim")
    assert report.num_steps == 20 and "multilevel ddim calibration report" in str(report)
    assert report.em_cost == pytest.approx(20 * report.cost_basis[-1])


@pytest.mark.filterwarnings("ignore:costs")
def test_sampler_calibration_bad_input():
    levels = state_free_levels(2)
    g = logsnr_grid(SDE, 6)
    y0 = jnp.zeros((6, DIM))
    keys = jax.random.split(jax.random.key(0), 6)
    solve = lambda m, y, k: ddim(m, SDE, y, g, k)
    with pytest.raises(ValueError, match="stride: .*stride=1"):
        level_statistics(levels, None, y0, g, keys, stride=2, solver=solve, control="cached")
    with pytest.raises(ValueError, match="control: .*extrapolated"):
        level_statistics(levels, None, y0, g, keys, solver=solve, control="extrapolated")
    with pytest.raises(TypeError, match="solver: .*no .y"):
        level_statistics(levels, None, y0, g, keys, solver=lambda m, y, k: ddim(m, SDE, y, g, k).y)
    stats = level_statistics(levels, None, y0, g, keys, num_bins=2, solver=solve)
    with pytest.raises(ValueError, match="control: these statistics hold no residuals"):
        calibrated_probabilities(stats, np.array([1.0, 2.0]), stats.step_size, 1e-3, control="cached")
    with pytest.raises(ValueError, match="control: 'cached' is unbiased with coins='iid' only"):
        calibration_report(levels, None, y0, g, keys, solver=solve, control="cached", coins="stratified",
                           speedup=2.0)
