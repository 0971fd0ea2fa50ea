"""`mlem-jax demo`: the main job. The best single-network sampler against the best multilevel
sampler at equal error: by default on the exact testbed (`_demo_testbed`: error against the
true flow of a Gaussian mixture fitted to Fashion-MNIST, levels an MLP ladder); with
`--family F`, on an image family at the coupled error of its top network (the earlier demo)."""

from __future__ import annotations

import os

import numpy as np

from mlem_jax._atomic import atomic_path
from mlem_jax._errors import InputError
from mlem_jax.cli._common import CLIError, output_files, positive, seed, writing


def add_parser(sub):
    """Register `mlem-jax demo` on the subparsers `sub`."""
    d = sub.add_parser("demo", help="the best single-network sampler against the best multilevel one at equal "
                                    "error against the true flow, on the exact testbed")
    d.add_argument("--target", type=positive(float), default=1.25,
                   help="the testbed's target: this multiple of the top level's floor (its own fine ODE against "
                        "the truth), in pathwise RMS")
    d.add_argument("--ladder", default=None,
                   help="the testbed's levels: a folder written by train_ladder (default: the shipped ladder)")
    d.add_argument("--family", default=None,
                   help="an image family instead of the testbed: the comparison at the coupled error of its top "
                        "network with DPM-Solver++(2M) at --steps (the earlier demo; the shipped one is "
                        "benchmarks/weights/fmnist16_demo)")
    d.add_argument("--steps", type=positive(int), default=8,
                   help="with --family: the target is the top network with DPM-Solver++(2M) on this many log-SNR "
                        "steps")
    d.add_argument("--batch-size", type=positive(int), default=None,
                   help="number of samples, a multiple of 4 (default 128 on the testbed, 32 with --family)")
    d.add_argument("--pilot-size", type=positive(int), default=32,
                   help="with --family: samples of the pilot batch on which the multilevel configuration is chosen "
                        "(a multiple of 4)")
    d.add_argument("--seed", type=seed, default=0, help="sampling seed")
    d.add_argument("--out", default="out/demo",
                   help="stem or folder of the side-by-side PNG (left: the single network, right: multilevel) and the "
                        "npz of both sides; the demo replaces its own earlier outputs")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=run)


def demo_ladders(steps: int) -> dict:
    """The step ladders the demo searches around a target of `steps`: single networks from
    3/4 of the target to twice it, multilevel runs from 1.5 to 2.5 times it (at the target's
    own steps, every m < N adds coin noise to the target's error, so none reaches it)."""
    singles = sorted({max(2, round(steps * f)) for f in (0.75, 1, 1.25, 1.5, 2)})
    multilevel = sorted({max(3, round(steps * f)) for f in (1.5, 2, 2.5)})
    return dict(step_ladder=tuple(singles), ml_step_ladder=tuple(multilevel))


def run(args):
    """`mlem-jax demo`: the exact testbed by default, the image family with --family."""
    _check_args(args)
    args.overwrite = True  # rerunning the demo replaces its own outputs
    png, npz = output_files(args, "demo", (".png", ".npz"))  # before any compute
    if args.family is None:
        from mlem_jax.cli._demo_testbed import run_testbed

        try:
            return run_testbed(args, png, npz)
        except InputError as e:
            raise CLIError(f"--{e}") from e
    return _run_family(args, png, npz)


def _check_args(args) -> None:
    if args.steps < 2:
        raise CLIError(f"--steps: expected at least 2, got {args.steps}.")
    if args.batch_size is None:
        args.batch_size = 32 if args.family else 128
    for name, v in (("--batch-size", args.batch_size), ("--pilot-size", args.pilot_size)):
        if v % 4 or v < 4:
            raise CLIError(f"{name}: expected a multiple of 4 (the samples split into 4 coin plans), got {v}.")
    if not 1.0 < args.target <= 10.0:
        raise CLIError(f"--target: expected a multiple of the top level's floor in (1, 10], got {args.target}.")


def _run_family(args, png: str, npz: str) -> None:
    """The image demo (--family): `compare_best_samplers` at the top network's error at --steps."""
    from tqdm.auto import tqdm

    from mlem_jax.cli._common import family_arg
    from mlem_jax.compare._best_samplers import SAMPLER_NAMES, compare_best_samplers, planned_runs
    from mlem_jax.diffusion.family import demo_family_path

    family = family_arg(args.family or demo_family_path())
    if len(family.models) < 2:
        raise CLIError(f"--family: the demo needs at least two levels, got {len(family.models)}.")
    nfs = [m.nf for m in family.models]
    kw = dict(steps=args.steps, sampler="dpm++2m", batch_size=args.batch_size, pilot_size=args.pilot_size,
              seed=args.seed, reference_steps=max(30, 4 * args.steps), repeats=3, samplers=("dpm++2m", "ddim"),
              exhaustive=False, skip_far=1.5, max_step_ups=64, **demo_ladders(args.steps))  # grow m up to N if need be
    top = SAMPLER_NAMES["dpm++2m"]
    print(f"mlem-jax demo: {args.batch_size} images of {family.meta.get('dataset') or 'the family'} "
          f"{'x'.join(map(str, family.image_shape[:2]))}, family nf={nfs}. The cheapest single-network sampler "
          f"(every network x {top} or DDIM, {kw['step_ladder'][0]}-{kw['step_ladder'][-1]} steps) against the "
          f"cheapest multilevel one (a lower base every step + nf={nfs[-1]} on m stratified firings) at the coupled "
          f"error of nf={nfs[-1]} with {top} at {args.steps} steps (RMS per pixel from nf={nfs[-1]}'s ODE "
          f"solved on {kw['reference_steps']} steps, same prior draws)", flush=True)
    if os.environ.get("XLA_FLAGS", "").strip():  # e.g. CI's quick run at a lower optimisation level
        print(f"  XLA_FLAGS={os.environ['XLA_FLAGS'].strip()}: the timings below are under these flags", flush=True)
    bar = tqdm(total=planned_runs(family, **kw), desc="demo", disable=args.no_progress, unit="run",
               bar_format="{desc}: {n}/{total} runs |{bar}| {elapsed}")
    log = (lambda s: None) if args.no_progress else (lambda s: bar.write("  " + s))
    try:
        c = compare_best_samplers(family, log=log, stage=lambda name: bar.set_description_str(f"demo: {name}"),
                                  tick=lambda: bar.update(1), **kw)
        bar.total = bar.n  # the runs made: fewer than planned where runs that cannot win were skipped
        bar.refresh()
    finally:
        bar.close()
    _report_family(c, nfs, args, kw["repeats"])
    _write_family(c, nfs, png, npz)


