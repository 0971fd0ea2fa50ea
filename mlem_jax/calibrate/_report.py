"""The calibration report: costs, statistics, probabilities and gamma in one call, as text and a plot."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax._schedules import PiecewiseConstant, schedule_values
from mlem_jax._validate import check_ts
from mlem_jax.calibrate._allocation import correction_costs, expected_cost, injected_variance
from mlem_jax.calibrate._closed_form import calibrated_probabilities
from mlem_jax.calibrate._costs import LevelCosts, level_costs
from mlem_jax.calibrate._gamma import GammaFit, fit_gamma
from mlem_jax.calibrate._statistics import LevelStatistics, cached_variances, level_statistics
from mlem_jax.calibrate._stratified import stratified_probabilities


class CalibrationReport(NamedTuple):
    """Everything `calibration_report` measured and chose; `str(report)` is the table."""

    costs: LevelCosts
    cost_basis: np.ndarray  # the costs the allocation used (seconds or FLOPs)
    cost_unit: str
    stats: LevelStatistics
    probs: Any  # PiecewiseConstant or array (K,): pass it as `probs`
    mean_probs: np.ndarray  # (K,) time-averaged p_k
    gamma: GammaFit | None
    num_steps: int
    num_trajectories: int
    span: float
    em_cost: float  # expected cost per trajectory of EM on the finest level
    mlem_cost: float  # expected cost per trajectory of ML-EM with `probs`
    injected_variance: float  # nu^2 per unit time (what iid coins inject)
    device: str
    coins: str = "iid"
    predicted_error: float = math.nan  # coupled RMS error per component: sqrt(T nu^2 / D) for iid
    pilots: np.ndarray | None = None  # stratified: the pilot runs (see StratifiedCalibration)
    solver: str = "EM"  # the sampler calibrated for (em_cost is its cost on the finest level)
    control: str | None = None

    def __str__(self) -> str:
        return format_report(self)

    def plot(self, path: str) -> str:
        return plot_report(self, path)


def _default_budget(speedup, em_cost, num_steps, basis, coupling, control) -> float:
    """EM's cost / `speedup` (4 by default, the paper's headline), never below the cheapest level on every
    call (and, with a cache, its first call's firings)."""
    speedup = 4.0 if speedup is None else speedup
    if not speedup > 0:
        raise InputError(f"speedup: expected a positive factor, got {speedup}.")
    first_call = float(np.sum(correction_costs(basis, coupling)[1:])) if control is not None else 0.0
    return max(em_cost / speedup, num_steps * basis[0] * 1.05 + first_call)


def calibration_report(
    drifts: Sequence[Callable],
    diffusion: Callable | None,
    y0: Any,
    ts,
    keys,
    args=None,
    *,
    costs: LevelCosts | None = None,
    cost_unit: str = "seconds",
    num_bins: int = 10,
    target_variance: float | None = None,
    budget: float | None = None,
    speedup: float | None = None,
    time_dependent: bool = True,
    coupling: str = "independent",
    coins: str = "iid",
    target_error: float | None = None,
    stride: int = 1,
    num_pilots: int = 6,
    progress: bool = False,
    solver: Callable | None = None,
    control: str | None = None,
    control_scale: Callable | None = None,
    solver_name: str = "EM",
    weighting: str = "linear",
) -> CalibrationReport:
    """Measure costs and statistics, choose probabilities and fit gamma, in one call.

    With coins="stratified" the probabilities come from `stratified_probabilities` (pilot
    runs on the reference trajectories), for a `target_error` (coupled RMS per state
    component), a `budget` or a `speedup`; `target_variance` is an iid-coins notion.

    `y0` and `keys` are the batch of reference trajectories (stacked initial states and
    one key each). Level costs are measured on a batched evaluation at (ts[0], y0) unless
    given. Give a `target_variance`, an absolute `budget` per trajectory, or a `speedup`
    (budget = EM's cost on the finest level / speedup); the default is `speedup=4`
    (the paper's headline), never below the cost of the cheapest level alone.

    `solver`, `control` and `control_scale` calibrate another sampler than EM, and the
    cached control variate, as in `level_statistics`: the statistics are taken at that
    sampler's model calls, the costs count its calls, the speedup is against the same
    sampler on the finest level alone, and stratified pilots are coupled to it;
    `solver_name` names it in the report; `weighting` as in `level_statistics`
    ("propagated" for the diffusion samplers).

    Args:
      drifts: f^1..f^K, cheapest first.
      diffusion: g(t, y, args), or None for an ODE.
      y0: the reference trajectories' initial states (stacked).
      ts: the grid.
      keys: one key per trajectory.
      args: passed to the drifts.
      costs: measured `LevelCosts` (default: measured here).
      cost_unit: "seconds" or "flops": which costs the probabilities weigh.
      num_bins: time bins of the statistics and the schedule.
      target_variance: injected variance per unit time to hold (iid coins).
      budget: the expected cost per trajectory to spend.
      speedup: budget = the finest level's cost alone / speedup.
      time_dependent: one row of probabilities per time bin.
      coupling: "independent" or "nested".
      coins: "iid" or "stratified".
      target_error: the coupled RMS error to reach (stratified coins).
      stride: statistics at every stride-th model call.
      num_pilots: pilot runs of the stratified calibration.
      progress: a bar over the pilots.
      solver: calibrate for this sampler instead of EM.
      control: None or "cached".
      control_scale: as in `level_statistics`.
      solver_name: the sampler's name in the report.
      weighting: "linear" or "propagated", as in `level_statistics`.
    """
    ts = check_ts(ts)
    drifts = tuple(drifts)
    _check_targets(coins, control, target_variance, budget, speedup, target_error)
    costs, basis, measured = _cost_basis(costs, cost_unit, drifts, ts, y0, args)
    stats = level_statistics(drifts, diffusion, y0, ts, keys, args, num_bins=num_bins, stride=stride,
                             solver=solver, control=control, control_scale=control_scale, weighting=weighting)
    num_steps = int(stats.num_calls)  # the solver's model calls (the steps, for EM)
    span, h = float(abs(ts[-1] - ts[0])), float(stats.step_size)
    em_cost = num_steps * basis[-1]
    if target_variance is None and budget is None and target_error is None:
        budget = _default_budget(speedup, em_cost, num_steps, basis, coupling, control)
    with warnings.catch_warnings():
        if measured:  # level_costs has already warned about the order of the costs
            warnings.simplefilter("ignore", UserWarning)
        if coins == "stratified":
            strat = stratified_probabilities(
                drifts, diffusion, y0, ts, keys, stats, basis, target_error=target_error,
                budget=None if target_error is not None else budget, coupling=coupling,
                time_dependent=time_dependent, num_pilots=num_pilots, args=args, progress=progress, solver=solver,
            )
            probs, pilots = strat.probs, strat.pilots
        else:
            probs, pilots = calibrated_probabilities(
                stats, basis, h, target_variance, budget=budget, num_steps=num_steps,
                time_dependent=time_dependent, coupling=coupling, control=control,
            ), None
    p, w, nu2, mlem_cost = _predicted(stats, probs, basis, coupling, control, ts[0])
    d = jax.devices()[0]
    size = sum(int(np.prod(np.shape(leaf)[1:])) for leaf in jax.tree_util.tree_leaves(y0))
    predicted = strat.predicted_error if coins == "stratified" else math.sqrt(span * nu2 / max(size, 1))
    if coins == "stratified" or control is not None:  # iid coins: calibrated_probabilities has warned
        _warn_if_noise(predicted, y0)
    return CalibrationReport(
        costs, basis, cost_unit, stats, probs, w @ p, _gamma_of(costs, stats), num_steps, int(np.shape(keys)[0]),
        span, em_cost, mlem_cost, nu2, f"{d.platform} ({getattr(d, 'device_kind', d.platform)})",
        coins, predicted, pilots, solver_name, control,
    )


def _warn_if_noise(predicted, y0) -> None:
    """Warn when the predicted coupled RMS error exceeds the RMS of the initial states (for a diffusion model,
    the prior's unit scale: the limit at which `mlem-jax calibrate` refuses): the samples would be noise."""
    scale = math.sqrt(float(sum(np.sum(np.square(np.asarray(leaf, np.float64)))
                                for leaf in jax.tree_util.tree_leaves(y0)))
                      / max(1, sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(y0))))
    if predicted is not None and scale > 0 and predicted > scale:
        warnings.warn(f"calibration_report: the probabilities predict a coupled RMS error of {predicted:.3g} per "
                      f"component, more than the scale of the states themselves (RMS of y0: {scale:.3g}); the "
                      "samples would be dominated by the estimator's noise. Ask for less (a smaller speedup or "
                      "budget cut), or use coins='stratified'.", UserWarning, stacklevel=3)


