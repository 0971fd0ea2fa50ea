"""Run in a subprocess with 4 fake CPU devices (XLA_FLAGS) by tests/test_sharding.py."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import multilevel_euler_maruyama
from mlem_jax.sharding import batch_mesh, sharded_sampler


def levels():
    ks = jax.random.split(jax.random.key(42), 3)
    ws = [0.3 * jax.random.normal(k, (4, 4)) for k in ks]
    return tuple((lambda t, y, a, w=w: jnp.tanh(w @ y) - y) for w in ws)


def sample_one(key, level_key):
    sol = multilevel_euler_maruyama(levels(), jnp.array([1.0, 0.3, 0.1]), lambda t, y, a: 0.5, jnp.ones(4),
                                    jnp.linspace(1.0, 0.0, 21), key, level_key=level_key)
    return sol.y, sol.evaluations


def main(mode):
    if mode == "host":  # before anything touches the XLA backend
        from mlem_jax.sharding import initialize_distributed

        initialize_distributed(f"localhost:{sys.argv[2]}", 2, int(sys.argv[3]))
    out = {"devices": jax.device_count()}
    if mode == "sample":
        keys = jax.random.split(jax.random.key(0), 10)  # not a multiple of 4: padded and trimmed
        lk = jax.random.key(1)
        sharded = sharded_sampler(sample_one, batch_mesh())
        y, ev = sharded(keys, lk)
        one = batch_mesh(jax.devices()[:1])
        y1, ev1 = sharded_sampler(sample_one, one)(keys, lk)
        out["equal"] = bool(np.array_equal(np.asarray(y), np.asarray(y1)))
        out["max_diff"] = float(np.max(np.abs(np.asarray(y) - np.asarray(y1))))
        out["evals_equal"] = bool(np.array_equal(np.asarray(ev), np.asarray(ev1)))
        padded = jax.random.split(jax.random.key(0), 12)
        hlo = sharded.jitted.lower(padded, lk).compile().as_text()
        out["conditional"] = hlo.count("conditional")
        out["shape"] = list(np.asarray(y).shape)
        out["sharding_devices"] = len(sharded.jitted.lower(padded, lk).compile().output_shardings[0].device_set)
    elif mode == "train":
        from mlem_jax.diffusion.data import procedural
        from mlem_jax.diffusion.train import TrainConfig, train
        from mlem_jax.diffusion.unet import UNet

        x = procedural(jax.random.key(0), 64, (8, 8, 1))
        cfg = TrainConfig(steps=4, batch_size=16, warmup_steps=2)
        m = UNet(nf=4, ch_mult=(1, 2))
        _, h1 = train(m, x, cfg, progress=False)
        ckpt = sys.argv[2]
        s4, h4 = train(m, x, cfg, progress=False, mesh=batch_mesh(), checkpoint_dir=ckpt)
        out["loss_1"] = [loss for _, loss in h1.train]
        out["loss_4"] = [loss for _, loss in h4.train]
        # the checkpoint written from 4 devices restores on the default device
        from mlem_jax.diffusion.train import load_level

        _, ema, _, _, _ = load_level(ckpt)
        out["restored_equal"] = all(bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in
                                    zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(s4.ema_params)))
        try:
            train(m, x, cfg._replace(batch_size=10), progress=False, mesh=batch_mesh())
            out["indivisible_error"] = None
        except ValueError as e:
            out["indivisible_error"] = str(e)
    elif mode == "host":
        from mlem_jax.sharding import process_shard, shard_path

        pid, path = int(sys.argv[3]), sys.argv[4]
        keys = jax.random.split(jax.random.key(0), 10)
        mine, offset = process_shard(keys)
        y, ev = sharded_sampler(sample_one, batch_mesh(jax.local_devices()))(mine, jax.random.key(1))
        np.savez(shard_path(path, pid), y=np.asarray(y), offset=np.full(len(mine), offset))
        out.update(process=jax.process_index(), count=jax.process_count(), local=len(mine))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
