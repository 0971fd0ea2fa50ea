"""Calibration: level statistics against exact values, allocations, fit_gamma, the
fixed-budget schedule, the report, and its bad inputs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax import FixedFirings, PiecewiseConstant, euler_maruyama, multilevel_euler_maruyama
from mlem_jax.calibrate import (
    calibrated_probabilities,
    calibration_report,
    correction_costs,
    expected_cost,
    fit_gamma,
    injected_variance,
    level_costs,
    level_statistics,
    optimal_probabilities,
    stratified_schedule,
)

import recursions
from recursions import em_moment_path

A = (0.5, 1.5, 1.2, 1.0)
B = (0.0, 0.5, 0.4, 0.3)
SIGMA = 0.3


def affine_levels(a=A, b=B):
    return recursions.affine_levels(a, b)


def g(t, y, args):
    return SIGMA


def test_level_variances_match_exact_values():
    """One bin per grid point, so every trajectory contributes one independent sample."""
    N, M = 8, 20_000
    ts = jnp.linspace(0.0, 1.0, N + 1)
    keys = jax.random.split(jax.random.key(0), M)
    y0 = jnp.ones(M)
    stats = level_statistics(affine_levels(), g, y0, ts, keys, num_bins=N)
    m, q = em_moment_path(A[-1], B[-1], np.asarray(ts, np.float64), 1.0, SIGMA)
    a_prev = np.concatenate([[0.0], A[:-1]])
    b_prev = np.concatenate([[0.0], B[:-1]])
    da, db = np.array(A) - a_prev, np.array(B) - b_prev
    exact = da**2 * q[:N, None] - 2 * da * db * m[:N, None] + db**2  # (N, K)
    # at t = 0 every trajectory starts at y0 = 1: no spread, only float32 rounding
    ok = np.abs(stats.variances - exact) <= 4 * stats.variance_se + 1e-5 * exact
    assert np.all(ok), (stats.variances, exact)
    assert np.all(stats.variance_se[1:] > 0)
    # the error of each level against the finest, Y = (a_K - a_k) X - (b_K - b_k) with X
    # Gaussian: E Y^2 is exact, and Var(Y^2) = 2 s^4 + 4 mu^2 s^2 gives its standard error
    ea, eb = A[-1] - np.array(A), B[-1] - np.array(B)
    mu = ea * m[:N, None] - eb
    s2 = ea**2 * (q[:N, None] - m[:N, None] ** 2)
    se = np.sqrt((2 * s2**2 + 4 * mu**2 * s2) / M)
    assert np.all(np.abs(stats.errors**2 - (mu**2 + s2)) <= 4 * se + 1e-5 * (mu**2 + s2))
    np.testing.assert_allclose(stats.errors[:, -2] ** 2, stats.variances[:, -1], rtol=1e-5)  # same quantity
    assert np.all(stats.check < 1)  # the MLMC consistency threshold
    assert np.all(np.isfinite(stats.kurtosis)) and np.all(stats.kurtosis[1:] >= 1)  # E Z^2 >= (E Z)^2


def test_time_dependent_allocation_beats_constant():
    rng = np.random.default_rng(0)
    V = np.exp(rng.normal(size=(6, 4))) * 4.0 ** -np.arange(4)
    C = correction_costs(2.0 ** (2.5 * np.arange(1, 5)))
    h, nu2 = 0.01, 1e-3
    p_t = optimal_probabilities(V, C, h, nu2)
    const = optimal_probabilities(V.mean(0), C, h, nu2)
    assert np.isclose(injected_variance(V, p_t, h), nu2, rtol=1e-9)
    # the constant schedule with the same variance, rescaled on the time-dependent V
    scale = np.logspace(-2, 2, 2001)
    for s in scale:
        q = np.minimum(1.0, np.concatenate([[1.0], s * const[1:]]))
        if injected_variance(np.broadcast_to(V, V.shape), np.broadcast_to(q, V.shape), h) <= nu2:
            break
    assert expected_cost(p_t, C, 100) < expected_cost(np.broadcast_to(q, V.shape), C, 100)


def test_budget_mode_spends_the_budget():
    V = np.array([[1.0, 0.3, 0.05, 0.01], [1.0, 0.05, 0.01, 0.001]])
    C = correction_costs([1.0, 4.0, 16.0, 64.0])
    p = optimal_probabilities(V, C, 0.01, budget=900.0, num_steps=100)
    assert np.isclose(expected_cost(p, C, 100), 900.0, rtol=1e-9)
    with pytest.raises(ValueError, match=r"budget: .* not above the cost of the cheapest level"):
        optimal_probabilities(V, C, 0.01, budget=50.0, num_steps=100)


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("gamma", [2.0, 2.5, 3.5])
def test_fit_gamma_recovers_known_gamma(gamma, offset):
    rng = np.random.default_rng(int(gamma * 10) + offset)
    cost = 4.0 ** np.arange(1, 11)
    err = 2.0 * cost ** (-1 / gamma) * np.exp(0.01 * rng.standard_normal(cost.size))
    if offset:
        err = err + 0.03
    fit = fit_gamma(cost, err, offset=offset)
    assert abs(fit.gamma - gamma) < 0.1, fit
    assert fit.low <= fit.gamma <= fit.high and fit.high - fit.low < 1.5, fit
    if offset:
        assert abs(fit.offset - 0.03) < 0.01


@pytest.mark.parametrize("offset, trials, floor", [(False, 300, 270), (True, 80, 68)])
def test_fit_gamma_interval_covers(offset, trials, floor):
    """The 95% interval covers the true gamma in about 95% of synthetic data sets; the
    floor is 4 binomial standard errors below 95%."""
    rng = np.random.default_rng(5)
    cost = 4.0 ** np.arange(1, 9)
    hits = 0
    for _ in range(trials):
        err = cost ** (-1 / 2.5) * np.exp(0.03 * rng.standard_normal(cost.size))
        fit = fit_gamma(cost, err + 0.02 * offset, offset=offset)
        hits += fit.low <= 2.5 <= fit.high
    assert hits >= floor, hits


def test_fit_gamma_with_loss_power_two():
    cost = 4.0 ** np.arange(1, 8)
    loss = 0.3 + 5.0 * cost ** (-2 / 2.5)
    fit = fit_gamma(cost, loss, offset=True, power=2.0)
    assert abs(fit.gamma - 2.5) < 0.1


def test_fixed_budget_fires_exact_counts():
    N = 50
    ts = jnp.linspace(0.0, 1.0, N + 1)
    levels = affine_levels()
    for seed in range(3):
        sol = multilevel_euler_maruyama(
            levels, FixedFirings((20, 7, 3)), g, 1.0, ts, jax.random.key(seed), coupling="nested"
        )
        np.testing.assert_array_equal(sol.evaluations, [N, 20, 7, 3])
        sol = multilevel_euler_maruyama(levels[:2], FixedFirings((9,)), g, 1.0, ts, jax.random.key(seed))
        np.testing.assert_array_equal(sol.evaluations, [N, 9])


@pytest.mark.parametrize("coupling", ["independent", "nested"])
def test_fixed_budget_is_unbiased(coupling):
    """Levels differing by state-independent corrections: the mean follows EM on f^K."""
    a = (1.0, 1.0, 1.0)
    b = (0.0, 2.0, 1.0)
    N, M = 10, 40_000
    ts = jnp.linspace(0.0, 1.0, N + 1)

    def one(k, lk):
        return multilevel_euler_maruyama(
            affine_levels(a, b), FixedFirings((3, 2)), g, jnp.float32(1.0), ts, k, level_key=lk, coupling=coupling
        ).y

    keys, level_keys = jax.random.split(jax.random.key(1), M), jax.random.split(jax.random.key(2), M)
    x = np.asarray(jax.jit(jax.vmap(one))(keys, level_keys))
    m, _ = em_moment_path(a[-1], b[-1], np.asarray(ts, np.float64), 1.0, SIGMA)
    se = x.std() / np.sqrt(M)
    assert abs(x.mean() - m[-1]) < 4 * se, (x.mean(), m[-1], se)
    # and the randomness is real: the spread exceeds plain EM's
    em_one = lambda k: euler_maruyama(affine_levels(a, b)[-1], g, 1.0, ts, k)
    em = np.asarray(jax.vmap(em_one)(jax.random.split(jax.random.key(1), M)))
    assert x.std() > 1.1 * em.std()


def test_piecewise_constant_schedule_in_the_solver():
    probs = PiecewiseConstant(jnp.array([0.0, 0.5, 1.0]), jnp.array([[1.0, 1.0], [1.0, 1e-3]]))
    ts = jnp.linspace(0.0, 1.0, 21)
    sol = multilevel_euler_maruyama(affine_levels()[:2], probs, g, 1.0, ts, jax.random.key(0))
    assert sol.evaluations[1] >= 10 and sol.evaluations[1] <= 11  # first half always, then rarely
    with pytest.raises(ValueError, match=r"probs\(t\): the first"):
        bad = PiecewiseConstant(jnp.array([0.0, 1.0]), jnp.array([[0.5, 0.5]]))
        multilevel_euler_maruyama(affine_levels()[:2], bad, g, 1.0, ts, jax.random.key(0))


def test_report_text_plot_and_usable_probs(tmp_path):
    M, N = 60, 20
    ts = jnp.linspace(0.0, 1.0, N + 1)
    keys = jax.random.split(jax.random.key(0), M)
    levels = affine_levels((1.5, 0.75, 1.125, 1.0), (0.3, 0.3, 0.3, 0.3))  # errors halve per level
    # FLOP-free affine levels cost the same: give synthetic costs that grow
    from mlem_jax.calibrate import LevelCosts

    costs = LevelCosts(np.array([1e-4, 4e-4, 1.6e-3, 6.4e-3]), np.array([1e6, 4e6, 1.6e7, 6.4e7]))
    report = calibration_report(levels, g, jnp.ones(M), ts, keys, costs=costs, num_bins=4)
    text = str(report)
    for word in ("level", "V_k", "kurtosis", "check", "gamma", "predicted cost"):
        assert word in text
    assert report.gamma is not None
    assert report.em_cost / report.mlem_cost == pytest.approx(4.0, rel=1e-6)  # default budget: EM / 4
    png = report.plot(str(tmp_path / "report.png"))
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3
    sol = multilevel_euler_maruyama(levels, report.probs, g, 1.0, ts, jax.random.key(1))
    assert np.isfinite(sol.y)


def test_level_costs_measures_time_and_flops():
    w_small, w_big = jnp.ones((16, 16)), jnp.ones((16, 512))
    small = lambda t, y, a: jnp.tanh(y @ w_small)
    big = lambda t, y, a: jnp.tanh(y @ w_big) @ w_big.T
    import warnings

    with warnings.catch_warnings():  # timings this small may not be ordered
        warnings.simplefilter("ignore", UserWarning)
        c = level_costs((small, big), 0.0, jnp.ones((64, 16)), repeats=3)
    assert c.flops[1] > 10 * c.flops[0] > 0
    assert np.all(c.seconds > 0)


def test_flops_of_counts_matrix_products_and_convolutions_exactly():
    """2 m n k for a product, 2 x outputs x taps for a VALID convolution: the count of the
    lowered program, which a GPU's compiled program (cuDNN custom calls) would not give."""
    from mlem_jax.calibrate import flops_of

    assert flops_of(lambda a, b: a @ b, jnp.zeros((16, 32)), jnp.zeros((32, 8))) == 2 * 16 * 32 * 8
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops_of(conv, jnp.zeros((2, 8, 8, 3)), jnp.zeros((3, 3, 3, 4))) == 2 * (2 * 6 * 6 * 4) * (3 * 3 * 3)


