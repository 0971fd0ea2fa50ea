"""Sampling throughput (samples per second) against the layout of the run, in one run:
P processes x D devices each, one SPMD program over the P*D devices (jax.distributed on
localhost for P > 1, gloo collectives on CPU).

Each layout runs in its own subprocesses (the device count and the process group are fixed
when JAX starts); on a CPU-only machine the devices are XLA's fake host devices
(--xla_force_host_platform_device_count), which share the same cores: this measures the
overhead of sharding and of the process group, not a speedup. On GPU hosts the same script
measures real scaling.

    python benchmarks/sharding_throughput.py [--quick] [--layouts 1x1 1x2 1x4 2x2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, sys, time
batch, steps, nproc, pid, port = map(int, sys.argv[1:6])
if nproc > 1:
    from mlem_jax.parallel import initialize_distributed
    initialize_distributed(f"localhost:{port}", nproc, pid)
import jax, jax.numpy as jnp
from mlem_jax import multilevel_euler_maruyama
from mlem_jax.diffusion import uniform_grid, reverse_diffusion
from mlem_jax.diffusion.family import load_family, shipped_family_path
from mlem_jax.parallel import batch_mesh, sharded_sampler
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
print("RESULT " + json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), "seconds": times[1],
                               "platform": d.platform, "kind": getattr(d, "device_kind", d.platform)}), flush=True)
'''


def layout(text):
    p, _, d = text.partition("x")
    if not (p.isdigit() and d.isdigit() and int(p) > 0 and int(d) > 0):
        raise argparse.ArgumentTypeError(f"expected PROCESSESxDEVICES such as 2x2, got {text!r}")
    return int(p), int(d)


def run_layout(processes, devices, batch, steps):
    """Time one layout: `processes` children with `devices` devices each; process 0's result."""
    import socket
    import tempfile

    env = dict(os.environ)
    if env.get("JAX_PLATFORMS", "cpu") == "cpu":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:  # files, not pipes: a full pipe would stall the collectives
        logs = [open(os.path.join(tmp, f"{p}.log"), "w+") for p in range(processes)]
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(batch), str(steps), str(processes), str(p),
                                   str(port)], stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
                 for p, f in enumerate(logs)]
        codes = [p.wait(timeout=900) for p in procs]
        texts = []
        for f in logs:
            f.seek(0)
            texts.append(f.read())
            f.close()
    if any(codes):
        print(texts[codes.index(next(c for c in codes if c))][-2000:])
        sys.exit(1)
    return json.loads([ln for ln in texts[0].splitlines() if ln.startswith("RESULT ")][-1][7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batch, layouts 1x1 1x2 2x1 (CI)")
    ap.add_argument("--layouts", type=layout, nargs="+", default=None,
                    help="PROCESSESxDEVICES per run (default 1x1 1x2 1x4 2x2)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    batch, steps = (16, 10) if args.quick else (64, 50)
    layouts = args.layouts or ([(1, 1), (1, 2), (2, 1)] if args.quick else [(1, 1), (1, 2), (1, 4), (2, 2)])
    rows = [run_layout(p, d, batch, steps) for p, d in layouts]
    base = rows[0]["seconds"]
    print(f"device: {rows[0]['platform']} ({rows[0]['kind']}), {os.cpu_count()} CPU cores; ML-EM on the shipped "
          f"digits family, batch {batch}, {steps} steps")
    print(f"{'processes':>9} {'devices':>8} {'seconds':>9} {'samples/s':>10} {'vs first':>9}")
    for r in rows:
        print(f"{r['processes']:9d} {r['devices']:8d} {r['seconds']:9.3f} {batch / r['seconds']:10.1f} "
              f"{base / r['seconds']:9.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sharding_throughput_quick.json" if args.quick else "sharding_throughput.json"),
              "w") as f:
        json.dump({"batch": batch, "steps": steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
