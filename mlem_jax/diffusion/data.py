"""Image datasets as arrays in [-1, 1] of shape (N, H, W, C), and seeded batching.

* `digits`: scikit-learn's 1797 handwritten digits (8x8, shipped inside its wheel),
  resized to 16x16: the embedded default, no download.
* `procedural`: smooth random images of any shape, for tests.
* `tfds_images`: prepared tensorflow-datasets data read with `tfds.data_source(...,
  download=False)` after an `is_prepared()` check that fails fast (asking tfds to
  download without a network hangs for minutes).
* `prepare_local`: the project's own TF-free builders that prepare MNIST, Fashion-MNIST
  (Debian's `dataset-fashion-mnist` installs its files offline) and CIFAR-10 from local
  files into array_record, readable by `tfds_images`.
* `celeba_64`: the usual CelebA 64x64 preprocessing (central crop 140, antialiased
  resize to 64, random horizontal flip).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError

EMBEDDED = ("digits", "procedural")
LOCAL_BUILDERS = {"mnist": "mlem_mnist", "fashion_mnist": "mlem_fashion_mnist", "cifar10": "mlem_cifar10"}
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


def to_unit_range(images: np.ndarray, max_value: float = 255.0) -> np.ndarray:
    """Map integer pixels in [0, max_value] to float32 in [-1, 1]."""
    return (np.asarray(images, np.float32) / max_value) * 2.0 - 1.0


def digits(split: str = "train", size: int = 16, holdout: float = 0.1) -> np.ndarray:
    """scikit-learn's digits, resized to size x size, in [-1, 1], shape (N, size, size, 1).
    The split is a fixed permutation: the last `holdout` fraction is "test".

    Args:
      split: "train" or "test".
      size: the side of the resized images.
      holdout: the fraction kept for "test".
    """
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    x = np.asarray(jax.image.resize(jnp.asarray(x)[..., None], (x.shape[0], size, size, 1), "linear"))
    x = np.clip(x, 0.0, 1.0) * 2.0 - 1.0
    order = np.random.default_rng(0).permutation(x.shape[0])
    n_test = int(round(holdout * x.shape[0]))
    return _split(x[order], split, n_test)


def _split(x, split, n_test):
    if split == "train":
        return x[:-n_test] if n_test else x
    if split == "test":
        return x[-n_test:]
    if split == "all":
        return x
    raise InputError(f"split: expected 'train', 'test' or 'all', got {split!r}.")


def procedural(key, num: int, shape=(16, 16, 1), blobs: int = 3) -> np.ndarray:
    """Smooth random images: sums of Gaussian blobs, scaled to [-1, 1].

    Args:
      key: a JAX key for the blobs.
      num: the number of images.
      shape: (H, W, C) of one image.
      blobs: Gaussian blobs per image.
    """
    H, W, C = shape
    k1, k2, k3 = jax.random.split(key, 3)
    centers = jax.random.uniform(k1, (num, blobs, 2)) * jnp.array([H, W])
    widths = 1.0 + jax.random.uniform(k2, (num, blobs, 1)) * max(H, W) / 4
    colors = jax.random.uniform(k3, (num, blobs, C), minval=0.3, maxval=1.0)
    yy, xx = jnp.meshgrid(jnp.arange(H), jnp.arange(W), indexing="ij")
    d2 = (yy[None, None] - centers[..., 0, None, None]) ** 2 + (xx[None, None] - centers[..., 1, None, None]) ** 2
    g = jnp.exp(-d2 / (2 * widths[..., None] ** 2))  # (num, blobs, H, W)
    img = jnp.einsum("nbhw,nbc->nhwc", g, colors)
    img = img / jnp.maximum(img.max(axis=(1, 2, 3), keepdims=True), 1e-6)
    return np.asarray(img * 2.0 - 1.0, np.float32)


def batches(images, batch_size: int, key, drop_last: bool = True) -> Iterator:
    """Endless seeded batches: epoch e shuffles with fold_in(key, e). `images` may be a tuple of
    arrays with one row per example (images, labels): the batches are then tuples, rows kept together.

    Args:
      images: an array, or a tuple of arrays with one row per example.
      batch_size: rows per batch.
      key: a JAX key; epoch e shuffles with fold_in(key, e).
      drop_last: drop the last, short batch of each epoch.
    """
    n = (images[0] if isinstance(images, tuple) else images).shape[0]
    if batch_size < 1 or (drop_last and batch_size > n):
        raise InputError(f"batch_size: expected 1 <= batch_size <= {n} (the number of images), got {batch_size}.")
    epoch = 0
    while True:
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        stop = n - n % batch_size if drop_last else n
        for i in range(0, stop, batch_size):
            rows = order[i : i + batch_size]
            yield tuple(a[rows] for a in images) if isinstance(images, tuple) else images[rows]
        epoch += 1


def load_dataset(name: str, split: str = "train", data_dir: str | None = None, image_size: int | None = None,
                 with_labels: bool = False):
    """Images in [-1, 1], (N, H, W, C), by name: an embedded one ('digits', 'procedural'),
    your own images (a folder of PNG/JPEG files or an .npy / .npz array: `folder.load_images`),
    or a prepared tfds dataset under `data_dir` (our local builders for 'mnist',
    'fashion_mnist' and 'cifar10', any other prepared tfds name as is). With
    `with_labels=True`, returns (images, labels) (tfds datasets with a 'label' only).

    Args:
      name: "digits", "procedural", a folder, an .npy/.npz file, or a tfds dataset name.
      split: "train" or "test".
      data_dir: the tfds data dir of a prepared dataset.
      image_size: resize to this square size.
      with_labels: also return the class labels.
    """
    if with_labels and name in EMBEDDED:
        raise InputError(f"with_labels: the embedded dataset {name!r} has no labels; use a tfds dataset.")
    labels = None
    if name not in EMBEDDED:
        from mlem_jax.diffusion.folder import is_image_source, load_images

        if is_image_source(name):  # your own images: a folder, or an .npy / .npz array
            return load_images(name, split, image_size, with_labels)
    if name == "digits":
        x = digits(split)
    elif name == "procedural":
        x = procedural(jax.random.key(0 if split == "train" else 1), 512, (16, 16, 1))
    else:
        if data_dir is None:
            raise InputError(
                f"data_dir: dataset {name!r} is read from a prepared tfds data dir; pass data_dir "
                f"(embedded datasets need none: {EMBEDDED})."
            )
        out = tfds_images(LOCAL_BUILDERS.get(name, name), split, data_dir, with_labels=with_labels)
        x, labels = out if with_labels else (out, None)
    if image_size is not None and x.shape[1] != image_size:
        x = np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], image_size, image_size, x.shape[-1]), "linear",
                                        antialias=True))
    return (x, labels) if with_labels else x


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "tensorflow-datasets is needed for this dataset: pip install 'mlem-jax[data]'"
        ) from e
    return tfds


def tfds_images(name: str, split: str, data_dir: str, limit: int | None = None, with_labels: bool = False):
    """Read a prepared tfds dataset's images without tensorflow and without downloads
    (and its integer 'label' feature, as a second result, with `with_labels=True`)."""
    tfds = _tfds()
    _register_local_builders()
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir: {data_dir!r} does not exist; prepare the dataset there first.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        known = sorted(set(LOCAL_BUILDERS) | set(LOCAL_BUILDERS.values()) | set(EMBEDDED))
        raise InputError(f"name: unknown dataset {name!r} ({type(e).__name__}); known here: {known} "
                         "or any tfds dataset prepared in data_dir.") from e
    if not builder.is_prepared():
        hint = (f"mlem_jax.diffusion.data.prepare_local({_local_short(name)!r}, source_dir, {data_dir!r})"
                if name in LOCAL_BUILDERS.values()
                else f"tfds build {name} --data_dir {data_dir} (needs tensorflow and a network)")
        raise FileNotFoundError(
            f"data_dir: dataset {name!r} is not prepared in {data_dir!r}; mlem-jax never downloads. "
            f"Prepare it with {hint}."
        )
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    n = len(source) if limit is None else min(limit, len(source))
    records = source.__getitems__(range(n))  # one batched read of the array_record files
    images = np.stack([np.asarray(r["image"]) for r in records])
    if images.ndim == 3:
        images = images[..., None]
    if not with_labels:
        return to_unit_range(images)
    if n and "label" not in records[0]:
        raise InputError(f"with_labels: dataset {name!r} has no 'label' feature (it has {sorted(records[0])}).")
    return to_unit_range(images), np.asarray([int(r["label"]) for r in records], np.int32)


def _local_short(name):
    return {v: k for k, v in LOCAL_BUILDERS.items()}.get(name, name)


# ----------------------------------------------------------------- local raw formats


def read_idx(path: str) -> np.ndarray:
    """An MNIST-style idx file (optionally gzipped)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise InputError(f"{path}: cannot be read ({type(e).__name__}: {e}); the file is damaged or truncated.") from e
    if len(data) < 4:
        raise InputError(f"{path}: too short ({len(data)} bytes) to be an idx file.")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise InputError(f"{path}: not an unsigned-byte idx file.")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    if len(data) - 4 - 4 * ndim != int(np.prod(shape)):
        raise InputError(f"{path}: the header says {shape} bytes of data, the file holds {len(data) - 4 - 4 * ndim}; "
                         "it is truncated or damaged.")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array in the idx format of MNIST-style files (gzip when the path ends in
    .gz)."""
    array = np.asarray(array, np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _find(source_dir, stem):
    for suffix in ("", ".gz"):
        p = os.path.join(source_dir, stem + suffix)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"source_dir: {stem}[.gz] not found in {source_dir!r}.")


def _mnist_like(source_dir, split):
    prefix = "train" if split == "train" else "t10k"
    xp, yp = _find(source_dir, f"{prefix}-images-idx3-ubyte"), _find(source_dir, f"{prefix}-labels-idx1-ubyte")
    x, y = read_idx(xp), read_idx(yp)
    if x.shape[0] != y.shape[0]:
        raise InputError(f"source_dir: {xp} holds {x.shape[0]} images but {yp} holds {y.shape[0]} labels; one of "
                         "the two files is from another split or damaged.")
    return x[..., None], y


def _cifar10(source_dir, split):
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in files:
        path = os.path.join(source_dir, name)
        with open(path, "rb") as f:
            try:
                d = _ArraysOnly(f, encoding="bytes").load()
            except pickle.UnpicklingError as e:
                raise InputError(f"source_dir: {path}: {e}") from e
        xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[b"labels"]))
    return np.concatenate(xs), np.concatenate(ys)


class _ArraysOnly(pickle.Unpickler):
    """An unpickler for the CIFAR-10 batch files that admits only what they hold (dicts, lists, bytes,
    numbers and numpy arrays): any other global, the way a crafted pickle runs code, is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a CIFAR-10 batch file: it holds only arrays, "
                                     "lists and bytes (a file that needs more is not the dataset's)")


