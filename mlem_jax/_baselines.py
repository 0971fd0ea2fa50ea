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

from mlem_jax import _validate
from mlem_jax._solvers import Drift, PyTree, _integrate


def heun(
    drift: Drift,
    diffusion: None,
    y0: PyTree,
    ts: jax.Array,
    key: Any = None,
    args: Any = None,
    *,
    saveat: Any = None,
    callback: Callable | None = None,
    progress: bool = False,
) -> PyTree:
    """Heun's second-order method for the ODE dy = drift(t, y, args) dt over `ts`.

    Takes the arguments of `euler_maruyama`; `diffusion` must be None and `key` is
    unused (there is no noise). Two drift evaluations per step.
    """
    if diffusion is not None:
        raise ValueError(
            "diffusion: heun integrates ODEs only (pass diffusion=None); Heun's method is not "
            "a consistent scheme for Ito SDEs. Use euler_maruyama for an SDE."
        )
    ts = _validate.check_ts(ts)
    y0 = _validate.check_y0(y0)
    _validate.check_drift(drift, ts[0], y0, args, name="drift")

    def step_drift(n, t, y, aux):
        h = ts[n + 1] - t
        d0 = drift(t, y, args)
        predictor = jax.tree_util.tree_map(lambda a, d: a + h.astype(d.dtype) * d, y, d0)
        d1 = drift(ts[n + 1], predictor, args)
        return jax.tree_util.tree_map(lambda a, b: 0.5 * (a + b), d0, d1), aux

    y, _ = _integrate(step_drift, None, y0, ts, None, args, saveat, None, progress, callback, "Heun")
    return y


def switched_drift(small: Drift, large: Drift, t_switch) -> Drift:
    """f(t, y) = small(t, y) for t > t_switch, large(t, y) otherwise, with `lax.cond`
    (one network runs per step). For sampling backwards in time from t = 1, the small
    network takes the steps before t_switch is reached."""

    def drift(t, y, args):
        return jax.lax.cond(t > t_switch, small, large, t, y, args)

    return drift
