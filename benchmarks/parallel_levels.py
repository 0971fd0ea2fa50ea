"""Training the levels of a family side by side (one group of devices each) against one
after another, in one run: wall time of `train_family(..., parallel=True)` over
`train_family(...)` on the same levels, steps and data.

Runs in a subprocess with D devices (on a CPU-only machine XLA's fake host devices, which
share the same cores: side by side then only fills cores that one small level leaves idle;
on a multi-GPU host each level gets its own GPU).

    python benchmarks/parallel_levels.py [--quick] [--devices 4] [--nfs 4 8 16 32] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, sys, time
import jax
from mlem_jax.diffusion.data import load_dataset
from mlem_jax.diffusion.objective import TrainConfig
from mlem_jax.diffusion.train import train_family
from mlem_jax.diffusion.unet import unet_family
nfs, steps, batch = [int(v) for v in sys.argv[1].split(",")], int(sys.argv[2]), int(sys.argv[3])
ch_mult = tuple(int(v) for v in sys.argv[4].split(","))
x = load_dataset("digits", "train")
family = unet_family(tuple(nfs), ch_mult=ch_mult)
cfg = TrainConfig(steps=steps, batch_size=batch)
train_family(family[:1], x, cfg._replace(steps=1), progress=False)  # warm-up: one-off costs stay out of both
rows = {}
for how, parallel in (("one after another", False), ("side by side", True)):
    t0 = time.perf_counter()
    out = train_family(family, x, cfg, progress=False, parallel=parallel)
    jax.block_until_ready([s.params for s, _ in out])
    rows[how] = {"seconds": time.perf_counter() - t0, "final_loss": [h.train[-1][1] for _, h in out]}
d = jax.devices()[0]
print("RESULT " + json.dumps({"devices": jax.device_count(), "rows": rows, "platform": d.platform,
                               "kind": getattr(d, "device_kind", d.platform)}), flush=True)
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two small levels, ch_mult 2, 5 steps at batch 16 (CI)")
    ap.add_argument("--devices", type=int, default=None, help="devices (default: one per level)")
    ap.add_argument("--nfs", type=int, nargs="+", default=None, help="level widths (default 4 8 16 32)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per level (default 200)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 64")
    ap.add_argument("--ch-mult", type=int, nargs="+", default=None, help="default 1 2 2 (the shipped family's)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    nfs = args.nfs or ([4, 8] if args.quick else [4, 8, 16, 32])
    steps = args.steps or (5 if args.quick else 200)
    args.batch_size = args.batch_size or (16 if args.quick else 64)
    ch_mult = args.ch_mult or ([2] if args.quick else [1, 2, 2])  # one resolution; ch_mult 1 at nf 4 would ignore t
    devices = args.devices or len(nfs)
    env = dict(os.environ)
    if env.get("JAX_PLATFORMS", "cpu") == "cpu":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(map(str, nfs)), str(steps), str(args.batch_size),
                           ",".join(map(str, ch_mult))], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        print(proc.stderr[-2000:])
        sys.exit(1)
    r = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    seq, par = r["rows"]["one after another"], r["rows"]["side by side"]
    print(f"device: {r['platform']} ({r['kind']}) x {r['devices']}, {os.cpu_count()} CPU cores; levels nf={nfs}, "
          f"ch_mult {ch_mult}, {steps} steps each at batch {args.batch_size} (compilation included)")
    for how, row in r["rows"].items():
        print(f"  {how:18s} {row['seconds']:8.1f} s   final losses " + ", ".join(f"{v:.4f}" for v in row["final_loss"]))
    print(f"side by side is {seq['seconds'] / par['seconds']:.2f}x faster than one after another")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "parallel_levels_quick.json" if args.quick else "parallel_levels.json"), "w") as f:
        json.dump({"nfs": nfs, "ch_mult": ch_mult, "steps": steps, "batch": args.batch_size, **r}, f, indent=1)


if __name__ == "__main__":
    main()
