"""The paper's experiment at CPU scale on Fashion-MNIST 16x16 (see image_experiment.py
for what is measured): the committed family benchmarks/weights/fmnist16 (nf 4, 8, 16, 32),
reproduced by the training command in its .json.

    python benchmarks/fmnist16.py --out docs/figures/fmnist16           # the full run on 2 cores
    python benchmarks/fmnist16.py --family runs/fmnist16x5/family --name fmnist16x5 ...  # another family
    python benchmarks/fmnist16.py --quick                               # CI: a few seconds of sampling

Fashion-MNIST is read from Debian's dataset-fashion-mnist (--source-dir) and prepared
once into a tfds data dir (--data-dir); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from mlem_jax.diffusion.data import FASHION_MNIST_DEBIAN, load_dataset, prepare_local, read_local  # noqa: E402
from mlem_jax.diffusion.family import load_family  # noqa: E402

from image_analysis import format_tables, tables  # noqa: E402
from image_experiment import QUICK, Config, parse_overrides, run_experiment  # noqa: E402
from image_plots import plot_curves  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights", "fmnist16")


def load_data(source_dir, data_dir, image_size, limit=None, raw=False):
    if raw:  # no tfds: the idx files in their own order
        return tuple(read_local("fashion_mnist", source_dir, split, image_size, with_labels=True)
                     for split in ("train", "test"))
    import tensorflow_datasets as tfds

    from mlem_jax.diffusion.data import _register_local_builders

    _register_local_builders()
    if not tfds.builder("mlem_fashion_mnist", data_dir=data_dir).is_prepared():
        prepare_local("fashion_mnist", source_dir, data_dir, limit=limit)
    train = load_dataset("fashion_mnist", "train", data_dir, image_size, with_labels=True)
    test = load_dataset("fashion_mnist", "test", data_dir, image_size, with_labels=True)
    return train, test


def recount_flops(result, family, batch: int = 8):
    """Level FLOPs per image counted again with `flops_of` (device independent) and each
    run's FLOPs recomputed from its evaluations: for results whose FLOPs came from a GPU's
    compiled programs, which leave out the cuDNN convolutions."""
    import jax
    import jax.numpy as jnp

    from mlem_jax.calibrate import flops_of

    y = jnp.zeros((batch, *family.image_shape))
    level = np.array([flops_of(jax.vmap(f, in_axes=(None, 0, None)), jnp.float32(0.5), y, None) / batch
                      for f in family.drifts(False)])
    if len(level) != len(result["nfs"]):
        raise SystemExit(f"--family: {len(level)} levels, but the result has {len(result['nfs'])}.")
    result["level_flops_as_measured"] = result.get("level_flops_as_measured", result["level_flops"])
    result["level_flops"] = level.tolist()
    result["top_over_base"]["flops"] = float(level[-1] / level[0])
    for r in result["runs"]:
        r["flops"] = float(np.dot(r["evaluations"], level))
    print("level FLOPs per image recounted: " + ", ".join(f"{v / 1e6:.1f} M" for v in level))


def replot(out, name, family=None):
    import json

    with open(os.path.join(out, f"{name}.json")) as f:
        result = json.load(f)
    if family is not None:
        recount_flops(result, family)
    targets = {"sde": tuple(result["config"]["targets"]), "ode": tuple(result["config"]["ode_steps"])}
    result["tables"] = tables(result["runs"], f"EM nf={result['nfs'][-1]}", f"Euler nf={result['nfs'][-1]}", targets)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(format_tables(result))
    plot_curves(result, out, name)
    print(f"rewrote the tables and plots in {out}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny batch and grids (CI)")
    p.add_argument("--family", default=WEIGHTS, help="trained family stem (default: the committed fmnist16)")
    p.add_argument("--source-dir", default=FASHION_MNIST_DEBIAN, help="Fashion-MNIST idx files")
    p.add_argument("--data-dir", default=None,
                   help="tfds data dir (default: data/tfds, or a temporary one with --quick)")
    p.add_argument("--raw-data", action="store_true",
                   help="read the idx files of --source-dir directly (no tensorflow-datasets, e.g. on a GPU image)")
    p.add_argument("--set", nargs="+", default=(), metavar="FIELD=VALUE",
                   help="override Config fields (image_experiment.Config), e.g. chunk=1024 "
                        "couplings=('independent',) geometric_steps=()")
    p.add_argument("--samples", type=int, default=None, help="samples per distribution run (default 1000)")
    p.add_argument("--coupled-samples", type=int, default=None, help="samples for the coupled error (default 128)")
    p.add_argument("--name", default="fmnist16", help="output file names: NAME.json, NAME.md, NAME_sde.png, ...")
    p.add_argument("--no-ode", action="store_true", help="skip the probability-flow ODE runs")
    p.add_argument("--out", default="benchmarks/out/fmnist16", help="output folder")
    p.add_argument("--replot", action="store_true",
                   help="redo the tables and plots from OUT/NAME.json (no sampling)")
    p.add_argument("--recount-flops", action="store_true",
                   help="with --replot: count the level FLOPs of --family again (for results from a GPU "
                        "before flops_of counted the lowered program)")
    args = p.parse_args(argv)
    if args.replot:
        return replot(args.out, args.name, load_family(args.family) if args.recount_flops else None)
    if not os.path.isdir(args.source_dir):
        msg = (f"--source-dir: Fashion-MNIST not found in {args.source_dir!r}; install Debian's "
               "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --source-dir.")
        if args.quick:  # CI without root cannot install it; the test suite skips likewise
            print("fmnist16 --quick skipped: " + msg)
            return 0
        p.error(msg)
    cfg = dataclasses.replace(QUICK if args.quick else Config(), name=args.name)
    if args.samples:
        cfg = dataclasses.replace(cfg, samples=args.samples)
    if args.coupled_samples:
        cfg = dataclasses.replace(cfg, coupled_samples=args.coupled_samples)
    cfg = dataclasses.replace(cfg, **parse_overrides(p, args.set))
    if args.no_ode:
        cfg = dataclasses.replace(cfg, ode_steps=(), heun_steps=(), ode_mlem_steps=())
    data_dir = args.data_dir or ("benchmarks/out/tfds_quick" if args.quick else "data/tfds")
    family = load_family(args.family)
    size = family.image_shape[0]
    (train_x, train_y), (test_x, test_y) = load_data(args.source_dir, data_dir, size,
                                                     limit=2000 if args.quick else None,
                                                      raw=args.raw_data)
    if args.quick:
        rng = np.random.default_rng(0)
        test_x, test_y = test_x[: 4 * cfg.heldout], test_y[: 4 * cfg.heldout]
        idx = rng.choice(len(train_x), min(len(train_x), 1000), replace=False)
        train_x, train_y = train_x[idx], train_y[idx]
    run_experiment(family, train_x, train_y, test_x, test_y, cfg, args.out, f"Fashion-MNIST {size}x{size}",
                   log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
