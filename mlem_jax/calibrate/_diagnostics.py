"""Held-out diagnostics of a family of levels, before any sampling: does each level add
accuracy, or only noise?

Every level predicts the same target (eps, a data prediction, a drift) on the same held-out
draws i = 1..N (shared x_0, t and noise). With per-draw losses l_{k,i} = |out_k - y_i|^2 / D:

* each level's loss L_k = mean_i l_{k,i} with its standard error, overall and per band of
  a per-draw covariate (the noise level, say);
* for two levels a < b, the spread V_ab = mean_i |out_a - out_b|^2 / D and the loss gap
  G_ab = L_a - L_b, both with paired standard errors. If b's error is a's minus a part
  orthogonal to b's remaining error (nested errors: the expensive level corrects the cheap
  one), V_ab = G_ab exactly in expectation, a ratio of 1. If b adds error of its own
  (seed noise: another network of about the same quality), V_ab exceeds the gap: the
  correction a multilevel estimator pays for is larger than the quality it buys. The ratio
  is what the multilevel variance is made of: the coins' variance is sum_k (1/p_k - 1) V_k;
* gamma from loss against cost, L_k = L_inf + A cost_k^(-2/gamma) (`fit_gamma` with an
  offset when the target is noisy, such as denoising score matching, whose floor L_inf is
  the irreducible loss; without it when the target is exact);
* which levels are worth keeping: a level whose gap to the level below is within two
  standard errors of zero, or whose ratio to the kept level below exceeds `max_ratio`,
  adds cost and coin noise rather than accuracy.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from mlem_jax._errors import InputError
from mlem_jax.calibrate._gamma import GammaFit, fit_gamma


class Measured(NamedTuple):
    """A mean over held-out draws and its standard error."""

    value: float
    stderr: float


class PairDiagnostic(NamedTuple):
    """Levels a < b: the spread V_ab, the loss gap L_a - L_b, and their ratio."""

    a: int
    b: int
    spread: Measured
    gap: Measured
    ratio: float


class LevelDiagnostics(NamedTuple):
    """What `level_diagnostics` measured.

    losses: each level's held-out loss.
    band_edges: (B + 1,) edges of the covariate bands; band_losses: (B, K) loss per band.
    pairs: every pair a < b.
    gamma: the fit of loss against cost (None without costs or with fewer than 3-4 levels).
    keep: the levels worth keeping, cheapest first; dropped: {level: why}.
    """

    losses: tuple
    band_edges: np.ndarray
    band_losses: np.ndarray
    pairs: tuple
    gamma: GammaFit | None
    keep: tuple
    dropped: dict

    def pair(self, a: int, b: int) -> PairDiagnostic:
        return next(p for p in self.pairs if (p.a, p.b) == (a, b))


def _mean(x) -> Measured:
    x = np.asarray(x, np.float64)
    return Measured(float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size)))


def level_diagnostics(outputs, target, *, covariate=None, bands: int = 4, costs=None, exact_target: bool = False,
                      max_ratio: float = 1.5) -> LevelDiagnostics:
    """Held-out diagnostics of K levels (see the module docstring).

    Args:
      outputs: (K, N, ...) each level's prediction on the same N held-out draws, cheapest first.
      target: (N, ...) what they predict (a noisy target such as eps, or an exact one).
      covariate: (N,) a per-draw quantity to band the losses by (t or log sigma); None: one band.
      bands: the number of equal-count bands of `covariate`.
      costs: (K,) the cost of one evaluation of each level (FLOPs or seconds), for gamma.
      exact_target: the target is exact (no irreducible loss): gamma is fitted without an offset.
      max_ratio: a level whose spread to the kept level below exceeds this multiple of its loss gap
        adds noise rather than accuracy, and is dropped.

    Returns:
      `LevelDiagnostics`.
    """
    out = np.asarray(outputs, np.float64)
    y = np.asarray(target, np.float64)
    if out.ndim < 2 or out.shape[1:] != y.shape:
        raise InputError(f"outputs: expected (K, N, ...) predictions of target's shape {y.shape}, got {out.shape}.")
    K, N = out.shape[:2]
    if N < 3:
        raise InputError(f"target: expected at least 3 held-out draws, got {N}.")
    out, y = out.reshape(K, N, -1), y.reshape(N, -1)
    per_draw = np.mean((out - y[None]) ** 2, -1)  # (K, N)
    losses = tuple(_mean(per_draw[k]) for k in range(K))
    if covariate is None:
        edges, band = np.array([-np.inf, np.inf]), np.zeros(N, int)
    else:
        cov = np.asarray(covariate, np.float64).reshape(-1)
        if cov.shape != (N,):
            raise InputError(f"covariate: expected one value per draw, shape ({N},), got {cov.shape}.")
        edges = np.quantile(cov, np.linspace(0, 1, bands + 1))
        band = np.clip(np.searchsorted(edges, cov, side="right") - 1, 0, bands - 1)
    band_losses = np.array([[per_draw[k, band == b].mean() if np.any(band == b) else np.nan for k in range(K)]
                            for b in range(len(edges) - 1)])
    pairs = []
    for a in range(K):
        for b in range(a + 1, K):
            spread = _mean(np.mean((out[a] - out[b]) ** 2, -1))
            gap = _mean(per_draw[a] - per_draw[b])
            pairs.append(PairDiagnostic(a, b, spread, gap, spread.value / gap.value if gap.value > 0 else math.inf))
    keep, dropped = [0], {}
    for k in range(1, K):
        p = next(q for q in pairs if (q.a, q.b) == (keep[-1], k))
        if p.gap.value <= 2 * p.gap.stderr:
            dropped[k] = (f"its loss is within two standard errors of level {keep[-1]}'s (gap {p.gap.value:.3g} "
                          f"+- {p.gap.stderr:.2g})")
        elif p.ratio > max_ratio:
            dropped[k] = (f"its correction to level {keep[-1]} is {p.ratio:.2f}x the loss it gains: it adds noise, "
                          "not accuracy")
        else:
            keep.append(k)
    gamma = None
    if costs is not None:
        c = np.asarray(costs, np.float64)
        if c.shape != (K,):
            raise InputError(f"costs: expected one cost per level, shape ({K},), got {c.shape}.")
        try:
            gamma = fit_gamma(c, np.array([m.value for m in losses]), offset=not exact_target, power=2.0)
        except ValueError:  # too few levels, or losses that do not fall with cost
            gamma = None
    return LevelDiagnostics(losses, edges, band_losses, tuple(pairs), gamma, tuple(keep), dropped)


def format_diagnostics(d: LevelDiagnostics, names: Sequence[str] | None = None) -> str:
    """A plain-text report of `level_diagnostics`."""
    K = len(d.losses)
    names = list(names) if names is not None else [f"level {k}" for k in range(K)]
    lines = ["held-out loss per level (mean +- s.e.):"]
    lines += [f"  {names[k]}: {m.value:.5g} +- {m.stderr:.2g}" for k, m in enumerate(d.losses)]
    lines.append("adjacent pairs: spread V_ab against the loss gap (ratio 1: nested errors; > 1: added noise)")
    for k in range(K - 1):
        p = d.pair(k, k + 1)
        lines.append(f"  {names[k]} -> {names[k + 1]}: V {p.spread.value:.4g} +- {p.spread.stderr:.2g}, gap "
                     f"{p.gap.value:.4g} +- {p.gap.stderr:.2g}, ratio {p.ratio:.2f}")
    if d.gamma is not None:
        g = d.gamma
        lines.append(f"gamma {g.gamma:.2f} (95% interval {g.low:.2f}-{g.high:.2f}) from loss = {g.offset:.4g} + "
                     f"{g.scale:.3g} cost^(-2/gamma)")
    lines.append("keep: " + ", ".join(names[k] for k in d.keep))
    for k, why in d.dropped.items():
        lines.append(f"drop {names[k]}: {why}")
    return "\n".join(lines)
