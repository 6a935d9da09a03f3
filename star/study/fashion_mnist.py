"""Fashion-MNIST for the study: fetch Debian's `dataset-fashion-mnist` package (no root needed), read its idx
files, and write the ImageFolder tree tokenize/run.py and tokenize/train_vq.py read:

    data/fashion-mnist/{train,test}/<NN_class-name>/<index>.png     28x28 grey -> 32x32 RGB (2 px black border)

Folder names start with the label number so that ImageFolder's sorted class ids equal Fashion-MNIST's labels.
Everything is cached: the .deb and its extraction under data/fashion-mnist/.cache, the PNGs behind a
`complete.json` marker written last (a half-written split is redone, never trusted).
"""
from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from star.io import atomic_path, write_json_atomic

PACKAGE = "dataset-fashion-mnist"
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle_boot")
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
PAD = 2  # 28 + 2 x 2 = 32 px: a multiple of the VQ's downsample 4 (8x8 tokens)


class FetchError(RuntimeError):
    """The package could not be downloaded or unpacked; the message names the commands to run by hand."""


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (optionally .gz): uint8 images [N, H, W] or labels [N]."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {array.size} values (truncated download?)")
    return array.reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """The inverse of read_idx (gzip when the name ends in .gz); tests use it to make tiny datasets."""
    array = np.ascontiguousarray(array, np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())
    return Path(path)


def find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        found = sorted(folder.rglob(name))
        if found:
            return found[0]
    return None


def fetch_package(cache: Path) -> Path:
    """`apt-get download` + `dpkg -x` into cache/ (once); returns the folder holding the idx files."""
    extracted = cache / "extracted"
    if find_idx(extracted, IDX_FILES["test"][0]) is not None:
        return extracted
    cache.mkdir(parents=True, exist_ok=True)
    by_hand = (f"cd {cache} && apt-get download {PACKAGE} && dpkg -x {PACKAGE}_*.deb extracted "
               f"(run `apt-get update` first if the package is not found)")
    debs = sorted(cache.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        attempts = [["apt-get", "download", PACKAGE]]
        if shutil.which("apt-get") is None:
            raise FetchError(f"no apt-get here to fetch Fashion-MNIST; on a Debian machine run: {by_hand}")
        result = subprocess.run(attempts[0], cwd=cache, capture_output=True, text=True)
        if result.returncode != 0:  # the package lists may be missing: refresh them once, then retry
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            result = subprocess.run(attempts[0], cwd=cache, capture_output=True, text=True)
        debs = sorted(cache.glob(f"{PACKAGE}_*.deb"))
        if result.returncode != 0 or not debs:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise FetchError(f"could not download {PACKAGE} ({last[0]}); run by hand: {by_hand}")
    staging = cache / "extracted.partial"
    shutil.rmtree(staging, ignore_errors=True)
    result = subprocess.run(["dpkg", "-x", str(debs[-1]), str(staging)], capture_output=True, text=True)
    if result.returncode != 0 or find_idx(staging, IDX_FILES["test"][0]) is None:
        raise FetchError(f"could not unpack {debs[-1]} ({result.stderr.strip() or 'no idx files inside'}); "
                         f"run by hand: {by_hand}")
    shutil.rmtree(extracted, ignore_errors=True)
    staging.rename(extracted)
    return extracted


def to_rgb32(image: np.ndarray) -> np.ndarray:
    """[28, 28] grey uint8 -> [32, 32, 3] RGB, a black border as the Fashion-MNIST background."""
    padded = np.pad(image, PAD)  # [32, 32]
    return np.repeat(padded[:, :, None], 3, axis=2)


def convert_split(images: np.ndarray, labels: np.ndarray, out: Path, class_names=CLASS_NAMES) -> dict:
    """Write one split as an ImageFolder; idempotent (a `complete.json` marker is written last)."""
    marker = out / "complete.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    if len(images) != len(labels):
        raise ValueError(f"{out}: {len(images)} images but {len(labels)} labels")
    folders = [out / f"{index:02d}_{name}" for index, name in enumerate(class_names)]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(to_rgb32(image)).save(folders[int(label)] / f"{index:05d}.png")
    counts = np.bincount(labels.astype(np.int64), minlength=len(class_names)).tolist()
    summary = {"images": int(len(images)), "per_class": counts, "size": int(images.shape[1]) + 2 * PAD}
    write_json_atomic(marker, summary)
    return summary


def prepare_fashion_mnist(root: str | Path = "data/fashion-mnist", idx_folder: str | Path | None = None) -> dict:
    """data/fashion-mnist/{train,test} ready (fetched and converted unless already there): a summary dict.
    `idx_folder` skips the download (any folder holding the four idx files, .gz or not)."""
    root = Path(root)
    done = {split: root / split / "complete.json" for split in IDX_FILES}
    if not all(marker.is_file() for marker in done.values()):
        source = Path(idx_folder) if idx_folder else fetch_package(root / ".cache")
        for split, (image_stem, label_stem) in IDX_FILES.items():
            paths = [find_idx(source, stem) for stem in (image_stem, label_stem)]
            if None in paths:
                raise FileNotFoundError(f"{source}: no {image_stem}[.gz] / {label_stem}[.gz]")
            convert_split(read_idx(paths[0]), read_idx(paths[1]), root / split)
    summary = {split: json.loads(marker.read_text()) for split, marker in done.items()}
    with atomic_path(root / "classes.json") as tmp:
        Path(tmp).write_text(json.dumps(list(CLASS_NAMES)))
    return {"root": str(root), "classes": list(CLASS_NAMES), **summary}


def make_subset(source: str | Path, target: str | Path, per_class: dict[str, int]) -> dict:
    """The first n images per class of each split (per_class = {"train": n, "test": m}), copied into a new
    ImageFolder: the QUICK study's smaller data. 0 or a missing split keeps every image."""
    source, target = Path(source), Path(target)
    summary = {}
    for split in IDX_FILES:
        marker = target / split / "complete.json"
        if marker.is_file():
            summary[split] = json.loads(marker.read_text())
            continue
        counts = []
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            files = sorted(folder.glob("*.png"))
            files = files[: per_class.get(split) or len(files)]
            (target / split / folder.name).mkdir(parents=True, exist_ok=True)
            for file in files:
                shutil.copyfile(file, target / split / folder.name / file.name)
            counts.append(len(files))
        summary[split] = {"images": sum(counts), "per_class": counts, "size": 28 + 2 * PAD}
        write_json_atomic(marker, summary[split])
    return summary
