"""Sampling throughput (samples per second) against the number of devices, in one run.

Each device count runs in its own subprocess (the count is fixed when JAX starts); on a
CPU-only machine the devices are XLA's fake host devices
(--xla_force_host_platform_device_count), which share the same cores: this measures the
overhead of sharding, not a speedup. On a multi-GPU machine the same script measures
real scaling.

    python benchmarks/sharding_throughput.py [--quick] [--devices 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, sys, time
import jax, jax.numpy as jnp
from mlem_jax import multilevel_euler_maruyama
from mlem_jax.diffusion import uniform_grid, reverse_diffusion
from mlem_jax.diffusion.family import load_family, shipped_family_path
from mlem_jax.sharding import batch_mesh, sharded_sampler
batch, steps = int(sys.argv[1]), int(sys.argv[2])
fam = load_family(shipped_family_path())
drifts, sde = fam.drifts(), fam.sde
ts = uniform_grid(steps)
probs = jnp.array([1.0, 0.12, 0.06, 0.02])
def one(key, lk):
    y0 = sde.prior_sample(jax.random.fold_in(key, 7), fam.image_shape)
    return multilevel_euler_maruyama(drifts, probs, reverse_diffusion(sde), y0, ts, key, level_key=lk).y
sample = sharded_sampler(one, batch_mesh())
keys = jax.random.split(jax.random.key(0), batch)
jax.block_until_ready(sample(keys, jax.random.key(1)))
times = []
for _ in range(3):
    t0 = time.perf_counter()
    jax.block_until_ready(sample(keys, jax.random.key(1)))
    times.append(time.perf_counter() - t0)
times.sort()
d = jax.devices()[0]
print("RESULT " + json.dumps({"devices": jax.device_count(), "seconds": times[1], "platform": d.platform,
                               "kind": getattr(d, "device_kind", d.platform)}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    batch, steps = (16, 10) if args.quick else (64, 50)
    rows = []
    for n in args.devices:
        env = dict(os.environ)
        if env.get("JAX_PLATFORMS", "cpu") == "cpu":
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        proc = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(steps)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            print(proc.stderr[-2000:])
            sys.exit(1)
        r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
        rows.append(r)
    base = rows[0]["seconds"]
    print(f"device: {rows[0]['platform']} ({rows[0]['kind']}), {os.cpu_count()} CPU cores; ML-EM on the shipped "
          f"digits family, batch {batch}, {steps} steps")
    print(f"{'devices':>8} {'seconds':>9} {'samples/s':>10} {'vs 1 device':>12}")
    for r in rows:
        print(f"{r['devices']:8d} {r['seconds']:9.3f} {batch / r['seconds']:10.1f} {base / r['seconds']:12.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sharding_throughput_quick.json" if args.quick else "sharding_throughput.json"),
              "w") as f:
        json.dump({"batch": batch, "steps": steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
