"""The paper's experiment at CPU scale on Fashion-MNIST 16x16 (see image_experiment.py
for what is measured): the committed family benchmarks/weights/fmnist16 (nf 4, 8, 16, 32),
reproduced by the training command in its .json.

    python benchmarks/image_speedup.py --out docs/figures/image_speedup   # about 30 min on 2 cores
    python benchmarks/image_speedup.py --quick                            # CI: a few seconds of sampling

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
from image_experiment import QUICK, Config, _tables, format_tables, plot_curves, run_experiment  # noqa: E402

from mlem_jax.diffusion.data import FASHION_MNIST_DEBIAN, load_dataset, prepare_local  # noqa: E402
from mlem_jax.diffusion.family import load_family  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights", "fmnist16")


def load_data(source_dir, data_dir, image_size, limit=None):
    import tensorflow_datasets as tfds

    from mlem_jax.diffusion.data import _register_local_builders

    _register_local_builders()
    if not tfds.builder("mlem_fashion_mnist", data_dir=data_dir).is_prepared():
        prepare_local("fashion_mnist", source_dir, data_dir, limit=limit)
    train = load_dataset("fashion_mnist", "train", data_dir, image_size, with_labels=True)
    test = load_dataset("fashion_mnist", "test", data_dir, image_size, with_labels=True)
    return train, test


def replot(out):
    import json

    with open(os.path.join(out, "image_speedup.json")) as f:
        result = json.load(f)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()})
    result["tables"] = _tables(result["runs"], cfg, f"EM nf={result['nfs'][-1]}", result["nfs"])
    with open(os.path.join(out, "image_speedup.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "image_speedup.md"), "w") as f:
        f.write(format_tables(result))
    plot_curves(result, out)
    print(f"rewrote the tables and plots in {out}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny batch and grids (CI)")
    p.add_argument("--family", default=WEIGHTS, help="trained family stem (default: the committed fmnist16)")
    p.add_argument("--source-dir", default=FASHION_MNIST_DEBIAN, help="Fashion-MNIST idx files")
    p.add_argument("--data-dir", default=None, help="tfds data dir (default: data/tfds, or a temporary one with --quick)")
    p.add_argument("--batch", type=int, default=None, help="samples per method (default 128, quick 8)")
    p.add_argument("--out", default="benchmarks/out/image_speedup", help="output folder")
    p.add_argument("--replot", action="store_true",
                   help="redo the tables and error-cost plots from OUT/image_speedup.json (no sampling)")
    args = p.parse_args(argv)
    if args.replot:
        return replot(args.out)
    if not os.path.isdir(args.source_dir):
        msg = (f"--source-dir: Fashion-MNIST not found in {args.source_dir!r}; install Debian's "
               "dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --source-dir.")
        if args.quick:  # CI without root cannot install it; the test suite skips likewise
            print("image_speedup --quick skipped: " + msg)
            return 0
        p.error(msg)
    cfg = QUICK if args.quick else Config()
    if args.batch:
        cfg = dataclasses.replace(cfg, batch=args.batch)
    data_dir = args.data_dir or ("benchmarks/out/tfds_quick" if args.quick else "data/tfds")
    family = load_family(args.family)
    size = family.image_shape[0]
    (train_x, train_y), (test_x, test_y) = load_data(args.source_dir, data_dir, size, limit=2000 if args.quick else None)
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
