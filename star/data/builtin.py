"""The built-in dataset: a small class-labelled ImageFolder cut from photos that ship with scikit-image and
scikit-learn (CC0 / CC-BY), so the demo and tests need no download. Each photo is one class; each image is a
random square crop of it (35-75% of the short side, random place, random mirror), resized to `image_size`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from star.io import write_json_atomic

PHOTO_CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "hubble", "ihc", "china", "flower")


def load_photo(name: str) -> np.ndarray:
    import skimage.data

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return load_sample_image(f"{name}.jpg")
    loader = {"hubble": "hubble_deep_field", "ihc": "immunohistochemistry"}.get(name, name)
    return getattr(skimage.data, loader)()


def random_square_crops(photo: np.ndarray, count: int, image_size: int, rng: np.random.Generator) -> list[Image.Image]:
    source = Image.fromarray(photo)
    short = min(source.size)
    crops = []
    for _ in range(count):
        side = int(short * rng.uniform(0.35, 0.75))
        left = int(rng.integers(0, source.width - side + 1))
        top = int(rng.integers(0, source.height - side + 1))
        crop = source.resize((image_size, image_size), Image.BICUBIC, box=(left, top, left + side, top + side))
        crops.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return crops


def build_builtin_dataset(root: str | Path, train_per_class: int = 64, val_per_class: int = 32,
                          image_size: int = 72, seed: int = 0, classes=PHOTO_CLASSES) -> dict:
    """Write `root/train/<class>/*.png` and `root/val/<class>/*.png`; a no-op when the same spec is already there."""
    root = Path(root)
    spec = {"classes": list(classes), "train_per_class": train_per_class, "val_per_class": val_per_class,
            "image_size": image_size, "seed": seed, "version": 1}
    stamp = root / "dataset.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return spec
    rng = np.random.default_rng(seed)
    for name in classes:
        photo = load_photo(name)
        crops = random_square_crops(photo, train_per_class + val_per_class, image_size, rng)
        for split, chunk in (("train", crops[:train_per_class]), ("val", crops[train_per_class:])):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, crop in enumerate(chunk):
                crop.save(folder / f"{index:04d}.png")
    write_json_atomic(stamp, spec)  # written last and atomically: a crash mid-build means a rebuild, not a half set
    return spec
