"""Stratified coins: the cube-root shape of p_k(t) and its scale from pilot runs."""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax._multilevel import Multilevel
from mlem_jax._schedules import PiecewiseConstant
from mlem_jax._validate import check_coupling, check_ts
from mlem_jax.calibrate._allocation import correction_costs, expected_cost
from mlem_jax.calibrate._closed_form import check_bins
from mlem_jax.calibrate._statistics import LevelStatistics, _default_solver


class StratifiedCalibration(NamedTuple):
    """What `stratified_probabilities` measured and chose.

    probs: the schedule (PiecewiseConstant, or an array (K,) when not time dependent).
    scale: the chosen lambda of p = min(1, lambda * shape).
    predicted_error, predicted_cost: coupled RMS error (interpolated from the pilots) and
      expected cost per trajectory of the chosen schedule.
    pilots: (P, 4) rows of (lambda, expected cost per trajectory, measured coupled RMS
      error against EM on f^K, its standard error).
    """

    probs: Any
    scale: float
    predicted_error: float
    predicted_cost: float
    pilots: np.ndarray


def stratified_shape(variances, costs, coupling: str = "independent") -> np.ndarray:
    """The shape s_k(t) of stratified probabilities p_k(t) = min(1, lambda s_k(t)).

    Stratified coins turn the corrections of level k into a Riemann sum on spacing
    h / p_k, whose mean-square error is about c_k (h / p_k)^2 (strong order 1). Minimising
    the cost sum_k p_k C_k at a fixed sum_k c_k (h / p_k)^2 gives p_k proportional to
    (c_k / C_k)^(1/3); with c_k taken proportional to V_k (the size of the correction),
    s_k = (V_k / C_k)^(1/3), normalised so that its largest value is 1. The scale lambda is
    set by measurement (`stratified_probabilities`), which absorbs the proportionality.

    Args:
      variances: V_k, (K,) or (bins, K).
      costs: (K,) cost of one evaluation of each level.
      coupling: "independent" or "nested".
    """
    v = np.atleast_2d(np.asarray(variances, np.float64))
    c = correction_costs(costs, coupling)
    shape = np.cbrt(np.maximum(v, np.finfo(np.float64).tiny) / c[None, :])
    shape[:, 0] = np.inf  # p_1 = 1 always
    top = shape[:, 1:].max() if shape.shape[1] > 1 else 1.0
    return shape / top


def _scaled(shape, scale, coupling):
    p = np.minimum(1.0, scale * shape)
    if coupling == "nested":
        p = np.minimum.accumulate(p, axis=1)
    return p


def _scale_for_cost(cost_of, target, low=1e-6, high=1e6) -> float:
    """The largest lambda whose expected cost is at most `target` (bisection in log lambda;
    the cost is non-decreasing in lambda)."""
    a, b = np.log(low), np.log(high)
    for _ in range(80):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if cost_of(np.exp(mid)) <= target else (a, mid)
    return float(np.exp(a))


def _check_budget(budget, num_steps, costs) -> None:
    if not budget > num_steps * costs[0]:
        raise InputError(
            f"budget: {budget:.4g} per trajectory is not above the cost of the cheapest level alone "
            f"({num_steps} steps x {costs[0]:.4g} = {num_steps * costs[0]:.4g}); raise the budget."
        )


def _stratified_family(stats: LevelStatistics, costs, num_steps: int, coupling: str, time_dependent: bool):
    """The one-parameter family p = min(1, lambda s) of the cube-root shape: returns
    (cost_of(lambda), schedule(lambda), shape)."""
    if time_dependent:
        check_bins(stats)
    V = np.asarray(stats.variances if time_dependent else stats.time_averaged("variances")[None], np.float64)
    w = np.asarray(stats.bin_weights) if time_dependent else np.ones(1)
    shape = stratified_shape(V, costs, coupling)
    Ct = correction_costs(costs, coupling)

    def cost_of(scale):
        return expected_cost(_scaled(shape, scale, coupling), Ct, num_steps, bin_weights=w)

    def schedule(scale):
        p = _scaled(shape, scale, coupling)
        if time_dependent:
            return PiecewiseConstant(jnp.asarray(stats.bin_edges, jnp.float32), jnp.asarray(p, jnp.float32))
        return jnp.asarray(p[0], jnp.float32)

    return cost_of, schedule, shape


