"""How sampling's output reaches disk: each batch as it is made (`.parts-<settings>/batch-NNNNNN.npz`, reused by
a rerun after a crash), then streamed batch by batch into samples.npz / tokens.npz / --save-tokens, so the
images are never all in memory at once (50k at 256 px are 9.8 GB)."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from star.eval.class_names import row_label
from star.images import save_labelled_grid
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
    decides = {**asdict(config), "out": None, "progress": None, "download_dir": None, "num_samples": None,
               "save_tokens": None, "class_names": None, "grid_per_class": None, "grid_classes": None,
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


def assemble(parts: Path, num_batches: int, labels: np.ndarray, config, resolved: dict,
             class_names: dict[int, str] | None = None) -> dict:
    """Stream the batches into the outputs; grid.png's rows are named from `class_names` (id -> name)."""
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
        layout = GridLayout(config.grid_per_class, config.grid_classes, class_names or {}, grid_caption(config))
        written["grid"] = str(grid_from_batches(read("images"), labels, out / "grid.png", layout))
    write_json_atomic(out / "settings.json", {**asdict(config), "labels_balanced": not config.classes,
                                              "resolved": resolved})
    return written


def _write_npy_streamed(path: Path, shape: tuple, dtype, chunks: Callable[[], Iterator[np.ndarray]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": shape})
        for chunk in chunks():
            handle.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


@dataclass
class GridLayout:
    """What grid.png shows: the first `per_class` samples (0 = all) of each of the first `classes` classes
    (0 = all), rows named from `names` (id -> name), under `caption` (the sampling settings)."""

    per_class: int = 16
    classes: int = 16
    names: dict[int, str] = field(default_factory=dict)
    caption: str = ""


def grid_caption(config) -> str:
    sampling = config.sampling
    return (f"{Path(config.ckpt).name} ({config.weights}): CFG {sampling.cfg_scale:g}, temperature "
            f"{sampling.temperature:g}, top-k {sampling.top_k or 'all'}, top-p {sampling.top_p:g}, seed {config.seed}")


def grid_title(shown: dict[int, int], counts: dict[int, int], caption: str = "") -> str:
    """Says what the grid holds: every sample, or the first N of M per class, and how many classes of all."""
    per_class = sorted(set(counts[label] for label in shown))
    of = f"{per_class[0]}" if len(per_class) == 1 else f"{per_class[0]}-{per_class[-1]}"
    if all(shown[label] == counts[label] for label in shown):
        samples = f"all {of} samples per class"
    else:
        samples = f"first {max(shown.values())} of {of} samples per class"
    classes = f"{len(shown)} classes" if len(shown) == len(counts) else f"first {len(shown)} of {len(counts)} classes"
    return "\n".join(part for part in (caption, f"{samples}; {classes}") if part)


def grid_from_batches(images: Iterator[np.ndarray], labels: np.ndarray, path: Path,
                      layout: GridLayout | None = None) -> Path:
    """A row per class in order of first appearance, read batch by batch (only the shown images are kept),
    each row named by its class and the title saying how much of the samples it shows."""
    layout = layout or GridLayout()
    counts = dict(Counter(labels.tolist()))
    classes = list(counts)[: layout.classes or None]
    wanted = {label: min(counts[label], layout.per_class or counts[label]) for label in classes}
    rows: dict[int, list[np.ndarray]] = {label: [] for label in classes}
    offset = 0
    for chunk in images:
        for image, label in zip(chunk, labels[offset : offset + len(chunk)].tolist()):
            if label in rows and len(rows[label]) < wanted[label]:
                rows[label].append(image)
        offset += len(chunk)
        if all(len(rows[label]) == wanted[label] for label in classes):
            break
    return save_labelled_grid([(row_label(label, layout.names), rows[label]) for label in classes], path,
                              title=grid_title(wanted, counts, layout.caption))
