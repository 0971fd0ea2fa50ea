"""How many samples does the Fréchet distance need to tell EM runs apart?

Samples EM with the largest network of the Fashion-MNIST family at several step counts
(and EM with the next smaller network), all from the same noise, computes the Fréchet
distance of each batch to held-out images on the features of our classifier, and prints
the paired bootstrap difference of every pair with its standard error. The image
experiment's sample size is chosen from this (docs/results.md).

    python benchmarks/fid_resolution.py --samples 1024     # about 10 min on 2 cores
    python benchmarks/fid_resolution.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from fmnist16 import WEIGHTS, load_data  # noqa: E402

from mlem_jax.diffusion.classifier import train_classifier  # noqa: E402
from mlem_jax.diffusion.data import FASHION_MNIST_DEBIAN  # noqa: E402
from mlem_jax.diffusion.family import load_family  # noqa: E402
from mlem_jax.diffusion.metrics import paired_frechet  # noqa: E402

from _common import device_description  # noqa: E402
from image_experiment import Config  # noqa: E402
from image_methods import Run, sampler_factory  # noqa: E402
from image_runner import Runner  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--quick", action="store_true", help="16 samples, 2 and 4 steps, a 30-step classifier")
    p.add_argument("--data-dir", default="data/tfds")
    args = p.parse_args(argv)
    if not os.path.isdir(FASHION_MNIST_DEBIAN):
        print(f"fid_resolution skipped: Fashion-MNIST not found in {FASHION_MNIST_DEBIAN}")
        return 0
    samples, steps, clf_steps = (16, [2, 4], 30) if args.quick else (args.samples, args.steps, 1500)
    data_dir = "benchmarks/out/tfds_quick" if args.quick else args.data_dir
    print(f"device: {device_description()}; {samples} samples per run")
    family = load_family(WEIGHTS)
    K = len(family.models)
    (train_x, train_y), (test_x, test_y) = load_data(FASHION_MNIST_DEBIAN, data_dir, family.image_shape[0],
                                                     limit=2000 if args.quick else None)
    clf = train_classifier(train_x, train_y, test_x[:2000], test_y[:2000], jax.random.key(3), steps=clf_steps,
                           progress=False)
    held = clf.features(np.asarray(test_x[-5000:]))
    cfg = dataclasses.replace(Config(), samples=samples, coupled_samples=min(64, samples), chunk=512,
                              em_steps=tuple(steps))
    runner = Runner(family, sampler_factory(family), cfg, np.ones(K), jax.random.key(0), print)
    runs = [Run(f"EM nf={family.models[-1].nf}, {n} steps", "EM", ("em", K - 1), n) for n in steps]
    runs.append(Run(f"EM nf={family.models[-2].nf}, {steps[-1]} steps", "EM", ("em", K - 2), steps[-1]))
    feats = {}
    for run in runs:
        t0 = time.perf_counter()
        y, _, _ = runner.sample(run, samples)
        feats[run.label] = clf.features(np.clip(y, -1, 1))
        print(f"  {run.label}: {time.perf_counter() - t0:.0f} s", flush=True)
    values, boot = paired_frechet(feats, held, num_bootstrap=100)
    for name, v in values.items():
        print(f"FID {name}: {v:.3f} ± {np.std(boot[name], ddof=1):.3f}")
    names = list(values)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d, se = values[a] - values[b], float(np.std(boot[a] - boot[b], ddof=1))
            print(f"{a} - {b}: {d:.3f} ± {se:.3f} ({d / se:.1f} standard errors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
