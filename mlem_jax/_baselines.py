"""Baselines that ML-EM is compared with, on the solvers' shared signature.

* `heun`: Heun's method (explicit trapezoid, two drift evaluations per step), global
  order 2 for the ODE dy = f(t, y) dt, such as the probability-flow ODE of a diffusion
  model:  y~ = y_n + h f(t_n, y_n),  y_{n+1} = y_n + h/2 (f(t_n, y_n) + f(t_{n+1}, y~)).
* `switched_drift`: the T-Stitch idea (Pan et al. 2024, arXiv 2402.14167): a small
  network before a switch time, the large one after. With a reverse-time grid (t from 1
  down to 0) the small network takes the noisy start. Deterministic and biased; pass it
  to `euler_maruyama`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mlem_jax import _validate
from mlem_jax._errors import InputError
from mlem_jax._multilevel import Multilevel, model_calls
from mlem_jax._solvers import Drift, PyTree
from mlem_jax._stepping import axpy, combine, integrate


def heun(
    drift: Drift | Multilevel,
    diffusion: None,
    y0: PyTree,
    ts: jax.Array,
    key: Any = None,
    args: Any = None,
    *,
    saveat: Any = None,
    callback: Callable | None = None,
    progress: bool = False,
    check_finite: bool = False,
) -> PyTree:
    """Heun's second-order method for the ODE dy = drift(t, y, args) dt over `ts`.

    Takes the arguments of `euler_maruyama`; `diffusion` must be None and `key` is used
    only to derive the level key of a `Multilevel` drift (there is no noise). Two drift
    evaluations per step; a `Multilevel` plans its coins over both (2N calls) and makes
    the result a `MultilevelSolution`.

    Args:
      drift: f(t, y, args), or a `Multilevel`.
      diffusion: must be None (an ODE).
      y0: the initial state (a pytree).
      ts: the strictly monotone time grid.
      key: derives the level key of a `Multilevel` without one (unused otherwise).
      args: passed to the drift.
      saveat: as in `euler_maruyama`.
      callback: as in `euler_maruyama`.
      progress: as in `euler_maruyama`.
      check_finite: as in `euler_maruyama`.
    """
    if diffusion is not None:
        raise InputError(
            "diffusion: heun integrates ODEs only (pass diffusion=None); Heun's method is not "
            "a consistent scheme for Ito SDEs. Use euler_maruyama for an SDE."
        )
    ts = _validate.check_ts(ts)
    y0 = _validate.check_y0(y0)
    call_times = jnp.stack([ts[:-1], ts[1:]], axis=1).reshape(-1)  # call 2n at t_n, call 2n + 1 at t_{n+1}
    calls = model_calls(drift, call_times, y0, args, key, name="drift", diffusion_given=False)

    def step(n, y, state):
        h = ts[n + 1] - ts[n]
        d0, state = calls.call(2 * n, ts[n], y, state)
        d1, state = calls.call(2 * n + 1, ts[n + 1], axpy(y, h, d0), state)
        return axpy(y, h, combine((0.5, d0), (0.5, d1))), state

    y, state = integrate(step, y0, ts, calls.state0, saveat=saveat, progress=progress, callback=callback,
                         desc="Heun", check_finite=check_finite)
    return calls.result(y, state)


def switched_drift(small: Drift, large: Drift, t_switch) -> Drift:
    """f(t, y) = small(t, y) for t > t_switch, large(t, y) otherwise, with `lax.cond`
    (one network runs per step). For sampling backwards in time from t = 1, the small
    network takes the steps before t_switch is reached.

    Args:
      small: the cheap drift f(t, y, args), used for t > t_switch.
      large: the accurate drift, used for t <= t_switch.
      t_switch: the time at which the drift changes."""

    def drift(t, y, args):
        return jax.lax.cond(t > t_switch, small, large, t, y, args)

    return drift
