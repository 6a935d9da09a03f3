"""Synthetic token shards, written through the real `ShardWriter` and `Manifest`: for rehearsals at a layout
nobody has on this machine (ImageNet's 1,000 classes x ten views) and for benchmarks and tests that need
shards without a tokenizer. Tokens are random; crop boxes are LlamaGen's ten crops of a square image.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from star.data.inputs import shard_order
from star.data.manifest import Manifest, ShardEntry, ViewsRecord
from star.data.shards import ShardSample, ShardWriter, shard_name, token_dtype


def ten_crop_views(image_size: int, crop_range: float = 1.1) -> list[dict]:
    """The ten crops' boxes (in the ADM frame of crop_range x size) and flips, as tokenize records them."""
    frame = round(image_size * crop_range)
    corners = [(0, 0), (frame - image_size, 0), (0, frame - image_size), (frame - image_size, frame - image_size),
               ((frame - image_size) // 2, (frame - image_size) // 2)]
    boxes = [[x, y, x + image_size, y + image_size] for x, y in corners]
    return [{"box": box, "flip": flip} for flip in (False, True) for box in boxes]


@dataclass(frozen=True)
class SyntheticLayout:
    """What the shards look like: ImageNet at 256 px by default (1000 classes, 16x16 tokens, ten views)."""

    num_images: int
    num_classes: int = 1000
    grid: int = 16
    views: int = 10
    codebook_size: int = 16384
    image_size: int = 0  # 0: grid x 16 (LlamaGen's VQ-16)


def write_synthetic_shards(out: str | Path, layout: SyntheticLayout, shard_size: int = 1000, order: str = "shuffled",
                           seed: int = 0) -> Manifest:
    """A shard folder of `layout.num_images` images listed class by class (as an ImageFolder lists them), dealt
    to shards in `order` exactly as tokenize deals a folder's images. Returns the written manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    num_images, num_classes, grid, views = layout.num_images, layout.num_classes, layout.grid, layout.views
    codebook_size, image_size = layout.codebook_size, layout.image_size or layout.grid * 16
    view_records = ten_crop_views(image_size)[:views] if views <= 10 else [
        {"box": [0, 0, image_size, image_size], "flip": bool(v % 2)} for v in range(views)]
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), -(-num_images // num_classes))[:num_images]  # listing: class order
    dtype = token_dtype(codebook_size)
    entries = []
    dealt = shard_order(num_images, order, seed)
    for index, start in enumerate(range(0, num_images, shard_size)):
        writer = ShardWriter(out / shard_name(index))
        for item in dealt[start : start + shard_size]:
            tokens = rng.integers(0, codebook_size, (views, grid, grid)).astype(dtype)  # [V, h, w]
            writer.write(ShardSample(f"class{labels[item]:04d}/image{item:08d}", tokens, int(labels[item]),
                                     view_records, (image_size, image_size), f"synthetic/{item}"))
        samples = writer.close()["samples"]
        entries.append(ShardEntry(writer.tar_path.name, samples, writer.tar_path.stat().st_size))
    manifest = Manifest(
        tokenizer={"config": {"codebook_size": codebook_size}, "config_source": "synthetic", "checkpoint": "",
                   "checkpoint_sha256": f"synthetic-{codebook_size}"},
        image_size=image_size, grid=(grid, grid), codebook_size=codebook_size, token_dtype=str(dtype),
        views=ViewsRecord("tencrop" if views == 10 else f"random:{views}", views, 1.1, seed),
        classes={f"class{c:04d}": c for c in range(num_classes)}, shards=entries, rejected=[],
        source={"kind": "synthetic", "data": "", "fingerprint": f"synthetic-{num_images}-{seed}-{order}"},
        command="star.data.synthetic", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), precision="fp32")
    manifest.write(out)
    return manifest
