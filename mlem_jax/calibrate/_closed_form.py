"""The closed-form iid allocation for measured statistics (with or without the cache)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax._schedules import PiecewiseConstant
from mlem_jax.calibrate._allocation import correction_costs, optimal_probabilities
from mlem_jax.calibrate._costs import check_cost_order
from mlem_jax.calibrate._statistics import LevelStatistics, cached_variances


def check_bins(stats: LevelStatistics) -> None:
    """A time-dependent schedule needs statistics in every bin: name empty bins (too many
    bins for the grid and stride) instead of failing later on their NaN variances."""
    empty = int(np.sum(np.asarray(stats.bin_weights) == 0))
    if empty:
        raise InputError(f"num_bins: {empty} of the {len(stats.bin_weights)} time bins hold no point where the "
                         "levels were evaluated (too many bins for the grid and stride); use fewer bins, more "
                         "steps or a smaller stride, or a constant schedule (time_dependent=False).")


def calibrated_probabilities(
    stats: LevelStatistics,
    costs,
    step_size: float,
    target_variance: float | None = None,
    *,
    budget: float | None = None,
    num_steps: int | None = None,
    time_dependent: bool = True,
    coupling: str = "independent",
    control: str | None = None,
):
    """The optimal probabilities for measured statistics and level costs.

    Returns a `PiecewiseConstant` schedule over the statistics' time bins
    (`time_dependent=True`) or a constant array (K,), usable directly as the `probs` of
    `Multilevel` with iid coins. Give a `target_variance` (injected variance per unit
    time, in the statistics' EM units) or a `budget` (expected cost per trajectory, with
    `num_steps`: the solver's model calls, `stats.num_calls`).

    control="cached" (statistics measured with it): the variance a level injects depends
    on p through the gap since its last firing (`cached_variances`). The probabilities are
    then the fixed point of the closed-form allocation with V replaced by the cached
    variances at the gaps it implies (damped iteration; it does not weigh how p moves the
    gaps, so it is a consistent choice rather than the exact optimum). A budget is met with
    the first call, where the cache fires every level, charged in full.

    Args:
      stats: `level_statistics` of the levels.
      costs: (K,) cost of one evaluation of each level (seconds or FLOPs).
      step_size: h of the statistics (`stats.step_size`).
      target_variance: injected variance per unit time to hold, or
      budget: the expected cost per trajectory to spend (with `num_steps`).
      num_steps: the solver's model calls (`stats.num_calls`), with a budget.
      time_dependent: one row per time bin (a `PiecewiseConstant`), else one row.
      coupling: "independent" or "nested".
      control: None, or "cached" for statistics measured with the cached control variate.
    """
    if control not in (None, "cached"):
        raise InputError(f"control: expected None or 'cached', got {control!r}.")
    if control is not None and stats.residuals is None:
        raise InputError("control: these statistics hold no residuals against the cache; measure them with "
                         f"level_statistics(..., control={control!r}).")
    if time_dependent:
        check_bins(stats)
    costs = np.asarray(costs, np.float64)
    K = np.shape(stats.variances)[1]
    if costs.shape != (K,):
        raise InputError(f"costs: expected one cost per level ({K} levels in the statistics), got {costs.size}.")
    check_cost_order(costs, "costs")
    Ct = correction_costs(costs, coupling)
    if time_dependent:
        V, w = np.asarray(stats.variances, np.float64), np.asarray(stats.bin_weights, np.float64)
        R = None if control is None else np.asarray(stats.residuals, np.float64)
    else:
        V, w = stats.time_averaged("variances")[None], np.ones(1)
        R = None if control is None else stats.time_averaged("residuals")[None]
    tiny = np.finfo(np.float64).tiny

    def allocate(v):
        if time_dependent:
            v = np.maximum(v, tiny)  # an empty or constant bin still gets a schedule
        p = optimal_probabilities(v, Ct, step_size, target_variance, budget=budget, num_steps=num_steps,
                                  bin_weights=w)
        return np.minimum.accumulate(p, axis=1) if coupling == "nested" else p

    if R is not None and budget is not None:
        first_call = float(np.sum(Ct[1:]))  # the first call fires every level: charged in full
        if not budget - first_call > num_steps * Ct[0]:
            raise InputError(f"budget: {budget:.4g} per trajectory does not cover the cheapest level on every call "
                             f"({num_steps} x {Ct[0]:.4g}) plus the first call, where the cache fires every level "
                             f"({first_call:.4g}); raise the budget.")
        budget = budget - first_call
    p = allocate(V)
    if R is not None:
        for _ in range(200):
            v = np.maximum(cached_variances(R, p), tiny)
            v[:, 0] = V[:, 0]
            new = allocate(v)
            if np.max(np.abs(new - p)) < 1e-6:
                break
            p = 0.5 * (p + new)
        p = new
    if R is None:
        _warn_if_noise(stats, V, p, step_size, w)
    if not time_dependent:
        return jnp.asarray(p[0], jnp.float32)
    return PiecewiseConstant(jnp.asarray(stats.bin_edges, jnp.float32), jnp.asarray(p, jnp.float32))


def _warn_if_noise(stats, V, p, step_size, w) -> None:
    """Warn when p's predicted coupled RMS error per component, sqrt(T nu^2 / D), exceeds the RMS of the
    initial states the statistics were taken from (the limit at which `mlem-jax calibrate` refuses)."""
    if stats.state_size is None or not stats.state_rms or stats.num_calls is None:
        return
    import math
    import warnings

    from mlem_jax.calibrate._allocation import injected_variance

    span = stats.num_calls * float(stats.step_size)
    predicted = math.sqrt(span * injected_variance(V, p, step_size, bin_weights=w) / max(stats.state_size, 1))
    if predicted > stats.state_rms:
        warnings.warn(f"calibrated_probabilities: these probabilities predict a coupled RMS error of {predicted:.3g} "
                      f"per component, more than the scale of the states themselves (RMS of y0: "
                      f"{stats.state_rms:.3g}); the samples would be dominated by the estimator's noise. Ask for "
                      "less (a larger budget or a smaller target variance), or use stratified coins.", UserWarning,
                      stacklevel=3)
