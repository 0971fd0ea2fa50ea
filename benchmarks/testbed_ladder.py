"""Train the exact testbed's ladder: MLP denoisers of growing width on fresh draws of the
Fashion-MNIST 16x16 Gaussian mixture, against its exact denoiser (mlem_jax.diffusion.ladder).

    python benchmarks/testbed_ladder.py --out runs/testbed_ladder            # resumable
    python benchmarks/testbed_ladder.py --quick --out benchmarks/out/testbed_ladder_quick

The full run writes runs/testbed_ladder/{ladder.npz, ladder.json, train.log}; `make
testbed-ladder` copies ladder.npz and ladder.json into mlem_jax/assets/fmnist16_ladder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax

from mlem_jax.diffusion.ladder import LadderConfig, mlp_flops, train_ladder
from mlem_jax.diffusion.mixture import load_mixture
from mlem_jax.diffusion.sde import VP


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="runs/testbed_ladder")
    parser.add_argument("--quick", action="store_true", help="two tiny levels, a few hundred steps (CI)")
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    if a.quick:
        config = LadderConfig(widths=tuple(a.widths or (8, 16)), max_steps=a.max_steps or 100, eval_every=50,
                              eval_size=256, batch_size=64)
    else:
        config = LadderConfig(**({"widths": tuple(a.widths)} if a.widths else {}),
                              **({"max_steps": a.max_steps} if a.max_steps else {}))
    os.makedirs(a.out, exist_ok=True)
    logfile = open(os.path.join(a.out, "train.log"), "a", encoding="utf-8")

    def log(msg):
        print(msg, flush=True)
        logfile.write(msg + "\n")
        logfile.flush()

    log(f"$ python {' '.join(sys.argv)}")
    log(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; config: {config.to_json()}")
    mixture = load_mixture()
    start = time.time()
    ladder = train_ladder(mixture, VP(), config, a.out, progress=not a.no_progress, log=log)
    for w, h in zip(config.widths, ladder.history):
        log(f"width {w}: {mlp_flops(mixture.dim, w, config.depth) / 1e6:.3f} MFLOP/sample, {h[-1]['step']} steps, "
            f"held-out error {h[-1]['error']:.4g}")
    log(f"testbed_ladder: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
