"""Learned level probabilities p_k(t) (the paper's method): stochastic gradient descent on

    J(p) = E |X^ML_N(p) - X^EM_N|^2 / d  +  lambda * E cost(p),

the coupled mean-square error of ML-EM (iid coins) against EM with the finest drift f^K
on the same Brownian path, plus a weighted expected cost
E cost = sum_n sum_k p_k(t_n) C~_k (C~ from `correction_costs`).

The schedule is piecewise constant in time: one logit per time bin and level, with
p_1 = 1. Independent coins use p = p_min + (1 - p_min) sigmoid(theta); nested coins use a
running product of such factors, so that p is non-increasing in k by construction.

The error term depends on p in two ways: through the 1/p weights of the corrections
(differentiable: the pathwise gradient, coins held fixed) and through the law of the
coins (not differentiable pathwise: the score-function, or REINFORCE, term). With the
coins B of one trajectory group and their log-probability

    independent: log P(B) = sum_n sum_{k>=2} B_nk log p_k(t_n) + (1 - B_nk) log(1 - p_k(t_n)),
    nested:      log P(B) = sum_n log(p_{m_n}(t_n) - p_{m_n + 1}(t_n)),  m_n = levels fired,

the gradient of E[D^2] is E[ d D^2 / dp |_B + (D^2 - b) d log P(B) / dp ], whose
independent-coin score is sum_n (B_nk - p_k) / (p_k (1 - p_k)) dp_k. The baseline b is the
mean error of the other trajectory groups of the same step (leave-one-out), independent
of the group's coins, so the estimator stays unbiased while its variance falls.

The trajectories of a group share their coins (one level key, unbatched under vmap), so
`lax.cond` still skips the levels that did not fire while the gradient is computed; the
groups run one after the other (`lax.map`).

With a `budget` the expected cost is held exactly at every step instead of being
weighted: the logits give the shape r_k(t) of the schedule and p = min(1, s r) with the
scale s solved from E cost(p) = budget (bisection for the set of clamped entries, then
s in closed form on the free ones, so that the gradient follows the constraint: the
optimum found is the constrained one, with no multiplier to tune).
Stratified coins have no tractable law per step, so they are not learned: their
probabilities come from the closed-form cube-root shape (`stratified_probabilities`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import _validate
from mlem_jax._coins import level_coins
from mlem_jax._errors import InputError
from mlem_jax._schedules import PiecewiseConstant, schedule_values
from mlem_jax._solvers import euler_maruyama, multilevel_euler_maruyama
from mlem_jax.calibrate._allocation import correction_costs


class LearningHistory(NamedTuple):
    """Per optimisation step (NumPy arrays): the surrogate objective, the mean coupled
    squared error of the step's trajectories, the expected cost per trajectory of the
    schedule, the schedule's values (steps, B, K), and the wall time of the step (the
    first includes compilation)."""

    objective: np.ndarray
    coupled_mse: np.ndarray
    expected_cost: np.ndarray
    probs: np.ndarray
    seconds: np.ndarray


class LearnedProbabilities(NamedTuple):
    """`probs`: the learned `PiecewiseConstant` schedule (p_1 = 1), the average of the
    iterates over the last `average` fraction of the steps; `history`: the training
    curves; `seconds`: wall time of the learning, compilation and EM reference included."""

    probs: PiecewiseConstant
    history: LearningHistory
    seconds: float


def time_bins(ts, num_bins: int) -> jax.Array:
    """Edges of `num_bins` equal time bins spanning the grid (increasing)."""
    ts = np.asarray(ts, np.float64)
    return jnp.asarray(np.linspace(ts.min(), ts.max(), num_bins + 1), jnp.result_type(float))


def probabilities_from_logits(logits, coupling: str = "independent", min_probability: float = 1e-3):
    """(B, K-1) logits -> (B, K) probabilities with p_1 = 1 (see the module docstring)."""
    q = min_probability + (1.0 - min_probability) * jax.nn.sigmoid(logits)
    if coupling == "nested":
        q = jnp.cumprod(q, axis=-1)
    return jnp.concatenate([jnp.ones_like(q[..., :1]), q], axis=-1)


def scaled_to_budget(shape, counts, corr, budget):
    """p = min(1, s * shape) for levels 2..K with the scale s that makes the expected cost
    sum_b counts_b sum_k p_bk corr_k equal `budget` (p_1 = 1 included in the cost). The
    clamped set comes from a bisection on log s; s is then the closed form on the free
    entries, so it is differentiable in `shape`. shape: (B, K) with shape[:, 0] ignored.

    Args:
      shape: (B, K) schedule shape; its first column is ignored.
      counts: (B,) steps in each bin.
      corr: (K,) cost of each level's correction.
      budget: the expected cost per trajectory to hold.
    """
    r = shape[:, 1:]
    w = counts[:, None] * corr[None, 1:]  # cost of p = 1 at (bin, level)
    room = budget - jnp.sum(counts) * corr[0]

    def cost(log_s):
        return jnp.sum(jnp.minimum(1.0, jnp.exp(log_s) * r) * w)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        high = cost(mid) > room
        return jnp.where(high, lo, mid), jnp.where(high, mid, hi)

    r_sg = jax.lax.stop_gradient(r)
    lo = -jnp.log(jnp.max(r_sg)) - 60.0
    hi = -jnp.log(jnp.min(r_sg))  # every entry clamped at 1 from here on
    lo, hi = jax.lax.fori_loop(0, 80, bisect, (lo, hi))
    free = jnp.exp(0.5 * (lo + hi)) * r_sg < 1.0
    s = (room - jnp.sum(jnp.where(free, 0.0, w))) / jnp.sum(jnp.where(free, r * w, 0.0))
    p = jnp.where(free, s * r, 1.0)
    return jnp.concatenate([jnp.ones_like(shape[:, :1]), p], axis=1)


def logits_from_probabilities(values, coupling: str = "independent", min_probability: float = 1e-3):
    """The inverse of `probabilities_from_logits` (values clipped into its range)."""
    p = np.asarray(values, np.float64)[..., 1:]
    if coupling == "nested":
        p = p / np.concatenate([np.ones_like(p[..., :1]), p[..., :-1]], axis=-1)
    q = np.clip((p - min_probability) / (1.0 - min_probability), 1e-6, 1 - 1e-6)
    return jnp.asarray(np.log(q) - np.log1p(-q), jnp.result_type(float))


def coin_log_probability(coins, probs, coupling: str = "independent"):
    """log P(B) of iid coins `coins` (N, K) under `probs` (N, K) (p_1 = 1 is not random)."""
    p = probs[:, 1:]
    if coupling == "independent":
        b = coins[:, 1:]
        return jnp.sum(jnp.where(b, jnp.log(p), jnp.log(jnp.maximum(1.0 - p, 1e-12))))
    fired = jnp.sum(coins, axis=1)  # nested: levels 1..m fired, m = fired
    padded = jnp.concatenate([probs, jnp.zeros_like(probs[:, :1])], axis=1)
    rows = jnp.arange(probs.shape[0])
    return jnp.sum(jnp.log(jnp.maximum(padded[rows, fired - 1] - padded[rows, fired], 1e-30)))


def _group_coins(level_key, p_grid, coupling):
    """The coins `multilevel_euler_maruyama` draws from `level_key` (iid): fold_in per step."""
    return jax.vmap(lambda n, p: level_coins(jax.random.fold_in(level_key, n), p, coupling))(
        jnp.arange(p_grid.shape[0]), p_grid)


def _surrogate(values, edges, drifts, diffusion, ts, args, coupling, y0s, path_keys, em_finals, level_keys):
    """Mean over groups of D^2_g + stop_gradient(D^2_g - b_g) log P(B_g), whose gradient is
    the estimator of d E[D^2] / d values; also returns the groups' D^2 (mean over paths and
    coordinates). y0s, path_keys, em_finals: (G, M, ...); level_keys: (G,)."""
    schedule = PiecewiseConstant(edges, values)
    p_grid = jax.vmap(schedule)(ts[:-1])

    def group(inputs):
        y0, keys, em, level_key = inputs
        sample = lambda y, k: multilevel_euler_maruyama(drifts, schedule, diffusion, y, ts, k, args,
                                                        level_key=level_key, coupling=coupling).y
        final = jax.vmap(sample)(y0, keys)
        sq = jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), final, em)
        size = sum(x.size for x in jax.tree_util.tree_leaves(em))
        mse = sum(jax.tree_util.tree_leaves(sq)) / size
        coins = _group_coins(level_key, jax.lax.stop_gradient(p_grid), coupling)
        return mse, coin_log_probability(coins, p_grid, coupling)

    mse, logp = jax.lax.map(group, (y0s, path_keys, em_finals, level_keys))
    G = mse.shape[0]
    baseline = (jnp.sum(mse) - mse) / (G - 1)
    surrogate = jnp.mean(mse + jax.lax.stop_gradient(mse - baseline) * logp)
    return surrogate, mse


def _check_inputs(drifts, y0s, ts, costs, num_bins, coupling, group_size, num_groups):
    ts = _validate.check_ts(ts)
    coupling = _validate.check_coupling(coupling)
    if len(drifts) < 2:
        raise InputError(f"drifts: learning probabilities needs at least 2 levels, got {len(drifts)}.")
    leaves = jax.tree_util.tree_leaves(y0s)
    if not leaves or any(jnp.ndim(x) < 1 for x in leaves):
        raise InputError("y0s: expected a batch of initial states with a leading axis (one per path).")
    pool = int(jnp.shape(leaves[0])[0])
    if pool < 1:
        raise InputError("y0s: expected at least one initial state.")
    c = np.asarray(costs, np.float64)
    if c.shape != (len(drifts),) or np.any(~np.isfinite(c)) or np.any(c <= 0):
        raise InputError(f"costs: expected one finite positive cost per level ({len(drifts)}), got {costs!r}.")
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise InputError(f"num_bins: expected a positive integer, got {num_bins!r}.")
    if num_bins > ts.shape[0] - 1:
        raise InputError(f"num_bins: {num_bins} bins for {ts.shape[0] - 1} steps would leave bins without steps; "
                         f"use at most {ts.shape[0] - 1}.")
    if not isinstance(num_groups, (int, np.integer)) or num_groups < 2:
        raise InputError(f"num_groups: expected an integer >= 2 (the baseline of a group is the mean of the "
                         f"others), got {num_groups!r}.")
    if not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise InputError(f"group_size: expected a positive integer, got {group_size!r}.")
    return ts, coupling, pool, c


def _em_finals(drift, diffusion, y0s, ts, path_keys, args, chunk=256):
    """EM with the finest drift from every pooled start, on each path's own noise."""
    fn = jax.jit(jax.vmap(lambda y, k: euler_maruyama(drift, diffusion, y, ts, k, args)))
    n = path_keys.shape[0]
    outs = [fn(jax.tree_util.tree_map(lambda x: x[i : i + chunk], y0s), path_keys[i : i + chunk])
            for i in range(0, n, chunk)]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *outs)


