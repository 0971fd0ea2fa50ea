"""Batched sampling of a trained family with EM or ML-EM: the jit(vmap(...)) pattern
with per-sample keys and an unbatched level key, over every device of every process,
timed with compilation separated."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import euler_maruyama, multilevel_euler_maruyama
from mlem_jax.diffusion.parameterization import reverse_diffusion


class SampleResult(NamedTuple):
    """Samples, the evaluations of each level per sample path, and compile and run seconds."""

    images: np.ndarray  # (B, H, W, C)
    evaluations: np.ndarray  # (K,) evaluations of each level per sample path
    compile_seconds: float
    run_seconds: float


def sample(family, levels, ts, seed: int, batch_size: int, probs=None, coupling="independent",
           probability_flow: bool = False, progress: bool = False, coins: str = "iid") -> SampleResult:
    """EM on the last of `levels` when `probs` is None, else ML-EM on `levels` (indices
    into the family, cheapest first). Sample i uses key fold_in(key(seed), i) for its
    prior draw and noise, so EM and ML-EM with the same seed share noise, and the level
    coins come from one unbatched key. One program over every device of every process
    (`mlem_jax.sharding.sharded_sampler`): in a multi-process run each process samples
    the rows of its own devices and every process gets the whole batch back, the same
    samples as on one device."""
    drifts_all = family.drifts(probability_flow)
    drifts = tuple(drifts_all[i] for i in levels)
    sde = family.sde
    g = None if probability_flow else reverse_diffusion(sde)
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch_size))
    level_key = jax.random.fold_in(jax.random.key(seed + 1_000_003), 0)
    shape = tuple(family.image_shape)

    def one(key, lk):
        y0 = sde.prior_sample(jax.random.fold_in(key, 7), shape)
        if probs is None:
            y = euler_maruyama(drifts[-1], g, y0, ts, key, progress=progress)
            return y, jnp.zeros(len(drifts), jnp.int32).at[-1].set(ts.shape[0] - 1)
        sol = multilevel_euler_maruyama(drifts, probs, g, y0, ts, key, level_key=lk, coupling=coupling,
                                        coins=coins, progress=progress)
        return sol.y, sol.evaluations

    from mlem_jax.sharding import sharded_sampler

    (images, evals), t_compile, t_run = sharded_sampler(one).timed(keys, level_key)
    images = np.asarray(images)
    bad = ~np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)
    if bad.any():
        raise FloatingPointError(
            f"sample: {int(bad.sum())} of {images.shape[0]} samples are not finite (NaN or inf), first at index "
            f"{int(np.argmax(bad))}; nothing was written. A family with damaged weights is refused by load_family, "
            "so look at the grid (too few steps for these probabilities?) or the level probabilities.")
    return SampleResult(images, np.asarray(evals[0]), t_compile, t_run)
