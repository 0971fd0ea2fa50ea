"""`mlem-jax advise`: will multilevel sampling pay on this family? Held-out diagnostics of its
levels (`mlem_jax.compare._advise`), a verdict in words, a text report and a plot."""

from __future__ import annotations

import os
import time

from mlem_jax.cli._common import CLIError, family_arg, positive, seed, writing


def add_parser(sub):
    """Register `mlem-jax advise` on the subparsers `sub`."""
    a = sub.add_parser("advise", help="held-out diagnostics of a family's levels and a verdict: does the top level "
                                      "add accuracy a multilevel estimator could buy, or only noise?")
    a.add_argument("--family", default=None, help="a family (default: the shipped digits family)")
    a.add_argument("--data", default=None,
                   help="held-out images: a dataset name, a folder or an .npy/.npz file (default: the dataset the "
                        "family records, its test split)")
    a.add_argument("--data-dir", default=None, help="tfds data dir for a prepared dataset")
    a.add_argument("--draws", type=positive(int), default=2048, help="held-out draws shared by every level")
    a.add_argument("--seed", type=seed, default=0, help="seed of the draws")
    a.add_argument("--out", default="out/advise", help="folder of advise.txt and advise.png")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(func=run)


def run(args):
    from tqdm.auto import tqdm

    from mlem_jax.compare._advise import family_diagnostics, held_out_images, plot_advice

    t0 = time.perf_counter()
    family = family_arg(args.family)
    if len(family.models) < 2:
        raise CLIError(f"--family: advise compares levels, and this family has {len(family.models)}.")
    os.makedirs(args.out, exist_ok=True)
    txt, png = os.path.join(args.out, "advise.txt"), os.path.join(args.out, "advise.png")
    try:
        images = held_out_images(family, args.data, args.data_dir)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(f"--data: {e}") from e
    bar = tqdm(total=len(family.models), desc="advise: levels", disable=args.no_progress, unit="level")
    try:
        advice = family_diagnostics(family, images, draws=args.draws, seed=args.seed, progress=lambda: bar.update(1))
    finally:
        bar.close()
    report = advice.report()
    print(report)
    with writing(txt, png):
        from mlem_jax._atomic import atomic_path

        with atomic_path(txt) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(report + "\n")
        plot = plot_advice(advice, png)
    print(f"wrote {os.path.abspath(txt)}" + (f" and {os.path.abspath(plot)}" if plot else "")
          + f" in {time.perf_counter() - t0:.0f} s")