def coupled_error_gradient(drifts: Sequence[Callable], diffusion, y0s, ts, key, probs: PiecewiseConstant, *,
                           coupling: str = "independent", group_size: int = 8, num_groups: int = 4, args: Any = None):
    """One unbiased estimate of E[D^2] and of its gradient with respect to `probs.values`
    (the score-function estimator of the module docstring), from `num_groups` groups of
    `group_size` trajectories drawn from `y0s` with their own noise and coins.

    Returns (mse per group (G,), gradient (B, K)); the gradient of the p_1 column is 0.

    Args:
      drifts: f^1..f^K, cheapest first.
      diffusion: g(t, y, args), or None for an ODE.
      y0s: the pool of initial states (leading axis).
      ts: the grid.
      key: draws the paths, their noise and their coins.
      probs: the `PiecewiseConstant` schedule at which the gradient is taken.
      coupling: "independent" or "nested".
      group_size: trajectories per group.
      num_groups: groups (the estimate's samples).
      args: passed to the drifts and the diffusion.
    """
    ts, coupling, pool, _ = _check_inputs(drifts, y0s, ts, np.ones(len(drifts)), probs.values.shape[0], coupling,
                                          group_size, num_groups)
    k_paths, k_levels, k_pick = jax.random.split(key, 3)
    idx = jax.random.choice(k_pick, pool, (num_groups, group_size), replace=pool < num_groups * group_size)
    path_keys = jax.random.split(k_paths, num_groups * group_size).reshape(num_groups, group_size)
    y0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[idx], y0s)
    em = jax.vmap(jax.vmap(lambda y, k: euler_maruyama(drifts[-1], diffusion, y, ts, k, args)))(y0, path_keys)
    level_keys = jax.random.split(k_levels, num_groups)
    grad, mse = jax.grad(_surrogate, has_aux=True)(
        jnp.asarray(probs.values), probs.edges, tuple(drifts), diffusion, ts, args, coupling, y0, path_keys, em,
        level_keys)
    return mse, grad.at[:, 0].set(0.0)


