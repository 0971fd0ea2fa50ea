"""Datasets: embedded, procedural, local tfds builders, tfds errors, CelebA preprocessing."""

import os
import pickle

import jax
import numpy as np
import pytest

from mlem_jax.diffusion import data

FMNIST = data.FASHION_MNIST_DEBIAN


def test_digits_embedded_default():
    train, test = data.digits("train"), data.digits("test")
    assert train.shape == (1617, 16, 16, 1) and test.shape == (180, 16, 16, 1)
    assert train.min() >= -1 and train.max() <= 1 and train.std() > 0.3
    np.testing.assert_array_equal(data.load_dataset("digits", "test"), test)


def test_procedural_any_shape():
    x = data.procedural(jax.random.key(0), 5, (12, 20, 3))
    assert x.shape == (5, 12, 20, 3) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(x, data.procedural(jax.random.key(0), 5, (12, 20, 3)))


def test_seeded_batches():
    x = np.arange(10)[:, None, None, None].astype(np.float32)
    a = data.batches(x, 4, jax.random.key(0))
    b = data.batches(x, 4, jax.random.key(0))
    first = [next(a) for _ in range(4)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate([next(b) for _ in range(4)]))
    # each epoch covers distinct images; epochs are shuffled differently
    e1 = np.concatenate(first[:2]).ravel()
    assert len(set(e1)) == 8
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(x, 11, jax.random.key(0)))


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason=f"Debian's dataset-fashion-mnist is not installed ({FMNIST})")
def test_fashion_mnist_builder_on_a_few_hundred_records(tmp_path):
    name = data.prepare_local("fashion_mnist", FMNIST, str(tmp_path), limit=300)
    x = data.tfds_images(name, "train", str(tmp_path))
    raw = data.read_idx(os.path.join(FMNIST, "train-images-idx3-ubyte.gz"))[:300]
    assert x.shape == (300, 28, 28, 1)
    # tfds stores the records in its own deterministic shuffled order: compare as sets
    as_bytes = lambda a: sorted(img.tobytes() for img in a)
    assert as_bytes(np.round((x[..., 0] + 1) / 2 * 255).astype(np.uint8)) == as_bytes(raw)
    assert data.load_dataset("fashion_mnist", "test", str(tmp_path), image_size=16).shape == (300, 16, 16, 1)
    # labels travel with their images (pairs, compared as sets since the order is tfds')
    x, y = data.load_dataset("fashion_mnist", "train", str(tmp_path), with_labels=True)
    raw_y = data.read_idx(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz"))[:300]
    pairs = lambda imgs, labels: sorted(zip((im.tobytes() for im in imgs), labels.tolist()))
    assert pairs(np.round((x[..., 0] + 1) / 2 * 255).astype(np.uint8), y) == pairs(raw, raw_y)


def test_embedded_datasets_have_no_labels():
    with pytest.raises(ValueError, match="with_labels: the embedded dataset 'digits' has no labels"):
        data.load_dataset("digits", with_labels=True)


def test_mnist_and_cifar_builders_from_local_files(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "mnist"
    src.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        data.write_idx(str(src / f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
        data.write_idx(str(src / f"{prefix}-labels-idx1-ubyte.gz"), rng.integers(0, 10, n))
    data.prepare_local("mnist", str(src), str(tmp_path / "tfds"))
    assert data.load_dataset("mnist", "test", str(tmp_path / "tfds")).shape == (10, 28, 28, 1)

    src = tmp_path / "cifar"
    src.mkdir()
    for name, n in [(f"data_batch_{i}", 3) for i in range(1, 6)] + [("test_batch", 4)]:
        with open(src / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10,
                                                                                                                n))}, f)
    data.prepare_local("cifar10", str(src), str(tmp_path / "tfds"))
    x = data.load_dataset("cifar10", "train", str(tmp_path / "tfds"))
    assert x.shape == (15, 32, 32, 3)
    # a crafted batch file that would run code when unpickled is refused, and runs nothing
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(src / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Exploit(), b"labels": []}, f)
    with pytest.raises(ValueError, match=r"data_batch_1: refusing (posix|os)\.system in a CIFAR-10 batch file"):
        data.prepare_local("cifar10", str(src), str(tmp_path / "tfds2"))
    assert not marker.exists()


def test_dataset_errors_fail_fast(tmp_path):
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"name: unknown dataset 'no_such_set'"):
        data.load_dataset("no_such_set", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"data_dir: .* does not exist"):
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"data_dir: dataset 'mlem_fashion_mnist' is not prepared"):
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"data_dir: dataset 'mnist' is not prepared .* never downloads"):
        data.tfds_images("mnist", "train", str(tmp_path))
    with pytest.raises(ValueError, match=r"data_dir: dataset 'cifar10' is read from a prepared tfds data dir"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match=r"name: expected one of"):
        data.prepare_local("svhn", str(tmp_path), str(tmp_path))
    assert time.perf_counter() - t0 < 30  # no download attempt, no hang