def _check_targets(coins, control, target_variance, budget, speedup, target_error) -> None:
    if sum(x is not None for x in (target_variance, budget, speedup, target_error)) > 1:
        raise InputError("target_variance, budget, speedup, target_error: give at most one of them.")
    if coins not in ("iid", "stratified"):
        raise InputError(f"coins: expected 'iid' or 'stratified', got {coins!r}.")
    if control is not None and coins != "iid":
        raise InputError(f"control: {control!r} is unbiased with coins='iid' only (a stratified coin depends on "
                         "earlier firings); calibrate coins='iid' with it, or stratified coins without it.")
    if coins == "iid" and target_error is not None:
        raise InputError("target_error: for iid coins give target_variance (nu^2 = T * error^2 per unit time).")
    if coins == "stratified" and target_variance is not None:
        raise InputError(
            "target_variance: the injected variance describes iid coins; for coins='stratified' give "
            "target_error (the coupled RMS error per state component), a budget or a speedup."
        )


def _cost_basis(costs, cost_unit, drifts, ts, y0, args):
    """(costs, the basis the allocation uses, whether they were measured here)."""
    if cost_unit not in ("seconds", "flops"):
        raise InputError(f"cost_unit: expected 'seconds' or 'flops', got {cost_unit!r}.")
    measured = costs is None
    if measured:
        batched = [jax.vmap(f, in_axes=(None, 0, None)) for f in drifts]
        costs = level_costs(batched, ts[0], y0, args)
    basis = np.asarray(costs.seconds if cost_unit == "seconds" else costs.flops, np.float64)
    if basis.shape != (len(drifts),):
        raise InputError(f"costs: expected one cost per level ({len(drifts)} drifts), got {basis.size}.")
    if np.any(~np.isfinite(basis)) or np.any(basis <= 0):
        raise InputError(f"costs: the {cost_unit} of every level must be positive and finite, got {basis}.")
    return costs, basis, measured


