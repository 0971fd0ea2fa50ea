"""Your own images: a folder of PNG/JPEG files or an `.npy` / `.npz` array, as training data.

* A folder: every `.png`, `.jpg`, `.jpeg` (any case) below it. Images are centre-cropped to
  a square and resized to `image_size` (antialiased); without `image_size` they must all
  have one size. Grey images stay one channel unless some image is colour, then all are
  RGB (alpha is dropped); 16-bit images are scaled by their depth (65535 is white), not
  clipped. Hidden entries (names starting with '.', such as `.ipynb_checkpoints/`) are
  skipped at every depth; a class folder that is a symbolic link is followed (one level, so
  a link loop cannot recurse). Labels are the names of the first-level subfolders that hold
  images, sorted (images directly in the folder get none; an empty folder takes no label).
* An array: `.npy` of shape (N, H, W) or (N, H, W, C), uint8 in [0, 255] or floats in
  [-1, 1] / [0, 1]; `.npz` with an `images` member (and optionally `labels`).

The split is deterministic: every tenth image (in sorted path order, or array order) is
held out as "test", the rest is "train". Pixels come back in [-1, 1], float32.
"""

from __future__ import annotations

import os

import numpy as np

from mlem_jax._errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HELD_OUT_EVERY = 10  # every tenth image is the held-out split


def is_image_source(name: str) -> bool:
    """Whether `name` is a path this module reads (a folder, or an .npy / .npz file)."""
    return os.path.isdir(name) or name.lower().endswith((".npy", ".npz"))


def load_images(path: str, split: str = "train", image_size: int | None = None, with_labels: bool = False):
    """Images in [-1, 1], (N, H, W, C), from a folder of images or an .npy / .npz array (the module
    docstring says how); `split` is "train", "test" (every tenth image) or "all".

    Args:
      path: a folder of images, or an .npy / .npz file.
      split: "train", "test" (every tenth image) or "all".
      image_size: resize to this side (default: the files' size).
      with_labels: also return the labels (from sub-folder names or the .npz's `labels`).
    """
    if split not in ("train", "test", "all"):
        raise InputError(f"split: expected 'train', 'test' or 'all', got {split!r}.")
    if os.path.isdir(path):
        x, labels = _read_folder(path, image_size)
    elif os.path.isfile(path):
        x, labels = _read_array(path, image_size)
    else:
        raise FileNotFoundError(f"dataset: {path!r} is neither a folder of images nor an .npy / .npz file.")
    keep = np.arange(x.shape[0])
    if split != "all":
        held_out = keep % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        keep = keep[held_out] if split == "test" else keep[~held_out]
        if keep.size == 0:
            raise InputError(f"dataset: {path!r} has {x.shape[0]} images, too few for a {split!r} split (every "
                             f"{HELD_OUT_EVERY}th image is held out); give at least {HELD_OUT_EVERY}.")
    x = x[keep]
    if with_labels:
        if labels is None:
            raise InputError(f"with_labels: {path!r} has no labels (put the images in one subfolder per class, or "
                             "an npz 'labels' member).")
        return x, labels[keep]
    return x


