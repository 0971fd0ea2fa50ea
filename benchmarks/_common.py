"""Helpers shared by the benchmark scripts: device description, timing, output folder, the tiny untrained
family of the --quick modes, and Fashion-MNIST with its feature classifier."""

from __future__ import annotations

import os
import platform

import jax

from mlem_jax.timing import time_calls


def device_description() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    flags = os.environ.get("XLA_FLAGS", "").strip()  # e.g. a lower optimisation level: said beside the timings
    return (f"{d.platform} ({kind}), {os.cpu_count()} CPU cores, jax {jax.__version__}, {platform.python_version()}"
            + (f", XLA_FLAGS={flags}" if flags else ""))


def median_time(fn, *args, repeats: int = 5) -> float:
    """Median wall time of fn(*args) in seconds, after one warm-up call (compilation)."""
    return time_calls(fn, *args, repeats=repeats).seconds


def out_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def tiny_family(path: str, num_classes: int = 0) -> str:
    """Two tiny untrained one-resolution UNets (nf 4, 8) at 16x16 saved as a family at `path`, conditional on
    `num_classes` classes when > 0: what the --quick modes sample (the pipeline, not the figures)."""
    from mlem_jax.diffusion import VP
    from mlem_jax.diffusion.family import save_family
    from mlem_jax.diffusion.unet import UNet, init_params

    cond = {"num_classes": num_classes} if num_classes else {}
    models = [UNet(nf=nf, ch_mult=(2,), **cond) for nf in (4, 8)]  # one resolution (least to compile), 2-channel groups
    save_family(path, models, [init_params(m, jax.random.key(i), (16, 16, 1)) for i, m in enumerate(models)], VP(),
                "eps", (16, 16, 1), extra=cond or None)
    return path


def fashion_mnist_and_classifier(source_dir: str, quick: bool, steps: int):
    """Fashion-MNIST 16x16 from the Debian idx files (a slice of it with `quick`) and the feature
    classifier trained on it: (train_x, train_y, test_x, test_y, classifier)."""
    from mlem_jax.diffusion.classifier import train_classifier
    from mlem_jax.diffusion.data import read_local

    train_x, train_y = read_local("fashion_mnist", source_dir, "train", 16, with_labels=True)
    test_x, test_y = read_local("fashion_mnist", source_dir, "test", 16, with_labels=True)
    if quick:
        train_x, train_y, test_x, test_y = train_x[:1000], train_y[:1000], test_x[:200], test_y[:200]
    clf = train_classifier(train_x, train_y, test_x[:2000], test_y[:2000], jax.random.key(3), steps=steps,
                           progress=False)
    print(f"classifier: test accuracy {clf.test_accuracy:.3f}", flush=True)
    return train_x, train_y, test_x, test_y, clf