def stratified_schedule(stats: LevelStatistics, costs, num_steps: int, budget: float, *,
                        coupling: str = "independent", time_dependent: bool = True):
    """The stratified cube-root schedule (`stratified_shape`) scaled to an expected cost of
    `budget` per trajectory (in the units of `costs`), without pilot runs. Returns the
    schedule (PiecewiseConstant, or an array (K,) when not time dependent) and lambda.

    Args:
      stats: `level_statistics` of the levels.
      costs: (K,) cost of one evaluation of each level.
      num_steps: the model calls of one trajectory.
      budget: the expected cost per trajectory.
      coupling: "independent" or "nested".
      time_dependent: one row per time bin, else one row.
    """
    costs = np.asarray(costs, np.float64)
    _check_budget(budget, num_steps, costs)
    cost_of, schedule, _ = _stratified_family(stats, costs, num_steps, coupling, time_dependent)
    scale = _scale_for_cost(cost_of, budget)
    return schedule(scale), scale


def stratified_probabilities(
    drifts: Sequence[Callable],
    diffusion: Callable | None,
    y0: Any,
    ts,
    keys,
    stats: LevelStatistics,
    costs,
    *,
    target_error: float | None = None,
    budget: float | None = None,
    coupling: str = "independent",
    time_dependent: bool = True,
    num_pilots: int = 6,
    num_groups: int = 8,
    level_key: jax.Array | None = None,
    args=None,
    progress: bool = False,
    solver: Callable | None = None,
) -> StratifiedCalibration:
    """Probabilities for coins="stratified", scaled by pilot runs.

    The iid formula (injected variance h sum_k V_k (1/p_k - 1)) overstates the error of
    stratified coins, which falls like h / p instead of sqrt(h / p). So: take the shape of
    `stratified_shape` (per time bin of `stats`, or time-averaged), run ML-EM with
    stratified coins for `num_pilots` scales lambda (expected costs log-spaced from the
    cheapest level alone to EM on the finest), coupled to EM on f^K on the same noise for
    the trajectories (y0, keys), and interpolate the coupled RMS error log-log in lambda.
    The trajectories are split into `num_groups` groups with a level key each, so that the
    error and its standard error average over coin plans as well as over noise.
    The chosen lambda meets `target_error` (per state component, RMS) at the least cost,
    or is the most accurate within `budget` (expected cost per trajectory, in the units of
    `costs`).

    `solver(model, y0, key)` (as in `level_statistics`, with which `stats` must have been
    measured) replaces EM: the pilots run it on the `Multilevel` and are coupled to it on
    the finest level alone, on the same grid and noise, and a cost counts its model calls.

    Args:
      drifts: f^1..f^K, cheapest first.
      diffusion: g(t, y, args), or None.
      y0: the reference trajectories' initial states (stacked).
      ts: the grid.
      keys: one key per trajectory.
      stats: their `level_statistics`.
      costs: (K,) cost of one evaluation of each level.
      target_error: the coupled RMS error to reach, or
      budget: the expected cost per trajectory to spend.
      coupling: "independent" or "nested".
      time_dependent: one scale per time bin of `stats`, else one shape.
      num_pilots: scales lambda tried.
      num_groups: coin plans per pilot.
      level_key: the key of the pilots' coins (default: derived).
      args: passed to the drifts.
      progress: a bar over the pilots.
      solver: calibrate for this sampler instead of EM (as in `level_statistics`).
    """
    ts = check_ts(ts)
    coupling = check_coupling(coupling)
    if (target_error is None) == (budget is None):
        raise InputError("target_error, budget: give exactly one of them.")
    if target_error is not None and not target_error > 0:
        raise InputError(f"target_error: expected a positive RMS error, got {target_error}.")
    if num_pilots < 2:
        raise InputError(f"num_pilots: expected at least 2 pilot runs to interpolate between, got {num_pilots}.")
    drifts = tuple(drifts)
    costs = np.asarray(costs, np.float64)
    if costs.shape != (len(drifts),) or np.any(~np.isfinite(costs)) or np.any(costs <= 0):
        raise InputError(f"costs: expected {len(drifts)} positive finite costs, one per level, got {costs}.")
    num_steps = int(ts.shape[0] - 1) if stats.num_calls is None else int(stats.num_calls)  # model calls
    if budget is not None:
        _check_budget(budget, num_steps, costs)
    cost_of, schedule, shape = _stratified_family(stats, costs, num_steps, coupling, time_dependent)
    solver = _default_solver(diffusion, ts, args) if solver is None else solver

    scales, hi_scale = _pilot_scales(shape, cost_of, num_steps * costs[0], num_pilots)
    level_key = jax.random.key(0) if level_key is None else level_key
    pilot = _coupled_pilot(solver, tuple(drifts), coupling, y0, jnp.asarray(keys), num_groups)
    rows = []
    for i, scale in enumerate(scales):
        mse = np.asarray(pilot(schedule(scale), jax.random.fold_in(level_key, i)), np.float64)  # per group
        rms = math.sqrt(mse.mean())
        se = mse.std(ddof=1) / math.sqrt(mse.size) / (2 * rms) if rms > 0 else 0.0
        rows.append((scale, cost_of(scale), rms, se))
        if progress:
            print(f"  pilot {i + 1}/{len(scales)}: lambda {scale:.4g}, cost {rows[-1][1]:.4g}, "
                  f"coupled RMS {rms:.4g} +- {se:.2g}", flush=True)
    pilots = np.array(rows)
    log_l, log_e = np.log(pilots[:, 0]), np.log(np.maximum(pilots[:, 2], 1e-30))
    order = np.argsort(log_l)
    log_l, log_e = log_l[order], np.minimum.accumulate(log_e[order])  # error non-increasing in lambda
    if target_error is not None:
        scale = _scale_for_error(target_error, log_l, log_e)
    else:
        scale = _scale_for_cost(cost_of, budget, high=hi_scale)
    predicted = float(np.exp(np.interp(np.log(scale), log_l, log_e)))
    return StratifiedCalibration(schedule(scale), scale, predicted, cost_of(scale), pilots)