def test_empty_time_bins_are_named_as_such():
    """10 bins on a 10-step grid evaluated at every other step leave bins empty: a
    time-dependent schedule says so (not "zero variance"); a constant one still works."""
    stats = level_statistics(affine_levels(), g, jnp.ones(8), jnp.linspace(0, 1, 11),
                             jax.random.split(jax.random.key(0), 8), num_bins=10, stride=2)
    with pytest.raises(ValueError, match=r"num_bins: 5 of the 10 time bins hold no point"):
        calibrated_probabilities(stats, [1.0, 2.0, 4.0, 8.0], 0.1, budget=100.0, num_steps=10)
    with pytest.raises(ValueError, match=r"num_bins: 5 of the 10 time bins hold no point"):
        stratified_schedule(stats, [1.0, 2.0, 4.0, 8.0], 10, 100.0)
    p = calibrated_probabilities(stats, [1.0, 2.0, 4.0, 8.0], 0.1, budget=100.0, num_steps=10, time_dependent=False)
    assert np.asarray(p).shape == (4,)


def test_bad_inputs():
    stats_like = level_statistics(affine_levels(), g, jnp.ones(12), jnp.linspace(0, 1, 5),
                                  jax.random.split(jax.random.key(0), 12), num_bins=2)
    with pytest.raises(ValueError, match=r"costs: expected one cost per level \(4 levels"):
        calibrated_probabilities(stats_like, [1.0, 2.0, 3.0], 0.1, 1e-3)
    with pytest.raises(ValueError, match=r"variances: expected finite positive"):
        optimal_probabilities([1.0, np.nan], [1.0, 2.0], 0.1, 1e-3)
    with pytest.raises(ValueError, match=r"variances: expected finite positive"):
        optimal_probabilities([1.0, 0.0], [1.0, 2.0], 0.1, 1e-3)
    with pytest.warns(UserWarning, match=r"costs: the level costs do not increase"):
        calibrated_probabilities(stats_like, [4.0, 3.0, 2.0, 1.0], 0.1, 1e-3)
    with pytest.raises(ValueError, match=r"probs: FixedFirings gives the firings of levels 2..K"):
        multilevel_euler_maruyama(affine_levels(), FixedFirings((3,)), g, 1.0, jnp.linspace(0, 1, 5), jax.random.key(0))
    with pytest.raises(ValueError, match=r"probs: FixedFirings firings must lie in \[1, 4\]"):
        multilevel_euler_maruyama(affine_levels()[:2], FixedFirings((5,)), g, 1.0, jnp.linspace(0, 1, 5),
                                  jax.random.key(0))
    with pytest.raises(ValueError, match=r"keys: expected at least 6"):
        level_statistics(affine_levels(), g, jnp.ones(3), jnp.linspace(0, 1, 5), jax.random.split(jax.random.key(0), 3))
    with pytest.raises(ValueError, match=r"costs, errors: expected two 1-D arrays"):
        fit_gamma([1.0, 2.0, 3.0], [1.0, 2.0])