_REGISTERED = False


def _register_local_builders():
    """Define (once) the tfds builders that prepare from local files, TF-free."""
    global _REGISTERED
    if _REGISTERED:
        return
    tfds = _tfds()

    def make(builder_name, shape, reader, description):
        class Builder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            MANUAL_DOWNLOAD_INSTRUCTIONS = description
            name = builder_name

            def _info(self):
                return self.dataset_info_from_configs(
                    features=tfds.features.FeaturesDict(
                        {"image": tfds.features.Tensor(shape=shape, dtype=np.uint8),
                         "label": tfds.features.ClassLabel(num_classes=10)}
                    ),
                    description=description,
                )

            def _split_generators(self, dl_manager):
                src = str(dl_manager.manual_dir)
                return {"train": self._generate_examples(src, "train"), "test": self._generate_examples(src, "test")}

            def _generate_examples(self, src, split):
                x, y = reader(src, split)
                for i in range(len(x)):  # a limit is DownloadConfig's max_examples_per_split
                    yield i, {"image": x[i], "label": int(y[i])}

        Builder.__name__ = builder_name
        return Builder

    make("mlem_mnist", (28, 28, 1), _mnist_like, "MNIST idx files (train/t10k-images-idx3-ubyte[.gz], labels).")
    make("mlem_fashion_mnist", (28, 28, 1), _mnist_like,
         f"Fashion-MNIST idx files; Debian's dataset-fashion-mnist installs them in {FASHION_MNIST_DEBIAN}.")
    make("mlem_cifar10", (32, 32, 3), _cifar10, "CIFAR-10 python batches (data_batch_1..5, test_batch).")
    _REGISTERED = True


