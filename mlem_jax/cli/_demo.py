"""`mlem-jax demo`: the main job, EM against ML-EM at equal coupled error on a shipped family."""

from __future__ import annotations

import argparse
import os

import numpy as np

from mlem_jax._atomic import atomic_path
from mlem_jax.cli._common import CLIError, family_arg, output_files, positive, seed, writing


def add_parser(sub):
    """Register `mlem-jax demo` on the subparsers `sub`."""
    d = sub.add_parser("demo", help="EM against ML-EM at equal coupled error on the shipped digits family")
    d.add_argument("--family", default=None, help=argparse.SUPPRESS)
    d.add_argument("--steps", type=positive(int), default=100, help="number of sampling steps")
    d.add_argument("--batch-size", type=positive(int), default=64, help="number of samples")
    d.add_argument("--pilot-size", type=positive(int), default=32,
                   help="samples of the pilot batch on which the ML-EM configuration is chosen")
    d.add_argument("--seed", type=seed, default=0, help="sampling seed")
    d.add_argument("--out", default="out/demo",
                   help="stem or folder of the side-by-side PNG (left EM, right ML-EM) and the npz of both sides; "
                        "the demo replaces its own earlier outputs")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=run)


def run(args):
    from mlem_jax.diffusion.family import shipped_family_path
    from mlem_jax.diffusion.images import save_png, side_by_side, to_grid, with_caption
    from mlem_jax.equal_error import equal_error_comparison

    args.overwrite = True  # rerunning the demo replaces its own outputs
    png, npz = output_files(args, "demo", (".png", ".npz"))  # before any compute
    family = family_arg(args.family)
    nfs = [m.nf for m in family.models]
    log = (lambda s: None) if args.no_progress else (lambda s: print(s, flush=True))
    print(f"mlem-jax demo: {args.batch_size} digits, {args.steps} steps, family nf={nfs}; EM on nf={nfs[-1]} "
          f"against ML-EM with stratified coins at equal coupled error (reference: EM on "
          f"{4 * args.steps} steps, same noise)", flush=True)
    probs, coupling, source = None, "independent", f"chosen on a pilot batch of {args.pilot_size}"
    cal_path = (args.family or shipped_family_path()) + ".calibration.json"
    if os.path.exists(cal_path):
        from mlem_jax.calibrate import load_calibration

        try:
            cal = load_calibration(cal_path)
        except ValueError as e:
            raise CLIError(f"demo: {e}") from e
        if cal.steps == args.steps and cal.grid == "uniform" and cal.coins == "stratified" and cal.levels == nfs:
            probs, coupling, source = cal.probs, cal.coupling, f"shipped calibration {os.path.basename(cal_path)}"
    from tqdm.auto import tqdm

    bar = tqdm(total=4 if probs is None else 3, desc="demo", disable=args.no_progress,
               bar_format="{desc} ({n}/{total} stages done) |{bar}| {elapsed}")
    started = []

    def stage(name):
        if started:
            bar.update(1)
        started.append(name)
        bar.set_description_str(f"demo: {name}")

    try:
        r = equal_error_comparison(family, args.steps, args.batch_size, args.seed, probs=probs, coupling=coupling,
                                   pilot_size=args.pilot_size, log=lambda s: (bar.clear(), log(s), bar.refresh()),
                                   stage=stage)
        bar.update(1)
    finally:
        bar.close()
    p = np.asarray(r.probs.values)
    print(f"  ML-EM configuration: {source}" + (f" ({r.pilot_seconds:.0f} s, not counted)" if probs is None else "")
          + f"; {r.config.coupling} coupling, time-averaged p = " + ", ".join(f"{v:.3f}" for v in p.mean(0))
          + (f"; lambda doubled {r.stepped_up} time(s) on the main batch" if r.stepped_up else ""))
    print(f"  EM    (nf={nfs[-1]} only): {r.em_seconds:6.2f} s   evaluations: nf={nfs[-1]}: {args.steps}   "
          f"coupled RMS error {r.em_error.value:.4f} +- {r.em_error.stderr:.4f}")
    print(f"  ML-EM (all levels):  {r.mlem_seconds:6.2f} s   evaluations: "
          + ", ".join(f"nf={n}: {e}" for n, e in zip(nfs, r.evaluations))
          + f"   coupled RMS error {r.mlem_error.value:.4f} +- {r.mlem_error.stderr:.4f}")
    print(f"  in FLOPs (XLA cost analysis x evaluations): EM / ML-EM = {r.flop_ratio:.2f}x (wall time differs "
          "where the small networks are overhead-bound, as on CPUs)")
    left = with_caption(to_grid(r.em_samples), [f"EM, nf={nfs[-1]} only", f"error {r.em_error.value:.4f}",
                                                 f"{r.em_seconds:.2f} s, {args.steps} evals"])
    right = with_caption(to_grid(r.mlem_samples), ["ML-EM, all levels", f"error {r.mlem_error.value:.4f}",
                                                    f"{r.mlem_seconds:.2f} s ({r.speedup:.2f}x)"])
    grid = side_by_side(left, right)
    with writing(png, npz):
        save_png(png, grid)
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, em=r.em_samples, mlem=r.mlem_samples, evaluations=r.evaluations, probs=p)
    print(f"wrote {os.path.abspath(png)} (left: EM, right: ML-EM, each captioned) and {os.path.abspath(npz)}")
    slower = " slower: ML-EM took longer than EM at this error" if round(r.speedup, 2) < 1 else ""
    print(f"equal-error speedup: {r.speedup:.2f}x (EM error {r.em_error.value:.4f}, ML-EM error "
          f"{r.mlem_error.value:.4f}){slower}")
