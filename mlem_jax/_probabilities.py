"""Level probability schedules for ML-EM.

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


def _check_positive(x, name):
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array, one value per level, got shape {x.shape}.")
    if np.any(~np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"{name}: expected finite positive values, got {x}.")
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
    raise ValueError(f"coupling: expected 'independent' or 'nested', got {coupling!r}.")


def optimal_probabilities(variances, costs, step_size: float, target_variance: float) -> np.ndarray:
    """The cheapest probabilities whose injected variance per unit time is `target_variance`.

    Args:
      variances: V_k = E|f^k - f^{k-1}|^2 for k = 1..K (V_1 is not used: p_1 = 1).
      costs: C_k, the cost of drawing the correction of level k (see `correction_costs`).
      step_size: |h| of the EM grid.
      target_variance: nu^2 = |h| sum_k V_k (1/p_k - 1), the variance ML-EM may add per
        unit time.

    Returns:
      p, an array (K,) with p_1 = 1 and p_k in (0, 1].
    """
    v = _check_positive(variances, "variances")
    c = _check_positive(costs, "costs")
    if v.shape != c.shape:
        raise ValueError(f"costs: expected one cost per level ({v.size}), got {c.size}.")
    if not step_size > 0:
        raise ValueError(f"step_size: expected a positive step, got {step_size}.")
    if not target_variance > 0:
        raise ValueError(f"target_variance: expected a positive variance, got {target_variance}.")
    h = float(step_size)
    p = np.ones_like(v)
    free = np.arange(v.size) >= 1
    while free.any():
        lam = h * np.sum(np.sqrt(v[free] * c[free])) / (target_variance + h * np.sum(v[free]))
        q = lam * np.sqrt(v / c)
        newly_clamped = free & (q >= 1)
        if not newly_clamped.any():
            p[free] = q[free]
            break
        free &= ~newly_clamped
    return p


def injected_variance(variances, probs, step_size: float) -> float:
    """nu^2 = |h| sum_{k>=2} V_k (1/p_k - 1), the variance per unit time of independent coins."""
    v = np.asarray(variances, np.float64)
    p = np.asarray(probs, np.float64)
    return float(step_size * np.sum(v[1:] * (1.0 / p[1:] - 1.0)))


def geometric_probabilities(num_levels: int, ratio: float) -> np.ndarray:
    """p_k = ratio^(k-1): the simple schedule of the paper (about 0.21 is optimal at
    gamma = 2.5 for a dyadic hierarchy, see docs/method.md)."""
    if num_levels < 1:
        raise ValueError(f"num_levels: expected at least 1, got {num_levels}.")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio: expected a value in (0, 1], got {ratio}.")
    return ratio ** np.arange(num_levels, dtype=np.float64)
