"""The paper's own setting: CelebA 64x64 with a larger UNet family, for a GPU.

Trains the family (same recipe for every level, resumable checkpoints), then runs the
image experiment of image_experiment.py: gamma two ways, EM / smaller networks /
T-Stitch / ML-EM variants / Euler and Heun on the probability-flow ODE, coupled RMS
error, KID on the features of a classifier of two CelebA attributes (Male x Smiling,
4 classes) and sliced Wasserstein. Reads a prepared tfds `celeb_a` from --data-dir and
never downloads (prepare it where a network is available with `tfds build celeb_a`).

    python benchmarks/celeba64.py --data-dir ~/tensorflow_datasets --out runs/celeba64
    python benchmarks/celeba64.py --data-dir D --out O --skip-training   # re-run the comparison

The test suite runs it end to end at tiny scale on tfds.testing.mock_data.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from image_experiment import Config, parse_overrides, run_experiment  # noqa: E402

ATTRIBUTES = ("Male", "Smiling")  # the classifier's 4 classes


def load_celeba(split: str, data_dir: str, limit: int | None, crop: int, size: int, chunk: int = 2048):
    """Preprocessed CelebA images in [-1, 1] and 4-class attribute labels."""
    import tensorflow_datasets as tfds

    from mlem_jax.diffusion.data import celeba_64

    try:
        source = tfds.data_source("celeb_a", split=split, data_dir=data_dir, download=False)
    except Exception as e:  # DatasetNotFoundError and friends
        raise SystemExit(f"--data-dir: celeb_a is not prepared in {data_dir!r} ({type(e).__name__}); prepare it "
                         "with `tfds build celeb_a --data_dir DIR` on a machine with a network.") from e
    n = len(source) if limit is None else min(limit, len(source))
    images, labels = [], []
    for i in range(0, n, chunk):
        recs = [source[j] for j in range(i, min(n, i + chunk))]
        images.append(celeba_64(np.stack([r["image"] for r in recs]), crop=crop, size=size))
        labels += [sum(int(bool(r["attributes"][a])) << b for b, a in enumerate(ATTRIBUTES)) for r in recs]
    return np.concatenate(images), np.asarray(labels, np.int32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="tfds data dir with celeb_a prepared")
    p.add_argument("--out", default="runs/celeba64", help="checkpoints, family and results go here")
    p.add_argument("--nfs", type=int, nargs="+", default=[32, 64, 128, 256], help="base widths of the levels")
    p.add_argument("--ch-mult", type=int, nargs="+", default=[1, 2, 2, 2], help="channel multipliers")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--crop", type=int, default=140, help="central crop before resizing")
    p.add_argument("--train-steps", type=int, default=30000, help="training steps per level")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--limit", type=int, default=None, help="use only the first records of each split")
    p.add_argument("--skip-training", action="store_true", help="reuse OUT/family.npz")
    p.add_argument("--tiny", action="store_true", help="the experiment's --quick configuration (tests)")
    p.add_argument("--samples", type=int, default=2000, help="samples per distribution run in the comparison")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--set", nargs="+", default=(), metavar="FIELD=VALUE",
                   help="override Config fields of the comparison (image_experiment.Config), e.g. mlem_steps=(50,)")
    args = p.parse_args(argv)

    from mlem_jax.diffusion.family import load_family, save_family
    from mlem_jax.diffusion.objective import TrainConfig
    from mlem_jax.diffusion.sde import VP
    from mlem_jax.diffusion.train import train_family
    from mlem_jax.diffusion.unet import unet_family

    t0 = time.perf_counter()
    train_x, train_y = load_celeba("train", args.data_dir, args.limit, args.crop, args.image_size)
    test_x, test_y = load_celeba("test", args.data_dir, args.limit, args.crop, args.image_size)
    print(f"CelebA {args.image_size}x{args.image_size}: {len(train_x)} train, {len(test_x)} test images "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    stem = os.path.join(args.out, "family")
    if not args.skip_training:
        family = unet_family(tuple(args.nfs), ch_mult=tuple(args.ch_mult))
        config = TrainConfig(steps=args.train_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                             checkpoint_every=max(1, min(5000, args.train_steps)),
                             eval_every=max(1, min(1000, args.train_steps)))
        results = train_family(family, train_x, config, VP(), test_x, os.path.join(args.out, "checkpoints"),
                               resume=True, progress=not args.no_progress)
        save_family(stem, family, [s.ema_params for s, _ in results], VP(), "eps", train_x.shape[1:],
                    extra={"command": "python benchmarks/celeba64.py "
                           + " ".join(argv if argv is not None else sys.argv[1:]),
                           "dataset": "celeb_a", "train_seconds": sum(h.seconds for _, h in results),
                           "held_out_loss": {str(m.nf): (h.test[-1][1] if h.test else None)
                                             for m, (_, h) in zip(family, results)}})
    family = load_family(stem)
    if args.tiny:
        from image_experiment import QUICK

        cfg = dataclasses.replace(QUICK, name="celeba64", heldout=min(QUICK.heldout, len(test_x)),
                                  loss_images=min(QUICK.loss_images, len(test_x)))
    else:
        cfg = dataclasses.replace(Config(), name="celeba64", samples=args.samples, coupled_samples=256, chunk=256,
                                  heldout=min(5000, len(test_x)), classifier_steps=3000)
    cfg = dataclasses.replace(cfg, **parse_overrides(p, args.set))
    result = run_experiment(family, train_x, train_y, test_x, test_y, cfg, args.out,
                            f"CelebA {args.image_size}x{args.image_size}", log=lambda s: print(s, flush=True))
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"argv": argv if argv is not None else sys.argv[1:], "seconds": time.perf_counter() - t0}, f)
    return result


if __name__ == "__main__":
    main()
