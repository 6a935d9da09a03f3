"""Image files: the one list of image extensions every stage accepts, and grids for people to look at
(sample grids, shard previews, attention panels)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


LABEL_FONT_SIZE = 14
MIN_TILE_PX = 64  # smaller tiles (a 32-px sample) are enlarged by a whole factor, pixels kept sharp


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def save_labelled_grid(rows: list[tuple[str, list[np.ndarray]]], path: str | Path, title: str = "", gap: int = 2,
                       min_tile: int = MIN_TILE_PX) -> Path:
    """Rows of equally sized uint8 tiles [S, S, 3], each row led by a strip with its name (a class name), under
    an optional title line; tiles under `min_tile` px are enlarged by a whole factor. One PNG, atomically."""
    size = next(tile for _, row in rows for tile in row).shape[0]
    factor = -(-min_tile // size)  # ceil: the smallest whole enlargement reaching min_tile
    tile_px = size * factor
    font = ImageFont.load_default(size=LABEL_FONT_SIZE)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_px = max(_text_size(measure, name, font)[0] for name, _ in rows) + 12
    title_px = _text_size(measure, title, font)[1] + 12 if title else 0
    columns = max(len(row) for _, row in rows)
    width = max(label_px + columns * (tile_px + gap), _text_size(measure, title, font)[0] + 12 if title else 0)
    canvas = Image.new("RGB", (width, title_px + len(rows) * (tile_px + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 6), title, fill="black", font=font)
    for r, (name, row) in enumerate(rows):
        top = title_px + r * (tile_px + gap)
        draw.text((6, top + tile_px // 2), name, fill="black", font=font, anchor="lm")
        for c, tile in enumerate(row):
            enlarged = np.kron(tile, np.ones((factor, factor, 1), np.uint8)) if factor > 1 else tile
            canvas.paste(Image.fromarray(enlarged), (label_px + c * (tile_px + gap), top))
    info = signed_png_info()
    info.add_text("Title", title)
    info.add_text("Description", "rows: " + " | ".join(name for name, _ in rows))  # the labels, machine-readable
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", pnginfo=info)
    return path
