"""Level costs: wall time and XLA FLOPs of one evaluation of each level, and the check that they increase."""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Sequence

import jax
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax._flops import flops_of
from mlem_jax.timing import time_calls


class LevelCosts(NamedTuple):
    """seconds: median wall time of one jitted evaluation per level (this device);
    flops: XLA's cost-analysis FLOPs per evaluation (NaN where the backend gives none)."""

    seconds: np.ndarray
    flops: np.ndarray


def level_costs(drifts: Sequence[Callable], t, y, args=None, repeats: int = 10, flops: bool = True) -> LevelCosts:
    """Cost of one evaluation `f(t, y, args)` of each level, on the current device.

    Pass a batched `y` (and a drift that accepts it, for example `jax.vmap(f)`) to measure
    the batched cost that sampling pays. Warm-up (compilation) is excluded; the median of
    `repeats` timed calls is reported (`mlem_jax.timing.time_calls`). `flops=False` skips
    XLA's cost analysis (`LevelCosts.flops` is then NaN).

    Args:
      drifts: the levels, each f(t, y, args).
      t: the time of the evaluation.
      y: the state (batched, for a batched drift).
      args: passed to the drifts.
      repeats: timed calls after the first.
      flops: also count XLA's FLOPs of each level.
    """
    drifts = tuple(drifts)
    if not drifts:
        raise InputError("drifts: expected at least one drift function.")
    seconds, counted = [], []
    for f in drifts:
        seconds.append(time_calls(jax.jit(f), t, y, args, repeats=repeats).seconds)
        counted.append(flops_of(f, t, y, args) if flops else float("nan"))
    seconds = np.array(seconds)
    check_cost_order(seconds, "costs")
    return LevelCosts(seconds, np.array(counted))


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