def _predicted(stats, probs, basis, coupling, control, t_first):
    """(p (bins, K), bin weights, injected variance nu^2, expected cost per trajectory)."""
    p = schedule_values(probs)
    w = stats.bin_weights if p.shape[0] > 1 else np.ones(1)
    V = stats.variances if p.shape[0] > 1 else stats.time_averaged("variances")[None]
    if control is not None:
        R = stats.residuals if p.shape[0] > 1 else stats.time_averaged("residuals")[None]
        V = np.concatenate([V[:, :1], cached_variances(R, p)[:, 1:]], axis=1)
    Ct = correction_costs(basis, coupling)
    nu2 = injected_variance(V, p, stats.step_size, bin_weights=w)
    mlem_cost = expected_cost(p, Ct, stats.num_calls, bin_weights=w)
    if control is not None:  # the first call fires every level (the caches start from an observation)
        first = np.asarray(probs(t_first), np.float64) if isinstance(probs, PiecewiseConstant) else p[0]
        mlem_cost += float(np.sum(Ct[1:] * (1 - first[1:])))
    return p, w, nu2, mlem_cost


def _gamma_of(costs, stats):
    """gamma fitted on the levels below the finest (FLOPs if known), or None."""
    err = stats.time_averaged("errors")[:-1]
    flops = np.asarray(costs.flops, np.float64)
    x = flops[:-1] if np.all(np.isfinite(flops)) and np.all(flops > 0) else np.asarray(costs.seconds)[:-1]
    if err.size >= 3 and np.all(err > 0) and np.all(np.diff(err) < 0):
        try:
            return fit_gamma(x, err)
        except ValueError:
            return None
    return None


