"""Sampling and training across devices and processes as one SPMD program.

JAX's multi-controller model: every process runs the same program over one global mesh
(`batch_mesh()`, all devices of all processes), and arrays are global: each process holds
only the shards on its own devices.

* `initialize_distributed(coordinator, num_processes, process_id)`: join a multi-process
  run (CPU collectives through gloo), with errors that say which flag is wrong.
* `batch_mesh()`: a 1-D mesh, axis "batch", over every device of every process.
* `to_global(tree, sharding)` / `to_host(tree)`: host values that are the same on every
  process become global arrays (each process places only its own shards); global arrays
  come back as numpy on every process.
* `sharded_sampler(sample_one, mesh)`: jit(vmap(sample_one)) with the per-sample keys
  split over the mesh and the level key replicated, so every device skips the same
  levels and each sample's noise comes from its own key: the samples of a seed do not
  depend on the number of devices or processes. A batch that does not divide over the
  devices is padded with extra keys and trimmed.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlem_jax._errors import InputError


def batch_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis "batch" over `devices` (default: `jax.devices()`, every device
    of every process, ordered by process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.array(devices), ("batch",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis over the mesh."""
    return NamedSharding(mesh, P("batch"))


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device of the mesh."""
    return NamedSharding(mesh, P())


def spans_processes(mesh: Mesh) -> bool:
    """Whether the mesh holds devices of other processes than this one."""
    return any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def to_global(tree, sharding: NamedSharding):
    """Host values (numpy or jax arrays, the same on every process) as global arrays laid
    out by `sharding`; each process places only the shards of its own devices, so a batch
    split over the mesh is fed by each process for its own rows only."""

    def one(a):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree_util.tree_map(one, tree)


def to_host(tree):
    """Global arrays as numpy arrays holding the whole value on every process (an
    all-gather across processes when the arrays span several)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if all(not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated for a in leaves):
        return jax.tree_util.tree_map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def pad_keys(keys, multiple: int):
    """Pad a batch of keys to a multiple of `multiple` with keys derived from the last one;
    returns (padded keys, original size)."""
    n = keys.shape[0]
    extra = (-n) % multiple
    if extra == 0:
        return keys, n
    more = jax.vmap(lambda i: jax.random.fold_in(keys[-1], 1_000_000 + i))(jnp.arange(extra))
    return jnp.concatenate([keys, more]), n


def _typed_key(key, name):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2:  # raw threefry keys
        return jax.random.wrap_key_data(key)
    raise TypeError(f"{name}: expected PRNG keys (jax.random.key / jax.random.split), got "
                    f"{key.dtype}{list(key.shape)}.")


def sharded_sampler(sample_one: Callable, mesh: Mesh | None = None) -> Callable:
    """`sample_one(key, level_key) -> pytree` becomes `sample(keys, level_key)`: one jitted
    program over `mesh` (default `batch_mesh()`, every device of every process) with the
    keys split over the devices and the level key replicated.

    In a multi-process run every process calls `sample` with the same keys (the same
    seed); each feeds only its own devices, and every process gets the whole batch back
    (gathered, as numpy). `sample.timed(keys, level_key)` returns (out, compile seconds,
    run seconds) with compilation timed apart; `sample.lower(keys, level_key)` lowers it.

    A third argument `per_sample` (an array, or pytree of arrays, with one row per key: class
    labels, for example) is split over the devices with the keys and passed as
    `sample_one(key, level_key, row)`.
    """
    mesh = batch_mesh() if mesh is None else mesh
    size = mesh.devices.size
    multiprocess = spans_processes(mesh)
    batch, rep = batch_sharding(mesh), replicated(mesh)
    programs = {}

    def program(impl, extra: bool):
        if (impl, extra) not in programs:
            def run(key_data, level_key_data, *rows):
                keys = jax.random.wrap_key_data(key_data, impl=impl)
                level_key = jax.random.wrap_key_data(level_key_data, impl=impl)
                return jax.vmap(sample_one, in_axes=(0, None) + (0,) * len(rows))(keys, level_key, *rows)

            shardings = (batch, rep, batch) if extra else (batch, rep)
            programs[impl, extra] = jax.jit(run, in_shardings=shardings, out_shardings=batch)
        return programs[impl, extra]

    def inputs(keys, level_key, per_sample=None):
        keys, level_key = _typed_key(keys, "keys"), _typed_key(level_key, "level_key")
        padded, n = pad_keys(keys, size)
        impl = str(jax.random.key_impl(padded))
        data = (jax.random.key_data(padded), jax.random.key_data(level_key))
        if per_sample is not None:
            extra = padded.shape[0] - n
            data += (jax.tree_util.tree_map(
                lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)]) if extra else a, per_sample),)
        if multiprocess:
            data = (to_global(data[0], batch), to_global(data[1], rep)) + tuple(to_global(d, batch) for d in data[2:])
        return program(impl, per_sample is not None), data, n

    def finish(out, n):
        if multiprocess:
            out = to_host(out)
        return jax.tree_util.tree_map(lambda a: a[:n], out)

    def sample(keys, level_key, per_sample=None):
        fn, data, n = inputs(keys, level_key, per_sample)
        return finish(fn(*data), n)

    def timed(keys, level_key, per_sample=None):
        (out,), t_compile, t_run = timed_chunks([(keys, level_key) + (() if per_sample is None else (per_sample,))])
        return out, t_compile, t_run

    def timed_chunks(chunks):
        """Several calls of equal shapes, `(keys, level_key[, per_sample])` each, compiled once
        and run one after another: (outs, compile seconds, total run seconds)."""
        prepared = [inputs(*c) for c in chunks]
        fn, data, _ = prepared[0]
        t0 = time.perf_counter()
        compiled = fn.lower(*data).compile()
        t1 = time.perf_counter()
        outs = []
        for _, data, n in prepared:
            outs.append(finish(jax.block_until_ready(compiled(*data)), n))
        t2 = time.perf_counter()
        return outs, t1 - t0, t2 - t1

    def lower(keys, level_key, per_sample=None):
        fn, data, _ = inputs(keys, level_key, per_sample)
        return fn.lower(*data)

    sample.timed, sample.timed_chunks, sample.lower, sample.mesh = timed, timed_chunks, lower, mesh
    return sample


