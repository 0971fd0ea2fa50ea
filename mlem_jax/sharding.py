"""Sampling and training across devices (and hosts) with JAX's own sharding.

* `batch_mesh()`: a 1-D mesh over the local devices, axis "batch".
* `sharded_sampler(sample_one, mesh)`: jit(vmap(sample_one)) with the per-sample keys
  split over the mesh and the level key replicated, so every device skips the same
  levels and each sample's noise comes from its own key: the result for a seed equals
  the one-device result. A batch that does not divide over the devices is padded with
  extra keys and trimmed.
* `process_shard(keys)`: the slice of a global batch that this process samples in a
  multi-host run (after `initialize_distributed`), and `merge_shards` to put the
  per-process outputs back together.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def batch_mesh(devices=None) -> Mesh:
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.array(devices), ("batch",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("batch"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def pad_keys(keys, multiple: int):
    """Pad a batch of keys to a multiple of `multiple` with keys derived from the last one;
    returns (padded keys, original size)."""
    n = keys.shape[0]
    extra = (-n) % multiple
    if extra == 0:
        return keys, n
    more = jax.vmap(lambda i: jax.random.fold_in(keys[-1], 1_000_000 + i))(jnp.arange(extra))
    return jnp.concatenate([keys, more]), n


def sharded_sampler(sample_one: Callable, mesh: Mesh | None = None) -> Callable:
    """`sample_one(key, level_key) -> pytree` becomes `sample(keys, level_key)`, the batch
    split over `mesh` (default: all local devices) and the level key replicated."""
    mesh = batch_mesh() if mesh is None else mesh
    size = mesh.devices.size
    fn = jax.jit(
        jax.vmap(sample_one, in_axes=(0, None)),
        in_shardings=(batch_sharding(mesh), replicated(mesh)),
        out_shardings=batch_sharding(mesh),
    )

    def sample(keys, level_key):
        padded, n = pad_keys(keys, size)
        out = fn(padded, level_key)
        return jax.tree_util.tree_map(lambda a: a[:n], out)

    sample.jitted = fn
    sample.mesh = mesh
    return sample


# ------------------------------------------------------------------------ multi-host


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize` for a multi-process run (one call per process)."""
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: expected 0 <= process_id < num_processes = {num_processes}, got {process_id}.")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def process_shard(keys, process_id: int | None = None, num_processes: int | None = None):
    """The contiguous slice of a global batch of keys that this process samples, and its
    offset: process p of n takes samples [p * ceil(B/n), (p + 1) * ceil(B/n))."""
    p = jax.process_index() if process_id is None else process_id
    n = jax.process_count() if num_processes is None else num_processes
    per = -(-keys.shape[0] // n)
    return keys[p * per: (p + 1) * per], p * per


def shard_path(path: str, process_id: int) -> str:
    base, ext = os.path.splitext(path)
    return f"{base}.process{process_id}{ext or '.npz'}"


def merge_shards(path: str, num_processes: int, keys=None) -> dict:
    """Concatenate the per-process `.npz` shards written as shard_path(path, p), in
    process order (only the arrays named in `keys`, default all), write them to `path`,
    and return them."""
    parts = []
    for p in range(num_processes):
        f = shard_path(path, p)
        if not os.path.exists(f):
            raise FileNotFoundError(f"merge: shard {f!r} of process {p} is missing.")
        parts.append(dict(np.load(f)))
    merged = {k: np.concatenate([d[k] for d in parts]) for k in (parts[0] if keys is None else keys)}
    np.savez_compressed(path, **merged)
    return merged