def _report_family(c, nfs, args, repeats: int) -> None:
    from mlem_jax.compare._best_samplers import SAMPLER_NAMES

    s, ml = c.single, c.multilevel
    print(f"  target: nf={nfs[-1]}, {SAMPLER_NAMES['dpm++2m']}, {args.steps} steps: coupled error "
          f"{c.target.error.value:.4f} +- {c.target.error.stderr:.4f}")
    print(f"  single network (the cheapest of {len(c.singles)} runs at the target): {s.describe(nfs)}: "
          f"{s.seconds:.2f} s, {s.gflop:.2f} GFLOP/sample, evaluations: nf={nfs[s.levels[0]]}: {s.evaluations[0]:g}, "
          f"coupled error {s.error.value:.4f} +- {s.error.stderr:.4f}")
    print(f"  multilevel (chosen among {len(c.pilot)} runs on a pilot of {args.pilot_size}"
          + (f", firings grown {c.stepped_up} time(s) on the main batch" if c.stepped_up else "")
          + f"): {ml.describe(nfs)}: {ml.seconds:.2f} s, {ml.gflop:.2f} GFLOP/sample, evaluations: "
          + ", ".join(f"nf={nfs[k]}: {e:g}" for k, e in zip(ml.levels, ml.evaluations))
          + f", coupled error {ml.error.value:.4f} +- {ml.error.stderr:.4f}")
    equal = ml.error.value <= 1.1 * s.error.value
    if not equal:  # even firing on every step: the top network alone at ml.steps
        print("  note: the multilevel side misses 1.1x the single network's error even at m = N; the figures "
              "below compare unequal errors")
    held = "the multilevel error at most 1.1x the single network's" if equal else "UNEQUAL errors, see the note above"
    print(f"  single / multilevel, {held}: "
          f"{c.speedup:.2f}x in measured seconds (best of {repeats}, interleaved), "
          f"{c.flop_ratio:.2f}x in FLOPs (XLA cost analysis x evaluations), "
          f"{s.modelled_seconds / ml.modelled_seconds:.2f}x in modelled seconds (evaluations x each level's "
          f"seconds per sample: {', '.join(f'nf={n}: {1e3 * t:.2f} ms' for n, t in zip(nfs, c.level_seconds))})")


def _write_family(c, nfs, png: str, npz: str) -> None:
    from mlem_jax.compare._best_samplers import SAMPLER_NAMES
    from mlem_jax.diffusion.images import save_png, side_by_side, to_grid, with_caption

    s, ml = c.single, c.multilevel
    left = with_caption(to_grid(s.images), [f"single: nf={nfs[s.levels[0]]}, {SAMPLER_NAMES[s.sampler]}",
                                            f"{s.steps} steps, error {s.error.value:.4f}",
                                            f"{s.seconds:.2f} s, {s.gflop:.2f} GFLOP"])
    pair = f"{nfs[ml.levels[0]]}+{nfs[ml.levels[-1]]}"
    right = with_caption(to_grid(ml.images), [f"multilevel nf={pair}, {ml.steps} steps",
                                              f"{ml.firings} firings, error {ml.error.value:.4f}",
                                              f"{ml.seconds:.2f} s, {ml.gflop:.2f} GFLOP ({c.speedup:.2f}x)"])
    with writing(png, npz):
        save_png(png, side_by_side(left, right))
        with atomic_path(npz) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, single=s.images, multilevel=ml.images, single_evaluations=s.evaluations,
                                multilevel_evaluations=ml.evaluations, multilevel_levels=np.array(ml.levels))
    print(f"wrote {os.path.abspath(png)} (left: the single network, right: multilevel, each captioned) and "
          f"{os.path.abspath(npz)}")
    slower = " slower: the multilevel sampler took longer than the single network at this error" \
        if round(c.speedup, 2) < 1 else ""
    print(f"equal-error speedup: {c.speedup:.2f}x (single-network error {s.error.value:.4f}, multilevel error "
          f"{ml.error.value:.4f}){slower}")