# ------------------------------------------------------------------------ multi-host


def check_distributed(coordinator, num_processes, process_id) -> None:
    """`InputError` naming the argument when the three values cannot describe a process of a run."""
    if not isinstance(coordinator, str) or coordinator.rpartition(":")[0] == "" \
            or not coordinator.rpartition(":")[2].isdigit():
        raise InputError(f"coordinator: expected 'host:port' (the address of process 0), got {coordinator!r}.")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise InputError(f"num_processes: expected a positive integer, got {num_processes!r}.")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise InputError(f"process_id: expected 0 <= process_id < num_processes = {num_processes}, got {process_id!r}.")


def initialize_distributed(coordinator: str, num_processes: int, process_id: int, *, timeout_s: int = 120,
                           heartbeat_timeout_s: float = 30.0, shutdown_timeout_s: int = 300,
                           preemption_notices: bool = False) -> None:
    """Join a multi-process run: `jax.distributed.initialize`, one call per process, before
    any other JAX call. On CPU the collectives go through gloo. Every process must give
    the same `coordinator` ("host:port" of process 0) and `num_processes`; a process that
    cannot join within `timeout_s` seconds fails instead of hanging.

    JAX's coordination service watches the run: a process silent for `heartbeat_timeout_s`
    (`heartbeat_timeout_seconds`), an id registered twice, or ids missing at `timeout_s` stop
    every process it concerns, in bounded time. It ends them with a C++ abort of 14-47
    lines that no code in the process can shorten (jax 0.10.2,
    `docs/figures/jax_distributed/probe.log`); run each process under the supervisor
    (`python -m mlem_jax.parallel COMMAND ...`, or `supervise`; `mlem-jax sample/train` do it
    themselves) to get one line naming the cause instead.

    JAX's preemption service catches SIGTERM in every process of a run and turns it into a
    notice that only code calling `multihost_utils.reached_preemption_sync_point` acts on.
    Nothing in this library does, so by default the service is off and SIGTERM (`timeout`, a
    scheduler, `docker stop`, or the supervisor passing one on) ends a process as it would
    without `jax.distributed`: the CLI unwinds, finishing the save in flight. With the service
    on, measured (jax 0.10.2), a SIGTERM was swallowed and the process ran on.

    Args:
      coordinator: "host:port" of process 0, the same in every process.
      num_processes: processes in the run.
      process_id: this process, 0-based.
      timeout_s: seconds to wait for every process to join.
      heartbeat_timeout_s: seconds of silence after which a process counts as lost.
      shutdown_timeout_s: seconds a process that ends waits at exit for the others to end.
      preemption_notices: keep JAX's preemption service (SIGTERM becomes a notice for code
        that polls `reached_preemption_sync_point`, and does not end the process).
    """
    check_distributed(coordinator, num_processes, process_id)
    if not isinstance(shutdown_timeout_s, int) or shutdown_timeout_s < 1:
        raise InputError(f"shutdown_timeout_s: expected a positive whole number of seconds, "
                         f"got {shutdown_timeout_s!r}.")
    if not heartbeat_timeout_s > 0:
        raise InputError(f"heartbeat_timeout_s: expected a positive number of seconds, got {heartbeat_timeout_s!r}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", bool(preemption_notices))
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(timeout_s),
                                   heartbeat_timeout_seconds=math.ceil(heartbeat_timeout_s),
                                   shutdown_timeout_seconds=shutdown_timeout_s)
    except Exception as e:  # noqa: BLE001 - the runtime's errors are long and name no flag
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(
            f"coordinator: process {process_id} of {num_processes} could not join the run at {coordinator!r} within "
            f"{timeout_s} s ({first[:200]}). Start every process with the same --coordinator and --num-processes, "
            "process 0 on the coordinator's host, and check that the port is reachable.") from e
