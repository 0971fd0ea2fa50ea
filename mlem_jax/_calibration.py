"""The implementation of `mlem_jax.calibrate` (costs, statistics, calibrated and stratified
probabilities, gamma fits, reports, calibration files); its docstring lists the pieces."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._flops import flops_of
from mlem_jax._multilevel import CallProbe, Multilevel, ProbeRecord
from mlem_jax._probabilities import (
    PiecewiseConstant,
    correction_costs,
    expected_cost,
    injected_variance,
    optimal_probabilities,
    schedule_values,
)
from mlem_jax._solvers import euler_maruyama
from mlem_jax._validate import check_coupling, check_drifts, check_ts
from mlem_jax.timing import time_calls

# ----------------------------------------------------------------------------- costs


class LevelCosts(NamedTuple):
    """seconds: median wall time of one jitted evaluation per level (this device);
    flops: XLA's cost-analysis FLOPs per evaluation (NaN where the backend gives none)."""

    seconds: np.ndarray
    flops: np.ndarray


def level_costs(drifts: Sequence[Callable], t, y, args=None, repeats: int = 10) -> LevelCosts:
    """Cost of one evaluation `f(t, y, args)` of each level, on the current device.

    Pass a batched `y` (and a drift that accepts it, for example `jax.vmap(f)`) to measure
    the batched cost that sampling pays. Warm-up (compilation) is excluded; the median of
    `repeats` timed calls is reported.
    """
    drifts = tuple(drifts)
    if not drifts:
        raise ValueError("drifts: expected at least one drift function.")
    seconds, flops = [], []
    for f in drifts:
        seconds.append(time_calls(jax.jit(f), t, y, args, repeats=repeats).seconds)
        flops.append(flops_of(f, t, y, args))
    seconds, flops = np.array(seconds), np.array(flops)
    check_cost_order(seconds, "costs")
    return LevelCosts(seconds, flops)


def check_cost_order(costs, name: str) -> None:
    """Warn when the level costs do not increase with the level (drifts out of order, or too
    cheap to time)."""
    costs = np.asarray(costs, np.float64)
    if costs.size > 1 and np.any(np.diff(costs) <= 0):
        warnings.warn(
            f"{name}: the level costs do not increase with the level ({', '.join(f'{c:.3g}' for c in costs)}); "
            "drifts must go from cheapest to most expensive, so the levels are probably in the "
            "wrong order (or too cheap to time: measure a batched evaluation).",
            stacklevel=3,
        )


# ------------------------------------------------------------------------ statistics


class LevelStatistics(NamedTuple):
    """Per time bin b and level k (level 1 is compared with f^0 = 0), measured at the model
    calls of the solver being calibrated:

    bin_edges (B+1,); bin_weights (B,): fraction of the model calls in each bin;
    variances (B, K): V_k(t) = E|f^k - f^{k-1}|^2 (squared norm over the whole state), in
      Euler-Maruyama units: each call's correction c counts as |a_n c|^2 / h^2 (weighting
      "linear", a_n the solver's coefficient of the call) or |J_n c|^2 / h^2 ("propagated"),
      with h = |span| / num_calls (for EM a_n = h_n, so on a uniform grid linear is V_k);
    variance_se (B, K): standard errors of those estimates;
    means (B, K): |E (f^k - f^{k-1})|, RMS over the state's components of the mean;
    kurtosis (B, K): E|D|^4 / (E|D|^2)^2 of the correction D (its kurtosis for a scalar);
    errors (B, K): sqrt(E|f^k - f^K|^2), each level against the finest (unweighted);
    check (K,): MLMC consistency ratio |E Y_k - (E P_k - E P_{k-1})| / (3 standard
      errors), from three disjoint thirds of the trajectories (Y = mean correction,
      P = mean drift); above 1 flags levels that are not evaluated consistently.
    num_calls: model calls per trajectory of the solver (the `num_steps` of its costs);
    step_size: h, the step for which `variances` are EM-equivalent;
    residuals (B, G, K), with a control variate only: E|c_k(x_n) - chat_k|^2 in the same
      units when the cache was last filled g = 1..G calls before (the gap clipped at the
      first call, where every cache is filled), averaged over the calls of each bin.
    """

    bin_edges: np.ndarray
    bin_weights: np.ndarray
    variances: np.ndarray
    variance_se: np.ndarray
    means: np.ndarray
    kurtosis: np.ndarray
    errors: np.ndarray
    check: np.ndarray
    num_calls: int | None = None
    step_size: float | None = None
    residuals: np.ndarray | None = None

    def time_averaged(self, field: str) -> np.ndarray:
        """The step-weighted mean over the bins (bins without points have weight 0)."""
        w, v = np.asarray(self.bin_weights), np.asarray(getattr(self, field))
        return np.tensordot(w[w > 0], v[w > 0], axes=1)


