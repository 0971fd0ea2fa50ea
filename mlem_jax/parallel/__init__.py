"""Many devices and processes: a batch mesh over the local (or global) devices, sharded
sampling (`sharded_sampler`: every device samples its slice of the batch with its own keys),
replicated training state, and the multi-process start-up (`initialize_distributed`, on
`jax.distributed` with a roll call that names a missing or duplicate process).

Imports only the core; `mlem_jax.diffusion` uses it for data-parallel training and
sampling. The implementation is in `_mesh` and `_roll_call`."""

from mlem_jax.parallel._mesh import (
    batch_mesh,
    batch_sharding,
    initialize_distributed,
    pad_keys,
    replicated,
    sharded_sampler,
    spans_processes,
    to_global,
    to_host,
)

__all__ = ["batch_mesh", "batch_sharding", "initialize_distributed", "pad_keys", "replicated", "sharded_sampler",
           "spans_processes", "to_global", "to_host"]
