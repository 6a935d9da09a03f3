"""Image files: the one list of image extensions every stage accepts, and grids for people to look at
(sample grids, shard previews, attention panels)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from star.io import atomic_path, signed_png_info

# The file extensions read as images, everywhere (tokenize's folder and tar inputs, the VQ trainer).
# Files with other extensions inside a class folder are still offered to the decoder and, if unreadable,
# listed as rejected with a reason: the list decides what counts as an image, never what is silently dropped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")


def save_tile_grid(rows: list[list[np.ndarray]], path: str | Path, gap: int = 2) -> Path:
    """Write rows of equally sized uint8 tiles [S, S, 3] as one PNG, white gaps between tiles (atomically)."""
    size = next(tile for row in rows for tile in row).shape[0]
    columns = max(len(row) for row in rows)
    canvas = np.full((len(rows) * (size + gap), columns * (size + gap), 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas[r * (size + gap) : r * (size + gap) + size, c * (size + gap) : c * (size + gap) + size] = tile
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG", pnginfo=signed_png_info())
    return path