def _default_solver(diffusion, ts, args):
    return lambda model, y, key: euler_maruyama(model, diffusion, y, ts, key, args)


def _probe(solver, probe: CallProbe, y0, key) -> ProbeRecord:
    record = solver(probe, y0, key)
    if not isinstance(record, ProbeRecord):
        raise TypeError(
            "solver: expected solver(model, y0, key) to return what a solver of the library returns when "
            f"called on its `model` argument, got {type(record).__name__}. Write it as, for example, "
            "`lambda m, y, k: dpm_solver_pp(m, sde, y, ts, k)` (no .y, no post-processing).")
    return record


def _num_calls(solver, model, y0, key) -> int:
    return jax.eval_shape(lambda y, k: _probe(solver, CallProbe(model), y, k).times, y0, key).shape[0]


def solver_calls(solver: Callable, model: Callable, y0: Any, key) -> tuple[jax.Array, jax.Array, Any]:
    """Where `solver(model, y0, key)` calls its model, and with what weight.

    Returns (times (N,), coefficients (N,), states (pytree of (N, ...))): the time and state
    of each of the N model calls along the solver's own trajectory, and the derivative of
    the mean of its output with respect to a constant added to that call's model value
    (through the solver's linear algebra, not the model's Jacobian). An error e_n in call
    n's model value moves the result by about coefficient_n * e_n.
    """
    zeros = jnp.zeros(_num_calls(solver, model, y0, key), jnp.float32)

    def mean_output(offsets):
        record = _probe(solver, CallProbe(model, offsets), y0, key)
        leaves = jax.tree_util.tree_leaves(record.y)
        size = sum(leaf.size for leaf in leaves)
        return sum(jnp.sum(leaf) for leaf in leaves) / size, record

    coefficients, record = jax.grad(mean_output, has_aux=True)(zeros)
    return record.times, coefficients, record.states


def solver_sensitivities(solver: Callable, model: Callable, y0: Any, key, cotangent_key) -> tuple:
    """J_n^T u for every model call n of `solver(model, y0, key)`, with u ~ N(0, I) drawn
    from `cotangent_key` and J_n the derivative of the solver's output with respect to the
    value of call n, carried through the later model calls (their Jacobians included) by
    one reverse-mode pass. Since E_u <J_n^T u, c>^2 = |J_n c|^2, the squared projection of
    a correction c on it is an unbiased estimate of the squared error c would cause at the
    output. Returns (times (N,), sensitivities and states: pytrees of (N, ...) arrays)."""
    num_calls = _num_calls(solver, model, y0, key)
    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros((num_calls, *jnp.shape(a)), jnp.result_type(a)), y0)
    leaves, tree = jax.tree_util.tree_flatten(y0)
    u = jax.tree_util.tree_unflatten(tree, [jax.random.normal(k, jnp.shape(a), jnp.result_type(a)) for k, a in
                                            zip(jax.random.split(cotangent_key, len(leaves)), leaves)])

    def projected_output(offsets):
        record = _probe(solver, CallProbe(model, offsets, through_model=True), y0, key)
        dot = sum(jnp.sum(a * b) for a, b in zip(jax.tree_util.tree_leaves(record.y), jax.tree_util.tree_leaves(u)))
        return dot, record

    sensitivities, record = jax.grad(projected_output, has_aux=True)(zeros)
    return record.times, sensitivities, record.states