def _image_files(folder: str) -> list:
    """Every image file below `folder`, hidden entries skipped, first-level links to folders
    followed (deeper links are not, so that a loop cannot recurse)."""
    files = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():  # follows a symlinked class folder
            for root, dirs, names in os.walk(entry.path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                files += [os.path.join(root, f) for f in names
                          if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
        elif entry.name.lower().endswith(IMAGE_SUFFIXES):
            files.append(entry.path)
    return sorted(files)


def class_names(path: str) -> list | None:
    """The class names of a folder dataset in label order (label i is `class_names(path)[i]`): the
    sorted first-level subfolders that hold images. None for an array file or a folder whose
    images are not all in class folders."""
    if not os.path.isdir(path):
        return None
    rel = [os.path.relpath(f, path) for f in _image_files(path)]
    if not rel or not all(os.sep in r for r in rel):
        return None
    return sorted({r.split(os.sep)[0] for r in rel})


def _read_folder(folder: str, image_size: int | None):
    files = _image_files(folder)
    if not files:
        raise InputError(f"dataset: the folder {folder!r} holds no images (.png, .jpg, .jpeg, searched "
                         "recursively).")
    from PIL import Image, UnidentifiedImageError

    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except Image.DecompressionBombError as e:
            raise InputError(f"dataset: {f} is too large to decode safely ({e}); resize it first.") from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError on bad chunks
            raise InputError(f"dataset: {f} is not a readable image ({type(e).__name__}: {e}).") from e
    colour = any(im.mode not in ("L", "1", "I", "I;16", "F", "LA") for im in images)
    arrays = [_to_array(im, "RGB" if colour else "L", image_size) for im in images]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        other = next(i for i, a in enumerate(arrays) if a.shape != arrays[0].shape)
        shown = ", ".join(f"{os.path.relpath(files[i], folder)}: {arrays[i].shape[1]}x{arrays[i].shape[0]}"
                          for i in (0, other))
        raise InputError(f"dataset: the images of {folder!r} have {len(sizes)} different sizes ({shown}, ...); "
                         "pass --image-size to centre-crop and resize them all.")
    x = np.stack(arrays).astype(np.float32) / 127.5 - 1.0
    classes = sorted({os.path.relpath(f, folder).split(os.sep)[0] for f in files
                      if os.sep in os.path.relpath(f, folder)})
    labels = None
    if classes and all(os.sep in os.path.relpath(f, folder) for f in files):
        index = {c: i for i, c in enumerate(classes)}
        labels = np.array([index[os.path.relpath(f, folder).split(os.sep)[0]] for f in files], np.int32)
    return (x if x.ndim == 4 else x[..., None]), labels


def _to_array(im, mode: str, image_size: int | None) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale by the depth (convert("L") would clip)
        depth = np.asarray(im).astype(np.float64) / 65535.0
        im = Image.fromarray(np.clip(np.round(depth * 255.0), 0, 255).astype(np.uint8), "L")
    im = im.convert(mode)
    if image_size is not None:
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.LANCZOS)
    a = np.asarray(im, np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _read_array(path: str, image_size: int | None):
    import zipfile

    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                if "images" not in z.files:
                    raise InputError(f"dataset: {path!r} has no 'images' member (it has {z.files[:5]}).")
                x = z["images"]
                labels = z["labels"] if "labels" in z.files else None
        else:
            x, labels = np.load(path, allow_pickle=False), None
    except ValueError as e:
        if str(e).startswith("dataset:"):
            raise
        raise InputError(f"dataset: {path!r} cannot be read as an array ({e}).") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"dataset: {path!r} cannot be read ({type(e).__name__}: {e}); the file is damaged or "
                         "truncated.") from e
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.shape[0] == 0:
        raise InputError(f"dataset: {path!r} holds an array of shape {x.shape}; expected images (N, H, W) or "
                         "(N, H, W, C) with C = 1 or 3.")
    if labels is not None and labels.shape != (x.shape[0],):
        raise InputError(f"dataset: {path!r} has labels of shape {labels.shape}, expected ({x.shape[0]},).")
    if labels is not None and not np.issubdtype(labels.dtype, np.integer):
        whole = np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(
            labels == np.round(labels))
        if not whole:
            raise InputError(f"dataset: {path!r} has labels of dtype {labels.dtype} that are not whole numbers "
                             f"(for example {labels.ravel()[:3].tolist()}); expected integer class indices.")
    x = _scaled(x, path)
    if image_size is not None and (x.shape[1], x.shape[2]) != (image_size, image_size):
        import jax
        import jax.numpy as jnp

        side = min(x.shape[1], x.shape[2])
        top, left = (x.shape[1] - side) // 2, (x.shape[2] - side) // 2
        x = x[:, top:top + side, left:left + side]
        x = np.asarray(jax.image.resize(jnp.asarray(x), (x.shape[0], image_size, image_size, x.shape[-1]),
                                        "linear", antialias=True))
    return x.astype(np.float32), (None if labels is None else labels.astype(np.int32))


def _scaled(x: np.ndarray, path: str) -> np.ndarray:
    """uint8 [0, 255] or floats in [0, 1] / [-1, 1], to [-1, 1]."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"dataset: {path!r} has pixels of dtype {x.dtype}; expected uint8 or floating point.")
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"dataset: {path!r} has {int(bad.sum())} pixels that are NaN or infinite (the first at "
                         f"index {first}); remove or repair those images.")
    lo, hi = float(np.min(x)), float(np.max(x))
    if lo < -1.0 - 1e-3 or hi > 1.0 + 1e-3:
        raise InputError(f"dataset: {path!r} has float pixels in [{lo:.3g}, {hi:.3g}]; expected [0, 1] or "
                         "[-1, 1] (or uint8).")
    return (2.0 * x - 1.0) if lo >= 0.0 else x.astype(np.float32)