def _pilot_scales(shape, cost_of, base, num_pilots):
    """Scales whose expected costs are log-spaced between about the base level alone and
    every p = 1 (the solver on f^K), and the scale from which every p is 1."""
    finite = shape[:, 1:][np.isfinite(shape[:, 1:])]
    hi_scale = 1.0 / max(finite.min(), 1e-12)
    top = cost_of(hi_scale)
    targets = np.exp(np.linspace(np.log(base + 0.03 * (top - base)), np.log(top), num_pilots + 1))[:-1]
    return [_scale_for_cost(cost_of, c, high=hi_scale) for c in targets], hi_scale


def _coupled_pilot(solver, drifts, coupling, y0, keys, num_groups):
    """`pilot(probs, level_key)` -> the mean squared coupled error (per group) of the
    stratified multilevel solver against the solver on the finest level, same noise; the
    trajectories split into groups with a level key each."""
    num_traj = keys.shape[0]
    groups = min(num_groups, num_traj)
    used = num_traj - num_traj % groups
    if used < 2 * groups:
        raise InputError(f"keys: expected at least {2 * groups} trajectories for {groups} pilot groups, got "
                         f"{num_traj}.")
    per_group = lambda a: jnp.reshape(a[:used], (groups, used // groups, *a.shape[1:]))
    y_groups = jax.tree_util.tree_map(per_group, y0)
    key_groups = per_group(keys)
    finest = drifts[-1]
    em = jax.jit(jax.vmap(jax.vmap(lambda y, k: solver(finest, y, k))))(y_groups, key_groups)

    @jax.jit
    def pilot(probs, lk):
        # one unbatched level key per group (lax.map keeps lax.cond skipping inside each group)
        def group(inputs):
            y, k, em_y, g_key = inputs
            ml = jax.vmap(lambda yy, kk: solver(Multilevel(
                drifts, probs, coins="stratified", coupling=coupling, level_key=g_key), yy, kk).y)(y, k)
            d = jnp.reshape(ml - em_y, (ml.shape[0], -1))
            return jnp.mean(d**2)

        return jax.lax.map(group, (y_groups, key_groups, em, jax.random.split(lk, groups)))

    return pilot


def _scale_for_error(target_error, log_l, log_e) -> float:
    """The scale whose interpolated pilot error is target_error (log-log in lambda)."""
    if target_error >= np.exp(log_e[0]):
        return float(np.exp(log_l[0]))
    if target_error < np.exp(log_e[-1]):
        raise InputError(
            f"target_error: {target_error:.3g} is below the coupled error of every pilot (the most "
            f"expensive reached {np.exp(log_e[-1]):.3g}); sample with EM on the finest level, or use "
            "more steps."
        )
    return float(np.exp(np.interp(-np.log(target_error), -log_e, log_l)))