def level_statistics(
    drifts: Sequence[Callable],
    diffusion: Callable | None,
    y0: Any,
    ts,
    keys,
    args=None,
    num_bins: int = 10,
    stride: int = 1,
    *,
    solver: Callable | None = None,
    control: str | None = None,
    control_scale: Callable | None = None,
    weighting: str = "linear",
) -> LevelStatistics:
    """Statistics of the level corrections at a solver's model calls along reference
    trajectories (the solver driven by the finest level).

    Args:
      drifts: (f^1, ..., f^K), cheapest first (drifts, or denoisers for the diffusion
        samplers).
      diffusion: as in `euler_maruyama` (None for an ODE); used by the default solver.
      y0: initial states, one per trajectory, stacked on a leading axis.
      ts: the sampling grid (its span sets the EM-equivalent step).
      keys: one PRNG key per trajectory (shape (M,)).
      num_bins: number of equal time bins over the span of ts.
      stride: evaluate the levels at every `stride`-th model call (saves time).
      solver: the sampler to calibrate for, as `solver(model, y0, key)` with everything
        else bound, e.g. `lambda m, y, k: dpm_solver_pp(m, sde, y, ts, k)`; each call's
        statistics are weighted as `weighting` says. Default:
        `euler_maruyama(m, diffusion, y, ts, k, args)`.
      control: "cached" also measures the residuals of the cached control variate against
        the gap since the last firing (`LevelStatistics.residuals`; needs stride=1).
      control_scale: the `control_scale` of the `Multilevel` to be calibrated (the
        diffusion samplers use the SDE's `noise_to_signal`); None is no rescaling.
      weighting: how a call's correction is weighed. "linear": by the solver's own
        coefficient a_n (`solver_calls`), |a_n c|^2; exact when the model's Jacobian plays
        no part (corrections that do not depend on the state), and what EM's calibration
        uses. "propagated": by the error it causes at the output through the whole rest of
        the trajectory, |J_n c|^2, model Jacobians included, estimated without bias from one
        reverse-mode pass per trajectory (`solver_sensitivities`). The diffusion samplers
        need it: at high noise an eps-network's D = (x - sigma eps) / alpha turns a small
        state error into a large one, which the linear weights do not see (measured in
        docs/samplers.md).
    """
    ts = check_ts(ts)
    keys = jnp.asarray(keys)
    num_traj = keys.shape[0]
    if num_traj < 6:
        raise ValueError(f"keys: expected at least 6 trajectories for the statistics, got {num_traj}.")
    first = jax.tree_util.tree_map(lambda a: a[0], y0)
    drifts = check_drifts(drifts, ts[0], first, args)
    if num_bins < 1:
        raise ValueError(f"num_bins: expected a positive number of bins, got {num_bins}.")
    if control not in (None, "cached"):
        raise ValueError(f"control: the statistics cover control=None and 'cached', got {control!r} (an "
                         "extrapolated cache depends on two gaps; calibrate it as 'cached' and compare by sampling).")
    if control is not None and stride != 1:
        raise ValueError(f"stride: the residuals against the cache need the levels at every model call; pass "
                         f"stride=1 with control={control!r}, got {stride}.")
    if weighting not in ("linear", "propagated"):
        raise ValueError(f"weighting: expected 'linear' or 'propagated', got {weighting!r}.")
    solver = _default_solver(diffusion, ts, args) if solver is None else solver
    finest = drifts[-1]
    propagated = weighting == "propagated"
    if propagated:
        ukeys = jax.random.split(jax.random.fold_in(keys[0], 0x5E75), num_traj)
        call_times, sens, states = jax.jit(jax.vmap(lambda y, k, u: solver_sensitivities(solver, finest, y, k, u)))(
            y0, keys, ukeys)
    else:
        call_times, coef, states = jax.jit(jax.vmap(lambda y, k: solver_calls(solver, finest, y, k)))(y0, keys)
    call_times = np.asarray(call_times[0], np.float64)
    num_calls = call_times.shape[0]
    span = float(abs(ts[-1] - ts[0]))
    h = span / num_calls
    # (N,): 1 for EM on a uniform grid; the propagated weights sit in the projections instead
    weight = np.ones(num_calls) / h**2 if propagated else np.mean(np.asarray(coef, np.float64) ** 2, axis=0) / h**2
    idx = np.arange(0, num_calls, stride)
    t_pts = call_times[idx]
    states = jax.tree_util.tree_map(lambda a: a[:, idx], states)  # (M, P, ...)
    flatten = lambda v: jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(v)])
    directions = jax.vmap(jax.vmap(flatten))(jax.tree_util.tree_map(lambda a: a[:, idx], sens)) if propagated \
        else jnp.zeros((num_traj, idx.size, 1))

    def per_point(t, y, u):
        fs = [f(t, y, args) for f in drifts]
        flat = [flatten(v) for v in fs]
        prev = [jnp.zeros_like(flat[0])] + flat[:-1]
        deltas = jnp.stack([a - b for a, b in zip(flat, prev)])  # (K, D)
        sq = (deltas @ u) ** 2 if propagated else jnp.sum(deltas**2, axis=1)
        err = jnp.sum((jnp.stack(flat) - flat[-1]) ** 2, axis=1)
        return sq, err, deltas, jnp.mean(deltas, axis=1), jnp.mean(jnp.stack(flat), axis=1)

    batch = jax.vmap(jax.vmap(per_point, in_axes=(0, 0, 0)), in_axes=(None, 0, 0))

    def reduced(t, y, u):
        sq, err, deltas, ymean, pmean = batch(t, y, u)
        # with a control: per level, the mean Gram matrix of the corrections (linear), or the
        # projections <J_n^T u, c_j> of every correction on every call's sensitivity (propagated)
        if not control:
            pairs = None
        elif propagated:
            pairs = jnp.einsum("mnd,mjkd->mknj", u, deltas)
        else:
            pairs = jnp.einsum("mnkd,mjkd->knj", deltas, deltas) / deltas.shape[0]
        return sq, err, deltas.mean(0), ymean, pmean, pairs

    sq, err, deltas, ymean, pmean, pairs = jax.jit(reduced)(jnp.asarray(t_pts, jnp.float32), states, directions)
    sq = np.asarray(sq, np.float64) * weight[idx][None, :, None]  # (M, P, K), EM-equivalent
    err = np.asarray(err, np.float64)
    deltas = np.asarray(deltas, np.float64)  # (P, K, D), mean over trajectories
    ymean, pmean = np.asarray(ymean, np.float64), np.asarray(pmean, np.float64)

    lo, hi = float(np.min(np.asarray(ts))), float(np.max(np.asarray(ts)))
    edges = np.linspace(lo, hi, num_bins + 1)
    which = np.clip(np.searchsorted(edges, t_pts, side="right") - 1, 0, num_bins - 1)
    K = len(drifts)
    V = np.full((num_bins, K), np.nan)
    V_se, means, kurt, errors = V.copy(), V.copy(), V.copy(), V.copy()
    weights = np.zeros(num_bins)
    for b in range(num_bins):
        sel = which == b
        if not sel.any():
            continue
        weights[b] = sel.sum()
        z = sq[:, sel].reshape(-1, K)
        V[b] = z.mean(0)
        V_se[b] = z.std(0, ddof=1) / np.sqrt(z.shape[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            kurt[b] = (z**2).mean(0) / z.mean(0) ** 2
        means[b] = np.sqrt(np.mean(deltas[sel].mean(axis=0) ** 2, axis=-1))
        errors[b] = np.sqrt(err[:, sel].reshape(-1, K).mean(0))
    weights /= weights.sum()
    residuals = None
    if control is not None:
        scale = (lambda t: np.ones_like(t)) if control_scale is None else (
            lambda t: np.asarray(jax.vmap(control_scale)(jnp.asarray(t, jnp.float32)), np.float64))
        residuals = _binned_residuals(np.asarray(pairs, np.float64), scale(call_times), weight, which, num_bins,
                                      propagated)

    # MLMC-style consistency check on disjoint thirds of the trajectories; one value per
    # trajectory (its time average), so that the samples are independent
    thirds = [np.arange(num_traj)[i::3] for i in range(3)]
    Y = ymean[thirds[0]].mean(1)
    PB = pmean[thirds[1]].mean(1)
    PC = np.concatenate([np.zeros((thirds[2].size, 1)), pmean[thirds[2]].mean(1)[:, :-1]], axis=1)
    se = lambda a: a.std(0, ddof=1) / np.sqrt(a.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        check = np.abs(Y.mean(0) - (PB.mean(0) - PC.mean(0))) / (3 * (se(Y) + se(PB) + se(PC)))
    return LevelStatistics(edges, weights, V, V_se, means, kurt, errors, check, num_calls, h, residuals)


def _binned_residuals(pairs, scale, weight, which, num_bins, propagated):
    """residuals[b, g - 1, k]: the mean over the calls n of bin b of the weighted
    E|c_k(x_n) - (s_n / s_j) c_k(x_j)|^2 with j = n - min(g, n) (the cache filled g calls
    before, or at the first call): from the mean Gram matrices pairs[k, n, j] (linear), or
    as the mean of (P_nn - r P_nj)^2 over trajectories from the projections
    pairs[m, k, n, j] = <J_n^T u, c_k(x_j)> (propagated)."""
    K, N = pairs.shape[-3], pairs.shape[-1]
    n = np.arange(N)
    g = np.arange(1, N + 1)
    j = n[:, None] - np.minimum(g[None, :], n[:, None])  # (N, G)
    r = scale[:, None] / scale[j]
    if propagated:
        own = np.einsum("mknn->mkn", pairs)[..., None]  # (M, K, N, 1)
        R = np.mean((own - r[None, None] * pairs[:, :, n[:, None], j]) ** 2, axis=0)  # (K, N, G)
    else:
        diag = np.einsum("knn->kn", pairs)
        R = diag[:, :, None] + r[None] ** 2 * diag[:, j] - 2 * r[None] * pairs[:, n[:, None], j]  # (K, N, G)
    R = np.maximum(R, 0.0) * weight[None, :, None]
    out = np.zeros((num_bins, N, K))
    for b in range(num_bins):
        sel = which == b
        if sel.any():
            out[b] = R[:, sel].mean(axis=1).T
    return out


def cached_variances(residuals, probs) -> np.ndarray:
    """The variance (B, K) that iid coins with probabilities `probs` (B, K) inject through the
    cached control variate: sum_g P(gap = g) residuals[:, g - 1], with the gap since the
    last firing geometric, P(g) = p (1 - p)^(g - 1), and the rest of the mass, (1 - p)^(G - 1),
    at the largest gap (no firing since the first call). Multiply by (1/p - 1) as for V."""
    R = np.asarray(residuals, np.float64)
    p = np.atleast_2d(np.asarray(probs, np.float64))[:, None, :]
    G = R.shape[1]
    g = np.arange(1, G + 1)[None, :, None]
    P = p * (1 - p) ** (g - 1)
    P[:, -1, :] = (1 - p[:, 0, :]) ** (G - 1)
    return np.sum(P * R, axis=1)


# -------------------------------------------------------------------- probabilities


def check_bins(stats: LevelStatistics) -> None:
    """A time-dependent schedule needs statistics in every bin: name empty bins (too many
    bins for the grid and stride) instead of failing later on their NaN variances."""
    empty = int(np.sum(np.asarray(stats.bin_weights) == 0))
    if empty:
        raise ValueError(f"num_bins: {empty} of the {len(stats.bin_weights)} time bins hold no point where the "
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
    """
    if control not in (None, "cached"):
        raise ValueError(f"control: expected None or 'cached', got {control!r}.")
    if control is not None and stats.residuals is None:
        raise ValueError("control: these statistics hold no residuals against the cache; measure them with "
                         f"level_statistics(..., control={control!r}).")
    if time_dependent:
        check_bins(stats)
    costs = np.asarray(costs, np.float64)
    K = np.shape(stats.variances)[1]
    if costs.shape != (K,):
        raise ValueError(f"costs: expected one cost per level ({K} levels in the statistics), got {costs.size}.")
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
            raise ValueError(f"budget: {budget:.4g} per trajectory does not cover the cheapest level on every call "
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
    if not time_dependent:
        return jnp.asarray(p[0], jnp.float32)
    return PiecewiseConstant(jnp.asarray(stats.bin_edges, jnp.float32), jnp.asarray(p, jnp.float32))


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
        raise ValueError(
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
    schedule (PiecewiseConstant, or an array (K,) when not time dependent) and lambda."""
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
    """
    ts = check_ts(ts)
    coupling = check_coupling(coupling)
    if (target_error is None) == (budget is None):
        raise ValueError("target_error, budget: give exactly one of them.")
    if target_error is not None and not target_error > 0:
        raise ValueError(f"target_error: expected a positive RMS error, got {target_error}.")
    if num_pilots < 2:
        raise ValueError(f"num_pilots: expected at least 2 pilot runs to interpolate between, got {num_pilots}.")
    drifts = tuple(drifts)
    costs = np.asarray(costs, np.float64)
    if costs.shape != (len(drifts),) or np.any(~np.isfinite(costs)) or np.any(costs <= 0):
        raise ValueError(f"costs: expected {len(drifts)} positive finite costs, one per level, got {costs}.")
    num_steps = int(ts.shape[0] - 1) if stats.num_calls is None else int(stats.num_calls)  # model calls
    if budget is not None:
        _check_budget(budget, num_steps, costs)
    cost_of, schedule, shape = _stratified_family(stats, costs, num_steps, coupling, time_dependent)
    solver = _default_solver(diffusion, ts, args) if solver is None else solver

    # scales whose expected costs are log-spaced between ~the base level and EM on f^K
    finite = shape[:, 1:][np.isfinite(shape[:, 1:])]
    hi_scale = 1.0 / max(finite.min(), 1e-12)  # every p = 1 from here on
    base, top = num_steps * costs[0], cost_of(hi_scale)
    targets = np.exp(np.linspace(np.log(base + 0.03 * (top - base)), np.log(top), num_pilots + 1))[:-1]
    scales = [_scale_for_cost(cost_of, c, high=hi_scale) for c in targets]

    level_key = jax.random.key(0) if level_key is None else level_key
    keys = jnp.asarray(keys)
    num_traj = keys.shape[0]
    groups = min(num_groups, num_traj)
    used = num_traj - num_traj % groups
    if used < 2 * groups:
        raise ValueError(f"keys: expected at least {2 * groups} trajectories for {groups} pilot groups, got "
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
        if target_error >= np.exp(log_e[0]):
            scale = float(np.exp(log_l[0]))
        elif target_error < np.exp(log_e[-1]):
            raise ValueError(
                f"target_error: {target_error:.3g} is below the coupled error of every pilot (the most "
                f"expensive reached {np.exp(log_e[-1]):.3g}); sample with EM on the finest level, or use "
                "more steps."
            )
        else:
            scale = float(np.exp(np.interp(-np.log(target_error), -log_e, log_l)))
    else:
        scale = _scale_for_cost(cost_of, budget, high=hi_scale)
    predicted = float(np.exp(np.interp(np.log(scale), log_l, log_e)))
    return StratifiedCalibration(schedule(scale), scale, predicted, cost_of(scale), pilots)


# ------------------------------------------------------------------------- fit gamma


class GammaFit(NamedTuple):
    """error ~ offset + scale * cost^(-power / gamma); [low, high] is the confidence
    interval of gamma at the requested level."""

    gamma: float
    low: float
    high: float
    offset: float
    scale: float
    power: float


def _t_quantile(q: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(q, dof))


def fit_gamma(costs, errors, *, offset: bool = False, power: float = 1.0, confidence: float = 0.95) -> GammaFit:
    """Fit error ~ [offset +] scale * cost^(-power/gamma) and return gamma with a CI.

    Without an offset this is a log-log least-squares line, slope -power/gamma, with a
    Student-t interval on the slope. With an offset (an irreducible error, such as the
    loss floor of denoising score matching), gamma is profiled on a grid (offset and
    scale solved by weighted least squares at each gamma) and the interval is the
    profile-likelihood (F-test) interval.
    `power=2` fits losses that scale like squared errors (L = L* + a cost^(-2/gamma)).
    """
    c = np.asarray(costs, np.float64)
    e = np.asarray(errors, np.float64)
    if c.shape != e.shape or c.ndim != 1:
        raise ValueError(f"costs, errors: expected two 1-D arrays of the same length, got {c.shape} and {e.shape}.")
    need = 4 if offset else 3
    if c.size < need:
        raise ValueError(f"costs: fitting gamma{' with an offset' if offset else ''} needs at least {need} points, "
                         f"got {c.size}.")
    if np.any(~np.isfinite(c)) or np.any(c <= 0) or np.any(~np.isfinite(e)) or np.any(e <= 0):
        raise ValueError("costs, errors: expected finite positive values.")

    def line(x, y):
        A = np.stack([np.ones_like(x), x], 1)
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        resid = y - A @ coef
        return coef, resid, A

    x = np.log(c)
    if not offset:
        coef, resid, A = line(x, np.log(e))
        slope = coef[1]
        if slope >= 0:
            raise ValueError("errors: they do not decrease with the cost, so gamma is undefined.")
        dof = x.size - 2
        s2 = resid @ resid / max(dof, 1)
        se = math.sqrt(s2 * np.linalg.inv(A.T @ A)[1, 1])
        tq = _t_quantile(0.5 + confidence / 2, dof)
        gamma = -power / slope
        lo_s, hi_s = slope - tq * se, slope + tq * se
        low = -power / lo_s if lo_s < 0 else gamma
        high = -power / hi_s if hi_s < 0 else math.inf
        return GammaFit(gamma, min(low, high), max(low, high), 0.0, math.exp(coef[0]), power)

    # With an offset: for a fixed gamma the model is linear in (offset, scale); fit it by
    # least squares weighted by 1/error^2 (relative errors), profile gamma on a grid, and
    # take the profile-likelihood interval SSE(gamma) <= SSE_min (1 + F(1, n-3) / (n-3)).
    wts = 1.0 / e

    def sse_at(g):
        z = c ** (-power / g)
        A = np.stack([np.ones_like(z), z], 1) * wts[:, None]
        coef, *_ = np.linalg.lstsq(A, e * wts, rcond=None)
        r = e * wts - A @ coef
        return (r @ r if coef[1] > 0 else np.inf), coef

    grid = np.exp(np.linspace(np.log(0.2), np.log(50.0), 3000)) * power
    sse = np.array([sse_at(g)[0] for g in grid])
    if not np.isfinite(sse).any():
        raise ValueError("errors: they do not decrease with the cost, so gamma is undefined.")
    i = int(np.argmin(sse))
    lo_i, hi_i = max(i - 1, 0), min(i + 1, grid.size - 1)
    fine = np.linspace(grid[lo_i], grid[hi_i], 401)
    fine_sse = np.array([sse_at(g)[0] for g in fine])
    gamma = float(fine[np.argmin(fine_sse)])
    best, coef = sse_at(gamma)
    dof = x.size - 3
    limit = best * (1 + _t_quantile(0.5 + confidence / 2, dof) ** 2 / dof)
    inside = grid[sse <= limit]
    low = float(min(inside.min(), gamma)) if inside.size else gamma
    high = float(max(inside.max(), gamma)) if inside.size else gamma
    if sse[-1] <= limit:
        high = math.inf  # the data cannot rule out arbitrarily large gamma
    return GammaFit(gamma, low, high, float(coef[0]), float(coef[1]), power)


# ---------------------------------------------------------------------------- report


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
    """
    ts = check_ts(ts)
    drifts = tuple(drifts)
    if cost_unit not in ("seconds", "flops"):
        raise ValueError(f"cost_unit: expected 'seconds' or 'flops', got {cost_unit!r}.")
    measured = costs is None
    if measured:
        batched = [jax.vmap(f, in_axes=(None, 0, None)) for f in drifts]
        costs = level_costs(batched, ts[0], y0, args)
    basis = np.asarray(costs.seconds if cost_unit == "seconds" else costs.flops, np.float64)
    if basis.shape != (len(drifts),):
        raise ValueError(f"costs: expected one cost per level ({len(drifts)} drifts), got {basis.size}.")
    if np.any(~np.isfinite(basis)) or np.any(basis <= 0):
        raise ValueError(f"costs: the {cost_unit} of every level must be positive and finite, got {basis}.")
    if control is not None and coins != "iid":
        raise ValueError(f"control: {control!r} is unbiased with coins='iid' only (a stratified coin depends on "
                         "earlier firings); calibrate coins='iid' with it, or stratified coins without it.")
    stats = level_statistics(drifts, diffusion, y0, ts, keys, args, num_bins=num_bins, stride=stride,
                             solver=solver, control=control, control_scale=control_scale, weighting=weighting)
    num_steps = int(stats.num_calls)  # the solver's model calls (the steps, for EM)
    span = float(abs(ts[-1] - ts[0]))
    h = float(stats.step_size)
    em_cost = num_steps * basis[-1]
    if sum(x is not None for x in (target_variance, budget, speedup, target_error)) > 1:
        raise ValueError("target_variance, budget, speedup, target_error: give at most one of them.")
    if coins not in ("iid", "stratified"):
        raise ValueError(f"coins: expected 'iid' or 'stratified', got {coins!r}.")
    if coins == "iid" and target_error is not None:
        raise ValueError("target_error: for iid coins give target_variance (nu^2 = T * error^2 per unit time).")
    if coins == "stratified" and target_variance is not None:
        raise ValueError(
            "target_variance: the injected variance describes iid coins; for coins='stratified' give "
            "target_error (the coupled RMS error per state component), a budget or a speedup."
        )
    if target_variance is None and budget is None and target_error is None:
        speedup = 4.0 if speedup is None else speedup
        if not speedup > 0:
            raise ValueError(f"speedup: expected a positive factor, got {speedup}.")
        # never below the cheapest level on every call (and, with a cache, its first call's firings)
        first_call = float(np.sum(correction_costs(basis, coupling)[1:])) if control is not None else 0.0
        budget = max(em_cost / speedup, num_steps * basis[0] * 1.05 + first_call)
    pilots = None
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
            probs = calibrated_probabilities(
                stats, basis, h, target_variance, budget=budget, num_steps=num_steps,
                time_dependent=time_dependent, coupling=coupling, control=control,
            )
    p = schedule_values(probs)
    w = stats.bin_weights if p.shape[0] > 1 else np.ones(1)
    V = stats.variances if p.shape[0] > 1 else stats.time_averaged("variances")[None]
    if control is not None:
        R = stats.residuals if p.shape[0] > 1 else stats.time_averaged("residuals")[None]
        V = np.concatenate([V[:, :1], cached_variances(R, p)[:, 1:]], axis=1)
    Ct = correction_costs(basis, coupling)
    nu2 = injected_variance(V, p, h, bin_weights=w)
    mlem_cost = expected_cost(p, Ct, num_steps, bin_weights=w)
    if control is not None:  # the first call fires every level (the caches start from an observation)
        first = np.asarray(probs(ts[0]), np.float64) if isinstance(probs, PiecewiseConstant) else p[0]
        mlem_cost += float(np.sum(Ct[1:] * (1 - first[1:])))
    err = stats.time_averaged("errors")[:-1]
    flops = np.asarray(costs.flops, np.float64)
    x = flops[:-1] if np.all(np.isfinite(flops)) and np.all(flops > 0) else np.asarray(costs.seconds)[:-1]
    gamma = None
    if err.size >= 3 and np.all(err > 0) and np.all(np.diff(err) < 0):
        try:
            gamma = fit_gamma(x, err)
        except ValueError:
            gamma = None
    d = jax.devices()[0]
    size = sum(int(np.prod(np.shape(leaf)[1:])) for leaf in jax.tree_util.tree_leaves(y0))
    predicted = strat.predicted_error if coins == "stratified" else math.sqrt(span * nu2 / max(size, 1))
    return CalibrationReport(
        costs, basis, cost_unit, stats, probs, w @ p, gamma, num_steps, int(np.shape(keys)[0]), span,
        em_cost, mlem_cost, nu2, f"{d.platform} ({getattr(d, 'device_kind', d.platform)})",
        coins, predicted, pilots, solver_name, control,
    )


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


# ------------------------------------------------------------------------------ files


class Calibration(NamedTuple):
    """A calibration file's content: the schedule and what it was made for.

    probs: PiecewiseConstant (pass it as `probs`).
    levels: the nf (or any identifier) of each level, cheapest first.
    steps, grid: the sampling grid it was calibrated on (number of steps, grid kind).
    coins, coupling: the coin scheme and coupling it assumed.
    meta: everything else in the file (command, predictions, how it was made).
    """

    probs: PiecewiseConstant
    levels: list
    steps: int
    grid: str
    coins: str
    coupling: str
    meta: dict


def save_calibration(path: str, probs, *, levels, steps: int, grid: str, coins: str = "iid",
                     coupling: str = "independent", solver: str = "em", control: str | None = None, **meta) -> str:
    """Write a schedule (PiecewiseConstant or constant array) with the grid, coins, solver and
    control variate it was made for, atomically, as JSON."""
    import json
    import os

    if isinstance(probs, PiecewiseConstant):
        edges, values = np.asarray(probs.edges, np.float64), np.asarray(probs.values, np.float64)
    else:
        values = np.atleast_2d(np.asarray(probs, np.float64))
        edges = np.array([0.0, 1.0])
    record = {"levels": list(levels), "edges": edges.tolist(), "values": values.tolist(), "steps": int(steps),
              "grid": grid, "coins": coins, "coupling": coupling, "solver": solver, "control": control, **meta}
    _check_calibration_values(record, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=lambda x: np.asarray(x).tolist())
    os.replace(tmp, path)
    return path


def _check_calibration_values(record: dict, path: str) -> None:
    for field in ("levels", "edges", "values", "steps", "grid"):
        if field not in record:
            raise ValueError(f"calibration {path}: missing the field {field!r}; write the file with "
                             "mlem-jax calibrate (or mlem_jax.calibrate.save_calibration).")
    try:
        edges = np.asarray(record["edges"], np.float64)
        values = np.asarray(record["values"], np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"calibration {path}: edges and values must be numbers ({e}).") from e
    K = len(record["levels"])
    if values.ndim != 2 or values.shape[1] != K or edges.shape != (values.shape[0] + 1,):
        raise ValueError(f"calibration {path}: expected values of shape (bins, {K}) and bins + 1 edges, got "
                         f"values {values.shape} and {edges.shape[0]} edges.")
    if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise ValueError(f"calibration {path}: the bin edges must be finite and increasing, got {edges.tolist()}.")
    if not np.all(np.isfinite(values)) or np.any(values <= 0) or np.any(values > 1):
        raise ValueError(f"calibration {path}: every probability must lie in (0, 1]; got min {np.nanmin(values):.3g}, "
                         f"max {np.nanmax(values):.3g}" + (" and NaN" if np.isnan(values).any() else "") + ".")
    if np.any(values[:, 0] != 1):
        raise ValueError(f"calibration {path}: the first level must have probability 1, got {values[:, 0].min():.3g}.")
    if record.get("coupling", "independent") == "nested" and np.any(np.diff(values, axis=1) > 0):
        raise ValueError(f"calibration {path}: the nested coupling needs non-increasing probabilities.")
    if record.get("coins", "iid") not in ("iid", "stratified"):
        raise ValueError(f"calibration {path}: coins must be 'iid' or 'stratified', got {record['coins']!r}.")
    if not isinstance(record["steps"], int) or record["steps"] < 1:
        raise ValueError(f"calibration {path}: steps must be a positive integer, got {record['steps']!r}.")


def load_calibration(path: str) -> Calibration:
    """Read and validate a calibration file (outside any trace, so bad values fail here)."""
    import json

    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"calibration {path}: file not found (write one with mlem-jax calibrate).") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration {path}: not valid JSON ({e}).") from e
    if not isinstance(record, dict):
        raise ValueError(f"calibration {path}: expected a JSON object.")
    _check_calibration_values(record, path)
    probs = PiecewiseConstant(jnp.asarray(record["edges"], jnp.float32), jnp.asarray(record["values"], jnp.float32))
    known = ("levels", "edges", "values", "steps", "grid", "coins", "coupling")
    return Calibration(probs, list(record["levels"]), int(record["steps"]), str(record["grid"]),
                       record.get("coins", "iid"), record.get("coupling", "independent"),
                       {k: v for k, v in record.items() if k not in known})


def check_calibration_use(cal: Calibration, path: str, *, levels, steps: int, grid: str, coins: str,
                          coupling: str, solver: str = "em", control: str | None = None) -> None:
    """Refuse a calibration used on another grid, other levels, other coins, coupling, solver
    or control variate: its probabilities were chosen for those (p scales with the step size,
    and each solver weighs its model calls differently). A file without a solver was made
    for EM without a control."""
    problems = []
    made_solver, made_control = cal.meta.get("solver", "em"), cal.meta.get("control")
    if solver != made_solver:
        problems.append(f"solver {made_solver!r} (sampling solver {solver!r})")
    if control != made_control:
        problems.append(f"control={made_control!r} (sampling control={control!r})")
    if list(levels) != list(cal.levels):
        problems.append(f"levels {cal.levels} (sampling {list(levels)})")
    if steps != cal.steps or grid != cal.grid:
        problems.append(f"a {cal.grid} grid of {cal.steps} steps (sampling {grid}, {steps} steps)")
    if coins != cal.coins:
        problems.append(f"coins={cal.coins!r} (sampling coins={coins!r})")
    if coupling != cal.coupling:
        problems.append(f"coupling={cal.coupling!r} (sampling coupling={coupling!r})")
    if problems:
        raise ValueError(
            f"calibration {path}: made for " + "; ".join(problems) + ". Its probabilities are chosen for that "
            "setting; recalibrate (mlem-jax calibrate) or sample with the setting it was made for."
        )