_READERS = {"mnist": _mnist_like, "fashion_mnist": _mnist_like, "cifar10": _cifar10}


def read_local(name: str, source_dir: str, split: str = "train", image_size: int | None = None,
               with_labels: bool = False):
    """'mnist', 'fashion_mnist' or 'cifar10' straight from their raw files in `source_dir`
    (no tensorflow-datasets): images in [-1, 1], (N, H, W, C), in the files' order, resized
    as `load_dataset` resizes them; with `with_labels=True`, (images, labels). For machines
    where tfds is not installed (a GPU image, say); `load_dataset` reads the same records
    from a prepared tfds dir, in tfds's order.

    Args:
      name: 'mnist', 'fashion_mnist' or 'cifar10'.
      source_dir: the folder of the raw files.
      split: "train" or "test".
      image_size: resize to this side (default: the files' size).
      with_labels: also return the labels.
    """
    if name not in _READERS:
        raise InputError(f"name: {name!r} has no raw reader; expected one of {sorted(_READERS)}.")
    if split not in ("train", "test"):
        raise InputError(f"split: expected 'train' or 'test', got {split!r}.")
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(f"source_dir: {source_dir!r} does not exist.")
    x, y = _READERS[name](source_dir, split)
    x = to_unit_range(np.asarray(x))
    if image_size is not None and x.shape[1] != image_size:
        x = np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], image_size, image_size, x.shape[-1]), "linear",
                                        antialias=True))
    return (x, np.asarray(y, np.int32)) if with_labels else x


