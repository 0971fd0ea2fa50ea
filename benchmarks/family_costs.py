"""Cost of each level of a family at a sampling batch, and the top / base ratios.

    python benchmarks/family_costs.py --family runs/fmnist16x5/family          # after make fmnist16x5's combine step
    python benchmarks/family_costs.py --quick                                   # the shipped digits family, batch 16
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from mlem_jax.calibrate import level_costs
from mlem_jax.diffusion.family import load_family, shipped_family_path

from _common import device_description


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default=None, help="family stem (default: the shipped digits family)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    fam = load_family(args.family or shipped_family_path())
    batch = 16 if args.quick else args.batch
    shape = tuple(fam.image_shape)
    y = jax.vmap(lambda k: fam.sde.prior_sample(k, shape))(jax.random.split(jax.random.key(0), batch))
    c = level_costs([jax.vmap(f, in_axes=(None, 0, None)) for f in fam.drifts()], jnp.float32(0.5), y, repeats=5)
    nfs = [m.nf for m in fam.models]
    print(f"device: {device_description()}; batch {batch}")
    for nf, s, f in zip(nfs, c.seconds, c.flops / batch):
        loss = fam.meta.get("held_out_loss", {}).get(str(nf))
        print(f"  nf={nf:4d}: {1e3 * s:9.1f} ms per batch, {f / 1e6:8.1f} MFLOP per image"
              + (f", held-out DSM loss {loss:.4f}" if loss is not None else ""))
    for k in range(len(nfs) - 1):
        print(f"top / level nf={nfs[k]}: wall time {c.seconds[-1] / c.seconds[k]:.1f}x, "
              f"FLOPs {c.flops[-1] / c.flops[k]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
