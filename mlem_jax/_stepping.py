"""The stepping skeleton every solver of the library runs on: one `lax.scan` over the grid,
saveat, the callback, the progress bar and the finiteness check. A solver supplies only
its update rule `step(n, y, state) -> (y_next, state)` for n = 0..N-1."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import _progress, _validate


def integrate(step: Callable, y0: Any, ts: jax.Array, state0: Any, *, saveat: Any = None, progress: bool = False,
              callback: Callable | None = None, desc: str = "", check_finite: bool = False) -> tuple[Any, Any]:
    """Run `step` over the grid `ts`; returns (final or saved states, final solver state)."""
    num_times = ts.shape[0]
    save_idx = _validate.check_saveat(saveat, num_times)
    bar = _progress.ProgressBar(num_times - 1, desc) if progress else None
    if save_idx is not None:
        # slot[n] = where the state at grid point n goes, or len(save_idx) (dropped).
        slot = np.full(num_times, len(save_idx), dtype=np.int32)
        slot[save_idx] = np.arange(len(save_idx), dtype=np.int32)
        saved0 = jax.tree_util.tree_map(lambda y: jnp.zeros((len(save_idx), *jnp.shape(y)), jnp.result_type(y)), y0)
        saved0 = jax.tree_util.tree_map(lambda s, y: s.at[slot[0]].set(y, mode="drop"), saved0, y0)
        slot = jnp.asarray(slot)
    else:
        saved0 = None

    def body(carry, n):
        y, state, saved = carry
        y1, state = step(n, y, state)
        if saved is not None:
            saved = jax.tree_util.tree_map(lambda s, v: s.at[slot[n + 1]].set(v, mode="drop"), saved, y1)
        _progress.report_step(n, ts[n + 1], y1, bar, callback)
        return (y1, state, saved), None

    (y, state, saved), _ = jax.lax.scan(body, (y0, state0, saved0), jnp.arange(num_times - 1))
    out = y if saved is None else saved
    if check_finite:  # NaN and inf propagate, so the final state tells whether the path stayed finite
        import equinox as eqx

        leaves = jax.tree_util.tree_leaves(y)
        bad = jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves])))
        out = jax.tree_util.tree_map(lambda a: eqx.error_if(
            a, bad, f"{desc}: the trajectory went non-finite (NaN or inf); look at the drifts, the step size "
                    "and the probabilities (check_finite=True)"), out)
    return out, state


def axpy(y, h, F):
    """y + h F, leaf by leaf."""
    return jax.tree_util.tree_map(lambda a, f: a + jnp.asarray(h, f.dtype) * f, y, F)


def combine(*pairs):
    """sum_i c_i T_i over pytrees T_i with scalar coefficients c_i: `combine((c1, T1), (c2, T2), ...)`."""
    out = None
    for c, tree in pairs:
        term = jax.tree_util.tree_map(lambda v: jnp.asarray(c, v.dtype) * v, tree)
        out = term if out is None else jax.tree_util.tree_map(jnp.add, out, term)
    return out
