"""Built-in datasets, so the demo and tests need no download.

- The demo's Fashion-MNIST subset (`DEMO_SUBSET`, committed under star/demo_data/, MIT licence): a stratified
  sample of the train and test splits as uint8 28x28 images with labels and the class names;
  `make_demo_subset` made it from Debian's `dataset-fashion-mnist`, `write_demo_image_folder` turns it into the
  ImageFolder the stages read (32 px RGB, as the study writes Fashion-MNIST).
- The photo dataset (`build_builtin_dataset`, for tests and benchmarks): a small class-labelled ImageFolder cut
  from photos that ship with scikit-image and scikit-learn (CC0 / CC-BY). Each photo is one class; each image
  is a random square crop of it (35-75% of the short side, random place, random mirror), resized to
  `image_size`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from star.io import write_json_atomic

DEMO_DATA = Path(__file__).resolve().parent.parent / "demo_data"
DEMO_SUBSET = DEMO_DATA / "fashion_mnist_subset.npz"
# Fashion-MNIST's class names, in label order (github.com/zalandoresearch/fashion-mnist)
FASHION_MNIST_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot")
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


def stratified_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` random indices of every label, sorted (the order the split had)."""
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(f"label {label} has {len(members)} images, fewer than the {per_class} asked for")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def make_demo_subset(idx_folder: str | Path, out: str | Path = DEMO_SUBSET, train_per_class: int = 400,
                     val_per_class: int = 100, seed: int = 0) -> Path:
    """Fashion-MNIST's idx files (e.g. /usr/share/datasets/fashion-mnist) -> the demo's compressed npz:
    train_* from the train split, val_* from the test split, `per_class` images of every class each."""
    from star.io import atomic_path
    from star.study.fashion_mnist import IDX_FILES, find_idx, read_idx

    rng = np.random.default_rng(seed)
    arrays = {}
    for name, split, per_class in (("train", "train", train_per_class), ("val", "test", val_per_class)):
        paths = [find_idx(Path(idx_folder), stem) for stem in IDX_FILES[split]]
        if None in paths:
            raise FileNotFoundError(f"{idx_folder}: no {' / '.join(IDX_FILES[split])}[.gz] (install Debian's "
                                    "dataset-fashion-mnist, or pass the folder holding the idx files)")
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        keep = stratified_indices(labels, per_class, rng)
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = images[keep], labels[keep]  # [N, 28, 28], [N]
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays, class_names=np.array(FASHION_MNIST_NAMES))
    return out


def load_demo_subset(path: str | Path = DEMO_SUBSET) -> dict[str, np.ndarray]:
    """The demo's subset: train_images / val_images uint8 [N, 28, 28], train_labels / val_labels [N],
    class_names [C] (str)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo's Fashion-MNIST subset is missing; it is committed with the "
                                "repository (git checkout -- star/demo_data)")
    with np.load(path, allow_pickle=False) as data:
        subset = {key: data[key] for key in data.files}
    missing = {"train_images", "train_labels", "val_images", "val_labels", "class_names"} - set(subset)
    if missing:
        raise ValueError(f"{path}: not the demo subset (no {', '.join(sorted(missing))})")
    return subset


def folder_slug(class_name: str) -> str:
    """'T-shirt/top' -> 't_shirt_top' (convert_split puts the label first: '00_t_shirt_top')."""
    return "".join(c if c.isalnum() else "_" for c in class_name.lower())


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` images of every label (all of them when per_class is 0), in order."""
    if not per_class:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.flatnonzero(labels == label)[:per_class] for label in np.unique(labels)]))


def write_demo_image_folder(root: str | Path, subset_path: str | Path = DEMO_SUBSET, train_per_class: int = 0,
                            val_per_class: int = 0) -> dict:
    """root/{train,val}/<NN_name>/<index>.png (32 px RGB, a 2 px black border) from the subset, the first
    `*_per_class` images of each class (0: all); a no-op when the same images are already written (each split's
    `complete.json` is written last), a rewrite of the split when other counts were."""
    from star.study.fashion_mnist import convert_split

    subset = load_demo_subset(subset_path)
    names = [str(name) for name in subset["class_names"]]
    folders = [folder_slug(name) for name in names]
    root = Path(root)
    splits = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        labels = subset[f"{split}_labels"]
        keep = first_per_class(labels, per_class)
        marker = root / split / "complete.json"
        wanted = np.bincount(labels[keep], minlength=len(names)).tolist()
        if marker.is_file() and json.loads(marker.read_text())["per_class"] != wanted:
            shutil.rmtree(root / split)
        splits[split] = convert_split(subset[f"{split}_images"][keep], labels[keep], root / split, folders)
    return {"root": str(root), "class_names": names, **splits}
