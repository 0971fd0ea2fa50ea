"""Image grids as PNG files."""

from __future__ import annotations

import math

import numpy as np


def to_grid(images, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) in [-1, 1] -> one uint8 image (rows * (H + pad), cols * (W + pad), C).

    Args:
      images: (N, H, W, C) in [-1, 1].
      ncols: images per row (default: about sqrt(N)).
      pad: white pixels between images.
    """
    x = np.asarray(images, np.float32)
    n, h, w, c = x.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    pix = np.clip((x + 1) / 2 * 255 + 0.5, 0, 255).astype(np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = pix[i]
    return grid


def save_png(path: str, grid: np.ndarray, scale: int = 1, exclusive: bool = False) -> str:
    """Write an image grid (uint8, H x W x C) as a PNG, each pixel repeated `scale` times;
    returns the path. With `exclusive`, an existing file is not replaced (`FileExistsError`).

    Args:
      path: the file to write.
      grid: a uint8 image (H, W, C).
      scale: each pixel is repeated this many times in each direction.
      exclusive: refuse to replace an existing file.
    """
    from PIL import Image

    g = grid[..., 0] if grid.shape[-1] == 1 else grid
    img = Image.fromarray(g)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    from mlem_jax._atomic import atomic_path

    with atomic_path(path, exclusive=exclusive) as tmp:  # whole or not at all
        img.save(tmp, format="PNG")
    return path


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 6) -> np.ndarray:
    """Two image grids next to each other with a white gap, padded to the same height.

    Args:
      left: a uint8 image grid (H, W, C).
      right: another, placed to its right.
      gap: white pixels between them.
    """
    h = max(left.shape[0], right.shape[0])
    pad = lambda g: np.pad(g, ((0, h - g.shape[0]), (0, 0), (0, 0)), constant_values=255)
    sep = np.full((h, gap, left.shape[-1]), 255, np.uint8)
    return np.concatenate([pad(left), sep, pad(right)], axis=1)


def with_caption(grid: np.ndarray, lines, scale: int = 4) -> np.ndarray:
    """The grid (uint8, H x W x C), enlarged `scale` times, under a white band with `lines` of black text
    (PIL's built-in bitmap font): a figure that says what it shows.

    Args:
      grid: a uint8 image (H, W, C).
      lines: the caption, one string per line.
      scale: the enlargement of the grid.
    """
    from PIL import Image, ImageDraw

    g = grid[..., 0] if grid.shape[-1] == 1 else grid
    img = Image.fromarray(g).convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    lines = [lines] if isinstance(lines, str) else list(lines)
    band = 4 + 12 * len(lines)
    out = Image.new("RGB", (img.width, img.height + band), "white")
    out.paste(img, (0, band))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((3, 2 + 12 * i), line, fill="black")
    return np.asarray(out)
