"""Fitting gamma: error ~ cost^(-power/gamma), with a confidence interval."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from mlem_jax._errors import InputError


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

    Args:
      costs: the cost of each level (or run).
      errors: its error (or loss).
      offset: fit an irreducible error as well.
      power: 1 for errors, 2 for losses that scale like squared errors.
      confidence: of the interval on gamma.
    """
    c = np.asarray(costs, np.float64)
    e = np.asarray(errors, np.float64)
    if c.shape != e.shape or c.ndim != 1:
        raise InputError(f"costs, errors: expected two 1-D arrays of the same length, got {c.shape} and {e.shape}.")
    need = 4 if offset else 3
    if c.size < need:
        raise InputError(f"costs: fitting gamma{' with an offset' if offset else ''} needs at least {need} points, "
                         f"got {c.size}.")
    if np.any(~np.isfinite(c)) or np.any(c <= 0) or np.any(~np.isfinite(e)) or np.any(e <= 0):
        raise InputError("costs, errors: expected finite positive values.")

    return (_fit_with_offset if offset else _fit_log_log)(c, e, power, confidence)


def _fit_log_log(c, e, power, confidence) -> GammaFit:
    """log e = a + slope log c by least squares, gamma = -power / slope, a Student-t interval on the slope."""
    x = np.log(c)
    A = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(A, np.log(e), rcond=None)
    resid = np.log(e) - A @ coef
    slope = coef[1]
    if slope >= 0:
        raise InputError("errors: they do not decrease with the cost, so gamma is undefined.")
    dof = x.size - 2
    s2 = resid @ resid / max(dof, 1)
    se = math.sqrt(s2 * np.linalg.inv(A.T @ A)[1, 1])
    tq = _t_quantile(0.5 + confidence / 2, dof)
    gamma = -power / slope
    lo_s, hi_s = slope - tq * se, slope + tq * se
    low = -power / lo_s if lo_s < 0 else gamma
    high = -power / hi_s if hi_s < 0 else math.inf
    return GammaFit(gamma, min(low, high), max(low, high), 0.0, math.exp(coef[0]), power)


def _fit_with_offset(c, e, power, confidence) -> GammaFit:
    """For a fixed gamma the model is linear in (offset, scale): fit it by least squares weighted by
    1/error^2 (relative errors), profile gamma on a grid, and take the profile-likelihood interval
    SSE(gamma) <= SSE_min (1 + F(1, n-3) / (n-3))."""
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
        raise InputError("errors: they do not decrease with the cost, so gamma is undefined.")
    i = int(np.argmin(sse))
    lo_i, hi_i = max(i - 1, 0), min(i + 1, grid.size - 1)
    fine = np.linspace(grid[lo_i], grid[hi_i], 401)
    fine_sse = np.array([sse_at(g)[0] for g in fine])
    gamma = float(fine[np.argmin(fine_sse)])
    best, coef = sse_at(gamma)
    dof = c.size - 3
    limit = best * (1 + _t_quantile(0.5 + confidence / 2, dof) ** 2 / dof)
    inside = grid[sse <= limit]
    low = float(min(inside.min(), gamma)) if inside.size else gamma
    high = float(max(inside.max(), gamma)) if inside.size else gamma
    if sse[-1] <= limit:
        high = math.inf  # the data cannot rule out arbitrarily large gamma
    return GammaFit(gamma, low, high, float(coef[0]), float(coef[1]), power)
