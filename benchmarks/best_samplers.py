"""The best single-network sampler against the best multilevel sampler at equal coupled error
(`mlem_jax.compare.compare_best_samplers`) on Fashion-MNIST 16x16 nf=16 + nf=64
(the demo's shipped family, `benchmarks/weights/fmnist16_demo`), every single-network run in the table.

    python benchmarks/best_samplers.py --out docs/figures/best_samplers
    python benchmarks/best_samplers.py --quick      # CI: a tiny untrained family
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mlem_jax.compare import compare_best_samplers  # noqa: E402
from mlem_jax.diffusion.family import demo_family_path, load_family  # noqa: E402

from _common import device_description, tiny_family  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=10, help="the target: the top network's DPM-Solver++(2M) steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pilot-size", type=int, default=32)
    p.add_argument("--out", default="benchmarks/out/best_samplers", help="tables and json")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.quick:
        fam = load_family(tiny_family(os.path.join(args.out, "tiny")))
        kw = dict(steps=4, batch_size=8, pilot_size=4, reference_steps=8, step_ladder=(2, 4), ml_step_ladder=(4,),
                  samplers=("dpm++2m",), coin_plans=2, repeats=1)
    else:
        fam = load_family(demo_family_path())  # nf=16 + nf=64, shipped for the demo
        kw = dict(steps=args.steps, batch_size=args.batch_size, pilot_size=args.pilot_size)
    nfs = [m.nf for m in fam.models]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = compare_best_samplers(fam, log=print, **kw)
    lines = [f"device: {device_description()}", f"family nf={nfs}; {time.perf_counter() - t0:.0f} s", "",
             "| run | coupled error | ± | GFLOP/sample | modelled s/sample | measured s (batch) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(c.singles, key=lambda r: r.gflop) + [c.multilevel]:
        lines.append(f"| {r.describe(nfs)} | {r.error.value:.4f} | {r.error.stderr:.4f} | {r.gflop:.3f} | "
                     f"{r.modelled_seconds:.4f} | {'' if r is not c.multilevel else f'{r.seconds:.2f}'} |")
    lines += ["", f"single-network side: {c.single.describe(nfs)}, error {c.single.error.value:.4f}, "
              f"{c.single.seconds:.2f} s, {c.single.gflop:.3f} GFLOP/sample",
              f"multilevel side: {c.multilevel.describe(nfs)}, error {c.multilevel.error.value:.4f}, "
              f"{c.multilevel.seconds:.2f} s, {c.multilevel.gflop:.3f} GFLOP/sample (firings grew {c.stepped_up}x)",
              f"speedup, the multilevel error at most 1.1 x the single-network error: {c.speedup:.2f}x in "
              f"measured seconds, {c.flop_ratio:.2f}x in FLOPs"
              + (" (slower)" if c.speedup < 1 else "")]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "best_samplers.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "best_samplers.json"), "w") as f:
        json.dump({"speedup": c.speedup, "flop_ratio": c.flop_ratio, "single": c.single.describe(nfs),
                   "multilevel": c.multilevel.describe(nfs), "single_error": c.single.error.value,
                   "multilevel_error": c.multilevel.error.value}, f, indent=1)


if __name__ == "__main__":
    main()