def test_report_speedup_and_exclusive_targets():
    from mlem_jax.calibrate import LevelCosts

    M, N = 12, 8
    ts = jnp.linspace(0.0, 1.0, N + 1)
    keys = jax.random.split(jax.random.key(0), M)
    levels = affine_levels((1.5, 0.75, 1.125, 1.0), (0.3, 0.3, 0.3, 0.3))
    costs = LevelCosts(np.array([1e-4, 4e-4, 1.6e-3, 6.4e-3]), np.full(4, np.nan))
    r = calibration_report(levels, g, jnp.ones(M), ts, keys, costs=costs, num_bins=2, speedup=2.0)
    assert r.em_cost / r.mlem_cost == pytest.approx(2.0, rel=1e-6)
    assert r.gamma is not None  # FLOPs unavailable: fitted against the times
    with pytest.raises(ValueError, match=r"give at most one"):
        calibration_report(levels, g, jnp.ones(M), ts, keys, costs=costs, speedup=2.0, budget=1.0)


# --------------------------------------------------------------- stratified coins


def test_stratified_calibration_predicts_the_measured_error():
    """The pilot-scaled schedule for a target error, measured again on fresh noise and fresh
    level keys, has the predicted coupled error: within 3 combined standard errors plus 25%
    for the log-log interpolation between pilots (a model error, not a sampling one)."""
    from test_coins import smooth_levels

    from mlem_jax.calibrate import level_statistics, stratified_probabilities

    levels, sigma = smooth_levels(4), lambda t, y, a: 0.5
    ts, M = jnp.linspace(0.0, 1.0, 101), 256
    keys = jax.random.split(jax.random.key(0), M)
    y0 = jnp.full(M, 0.5, jnp.float32)
    stats = level_statistics(levels, sigma, y0, ts, keys, num_bins=4)
    costs = np.array([1.0, 4.0, 16.0, 64.0])
    cal = stratified_probabilities(levels, sigma, y0, ts, keys, stats, costs, target_error=3e-3)
    assert cal.predicted_error == pytest.approx(3e-3, rel=1e-6)
    assert cal.predicted_cost < 0.5 * 100 * costs[-1]  # cheaper than EM on the finest level
    p = np.asarray(cal.probs.values)
    assert np.all(p[:, 0] == 1) and np.all((p > 0) & (p <= 1))
    # fresh noise, 16 level keys (the error varies with the coin plan as well as the noise)
    M2, groups = 4096, 16
    keys2 = jax.random.split(jax.random.key(9), M2).reshape(groups, -1)
    em = jax.vmap(jax.vmap(lambda k: euler_maruyama(levels[-1], sigma, jnp.float32(0.5), ts, k)))(keys2)
    ml = jax.lax.map(lambda kk: jax.vmap(lambda k: multilevel_euler_maruyama(
        levels, cal.probs, sigma, jnp.float32(0.5), ts, k, level_key=kk[1], coins="stratified").y)(kk[0]),
        (keys2, jax.random.split(jax.random.key(3), groups)))
    mse = np.mean(np.asarray(ml - em, np.float64) ** 2, axis=1)
    measured = np.sqrt(mse.mean())
    se = mse.std(ddof=1) / np.sqrt(groups) / (2 * measured)
    se_pred = np.interp(np.log(cal.scale), np.log(cal.pilots[:, 0]), cal.pilots[:, 3])
    assert abs(measured - cal.predicted_error) < 3 * np.hypot(se, se_pred) + 0.25 * cal.predicted_error
    # and iid coins at the same probabilities are far worse: stratification is what pays
    ml_iid = jax.vmap(jax.vmap(lambda k, lk: multilevel_euler_maruyama(
        levels, cal.probs, sigma, jnp.float32(0.5), ts, k, level_key=lk).y))(keys2, keys2)
    assert np.sqrt(np.mean(np.asarray(ml_iid - em) ** 2)) > 3 * measured