def format_report(r: CalibrationReport) -> str:
    """The calibration report as text: per-level statistics with standard errors, the
    probabilities, the predicted cost and error."""
    st = r.stats
    V = st.time_averaged("variances")
    se = np.sqrt(np.asarray(st.bin_weights) ** 2 @ np.asarray(st.variance_se) ** 2)
    mean = st.time_averaged("means")
    kurt = st.time_averaged("kurtosis")
    p = schedule_values(r.probs)
    lines = [
        f"multilevel {r.solver} calibration report" + ("" if r.control is None else f" (control={r.control!r})"),
        f"device {r.device}; {len(V)} levels, {r.num_trajectories} reference trajectories, "
        f"{r.num_steps} model calls over a span of {r.span:g}, {len(st.bin_weights)} time bins",
        "",
        f"{'level':>5} {'cost ms':>10} {'GFLOP':>10} {'V_k':>11} {'+-':>9} {'mean':>11} {'kurtosis':>9} "
        f"{'check':>7} {'p_k mean':>9} {'p_k min':>9} {'p_k max':>9}",
    ]
    for k in range(len(V)):
        lines.append(
            f"{k + 1:5d} {1e3 * r.costs.seconds[k]:10.4g} {r.costs.flops[k] / 1e9:10.4g} {V[k]:11.4e} "
            f"{se[k]:9.2e} {mean[k]:11.4e} {kurt[k]:9.2f} {st.check[k]:7.2f} {r.mean_probs[k]:9.4f} "
            f"{p[:, k].min():9.4f} {p[:, k].max():9.4f}"
        )
    lines.append("")
    lines.append(f"V_k = E|f^k - f^(k-1)|^2 at the model calls of {r.solver} on the finest level (level 1: "
                 "E|f^1|^2), in EM units;")
    lines.append("check > 1 flags an inconsistent telescoping sum (MLMC test); kurtosis = E|D|^4 / (E|D|^2)^2.")
    err = st.time_averaged("errors")
    lines.append("RMS error of each level against the finest: " + ", ".join(f"{e:.3e}" for e in err))
    if r.gamma is not None:
        g = r.gamma
        lines.append(f"gamma (error ~ cost^(-1/gamma), levels 1..K-1): {g.gamma:.2f}, 95% CI [{g.low:.2f}, "
                     f"{g.high:.2f}]")
    else:
        lines.append("gamma: not fitted (needs at least 3 levels below the finest with decreasing errors)")
    unit = "ms" if r.cost_unit == "seconds" else "GFLOP"
    scale = 1e3 if r.cost_unit == "seconds" else 1e-9
    cost_line = (
        f"predicted cost per trajectory ({r.cost_unit}): {r.solver} on the finest level {r.em_cost * scale:.4g} "
        f"{unit}, multilevel {r.mlem_cost * scale:.4g} {unit}, ratio {r.em_cost / r.mlem_cost:.2f}x"
    )
    if r.coins == "stratified":
        lines.append(f"coins: stratified; probabilities p_k(t) = min(1, lambda (V_k / C_k)^(1/3)), lambda from "
                     f"{len(r.pilots)} pilot runs coupled to {r.solver} on the finest level:")
        for lam, c, e, se in r.pilots:
            lines.append(f"  lambda {lam:9.4g}  cost {c * scale:10.4g} {unit}  coupled RMS {e:.4e} +- {se:.1e}")
        lines.append(f"{cost_line}, at a coupled RMS error per component of about {r.predicted_error:.3e} "
                     "(interpolated from the pilots)")
    else:
        lines.append(f"coins: iid; {cost_line}, at an injected variance nu^2 = {r.injected_variance:.3e} per unit "
                     f"time (coupled RMS error per component about sqrt(T nu^2 / D) = {r.predicted_error:.3e})")
    return "\n".join(lines)


def plot_report(r: CalibrationReport, path: str) -> str:
    """A PNG with V_k(t) and the chosen p_k(t)."""
    from mlem_jax.plotting import pyplot

    plt = pyplot()
    st = r.stats
    mid = (st.bin_edges[1:] + st.bin_edges[:-1]) / 2
    p = schedule_values(r.probs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for k in range(st.variances.shape[1]):
        axes[0].semilogy(mid, st.variances[:, k], "o-", ms=3, label=f"k={k + 1}")
        edges = st.bin_edges
        values = p[:, k] if p.shape[0] > 1 else np.full(len(edges) - 1, p[0, k])
        axes[1].step(edges, np.append(values, values[-1]), where="post", label=f"k={k + 1}")
    axes[0].set(title="V_k(t) = E|f^k - f^(k-1)|^2", xlabel="t")
    axes[1].set(title="chosen p_k(t)", xlabel="t", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
