"""Sample grids as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jaxgen.paths import as_path


def image_grid(images_nhwc: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """`[N, H, W, 3]` floats in [0, 1] -> one uint8 image `[rows*(H+pad)+pad, nrow*(W+pad)+pad, 3]`, row-major."""
    images = np.clip(np.asarray(images_nhwc, np.float32), 0.0, 1.0)
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.float32)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return (grid * 255.0 + 0.5).astype(np.uint8)


def save_grid(
    images_nhwc: np.ndarray, path: str | Path, nrow: int, row_labels: Sequence[str] | None = None, scale: int = 1
) -> Path:
    """Write a grid PNG; `row_labels` (one per row, e.g. the class) are drawn in a margin on the left."""
    grid = Image.fromarray(image_grid(images_nhwc, nrow))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if row_labels:
        margin = 8 + 7 * max(len(s) for s in row_labels)
        canvas = Image.new("RGB", (grid.width + margin, grid.height), "white")
        canvas.paste(grid, (margin, 0))
        draw = ImageDraw.Draw(canvas)
        row_h = grid.height / len(row_labels)
        for r, text in enumerate(row_labels):
            draw.text((4, int(r * row_h + row_h / 2 - 5)), text, fill="black")
        grid = canvas
    path = as_path(path)  # local or a bucket (gs://...)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        grid.save(f, format="PNG")
    return path