def test_stratified_calibration_bad_inputs():
    from mlem_jax.calibrate import LevelStatistics, stratified_probabilities

    stats = LevelStatistics(np.array([0.0, 1.0]), np.ones(1), np.ones((1, 2)), np.zeros((1, 2)), np.ones((1, 2)),
                            np.ones((1, 2)), np.ones((1, 2)), np.ones(2))
    levels, ts = affine_levels()[:2], jnp.linspace(0, 1, 11)
    keys, y0 = jax.random.split(jax.random.key(0), 16), jnp.ones(16)
    with pytest.raises(ValueError, match="target_error, budget: give exactly one"):
        stratified_probabilities(levels, g, y0, ts, keys, stats, [1.0, 2.0])
    with pytest.raises(ValueError, match="costs: expected 2 positive finite costs"):
        stratified_probabilities(levels, g, y0, ts, keys, stats, [1.0, -2.0], target_error=0.1)
    with pytest.raises(ValueError, match=r"budget: .* is not above the cost of the cheapest level alone"):
        stratified_probabilities(levels, g, y0, ts, keys, stats, [1.0, 2.0], budget=5.0)
    with pytest.raises(ValueError, match="num_pilots: expected at least 2"):
        stratified_probabilities(levels, g, y0, ts, keys, stats, [1.0, 2.0], target_error=0.1, num_pilots=1)


