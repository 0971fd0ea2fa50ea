"""A small convolutional classifier whose penultimate layer gives the features of the
kernel distance (`metrics.kernel_distance`), trained here on the same data as the
diffusion models (the Inception network of FID/KID does not exist for 16x16 greyscale)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from mlem_jax._errors import InputError
from mlem_jax.diffusion.unet import compiled_init


class Classifier(nn.Module):
    """A small convolutional classifier whose penultimate layer gives the features of the
    distribution distances."""

    num_classes: int
    width: int = 32
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x, return_features: bool = False):
        for mult in (1, 2):
            x = nn.gelu(nn.Conv(self.width * mult, (3, 3))(x))
            x = nn.gelu(nn.Conv(self.width * mult, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.gelu(nn.Dense(self.feature_dim)(x))
        return features if return_features else nn.Dense(self.num_classes)(features)


class TrainedClassifier(NamedTuple):
    """A trained `Classifier`, its parameters and held-out accuracy; `features` embeds
    images."""

    model: Classifier
    params: Any
    test_accuracy: float

    def features(self, images, batch_size: int = 512) -> np.ndarray:
        """Penultimate-layer features (N, feature_dim) of images in [-1, 1]."""
        return _batched(_features, self, images, batch_size)

    def predict(self, images, batch_size: int = 512) -> np.ndarray:
        return _batched(_predict, self, images, batch_size)


@functools.partial(jax.jit, static_argnums=0)
def _features(model, params, x):
    return model.apply(params, x, return_features=True)


@functools.partial(jax.jit, static_argnums=0)
def _predict(model, params, x):
    return jnp.argmax(model.apply(params, x), -1)


def _batched(fn, clf, images, batch_size):
    x = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(fn(clf.model, clf.params, x[i : i + batch_size]))
                           for i in range(0, len(x), batch_size)])


def train_classifier(images, labels, test_images, test_labels, key, steps: int = 1500, batch_size: int = 128,
                     learning_rate: float = 2e-3, width: int = 32, progress: bool = True) -> TrainedClassifier:
    """Cross-entropy training with Adam (cosine decay) and random horizontal flips;
    returns the model with its accuracy on the test images.

    Args:
      images: training images (N, H, W, C) in [-1, 1].
      labels: their integer classes (N,).
      test_images: images the accuracy is measured on.
      test_labels: their classes.
      key: a JAX key for the initialisation, batches and flips.
      steps: optimiser steps.
      batch_size: images per step.
      learning_rate: Adam's peak rate (cosine decay to 0).
      width: channels of the first convolution.
      progress: show a progress bar.
    """
    images, labels = np.asarray(images, np.float32), np.asarray(labels, np.int32)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise InputError(f"images, labels: expected (N, H, W, C) and (N,), got {images.shape} and {labels.shape}.")
    num_classes = int(max(labels.max(), np.max(test_labels)) + 1)
    model = Classifier(num_classes, width)
    init_key, data_key = jax.random.split(key)
    params = compiled_init(model, init_key, jnp.zeros((1, *images.shape[1:])))
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y, k):
        x = jnp.where(jax.random.bernoulli(k, 0.5, (x.shape[0], 1, 1, 1)), x[:, :, ::-1], x)

        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(int(jax.random.randint(data_key, (), 0, 2**31 - 1)))
    bar = tqdm(range(steps), desc="classifier", disable=not progress)
    for i in bar:
        idx = rng.integers(0, len(images), batch_size)
        params, opt_state, value = step(params, opt_state, images[idx], labels[idx], jax.random.fold_in(data_key, i))
        if progress and i % 100 == 0:
            bar.set_postfix(loss=f"{float(value):.3f}")
    trained = TrainedClassifier(model, params, 0.0)
    accuracy = float(np.mean(trained.predict(test_images) == np.asarray(test_labels)))
    return trained._replace(test_accuracy=accuracy)
