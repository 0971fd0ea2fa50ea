"""The one way mlem-jax times a jitted call: a first call (compilation and one run) timed
apart, then `repeats` further calls, each waited for with `jax.block_until_ready`."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from mlem_jax._errors import InputError


class Timing(NamedTuple):
    """The output of the last call, the first call's seconds (compilation included), and
    the median (or minimum) seconds of the further calls."""

    output: Any
    first_seconds: float
    seconds: float


def time_calls(fn: Callable, *args, repeats: int = 5, statistic: str = "median") -> Timing:
    """Time `fn(*args)`: one first call, then `repeats` (at least 1) timed calls summarised
    by `statistic`, "median" (robust to a stray slow call) or "min" (the best the device
    does)."""
    if statistic not in ("median", "min"):
        raise InputError(f"statistic: expected 'median' or 'min', got {statistic!r}.")
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return Timing(out, first, float(np.median(times) if statistic == "median" else np.min(times)))


def time_pair(a: Callable, b: Callable, repeats: int = 2) -> tuple:
    """Measured seconds of `a()` and of `b()`: one untimed call of each, then `repeats`
    rounds timing a then b, and the best of each. Interleaving puts both sides under the same
    load, which on a shared machine drifts between calls."""
    best = [math.inf, math.inf]
    for fn in (a, b):
        jax.block_until_ready(fn())
    for _ in range(max(1, int(repeats))):
        for i, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]