# ------------------------------------------------------------- calibration files


def test_calibration_file_round_trip_and_grid_binding(tmp_path):
    from mlem_jax.calibrate import check_calibration_use, load_calibration, save_calibration

    probs = PiecewiseConstant(jnp.array([0.0, 0.5, 1.0]), jnp.array([[1.0, 0.5], [1.0, 0.25]]))
    path = save_calibration(str(tmp_path / "c.json"), probs, levels=[4, 8], steps=50, grid="uniform",
                            coins="stratified", command="test")
    cal = load_calibration(path)
    np.testing.assert_array_equal(cal.probs.values, probs.values)
    assert (cal.steps, cal.grid, cal.coins, cal.coupling, cal.meta["command"]) == (50, "uniform", "stratified",
                                                                                  "independent", "test")
    check_calibration_use(cal, path, levels=[4, 8], steps=50, grid="uniform", coins="stratified",
                          coupling="independent")
    for kw, what in [({"steps": 20}, "a uniform grid of 50 steps"), ({"coins": "iid"}, "coins='stratified'"),
                     ({"levels": [8, 16]}, "levels [4, 8]"), ({"coupling": "nested"}, "coupling='independent'")]:
        use = dict(levels=[4, 8], steps=50, grid="uniform", coins="stratified", coupling="independent") | kw
        with pytest.raises(ValueError, match=re.escape(what)):
            check_calibration_use(cal, path, **use)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["values"][0].__setitem__(1, 1.5), r"every probability must lie in \(0, 1\]"),
    (lambda c: c["values"][0].__setitem__(0, 0.5), "the first level must have probability 1"),
    (lambda c: c["values"][1].__setitem__(1, float("nan")), "and NaN"),
    (lambda c: c.__setitem__("edges", [1.0, 0.5, 0.0]), "finite and increasing"),
    (lambda c: c.pop("edges"), "missing the field 'edges'"),
    (lambda c: c.__setitem__("values", [[1.0, 0.5]]), r"expected values of shape \(bins, 2\)"),
])
def test_bad_calibration_files_are_refused_on_load(tmp_path, edit, message):
    import json

    from mlem_jax.calibrate import load_calibration

    record = {"levels": [4, 8], "edges": [0.0, 0.5, 1.0], "values": [[1.0, 0.5], [1.0, 0.25]], "steps": 10,
              "grid": "uniform"}
    edit(record)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(record).replace("NaN", "NaN"))
    with pytest.raises(ValueError, match=message):
        load_calibration(str(path))
    path.write_text('{"levels": [4, 8], "edg')
    with pytest.raises(ValueError, match=r"calibration .*bad.json: not valid JSON"):
        load_calibration(str(path))