def learn_probabilities(
    drifts: Sequence[Callable],
    diffusion: Callable | None,
    y0s,
    ts,
    key,
    *,
    costs,
    budget: float | None = None,
    cost_weight: float | None = None,
    num_bins: int = 10,
    coupling: str = "independent",
    steps: int = 300,
    group_size: int = 8,
    num_groups: int = 4,
    optimizer=None,
    init=None,
    min_probability: float = 1e-3,
    average: float = 0.5,
    remat: bool = True,
    args: Any = None,
    progress: bool = True,
) -> LearnedProbabilities:
    """Learn a piecewise-constant schedule p_k(t) by SGD (the paper's method; see the
    module docstring for the objective and the gradient estimator).

    Args:
      drifts: f^1..f^K, cheapest first.
      diffusion: g(t, y, args) (None for an ODE).
      y0s: a pool of initial states with a leading axis; path i gets its own Brownian
        path from `key`, and its EM reference with f^K is computed once.
      ts: the time grid the schedule is learned for (and should be used on).
      key: a JAX key for the Brownian paths, the groups and the coins.
      costs: (K,) cost of one evaluation of each level (seconds or FLOPs).
      budget: expected cost per trajectory, held exactly at every step, or
      cost_weight: a fixed weight lambda of the expected cost. Give exactly one.
      num_bins: time bins of the schedule.
      coupling: "independent" or "nested".
      steps: optimisation steps, each on `num_groups` groups of `group_size` paths.
      group_size: trajectories per group.
      num_groups: groups per step.
      optimizer: an optax optimizer on the logits (default optax.adam(0.05)).
      init: initial schedule ((K,) or (num_bins, K) values, or a PiecewiseConstant).
        Default: the closed-form allocation for iid coins (`calibrated_probabilities` on
        `level_statistics` of the pool, `num_bins` bins) at the budget, or, with a
        `cost_weight`, at the cost of p_k = 0.3^(k-1); p_k = 0.3^(k-1) itself when the pool
        has fewer than 6 starts. A flat start needs many more steps to find a schedule that
        varies in time (measured: 1.82x the optimal variance after 300 steps).
      min_probability: the smallest p_k the schedule may take.
      average: fraction of the last steps whose schedules are averaged into the result.
      remat: recompute each drift's internals in the backward pass (`jax.checkpoint`)
        instead of storing them for every step and path: without it, 100 steps of 32
        paths through the Fashion-MNIST UNets needed more than 22 GB.
      args: passed to the drifts and the diffusion.
      progress: show a progress bar.

    Returns:
      `LearnedProbabilities(probs, history, seconds)`.
    """
    import time

    import optax

    start = time.perf_counter()
    plain = tuple(drifts)
    drifts = tuple(jax.checkpoint(f) for f in drifts) if remat else plain
    ts, coupling, pool, level_cost = _check_inputs(drifts, y0s, ts, costs, num_bins, coupling, group_size,
                                                   num_groups)
    corr = correction_costs(level_cost, coupling)
    _check_learning(budget, cost_weight, steps, min_probability, average, ts.shape[0] - 1, corr)
    edges = time_bins(ts, num_bins)
    if init is None:
        init = _closed_form_start(plain, diffusion, y0s, ts, key, args, level_cost, budget, num_bins, coupling)
    init_values = np.broadcast_to(schedule_values(init), (num_bins, len(drifts)))
    logits = logits_from_probabilities(init_values, coupling, min_probability)
    optimizer = optax.adam(0.05) if optimizer is None else optimizer

    loss = _learning_objective(drifts, diffusion, y0s, ts, key, args, edges, corr, coupling, min_probability,
                               budget, pool, num_groups, group_size)
    weight = 0.0 if cost_weight is None else float(cost_weight)  # a budget is held by the scale instead
    hist = _descend(loss, optimizer, logits, weight, steps, progress)
    tail = hist.probs[-max(1, int(round(average * steps))):]
    learned = PiecewiseConstant(edges, jnp.asarray(tail.mean(0), ts.dtype))
    message = unsettled(hist)
    if message is not None:
        import warnings

        warnings.warn(f"learn_probabilities: {message}; the schedule is not the optimum yet: run more steps (steps=), "
                      "or start from the closed form (init=None, the default when the pool has at least 6 starts).",
                      NotConvergedWarning, stacklevel=2)
    return LearnedProbabilities(learned, hist, time.perf_counter() - start)


