"""Run in a subprocess by tests/test_sharding.py: the device count (XLA_FLAGS) and the
process group are fixed when JAX starts.

    python sharding_worker.py sample | train CKPT            one process
    python sharding_worker.py spmd PORT PID NPROC CKPT [LATE]  one of NPROC processes; process 1 starts
                                                             training LATE s after the others (default 0)
    python sharding_worker.py join PORT PID NPROC [TIMEOUT]  initialize only (error checks; TIMEOUT s, default 20)
    python sharding_worker.py lose PORT PID NPROC [VICTIM]   process VICTIM (default 1) is killed after the
                                                             join (none when VICTIM >= NPROC); the others run
                                                             collectives until JAX's coordination service
                                                             stops them (or 600 s pass)
    python sharding_worker.py levels CKPT                    levels side by side; restore CKPT here
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import multilevel_euler_maruyama
from mlem_jax.parallel import batch_mesh, sharded_sampler

KEYS, LEVEL_KEY = 10, 1  # 10 samples: not a multiple of 4, so padded and trimmed


def levels():
    ks = jax.random.split(jax.random.key(42), 3)
    ws = [0.3 * jax.random.normal(k, (4, 4)) for k in ks]
    return tuple((lambda t, y, a, w=w: jnp.tanh(w @ y) - y) for w in ws)


def sample_one(key, level_key):
    sol = multilevel_euler_maruyama(levels(), jnp.array([1.0, 0.3, 0.1]), lambda t, y, a: 0.5, jnp.ones(4),
                                    jnp.linspace(1.0, 0.0, 21), key, level_key=level_key)
    return sol.y, sol.evaluations


def tiny_training():
    from mlem_jax.diffusion.data import procedural
    from mlem_jax.diffusion.objective import TrainConfig
    from mlem_jax.diffusion.unet import UNet

    return UNet(nf=4, ch_mult=(2,)), procedural(jax.random.key(0), 64, (8, 8, 1)), \
        TrainConfig(steps=4, batch_size=16, warmup_steps=2)


def indivisible_error(train, batch_size):
    """The error of training at a batch that does not split over the mesh, or None."""
    m, x, cfg = tiny_training()
    try:
        train(m, x, cfg._replace(batch_size=batch_size), progress=False, mesh=batch_mesh())
    except ValueError as e:
        return str(e)
    return None


def leaves(tree):
    return [np.asarray(a).tolist() for a in jax.tree_util.tree_leaves(tree)]


def main(mode):
    if mode in ("spmd", "join", "lose"):  # before anything touches the XLA backend
        from mlem_jax.parallel import initialize_distributed

        timeout = int(sys.argv[5]) if mode == "join" and len(sys.argv) > 5 else {"join": 20}.get(mode, 120)
        # a short heartbeat only where a process is killed on purpose: under a loaded CI machine a 10 s heartbeat
        # can lapse in a busy process (JAX's own default is 100 s; the library's 30 s)
        initialize_distributed(f"localhost:{sys.argv[2]}", int(sys.argv[4]), int(sys.argv[3]), timeout_s=timeout,
                               heartbeat_timeout_s=10 if mode == "lose" else 30)
    if mode == "lose":
        import os
        import signal
        import time

        from jax.experimental import multihost_utils

        print("JOINED", flush=True)
        if jax.process_index() == (int(sys.argv[5]) if len(sys.argv) > 5 else 1):
            time.sleep(2)
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600:  # the survivor: blocked in collectives once its peer is gone
            multihost_utils.process_allgather(jnp.ones(2))
            time.sleep(0.2)
        return
    out = {"devices": jax.device_count(), "processes": jax.process_count(), "process": jax.process_index()}
    keys, lk = jax.random.split(jax.random.key(0), KEYS), jax.random.key(LEVEL_KEY)
    if mode == "sample":
        sharded = sharded_sampler(sample_one, batch_mesh())
        y, ev = sharded(keys, lk)
        y1, ev1 = sharded_sampler(sample_one, batch_mesh(jax.devices()[:1]))(keys, lk)
        out.update(y=np.asarray(y).tolist(), y1=np.asarray(y1).tolist(), evals=np.asarray(ev).tolist(),
                   evals1=np.asarray(ev1).tolist())
        compiled = sharded.lower(keys, lk).compile()
        out["conditional"] = compiled.as_text().count("conditional")
        out["sharding_devices"] = len(compiled.output_shardings[0].device_set)
    elif mode == "train":
        from mlem_jax.diffusion.checkpoint import load_level
        from mlem_jax.diffusion.train import train

        m, x, cfg = tiny_training()
        _, h1 = train(m, x, cfg, progress=False)
        ckpt = sys.argv[2]
        s4, h4 = train(m, x, cfg, progress=False, mesh=batch_mesh(), checkpoint_dir=ckpt)
        out["loss_1"] = [loss for _, loss in h1.train]
        out["loss_4"] = [loss for _, loss in h4.train]
        _, ema, _, _, _ = load_level(ckpt)  # written from 4 devices, restored on the default one
        out["restored_equal"] = leaves(ema) == leaves(s4.ema_params)
        out["indivisible_error"] = indivisible_error(train, 10)
    elif mode == "spmd":
        from mlem_jax.diffusion.train import train

        y, ev = sharded_sampler(sample_one)(keys, lk)  # one program over every device of every process
        out.update(y=np.asarray(y).tolist(), evals=np.asarray(ev).tolist())
        m, x, cfg = tiny_training()
        if jax.process_index() == 1 and len(sys.argv) > 6:  # process 0 has created the folder by then
            import time

            time.sleep(float(sys.argv[6]))
        state, h = train(m, x, cfg, progress=False, mesh=batch_mesh(), checkpoint_dir=sys.argv[5])
        out["loss"] = [loss for _, loss in h.train]
        out["ema"] = leaves(state.ema_params)
        out["indivisible_error"] = indivisible_error(train, 6)
    elif mode == "levels":
        from mlem_jax.diffusion.train import train_family
        from mlem_jax.diffusion.unet import UNet

        _, x, cfg = tiny_training()
        family = [UNet(nf=4, ch_mult=(2,))] * 2  # twice the "train" mode's level: one reference for both
        side_by_side = train_family(family, x, cfg, progress=False, parallel=True)
        out["loss_parallel"] = [[loss for _, loss in h.train] for _, h in side_by_side]
        out["parallel_devices"] = [sorted(d.id for d in jax.tree_util.tree_leaves(s.params)[0].sharding.device_set)
                                   for s, _ in side_by_side]
        from mlem_jax.diffusion.checkpoint import restore_checkpoint  # a checkpoint of another topology

        m, _, _ = tiny_training()
        state, _ = restore_checkpoint(sys.argv[2], m, x.shape[1:], cfg, mesh=batch_mesh())
        out["ema"] = leaves(state.ema_params)
        out["replicated_on"] = len(jax.tree_util.tree_leaves(state.ema_params)[0].sharding.device_set)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    import faulthandler
    import os

    if os.environ.get("MLEM_WORKER_DUMP_AFTER"):  # a hang shows every thread's stack on stderr, not silence
        faulthandler.dump_traceback_later(float(os.environ["MLEM_WORKER_DUMP_AFTER"]), exit=False)
    main(sys.argv[1])