def test_the_report_warns_when_its_probabilities_predict_noise():
    """A large speedup on levels whose corrections are of the order of the state: the predicted coupled
    RMS error exceeds the scale of the states, which the CLI refuses and the library warns about."""
    import warnings

    import jax
    import jax.numpy as jnp

    from mlem_jax.calibrate import LevelCosts, calibration_report

    levels = (lambda t, y, a: -y, lambda t, y, a: -y + 30.0 * jnp.sin(5 * y),
              lambda t, y, a: -y + 32.0 * jnp.sin(5 * y))
    ts = jnp.linspace(0.0, 1.0, 41)
    costs = LevelCosts(seconds=(1.0, 10.0, 100.0), flops=(1.0, 10.0, 100.0))
    kw = dict(costs=costs, cost_unit="flops", num_bins=2)
    y0 = jnp.ones((8, 4))
    with pytest.warns(UserWarning, match=r"calibrated_probabilities: these probabilities predict a coupled RMS "):
        report = calibration_report(levels, None, y0, ts, jax.random.split(jax.random.key(0), 8), speedup=20, **kw)
    assert report.predicted_error > 1.0
    with pytest.warns(UserWarning, match=r"calibration_report: the probabilities predict a coupled RMS error of"):
        calibration_report(levels, None, jnp.ones((16, 4)), ts, jax.random.split(jax.random.key(0), 16),
                           speedup=20, coins="stratified", num_pilots=2, **kw)
    with warnings.catch_warnings():  # at p = 1 nearly everywhere (speedup 1.05) the error is small: no warning
        warnings.simplefilter("error", UserWarning)
        calm = calibration_report(levels, None, y0, ts, jax.random.split(jax.random.key(0), 8), speedup=1.05, **kw)
    assert calm.predicted_error < 1.0
