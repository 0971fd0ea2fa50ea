"""Host-side progress bars and user callbacks for jitted scan loops.

The bar lives on the host and is driven by `jax.debug.callback` with the (unbatched)
step index, so it ticks once per step even under `jax.vmap`, and it restarts on every
call of a compiled sampler because it resets itself at step 0.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax


class StepInfo(NamedTuple):
    """What a `callback` receives after every step (as NumPy values on the host)."""

    step: Any  # index n of the step just taken, 0-based
    t: Any  # time t_{n+1} reached
    y: Any  # state at t_{n+1}


class ProgressBar:
    """A tqdm bar over `total` steps that a jitted loop can drive."""

    def __init__(self, total: int, desc: str):
        self.total = total
        self.desc = desc
        self.bar = None

    def __call__(self, n) -> None:
        from tqdm.auto import tqdm

        n = int(n)
        if self.bar is None or n == 0:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=self.total, desc=self.desc, leave=False)
        if n + 1 > self.bar.n:
            self.bar.update(n + 1 - self.bar.n)
        if n + 1 >= self.total:
            self.bar.close()
            self.bar = None


def report_step(n, t, y, progress: ProgressBar | None, callback: Callable | None) -> None:
    """Call the progress bar and the user callback from inside a traced loop."""
    if progress is not None:
        jax.debug.callback(progress, n)
    if callback is not None:
        jax.debug.callback(lambda n, t, y: callback(StepInfo(n, t, y)), n, t, y)
