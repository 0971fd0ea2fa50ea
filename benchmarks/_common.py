"""Helpers shared by the benchmark scripts: device description, timing, output folder."""

from __future__ import annotations

import os
import platform

import jax

from mlem_jax.timing import time_calls


def device_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{d.platform} ({kind}), {os.cpu_count()} CPU cores, jax {jax.__version__}, {platform.python_version()}"


def median_time(fn, *args, repeats: int = 5) -> float:
    """Median wall time of fn(*args) in seconds, after one warm-up call (compilation)."""
    return time_calls(fn, *args, repeats=repeats).seconds


def out_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
