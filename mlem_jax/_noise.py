"""Brownian increments dW_n over [t_n, t_{n+1}], from one of three sources.

* a PRNG key: dW_n = sqrt(|t_{n+1} - t_n|) * N(0, I) drawn from fold_in(noise_key, n),
  where noise_key = split(key)[0]. Each step's noise depends only on the key and the
  step index, so a seeded sample is the same alone or inside a vmapped batch, and
  `euler_maruyama` and `multilevel_euler_maruyama` given the same key see the same noise;
* a diffrax Brownian path (anything with `evaluate(t0, t1)`, such as
  `diffrax.VirtualBrownianTree`): dW_n = path.evaluate(t_n, t_{n+1}), so EM, ML-EM and a
  fine-grid reference can share one path;
* precomputed increments: a pytree like y0 whose leaves carry a leading axis of length
  len(ts) - 1, used as given.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mlem_jax import _validate
from mlem_jax._errors import InputError


class BrownianSource(NamedTuple):
    """`increment(n, t0, t1)` returns dW over [t0, t1] shaped like y0."""

    increment: Callable[[jax.Array, jax.Array, jax.Array], Any]
    key: jax.Array | None  # the PRNG key it was built from, if any


def split_key(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(noise_key, level_key): the two independent streams derived from a sampler key."""
    noise_key, level_key = jax.random.split(key)
    return noise_key, level_key


def _is_brownian_path(x: Any) -> bool:
    return hasattr(x, "evaluate") and callable(x.evaluate)


def brownian_source(key: Any, y0: Any, ts: jax.Array) -> BrownianSource:
    """Interpret the `key` argument of the solvers (see the module docstring)."""
    if _validate.is_prng_key(key):
        return _key_source(key, y0)
    if _is_brownian_path(key):
        return _path_source(key, y0, ts)
    if hasattr(key, "shape") or isinstance(key, (list, tuple, dict)):
        source = _increments_source(key, y0, ts)
        if source is not None:
            return source
    got = f"{key.dtype}{list(key.shape)}" if hasattr(key, "shape") else type(key).__name__
    raise TypeError(
        f"key: expected a PRNG key (jax.random.key(0)), a diffrax Brownian path such as "
        f"diffrax.VirtualBrownianTree, or increments of shape (len(ts) - 1, *y0.shape); got "
        f"{got}. To sample a batch, jax.vmap over jax.random.split(key, batch)."
    )


def _key_source(key, y0) -> BrownianSource:
    """Increments N(0, |dt|) drawn from fold_in(noise key, n), one split per leaf of y0."""
    leaves, treedef = jax.tree_util.tree_flatten(y0)
    noise_key, _ = split_key(key)

    def increment(n, t0, t1):
        k = jax.random.fold_in(noise_key, n)
        ks = jax.random.split(k, len(leaves)) if len(leaves) > 1 else [k]
        scale = jnp.sqrt(jnp.abs(t1 - t0))
        dws = [
            (jax.random.normal(kk, jnp.shape(y), jnp.result_type(y)) * scale.astype(jnp.result_type(y)))
            for kk, y in zip(ks, leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, dws)

    return BrownianSource(increment, key)


def _path_source(path, y0, ts) -> BrownianSource:
    """Increments path.evaluate(t0, t1) of a diffrax Brownian path shaped like y0."""
    leaves, treedef = jax.tree_util.tree_flatten(y0)
    out = jax.eval_shape(path.evaluate, ts[0], ts[1])
    if jax.tree_util.tree_structure(out) != treedef or any(
        o.shape != jnp.shape(y) for o, y in zip(jax.tree_util.tree_leaves(out), leaves)
    ):
        raise InputError(
            "key: the Brownian path's increments must be shaped like y0; build it with "
            "shape=y0.shape (or a pytree of jax.ShapeDtypeStruct like y0)."
        )

    def increment(n, t0, t1):
        dw = path.evaluate(t0, t1)
        return jax.tree_util.tree_map(lambda w, y: w.astype(jnp.result_type(y)), dw, y0)

    return BrownianSource(increment, None)


def _increments_source(key, y0, ts) -> BrownianSource | None:
    """Precomputed increments (len(ts) - 1, *y0.shape), floating point; None when `key` is not shaped so."""
    leaves, treedef = jax.tree_util.tree_flatten(y0)
    inc_leaves = jax.tree_util.tree_leaves(key)
    floating = all(hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) for a in inc_leaves)
    n_steps = ts.shape[0] - 1
    if floating and jax.tree_util.tree_structure(key) == treedef:
        for a, y in zip(inc_leaves, leaves):
            if tuple(a.shape) != (n_steps, *jnp.shape(y)):
                raise InputError(
                    f"key: precomputed Brownian increments must have shape "
                    f"(len(ts) - 1, *y0.shape) = {(n_steps, *jnp.shape(y))}, got {tuple(a.shape)}."
                )
        return BrownianSource(lambda n, t0, t1: jax.tree_util.tree_map(
            lambda a, y: a[n].astype(jnp.result_type(y)), key, y0), None)
    if jax.tree_util.tree_structure(key) == treedef and all(
        hasattr(a, "dtype") and tuple(a.shape) == (n_steps, *jnp.shape(y)) for a, y in zip(inc_leaves, leaves)
    ):  # shaped like increments, but not floating point
        dtypes = sorted({str(a.dtype) for a in inc_leaves})
        raise TypeError(
            f"key: precomputed Brownian increments must be floating point, got dtype "
            f"{', '.join(dtypes)}; pass increments.astype(y0.dtype) (they are N(0, dt) draws)."
        )
    return None