def test_celeba_preprocessing_on_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        source = tfds.data_source("celeb_a", split="train")
        images = np.stack([source[i]["image"] for i in range(4)])
    assert images.shape == (4, 218, 178, 3)
    x = data.celeba_64(images)
    assert x.shape == (4, 64, 64, 3) and x.min() >= -1 and x.max() <= 1
    flipped = data.celeba_64(images, key=jax.random.key(0))
    for a, b in zip(x, flipped):
        assert np.allclose(a, b, atol=1e-6) or np.allclose(a[:, ::-1], b, atol=1e-6)
    # the crop is central: a marker in the centre survives, one in the corner does not
    marker = np.zeros((1, 218, 178, 3), np.uint8)
    marker[0, 105:113, 85:93] = 255
    assert data.celeba_64(marker)[0, 28:36, 28:36].max() > 0.5
    with pytest.raises(ValueError, match=r"images: expected images of at least 140x140"):
        data.celeba_64(np.zeros((1, 100, 100, 3), np.uint8))


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_a_folder_of_images_with_labels_from_subfolders(tmp_path):
    """Generated PNGs of two sizes, grey and colour, in one subfolder per class: centre-cropped, resized,
    RGB for all (one is colour), in [-1, 1], labels by sorted folder name, every tenth image held out."""
    from mlem_jax.diffusion.folder import load_images

    rng = np.random.default_rng(0)
    for i in range(12):
        cls = "cat" if i % 2 else "ant"
        shape = (20, 24) if i % 3 else (12, 12)
        _png(tmp_path / "imgs" / cls / f"{i:02d}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    _png(tmp_path / "imgs" / "ant" / "colour.PNG", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    x, y = load_images(str(tmp_path / "imgs"), "train", image_size=8, with_labels=True)
    xt = load_images(str(tmp_path / "imgs"), "test", image_size=8)
    assert x.shape == (12, 8, 8, 3) and xt.shape == (1, 8, 8, 3) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == {0, 1}
    assert (y == 0).sum() == 7 and (y == 1).sum() == 5  # sorted paths: 7 ant, then cat; the 10th (a cat) held out
    # the centre crop: a 12x12 grey image resized to 8 equals PIL's own resize of the same crop
    from PIL import Image

    direct = np.asarray(Image.open(tmp_path / "imgs" / "ant" / "00.png").convert("RGB").resize((8, 8), Image.LANCZOS))
    all_x = load_images(str(tmp_path / "imgs"), "all", image_size=8)
    np.testing.assert_allclose(all_x[0], direct / 127.5 - 1.0, atol=1e-6)
    assert data.load_dataset(str(tmp_path / "imgs"), "train", image_size=8).shape == (12, 8, 8, 3)


def test_folder_and_array_errors_name_the_file(tmp_path):
    from mlem_jax.diffusion.folder import load_images

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no images"):
        load_images(str(tmp_path / "empty"))
    rng = np.random.default_rng(1)
    for i, shape in enumerate([(8, 8)] * 9 + [(10, 12)]):
        _png(tmp_path / "mixed" / f"{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"2 different sizes \(0.png: 8x8, 9.png: 12x10.*--image-size"):
        load_images(str(tmp_path / "mixed"))
    assert load_images(str(tmp_path / "mixed"), image_size=8).shape == (9, 8, 8, 1)
    (tmp_path / "mixed" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken.png is not a readable image"):
        load_images(str(tmp_path / "mixed"), image_size=8)
    arr = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    x = load_images(str(tmp_path / "a.npy"), "all")
    np.testing.assert_allclose(x[..., 0], arr / 127.5 - 1.0, atol=1e-6)
    np.savez(tmp_path / "b.npz", images=arr, labels=np.arange(20) % 3)
    assert load_images(str(tmp_path / "b.npz"), "test", with_labels=True)[1].tolist() == [0, 1]
    np.save(tmp_path / "c.npy", np.full((10, 4, 4), 3.0))
    with pytest.raises(ValueError, match=r"float pixels in \[3, 3\]"):
        load_images(str(tmp_path / "c.npy"))
    with pytest.raises(ValueError, match=r"has no labels"):
        load_images(str(tmp_path / "a.npy"), with_labels=True)


def test_folder_skips_hidden_entries_follows_linked_classes_and_scales_16_bit(tmp_path):
    """Round 4: a hidden .ipynb_checkpoints/ folder is not a class, a symlinked class folder is
    read, an empty class folder takes no label, and a 16-bit gradient keeps its gradient."""
    from PIL import Image

    from mlem_jax.diffusion.folder import load_images

    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    for cls in ("bird", "cat"):
        for i in range(5):
            _png(root / cls / f"{i}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    _png(root / ".ipynb_checkpoints" / "0-checkpoint.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    _png(root / "bird" / ".hidden.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    (root / "box").mkdir()  # empty, between bird and cat: must not shift cat's label
    elsewhere = tmp_path / "dogs"
    for i in range(5):
        _png(elsewhere / f"{i}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    (root / "dog").symlink_to(elsewhere, target_is_directory=True)
    x, y = load_images(str(root), "all", with_labels=True)
    assert x.shape == (15, 4, 4, 1)
    assert sorted(np.bincount(y).tolist()) == [5, 5, 5] and y.max() == 2  # bird 0, cat 1, dog 2
    from mlem_jax.diffusion.folder import class_names

    assert class_names(str(root)) == ["bird", "cat", "dog"]  # what train writes into the family as class_names
    import argparse

    from mlem_jax.cli._train import _class_names

    assert _class_names(argparse.Namespace(dataset=str(root), conditional=True)) == {
        "class_names": ["bird", "cat", "dog"]}
    assert _class_names(argparse.Namespace(dataset=str(root), conditional=False)) == {}
    gradient = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
    (tmp_path / "deep").mkdir()
    for i in range(10):
        Image.fromarray(gradient).save(tmp_path / "deep" / f"{i}.png")
    g = load_images(str(tmp_path / "deep"), "all")[0, ..., 0].ravel()
    np.testing.assert_allclose(g, np.round(gradient.ravel() / 65535 * 255) / 127.5 - 1, atol=1e-6)
    assert np.all(np.diff(g) > 0)


def test_damaged_arrays_and_labels_are_named(tmp_path):
    from mlem_jax.diffusion.folder import load_images

    arr = np.random.default_rng(4).integers(0, 256, (20, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "ok.npz", images=arr)
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"truncated.npz' cannot be read .*damaged or truncated"):
        load_images(str(tmp_path / "truncated.npz"))
    np.savez(tmp_path / "frac.npz", images=arr, labels=np.linspace(0, 1.9, 20))
    with pytest.raises(ValueError, match=r"not whole numbers"):
        load_images(str(tmp_path / "frac.npz"), with_labels=True)
    np.savez(tmp_path / "whole.npz", images=arr, labels=(np.arange(20) % 2).astype(np.float32))
    assert load_images(str(tmp_path / "whole.npz"), "all", with_labels=True)[1].tolist()[:3] == [0, 1, 0]
    f = (arr / 255.0).astype(np.float32)
    f[3, 1, 2] = np.nan
    np.save(tmp_path / "nan.npy", f)
    with pytest.raises(ValueError, match=r"1 pixels that are NaN or infinite \(the first at index \(3, 1, 2, 0\)\)"):
        load_images(str(tmp_path / "nan.npy"))


def test_truncated_and_mismatched_idx_files_are_named(tmp_path):
    import gzip

    data.write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), np.zeros((5, 28, 28), np.uint8))
    data.write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros((7,), np.uint8))
    with pytest.raises(ValueError, match=r"holds 5 images but .* holds 7 labels"):
        data.read_local("fashion_mnist", str(tmp_path), "train")
    raw = gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 100)
    (tmp_path / "cut.gz").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"cut.gz: cannot be read .*truncated"):
        data.read_idx(str(tmp_path / "cut.gz"))


def test_damaged_and_huge_pngs_are_named(tmp_path, monkeypatch):
    """PIL's SyntaxError (a damaged chunk) and DecompressionBombError (a 14000x14000 PNG) are
    one ValueError naming the file (the bomb reproduced by lowering PIL's pixel limit)."""
    from PIL import Image

    from mlem_jax.diffusion.folder import load_images

    for i in range(10):
        _png(tmp_path / "imgs" / f"{i}.png", np.zeros((8, 8), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x8 = 64 > 2 x 10: PIL refuses to decode
    with pytest.raises(ValueError, match=r"0.png is too large to decode safely"):
        load_images(str(tmp_path / "imgs"))
    monkeypatch.undo()
    real_open = Image.open

    def damaged(path, *a, **k):
        if str(path).endswith("3.png"):
            raise SyntaxError("broken PNG file (bad header checksum in b'tEXt')")
        return real_open(path, *a, **k)

    monkeypatch.setattr(Image, "open", damaged)
    with pytest.raises(ValueError, match=r"3.png is not a readable image \(SyntaxError: broken PNG"):
        load_images(str(tmp_path / "imgs"))