def prepare_local(name: str, source_dir: str, data_dir: str, limit: int | None = None) -> str:
    """Prepare 'mnist', 'fashion_mnist' or 'cifar10' from local files into array_record
    under data_dir (no tensorflow, no network). `limit` keeps the first records of each
    split (for tests). Returns the tfds name to read it with.

    Args:
      name: 'mnist', 'fashion_mnist' or 'cifar10'.
      source_dir: the folder of the raw files (as Debian's dataset packages install them).
      data_dir: the tfds data folder to write under.
      limit: records kept per split (default: all).
    """
    if name not in LOCAL_BUILDERS:
        raise InputError(f"name: expected one of {sorted(LOCAL_BUILDERS)}, got {name!r}.")
    if not os.path.isdir(source_dir):
        raise FileNotFoundError(f"source_dir: {source_dir!r} does not exist.")
    tfds = _tfds()
    _register_local_builders()
    tfds_name = LOCAL_BUILDERS[name]
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit: expected a positive number of records per split, or None for all, got {limit!r}.")
    builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=source_dir, max_examples_per_split=limit)
    builder.download_and_prepare(download_config=config)
    return tfds_name


# -------------------------------------------------------------------------- CelebA


def celeba_64(images, key=None, crop: int = 140, size: int = 64) -> np.ndarray:
    """CelebA preprocessing: central crop `crop` x `crop`, antialiased resize to `size`,
    random horizontal flip when a key is given; uint8 (N, 218, 178, 3) -> [-1, 1]."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    N, H, W, C = x.shape
    if H < crop or W < crop:
        raise InputError(f"images: expected images of at least {crop}x{crop}, got {H}x{W}.")
    top, left = (H - crop) // 2, (W - crop) // 2
    x = to_unit_range(x[:, top : top + crop, left : left + crop])
    x = jax.image.resize(jnp.asarray(x), (N, size, size, C), "linear", antialias=True)
    if key is not None:
        flip = jax.random.bernoulli(key, 0.5, (N,))
        x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
    return np.asarray(x, np.float32)
