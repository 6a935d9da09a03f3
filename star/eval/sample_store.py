"""How sampling's output reaches disk: each batch as it is made (`.parts-<settings>/batch-NNNNNN.npz`, reused by
a rerun after a crash), then streamed batch by batch into samples.npz / tokens.npz / --save-tokens, so the
images are never all in memory at once (50k at 256 px are 9.8 GB)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from star.images import save_tile_grid
from star.io import atomic_path, sha256_file, write_json_atomic


def is_token_array(path: Path) -> bool:
    """Whether `path` is a tokens .npy as --save-tokens writes it (a 2-D integer array)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(handle)
    except (OSError, ValueError):
        return False
    return len(shape) == 2 and np.dtype(dtype).kind in "iu"


def parts_folder(config, checkpoint_file: Path) -> Path:
    """Where the batches are kept as they are made: named by everything that decides a batch's samples (the
    weights file, the VQ, the settings; not the sample count), so a rerun reuses exactly the batches it would
    make again, and another setting never picks up stale ones."""
    stat = checkpoint_file.stat()
    decides = {**asdict(config), "out": None, "progress": None, "download_dir": None, "num_samples": None, "save_tokens": None,
               "weights_file": [str(checkpoint_file.resolve()), stat.st_size, stat.st_mtime_ns],
               "vq": sha256_file(config.vq_ckpt) if config.vq_ckpt and not config.tokens_only else None}
    digest = hashlib.sha256(json.dumps(decides, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(config.out) / f".parts-{digest}"


def part_path(parts: Path, batch_index: int) -> Path:
    return parts / f"batch-{batch_index:06d}.npz"


def part_is_done(parts: Path, batch_index: int, length: int) -> bool:
    path = part_path(parts, batch_index)
    if not path.is_file():
        return False
    try:
        with np.load(path) as part:
            return len(part["tokens"]) == length
    except (OSError, ValueError, KeyError):
        return False  # a damaged part is made again


def write_part(parts: Path, batch_index: int, tokens: np.ndarray, images: np.ndarray | None) -> None:
    with atomic_path(part_path(parts, batch_index)) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, tokens=tokens, **({"images": images} if images is not None else {}))


def _stream_npz(path: Path, arrays: dict[str, tuple[tuple, np.dtype, Callable[[], Iterator[np.ndarray]]]]) -> None:
    """Write an .npz whose arrays are produced chunk by chunk: {name: (shape, dtype, chunks)}; at most one chunk
    is in memory. np.load reads it like any np.savez file."""
    import zipfile

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, (shape, dtype, chunks) in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array_header_2_0(entry, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                             "fortran_order": False, "shape": shape})
                for chunk in chunks():
                    entry.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def assemble(parts: Path, num_batches: int, labels: np.ndarray, config, resolved: dict) -> dict:
    def read(key: str) -> Iterator[np.ndarray]:
        for b in range(num_batches):
            with np.load(part_path(parts, b)) as part:
                yield part[key]

    with np.load(part_path(parts, 0)) as first:
        tokens_shape, token_dtype = first["tokens"].shape[1:], first["tokens"].dtype
        image_shape = first["images"].shape[1:] if "images" in first else None
    written = {}
    if config.save_tokens:
        _write_npy_streamed(Path(config.save_tokens), (len(labels), *tokens_shape), token_dtype, lambda: read("tokens"))
        written["tokens"] = config.save_tokens
    out = Path(config.out)
    if config.tokens_only:
        _stream_npz(out / "tokens.npz", {"tokens": ((len(labels), *tokens_shape), token_dtype, lambda: read("tokens")),
                                         "labels": (labels.shape, labels.dtype, lambda: iter([labels]))})
        written["tokens_npz"] = str(out / "tokens.npz")
    else:
        _stream_npz(out / "samples.npz", {"arr_0": ((len(labels), *image_shape), np.uint8, lambda: read("images")),
                                          "labels": (labels.shape, labels.dtype, lambda: iter([labels]))})
        written["samples"] = str(out / "samples.npz")
        written["grid"] = str(_grid_from_parts(read("images"), labels, out / "grid.png"))
    write_json_atomic(out / "settings.json", {**asdict(config), "labels_balanced": not config.classes,
                                              "resolved": resolved})
    return written


def _write_npy_streamed(path: Path, shape: tuple, dtype, chunks: Callable[[], Iterator[np.ndarray]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": shape})
        for chunk in chunks():
            handle.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def _grid_from_parts(images: Iterator[np.ndarray], labels: np.ndarray, path: Path, per_class: int = 8,
                     max_classes: int = 16) -> Path:
    """A row per class (the first `max_classes` classes present), up to `per_class` samples each, read in order."""
    classes = list(dict.fromkeys(labels.tolist()))[:max_classes]
    rows: dict[int, list[np.ndarray]] = {label: [] for label in classes}
    offset = 0
    for chunk in images:
        for image, label in zip(chunk, labels[offset : offset + len(chunk)].tolist()):
            if label in rows and len(rows[label]) < per_class:
                rows[label].append(image)
        offset += len(chunk)
        if all(len(row) == per_class for row in rows.values()):
            break
    return save_tile_grid([rows[label] for label in classes], path)
