"""Coupled comparisons: several samplers driven by the same prior draws and the same
Brownian path, so that their differences are the differences of the methods.

The Brownian increments are drawn once on a fine uniform grid; a coarser grid whose points
are every r-th fine point gets the sums of r consecutive fine increments, which is the
same Brownian path seen on the coarse grid. The reference (EM with the finest level on
the fine grid) and every method then differ only by their discretisation and coins, and
`mlem_jax.diffusion.metrics.coupled_error` measures that difference.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import euler_maruyama, multilevel_euler_maruyama
from mlem_jax._errors import InputError


class SharedNoise(NamedTuple):
    """y0: (B, *shape) prior draws; increments: (B, N_fine, *shape) on the grid `ts`."""

    y0: jax.Array
    increments: jax.Array
    ts: jax.Array


def shared_noise(sde, key: jax.Array, batch_size: int, image_shape, ts_fine) -> SharedNoise:
    """Prior draws and Brownian increments on the fine grid `ts_fine` for a batch.

    Args:
      sde: the family's SDE (its prior).
      key: draws the prior and the increments.
      batch_size: samples.
      image_shape: one sample's shape.
      ts_fine: the finest grid; coarser grids sum its increments.
    """
    ts_fine = jnp.asarray(ts_fine)
    shape = tuple(image_shape)
    prior_key, noise_key = jax.random.split(key)
    y0 = jax.vmap(lambda k: sde.prior_sample(k, shape))(jax.random.split(prior_key, batch_size))
    h = jnp.abs(jnp.diff(ts_fine)).reshape(1, -1, *([1] * len(shape)))
    z = jax.random.normal(noise_key, (batch_size, ts_fine.shape[0] - 1, *shape))
    return SharedNoise(y0, z * jnp.sqrt(h), ts_fine)


def increments_on(noise: SharedNoise, ts) -> jax.Array:
    """The increments of the shared path on `ts`, a subgrid of every r-th fine point."""
    fine = np.asarray(noise.ts, np.float64)
    coarse = np.asarray(ts, np.float64)
    n_fine, n = fine.size - 1, coarse.size - 1
    if n < 1 or n_fine % n != 0 or not np.allclose(fine[:: n_fine // n], coarse, rtol=1e-5, atol=1e-7):
        raise InputError(
            f"ts: a grid of {n} steps is not every r-th point of the shared noise's grid of {n_fine} steps; "
            "use grids whose step counts divide the fine one (for example uniform_grid(N) and "
            "uniform_grid(4 N))."
        )
    dw = noise.increments
    return dw.reshape(dw.shape[0], n, n_fine // n, *dw.shape[2:]).sum(2)


def em_sampler(drift: Callable, diffusion: Callable | None, ts) -> Callable:
    """`run(y0, dw) -> samples`: EM with one drift over a batch, jitted.

    Args:
      drift: the finest level's reverse drift.
      diffusion: g(t, y, args).
      ts: the grid the increments are summed onto.
    """
    return jax.jit(jax.vmap(lambda y, w: euler_maruyama(drift, diffusion, y, ts, w)))


def mlem_sampler(drifts, diffusion: Callable | None, ts, coupling: str = "independent",
                 coins: str = "iid") -> Callable:
    """`run(y0, dw, level_key, probs) -> (samples, evaluations per path)`: ML-EM over a
    batch, jitted, the level key unbatched so that skipped levels stay skipped. The
    probabilities are an argument: schedules of one shape share one compilation.

    Args:
      drifts: the levels' reverse drifts, cheapest first.
      diffusion: g(t, y, args).
      ts: the grid.
      coupling: "independent" or "nested".
      coins: "iid" or "stratified".
    """

    def one(y, w, lk, probs):
        sol = multilevel_euler_maruyama(drifts, probs, diffusion, y, ts, w, level_key=lk, coupling=coupling,
                                        coins=coins)
        return sol.y, sol.evaluations

    batched = jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))

    def run(y0, dw, level_key, probs):
        y, evaluations = batched(y0, dw, level_key, probs)
        return y, evaluations[0]  # the coins are shared: every path has the same counts

    return run