def _closed_form_start(drifts, diffusion, y0s, ts, key, args, costs, budget, num_bins, coupling):
    """The default start of `learn_probabilities` (see its `init`)."""
    import warnings

    from mlem_jax.calibrate._closed_form import calibrated_probabilities
    from mlem_jax.calibrate._statistics import level_statistics

    geometric = 0.3 ** np.arange(len(drifts))
    pool = jax.tree_util.tree_leaves(y0s)[0].shape[0]
    if pool < 6:
        return geometric
    if budget is None:  # a cost weight: the closed-form shape at the geometric start's cost
        budget = (ts.shape[0] - 1) * float(np.sum(geometric * correction_costs(costs, coupling)))
    keys = jax.random.split(jax.random.fold_in(key, 7), pool)
    stats = level_statistics(drifts, diffusion, y0s, ts, keys, args, num_bins=num_bins)
    with warnings.catch_warnings():  # a start only: its predicted noise is what the learning improves on
        warnings.simplefilter("ignore", UserWarning)
        closed = calibrated_probabilities(stats, costs, float(stats.step_size), budget=budget,
                                          num_steps=int(stats.num_calls), coupling=coupling)
    return schedule_values(closed)  # over the same increasing equal time bins as `time_bins`


def _learning_objective(drifts, diffusion, y0s, ts, key, args, edges, corr, coupling, min_probability, budget,
                        pool, num_groups, group_size) -> Callable:
    """`loss(theta, weight, it) -> (surrogate + weight x cost, (coupled MSE, cost, p))` on step `it`'s
    groups of paths: each path's EM reference with the finest level is computed once, here."""
    num_bins = edges.shape[0] - 1
    k_paths, k_levels, k_pick = jax.random.split(key, 3)
    path_keys = jax.random.split(k_paths, pool)
    em_finals = _em_finals(drifts[-1], diffusion, y0s, ts, path_keys, args)
    corr_j = jnp.asarray(corr, ts.dtype)
    step_bins = np.clip(np.searchsorted(np.asarray(edges), np.asarray(ts[:-1]), side="right") - 1, 0, num_bins - 1)
    counts = jnp.asarray(np.bincount(step_bins, minlength=num_bins), ts.dtype)
    p_of = lambda th: probabilities_from_logits(th, coupling, min_probability)
    if budget is not None:
        p_of = lambda th: scaled_to_budget(probabilities_from_logits(th, coupling, min_probability), counts, corr_j,
                                           budget)

    def loss(theta, weight, it):
        values = p_of(theta)
        idx = jax.random.choice(jax.random.fold_in(k_pick, it), pool, (num_groups, group_size),
                                replace=pool < num_groups * group_size)
        take = lambda x: x[idx]
        level_keys = jax.random.split(jax.random.fold_in(k_levels, it), num_groups)
        surrogate, mse = _surrogate(values, edges, drifts, diffusion, ts, args, coupling,
                                    jax.tree_util.tree_map(take, y0s), path_keys[idx],
                                    jax.tree_util.tree_map(take, em_finals), level_keys)
        cost = jnp.sum(counts[:, None] * values * corr_j)
        return surrogate + weight * cost, (jnp.mean(mse), cost, values)

    return loss


