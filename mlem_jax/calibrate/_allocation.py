"""The allocation of level probabilities: which p_k minimise the cost at a given injected
variance, or the variance at a given cost.

With V_k = E|f^k - f^{k-1}|^2 and C_k the cost of drawing the correction of level k,
independent coins inject, per unit time, the variance

    nu^2 = h * sum_{k>=2} V_k (1 / p_k - 1)

(EM with step h accumulates it like extra noise) at an expected cost per step of
sum_k p_k C_k. Minimising the cost at fixed nu^2 (a Lagrange multiplier per level)
gives the MLMC-like allocation

    p_k = min(1, lambda * sqrt(V_k / C_k)),
    lambda = h * sum_{k in U} sqrt(V_k C_k) / (nu^2 + h * sum_{k in U} V_k),

where U is the set of levels not clamped at 1, found by clamping and re-solving.
Level 1 is the base of the estimator and always has p_1 = 1.
"""

from __future__ import annotations

import numpy as np

from mlem_jax._errors import InputError


def _check_positive(x, name):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise InputError(f"{name}: expected a non-empty 1-D array, one value per level, got shape {x.shape}.")
    if np.any(~np.isfinite(x)) or np.any(x <= 0):
        raise InputError(f"{name}: expected finite positive values, got {x}.")
    return x


def correction_costs(level_costs, coupling: str = "independent") -> np.ndarray:
    """Cost of drawing the correction f^k - f^{k-1} of each level.

    independent: C_k + C_{k-1} (both networks run when the coin of level k fires);
    nested: C_k (the fired levels form a prefix, so f^{k-1} has run already).
    """
    c = _check_positive(level_costs, "level_costs")
    if coupling == "independent":
        return c + np.concatenate([[0.0], c[:-1]])
    if coupling == "nested":
        return c
    raise InputError(f"coupling: expected 'independent' or 'nested', got {coupling!r}.")


def optimal_probabilities(
    variances,
    costs,
    step_size: float,
    target_variance: float | None = None,
    *,
    budget: float | None = None,
    num_steps: int | None = None,
    bin_weights=None,
) -> np.ndarray:
    """The cheapest probabilities for a target injected variance, or the most accurate
    ones for a compute budget.

    Args:
      variances: V_k = E|f^k - f^{k-1}|^2, shape (K,), or (B, K) for B time bins (a
        time-dependent schedule; V_1 is not used: p_1 = 1).
      costs: (K,) cost of drawing the correction of each level (see `correction_costs`).
      step_size: |h| of the EM grid.
      target_variance: nu^2 = |h| sum_b w_b sum_k V_bk (1/p_bk - 1), the variance ML-EM
        may add per unit time (averaged over the bins).
      budget: instead of a variance, the expected cost per trajectory,
        num_steps * sum_b w_b sum_k p_bk C_k; needs `num_steps`.
      num_steps: the steps of a trajectory, with `budget`.
      bin_weights: (B,) fraction of the steps in each bin (default: equal).

    Returns:
      p with the shape of `variances`, p_1 = 1, p_k in (0, 1]. All bins share one
      Lagrange multiplier, so the allocation is optimal over time as well as levels.
    """
    v, c, w, one_bin = _check_allocation(variances, costs, step_size, bin_weights, target_variance, budget)
    h = float(step_size)
    ratio = np.sqrt(v / c)  # p is lambda * ratio where not clamped
    root = w[:, None] * np.sqrt(v * c)
    free = np.zeros(v.shape, bool)
    free[:, 1:] = True
    if target_variance is not None:
        if not target_variance > 0:
            raise InputError(f"target_variance: expected a positive variance, got {target_variance}.")
        multiplier = lambda free: h * root[free].sum() / (target_variance + h * (w[:, None] * v)[free].sum())
    else:
        multiplier = _budget_multiplier(budget, num_steps, c, w, root)
    while free.any():  # clamp at 1 the levels whose p would exceed it, then solve again for the others
        lam = multiplier(free)
        clamp = free & (lam * ratio >= 1)
        if not clamp.any():
            break
        free &= ~clamp
    p = np.ones_like(v)
    if free.any():
        p[free] = (lam * ratio)[free]
    return p[0] if one_bin else p


