"""Level statistics at a solver's model calls: where it calls its model and with what weight
(`solver_calls`, `solver_sensitivities`), V_k(t), the residuals against the cache, and the
variance the cache injects."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax._solvers import euler_maruyama
from mlem_jax._validate import check_drifts, check_ts
from mlem_jax.calibrate._probes import CallProbe, ProbeRecord


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
    state_size, state_rms: components D of one state and the RMS of the initial states (their scale, which
      `calibrated_probabilities` compares its predicted error with);
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
    state_size: int | None = None  # components of one state (D)
    state_rms: float | None = None  # RMS of the initial states' components: their scale

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

    Args:
      solver: `solver(model, y0, key)` with everything else bound.
      model: the model it calls (a drift or a denoiser).
      y0: one initial state.
      key: the solver's key.
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
    output. Returns (times (N,), sensitivities and states: pytrees of (N, ...) arrays).

    Args:
      solver: `solver(model, y0, key)` with everything else bound.
      model: the model it calls.
      y0: one initial state.
      key: the solver's key.
      cotangent_key: draws u.
    """
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
      args: passed to the drifts and the diffusion.
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
        raise InputError(f"keys: expected at least 6 trajectories for the statistics, got {num_traj}.")
    first = jax.tree_util.tree_map(lambda a: a[0], y0)
    drifts = check_drifts(drifts, ts[0], first, args)
    if num_bins < 1:
        raise InputError(f"num_bins: expected a positive number of bins, got {num_bins}.")
    _check_statistics_options(control, stride, weighting)
    solver = _default_solver(diffusion, ts, args) if solver is None else solver
    propagated = weighting == "propagated"
    call_times, weight, h, idx, states, directions = _reference_calls(solver, drifts[-1], y0, keys, ts, stride,
                                                                      propagated)
    t_pts = call_times[idx]
    sq, err, deltas, ymean, pmean, pairs = _level_values(drifts, args, t_pts, states, directions, propagated,
                                                         control is not None)
    sq = sq * weight[idx][None, :, None]  # (M, P, K), EM-equivalent
    edges, weights, which, binned = _binned(sq, err, deltas, t_pts, ts, num_bins)
    residuals = None
    if control is not None:
        scale = (lambda t: np.ones_like(t)) if control_scale is None else (
            lambda t: np.asarray(jax.vmap(control_scale)(jnp.asarray(t, jnp.float32)), np.float64))
        residuals = _binned_residuals(pairs, scale(call_times), weight, which, num_bins, propagated)
    leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(y0)]
    size = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)
    rms = float(np.sqrt(sum(np.sum(leaf**2) for leaf in leaves) / max(1, sum(leaf.size for leaf in leaves))))
    return LevelStatistics(edges, weights, *binned, _consistency_check(ymean, pmean), call_times.shape[0], h,
                           residuals, size, rms)


def _check_statistics_options(control, stride, weighting) -> None:
    if control not in (None, "cached"):
        raise InputError(f"control: the statistics cover control=None and 'cached', got {control!r} (an "
                         "extrapolated cache depends on two gaps; calibrate it as 'cached' and compare by sampling).")
    if control is not None and stride != 1:
        raise InputError(f"stride: the residuals against the cache need the levels at every model call; pass "
                         f"stride=1 with control={control!r}, got {stride}.")
    if weighting not in ("linear", "propagated"):
        raise InputError(f"weighting: expected 'linear' or 'propagated', got {weighting!r}.")


def _flatten(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _reference_calls(solver, finest, y0, keys, ts, stride, propagated):
    """The solver on the finest level, one run per trajectory: its call times (N,), the
    weight of each call in EM units (N,), h, the indices of the calls where the levels are
    evaluated, the states there (M, P, ...) and, propagated, the sensitivities J_n^T u
    there, flattened (M, P, D)."""
    num_traj = keys.shape[0]
    if propagated:
        ukeys = jax.random.split(jax.random.fold_in(keys[0], 0x5E75), num_traj)
        call_times, sens, states = jax.jit(jax.vmap(lambda y, k, u: solver_sensitivities(solver, finest, y, k, u)))(
            y0, keys, ukeys)
    else:
        call_times, coef, states = jax.jit(jax.vmap(lambda y, k: solver_calls(solver, finest, y, k)))(y0, keys)
    call_times = np.asarray(call_times[0], np.float64)
    num_calls = call_times.shape[0]
    h = float(abs(ts[-1] - ts[0])) / num_calls
    # 1 for EM on a uniform grid; the propagated weights sit in the projections instead
    weight = np.ones(num_calls) / h**2 if propagated else np.mean(np.asarray(coef, np.float64) ** 2, axis=0) / h**2
    idx = np.arange(0, num_calls, stride)
    states = jax.tree_util.tree_map(lambda a: a[:, idx], states)
    directions = jax.vmap(jax.vmap(_flatten))(jax.tree_util.tree_map(lambda a: a[:, idx], sens)) if propagated \
        else jnp.zeros((num_traj, idx.size, 1))
    return call_times, weight, h, idx, states, directions


def _level_values(drifts, args, t_pts, states, directions, propagated, with_pairs):
    """Every level at every (trajectory, point): the squared corrections (their projections
    on the sensitivities, propagated), the squared errors against the finest, the corrections
    averaged over trajectories, the mean correction and drift per trajectory, and for a
    control the pairs `_binned_residuals` needs. As float64 numpy arrays."""

    def per_point(t, y, u):
        flat = [_flatten(f(t, y, args)) for f in drifts]
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
        if not with_pairs:
            pairs = None
        elif propagated:
            pairs = jnp.einsum("mnd,mjkd->mknj", u, deltas)
        else:
            pairs = jnp.einsum("mnkd,mjkd->knj", deltas, deltas) / deltas.shape[0]
        return sq, err, deltas.mean(0), ymean, pmean, pairs

    out = jax.jit(reduced)(jnp.asarray(t_pts, jnp.float32), states, directions)
    return tuple(None if a is None else np.asarray(a, np.float64) for a in out)


def _binned(sq, err, deltas, t_pts, ts, num_bins):
    """Equal time bins over the span of ts: (edges, weights, which bin each point is in,
    (V, V_se, means, kurtosis, errors)), NaN in bins without points."""
    lo, hi = float(np.min(np.asarray(ts))), float(np.max(np.asarray(ts)))
    edges = np.linspace(lo, hi, num_bins + 1)
    which = np.clip(np.searchsorted(edges, t_pts, side="right") - 1, 0, num_bins - 1)
    K = sq.shape[-1]
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
    return edges, weights / weights.sum(), which, (V, V_se, means, kurt, errors)


def _consistency_check(ymean, pmean):
    """MLMC-style consistency check on disjoint thirds of the trajectories; one value per
    trajectory (its time average), so that the samples are independent."""
    num_traj = ymean.shape[0]
    thirds = [np.arange(num_traj)[i::3] for i in range(3)]
    Y = ymean[thirds[0]].mean(1)
    PB = pmean[thirds[1]].mean(1)
    PC = np.concatenate([np.zeros((thirds[2].size, 1)), pmean[thirds[2]].mean(1)[:, :-1]], axis=1)
    se = lambda a: a.std(0, ddof=1) / np.sqrt(a.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(Y.mean(0) - (PB.mean(0) - PC.mean(0))) / (3 * (se(Y) + se(PB) + se(PC)))


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
