"""Many devices and processes: a batch mesh over the local (or global) devices, sharded
sampling (`sharded_sampler`: every device samples its slice of the batch with its own keys),
replicated training state, and the multi-process start-up (`initialize_distributed`, on
`jax.distributed`, and `supervise`, which turns the runtime's abort of a stopped process
into one line: `python -m mlem_jax.parallel COMMAND ...`).

Imports only the core; `mlem_jax.diffusion` uses it for data-parallel training and
sampling. The implementation is in `_mesh` and `_supervisor`."""

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
from mlem_jax.parallel._supervisor import supervise

__all__ = ["batch_mesh", "batch_sharding", "initialize_distributed", "pad_keys", "replicated", "sharded_sampler",
           "spans_processes", "supervise", "to_global", "to_host"]
