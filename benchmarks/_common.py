"""Helpers shared by the benchmark scripts: device description, timing, output folder."""

from __future__ import annotations

import os
import platform
import time

import jax


def device_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{d.platform} ({kind}), {os.cpu_count()} CPU cores, jax {jax.__version__}, {platform.python_version()}"


def median_time(fn, *args, repeats: int = 5) -> float:
    """Median wall time of fn(*args) in seconds, after one warm-up call (compilation)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def out_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