class NotConvergedWarning(UserWarning):
    """`learn_probabilities` stopped while its objective or its schedule was still moving."""


def unsettled(history: LearningHistory, z: float = 3.0, drift: float = 0.1) -> str | None:
    """Why the descent has not settled, or None: over the last half of the steps, the coupled MSE still
    falls (a least-squares slope more than `z` standard errors below 0, the predicted fall over that half
    more than 5% of its mean), or the schedule's mean over the last quarter differs from the quarter
    before by more than `drift` (relative, largest over bins and levels).

    Args:
      history: the `LearningHistory` of a descent.
      z: standard errors below 0 that the slope of the coupled MSE must reach to count as falling.
      drift: relative change of the schedule between the last two quarters that counts as moving.
    """
    n = len(history.coupled_mse)
    if n < 20:
        return None
    y = np.asarray(history.coupled_mse[n // 2:], np.float64)
    x = np.arange(y.size, dtype=np.float64)
    x -= x.mean()
    slope = float(np.dot(x, y - y.mean()) / np.dot(x, x))
    resid = y - y.mean() - slope * x
    se = float(np.sqrt(np.sum(resid**2) / max(1, y.size - 2) / np.dot(x, x)))
    fall = -slope * y.size / max(abs(float(y.mean())), 1e-300)
    if se > 0 and slope < -z * se and fall > 0.05:
        return f"the coupled MSE was still falling over the last {y.size} steps ({100 * fall:.0f}% over them)"
    q = n // 4
    last, before = history.probs[-q:].mean(0), history.probs[-2 * q:-q].mean(0)
    moved = float(np.max(np.abs(last - before) / np.maximum(before, 1e-3)))
    if moved > drift:
        return f"the schedule still moved by {100 * moved:.0f}% between the last two quarters of the steps"
    return None


def _check_learning(budget, cost_weight, steps, min_probability, average, num_steps, corr):
    """Refuse a budget that buys nothing or everything, a bad weight, step count, floor or average."""
    if (budget is None) == (cost_weight is None):
        raise InputError("budget, cost_weight: give exactly one (a cost per trajectory to hold, or a fixed "
                         "weight lambda of the expected cost in the objective).")
    if budget is not None:
        floor = num_steps * corr[0]
        if not (np.isfinite(budget) and budget > floor):
            raise InputError(f"budget: {budget!r} per trajectory is not above the cost of the cheapest level alone "
                             f"({num_steps} steps x {corr[0]:.4g} = {floor:.4g}); raise the budget or use fewer steps.")
        full = num_steps * corr.sum()
        if budget >= full:
            raise InputError(f"budget: {budget:.4g} per trajectory pays for every level at every step "
                             f"({full:.4g}); there is nothing to learn: use p = 1 (or EM with the finest level).")
    elif not (np.isfinite(cost_weight) and cost_weight > 0):
        raise InputError(f"cost_weight: expected a finite positive weight, got {cost_weight!r}.")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps: expected a positive number of optimisation steps, got {steps!r}.")
    if not 0 < min_probability < 1:
        raise InputError(f"min_probability: expected a value in (0, 1), got {min_probability!r}.")
    if not 0 < average <= 1:
        raise InputError(f"average: expected a fraction in (0, 1], got {average!r}.")


def _descend(loss, optimizer, logits, weight, steps, progress) -> LearningHistory:
    """`steps` optimiser steps on loss(theta, weight, it) -> (objective, (mse, cost, values)), with a progress
    bar; the history of every step. A non-finite objective stops with a FloatingPointError."""
    import time

    import optax

    @jax.jit
    def update(theta, opt_state, weight, it):
        (objective, (mse, cost, values)), grad = jax.value_and_grad(loss, has_aux=True)(theta, weight, it)
        updates, opt_state = optimizer.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, objective, mse, cost, values

    opt_state = optimizer.init(logits)
    history = {k: [] for k in LearningHistory._fields}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="learning p_k(t)", leave=False)
    for it in range(steps):
        t_step = time.perf_counter()
        logits, opt_state, objective, mse, cost, values = update(logits, opt_state, jnp.float32(weight), it)
        jax.block_until_ready(values)
        for name, v in zip(LearningHistory._fields, (objective, mse, cost, values, time.perf_counter() - t_step)):
            history[name].append(np.asarray(v))
        if not np.isfinite(float(objective)):
            raise FloatingPointError(f"learn_probabilities: the objective became {float(objective)} at step {it}; "
                                     "lower the learning rate or raise min_probability.")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(mse=f"{float(mse):.3g}", cost=f"{float(cost):.3g}")
    if bar is not None:
        bar.close()
    return LearningHistory(*(np.asarray(history[k]) for k in LearningHistory._fields))
