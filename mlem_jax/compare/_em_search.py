"""The cheapest stratified ML-EM configuration at EM's coupled error: what
`mlem-jax calibrate --match-em` writes.

1. Reference: EM with the finest level on a grid `refine` times finer, on the same prior
   draws and Brownian path as every method (`_coupled.shared_noise`).
2. EM with the finest level on N steps: its coupled RMS error A.
3. ML-EM configurations, cheapest first: stratified coins, the independent or nested
   coupling, and probabilities p_k(t) = min(1, lambda s_k(t)) along a ladder of lambda,
   with the shape s of `calibrate.stratified_shape` (from level statistics and costs
   measured on this device). The search returns the cheapest whose error is at most
   `tolerance` A on its pilot batch. At the top of the ladder every p is 1 (ML-EM is EM),
   so a configuration is always found.

The comparison of samplers at equal error is `_best_samplers.compare_best_samplers`, whose
`Comparison` is the one result type of this package.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from mlem_jax import PiecewiseConstant
from mlem_jax._errors import InputError
from mlem_jax.calibrate import level_costs, level_statistics
from mlem_jax.calibrate._stratified import _stratified_family
from mlem_jax.compare._coupled import em_sampler, increments_on, mlem_sampler, shared_noise
from mlem_jax.diffusion.metrics import coupled_error
from mlem_jax.diffusion.parameterization import reverse_diffusion
from mlem_jax.diffusion.sde import uniform_grid

LADDER = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6, 8.0)


class Config(NamedTuple):
    """One stratified ML-EM configuration: the coupling and the scale lambda of p = min(1,
    lambda x shape)."""

    coupling: str
    scale: float  # lambda; p = min(1, lambda * shape)


class Search(NamedTuple):
    """The pilot search: the chosen configuration and its schedule, EM's pilot error, and
    the configurations tried as (coupling, lambda, predicted seconds, coupled error)."""

    config: Config
    probs: PiecewiseConstant
    em_error: float
    tried: list
    seconds: float


def _setup(family, num_steps, refine):
    drifts = family.drifts()
    g = reverse_diffusion(family.sde)
    return drifts, g, uniform_grid(num_steps), uniform_grid(refine * num_steps)


def _reference_and_em(drifts, g, ts, ts_ref, noise):
    ref = em_sampler(drifts[-1], g, ts_ref)(noise.y0, noise.increments)
    dw = increments_on(noise, ts)
    return ref, dw, em_sampler(drifts[-1], g, ts)(noise.y0, dw)


def search_configuration(family, num_steps: int = 100, pilot_size: int = 32, seed: int = 1, *,
                         tolerance: float = 1.05, refine: int = 4, num_bins: int = 10,
                         max_error: float | None = None, log: Callable[[str], None] = lambda s: None) -> Search:
    """The cheapest stratified ML-EM configuration whose coupled error on a pilot batch is
    at most `tolerance` times EM's (both against EM on a `refine` times finer grid).

    Configurations: coupling in {independent, nested} x lambda in LADDER, sorted by their
    predicted time (level costs measured on this device at the pilot batch), plus every
    p = 1 last. The error falls with the cost, so the first one that meets the target is
    found by bisection over that order. With `max_error`, an EM error above it (a family that
    samples noise) is a ValueError before the search.

    Args:
      family: the family, cheapest level first.
      num_steps: EM's steps on the finest level.
      pilot_size: prior draws of the pilot batch.
      seed: of the pilot batch.
      tolerance: the error allowed over EM's, as a factor.
      refine: the reference's grid is this many times finer.
      num_bins: time bins of the statistics and the schedule.
      max_error: refuse a family whose pilot error exceeds this (untrained levels).
      log: receives one line per notable event.
    """
    if not isinstance(pilot_size, (int, np.integer)) or pilot_size < 6:
        raise InputError(f"pilot_size: expected at least 6 pilot samples (the level statistics need 6), got "
                         f"{pilot_size!r}.")
    t_start = time.perf_counter()
    drifts, g, ts, ts_ref = _setup(family, num_steps, refine)
    shape_img = tuple(family.image_shape)
    pilot = shared_noise(family.sde, jax.random.key(seed), pilot_size, shape_img, ts_ref)
    stride = max(1, num_steps // 50)
    points = -(-num_steps // stride)  # grid points where the levels are evaluated
    n_stats = min(pilot_size, 16)  # trajectories of the statistics (the pilot batch has only pilot_size)
    stats = level_statistics(drifts, g, pilot.y0[:n_stats], ts, jax.random.split(jax.random.key(seed + 1), n_stats),
                             num_bins=min(num_bins, max(1, points // 2)), stride=stride)  # no empty bins
    costs = np.asarray(level_costs([jax.vmap(f, in_axes=(None, 0, None)) for f in drifts], ts[0], pilot.y0,
                                   repeats=5).seconds)
    # per coupling, the cube-root family p = min(1, lambda s) and its predicted time per sample
    families = {c: _stratified_family(stats, costs, num_steps, c, True) for c in ("independent", "nested")}
    predicted = {(c, s): families[c][0](s) for c in families for s in LADDER}
    schedules = [(Config(c, s), families[c][1](s)) for c, s in sorted(predicted, key=predicted.get)]
    schedules.append((Config("nested", float("inf")), families["nested"][1](float("inf"))))  # every p = 1
    samplers = {c: mlem_sampler(drifts, g, ts, coupling=c, coins="stratified") for c in ("independent", "nested")}
    ref, dw, y = _reference_and_em(drifts, g, ts, ts_ref, pilot)
    target = coupled_error(y, ref).value
    if max_error is not None and not target <= max_error:
        raise InputError(f"family: EM's own coupled error on the pilot is {target:.3g} per pixel, beyond {max_error:g} "
                         "(half the data's range): the finest level samples noise, so the family looks undertrained "
                         "or the grid too coarse; nothing was searched.")
    log(f"pilot ({pilot_size} samples): EM error {target:.4f}; bisecting over {len(schedules)} configurations")
    tried = []
    lo, hi = 0, len(schedules) - 1  # schedules[hi] meets the target (every p = 1 is EM)
    while lo < hi:
        mid = (lo + hi) // 2
        cfg, probs = schedules[mid]
        yml, _ = samplers[cfg.coupling](pilot.y0, dw, jax.random.key(seed + 11), probs)
        err = coupled_error(yml, ref).value
        tried.append((cfg.coupling, cfg.scale, families[cfg.coupling][0](cfg.scale), err))
        log(f"  {cfg.coupling:11s} lambda {cfg.scale:4.2f}: error {err:.4f} ({err / target:.2f} x EM's)")
        lo, hi = (lo, mid) if err <= tolerance * target else (mid + 1, hi)
    cfg, probs = schedules[lo]
    return Search(cfg, probs, target, tried, time.perf_counter() - t_start)