def _check_allocation(variances, costs, step_size, bin_weights, target_variance, budget):
    """(V as (B, K), costs, bin weights, whether V was one bin), or a ValueError naming the argument."""
    v = np.asarray(variances, dtype=np.float64)
    one_bin = v.ndim == 1
    v = np.atleast_2d(v)
    if v.ndim != 2 or v.shape[1] == 0:
        raise InputError(f"variances: expected shape (K,) or (bins, K), got {np.shape(variances)}.")
    if np.any(np.isnan(v)) or np.any(~np.isfinite(v)) or np.any(v[:, 1:] <= 0):
        raise InputError(
            "variances: expected finite positive variances of the level corrections, got "
            f"{np.array2string(np.asarray(variances), precision=3)}. A zero variance means two "
            "levels are identical: drop one of them."
        )
    c = _check_positive(costs, "costs")
    if c.shape != (v.shape[1],):
        raise InputError(f"costs: expected one cost per level ({v.shape[1]}), got {c.size}.")
    if not step_size > 0:
        raise InputError(f"step_size: expected a positive step, got {step_size}.")
    w = np.full(v.shape[0], 1.0 / v.shape[0]) if bin_weights is None else np.asarray(bin_weights, np.float64)
    if w.shape != (v.shape[0],) or np.any(w < 0) or not np.isclose(w.sum(), 1.0):
        raise InputError(f"bin_weights: expected {v.shape[0]} non-negative weights summing to 1, got {w}.")
    if (target_variance is None) == (budget is None):
        raise InputError("target_variance, budget: give exactly one of them.")
    return v, c, w, one_bin


def _budget_multiplier(budget, num_steps, c, w, root):
    """lambda(free levels) that spends `budget` per trajectory, the clamped levels paid in full."""
    if num_steps is None or num_steps < 1:
        raise InputError("num_steps: a budget per trajectory needs the number of steps.")
    per_step = float(budget) / num_steps
    floor = c[0]
    if not per_step > floor:
        raise InputError(
            f"budget: {budget:.4g} per trajectory is not above the cost of the cheapest level "
            f"alone ({num_steps} steps x {c[0]:.4g} = {num_steps * c[0]:.4g}); raise the budget "
            "or use fewer steps."
        )

    def multiplier(free):
        clamped_cost = floor + (w[:, None] * c[None, :] * (~free))[:, 1:].sum()
        lam = (per_step - clamped_cost) / root[free].sum()
        if lam <= 0:
            raise InputError(f"budget: {budget:.4g} cannot pay for the levels that must run.")
        return lam

    return multiplier


def injected_variance(variances, probs, step_size: float, bin_weights=None) -> float:
    """nu^2 = |h| sum_b w_b sum_{k>=2} V_bk (1/p_bk - 1), the variance per unit time that
    independent coins add (variances and probs of shape (K,) or (bins, K)).

    Args:
      variances: V_k, (K,) or (bins, K); the first column is ignored.
      probs: p_k, the same shape.
      step_size: h, the EM-equivalent step.
      bin_weights: (bins,) share of the steps in each bin (default: equal).
    """
    v = np.atleast_2d(np.asarray(variances, np.float64))
    p = np.atleast_2d(np.asarray(probs, np.float64))
    w = np.full(v.shape[0], 1.0 / v.shape[0]) if bin_weights is None else np.asarray(bin_weights)
    return float(step_size * np.sum(w[:, None] * v[:, 1:] * (1.0 / p[:, 1:] - 1.0)))


def expected_cost(probs, costs, num_steps: int, bin_weights=None) -> float:
    """num_steps * sum_b w_b sum_k p_bk C_k: the expected cost of one trajectory.

    Args:
      probs: (K,) or (bins, K) probabilities.
      costs: (K,) cost of drawing each level's correction (`correction_costs`).
      num_steps: the model calls of one trajectory.
      bin_weights: (bins,) share of the steps in each bin (default: equal).
    """
    p = np.atleast_2d(np.asarray(probs, np.float64))
    w = np.full(p.shape[0], 1.0 / p.shape[0]) if bin_weights is None else np.asarray(bin_weights)
    return float(num_steps * np.sum(w[:, None] * p * np.asarray(costs)[None, :]))
