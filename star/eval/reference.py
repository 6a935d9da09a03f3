"""Where images and reference statistics come from: samples .npz / image folders read as streams, ADM reference
batches (mu, sigma, mu_s, sigma_s, arr_0), shard folders standing for their source images, and the cache of
reference features (keyed by the files' names, sizes and mtimes, the weights file and the pipeline version).

ADM reference batches (`VIRTUAL_imagenet256_labeled.npz`): their `mu`/`sigma` (pool3) and `mu_s`/`sigma_s`
(sFID) were computed by the ADM TensorFlow evaluator: the same weights, but TF's graph and its in-graph
bilinear resize to 299 rather than clean-fid's PIL bicubic. FID/sFID against them are therefore close to, not
identical with, the ADM evaluator's numbers for the same samples (the paper tables were made with the ADM
evaluator). The 10k `arr_0` images are passed through our network for precision/recall, like the ADM evaluator
does with its own network. Every statistic read from a file is checked (finite mean, PSD covariance).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from star.eval.inception import (
    FEATURE_PIPELINE_VERSION,
    Activations,
    InceptionFeatures,
    extract_features,
    find_inception_weights,
)
from star.eval.scores import check_statistics, feature_statistics
from star.images import IMAGE_EXTENSIONS  # the one extension list
from star.io import atomic_path


class _ImageStream:
    """A re-iterable stream of uint8 images with a known count (for the progress bar)."""

    def __init__(self, iterate, num_images: int):
        self._iterate = iterate
        self.num_images = num_images

    def __iter__(self):
        return self._iterate()

    def __len__(self):
        return self.num_images


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Images under `folder`, recursively (star/images.py's extensions, any case), in sorted relative-path order."""
    folder = Path(folder)
    files = sorted(
        (path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()),
        key=lambda path: path.relative_to(folder).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return files


def _read_image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)  # [H, W, 3], as clean-fid reads files


def _readable_images(files: list[Path]):
    """The images of `files`, skipping the unreadable ones (as tokenize does) with one warning naming them."""
    skipped = []
    for path in files:
        try:
            yield _read_image(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            skipped.append(path)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {len(files)} (e.g. {skipped[0]}): the "
                      "statistics use the rest", stacklevel=2)


def _folder_stream(folder: Path) -> _ImageStream:
    files = list_image_files(folder)
    return _ImageStream(lambda: _readable_images(files), len(files))


def _read_npy_header(member) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype from an open .npy stream, left positioned at the data; None if not plain C-order."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        return None
    return None if fortran_order or dtype.hasobject else (tuple(shape), dtype)


def npz_stream(npz_path: Path, key: str = "arr_0", chunk: int = 256) -> _ImageStream:
    """Images of `key` in an .npz, read `chunk` at a time: 50k samples at 384 px never sit in memory whole."""
    with np.load(npz_path) as data:
        if key not in data.files:
            raise ValueError(f"{npz_path} has no '{key}' array (it holds {data.files}); expected '{key}': uint8 "
                             "images [N, H, W, 3] (the ADM samples format)")
    with zipfile.ZipFile(npz_path) as archive, archive.open(f"{key}.npy") as member:
        header = _read_npy_header(member)
    if header is None:  # unusual layout: load it whole
        array = np.load(npz_path)[key]
        _check_image_array(array, npz_path)
        return _ImageStream(lambda: iter([array]), len(array))
    shape, dtype = header
    _check_image_array(np.empty((0,) + shape[1:], dtype), npz_path, shape)
    image_bytes = int(np.prod(shape[1:])) * dtype.itemsize

    def iterate():
        with zipfile.ZipFile(npz_path) as archive, archive.open(f"{key}.npy") as member:
            _read_npy_header(member)
            for start in range(0, shape[0], chunk):
                count = min(chunk, shape[0] - start)
                buffer = member.read(count * image_bytes)  # [count, H, W, 3] bytes
                yield np.frombuffer(buffer, dtype=dtype).reshape((count,) + shape[1:])

    return _ImageStream(iterate, shape[0])


def _check_image_array(array: np.ndarray, source, shape=None) -> None:
    shape = tuple(shape if shape is not None else array.shape)
    if array.dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{source}: 'arr_0' must be uint8 [N, H, W, 3] (the ADM format), got {array.dtype} {shape}")


def image_source(path: Path) -> _ImageStream:
    """The images to score or to compute reference features from: a samples .npz streamed a chunk at a time, or
    a folder's images one by one in sorted relative-path order (unreadable ones skipped with a warning)."""
    if path.is_dir():
        return _folder_stream(path)
    if path.suffix == ".npz":
        return npz_stream(path)
    raise ValueError(f"{path}: expected an .npz (ADM reference batch or samples) or a folder of images")


@dataclass
class ReferenceStats:
    """Reference statistics for FID and sFID, and the reference features precision/recall needs (None if unknown)."""

    mu: np.ndarray  # [2048]
    sigma: np.ndarray  # [2048, 2048]
    features: np.ndarray | None  # [N, 2048] features of reference images, through our network
    num_images: int | None  # images behind `features` (an ADM mu/sigma was made from more)
    source: str
    kind: str  # "adm_reference" | "samples_npz" | "image_folder"
    note: str = ""
    spatial_mu: np.ndarray | None = None  # [2023] sFID statistics (None: sFID unavailable)
    spatial_sigma: np.ndarray | None = None  # [2023, 2023]
    spatial_features: np.ndarray | None = None  # [N, 2023], when computed from images


ADM_REFERENCE_NOTE = (
    "mu/sigma (and mu_s/sigma_s) from the ADM TensorFlow evaluator (same Inception weights, TF graph with in-graph "
    "bilinear resize); sample features use clean-fid's PIL-bicubic resize, so FID and sFID are close to but not "
    "identical with the ADM evaluator's"
)


def resolve_reference(ref: str | os.PathLike) -> str:
    """A shard folder stands for the source images behind it (folder inputs); anything else is itself."""
    from star.data.manifest import Manifest

    if (Path(ref) / "manifest.json").is_file():
        source = Manifest.load(ref).source
        if source["kind"] != "folder":
            raise ValueError(f"--ref {ref}: shards made from tars; give the image folder or an .npz instead")
        return source["data"]
    return str(ref)


def _fingerprint(path: Path, weights_path: Path, precision: str = "fp32") -> str:
    """Hash of the inputs' relative names, sizes and mtimes, the weights file, and the pipeline version."""
    files = list_image_files(path) if path.is_dir() else [path]
    entries = []
    for file in files:
        stat = file.stat()
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        entries.append([name, stat.st_size, stat.st_mtime_ns])
    weights_stat = weights_path.stat()
    key = {
        "inputs": entries,
        "weights": [weights_path.name, weights_stat.st_size],
        "pipeline": FEATURE_PIPELINE_VERSION,
    }
    if precision != "fp32":  # fp32, the reference precision, is the key without a precision entry
        key["precision"] = precision
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


@dataclass
class FeatureOptions:
    """How reference features are computed and where they are cached."""

    cache_dir: str | os.PathLike | None = None
    batch_size: int = 50
    device: str | torch.device = "cpu"
    num_workers: int | None = None


def _cached_activations(path: Path, model: InceptionFeatures, options: FeatureOptions) -> Activations:
    """Features [N, 2048] and sFID features [N, 2023] of the images at `path`, from the cache when up to date."""
    cache_file = None
    if options.cache_dir is not None:
        cache_file = Path(options.cache_dir) / f"reference-{_fingerprint(path, model.weights_path, model.precision)}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as cached:
                spatial = cached["spatial"] if "spatial" in cached.files else None
                if spatial is not None or not model.has_spatial:
                    return Activations(cached["features"].astype(np.float64), None, spatial)
    activations = extract_features(image_source(path), batch_size=options.batch_size, device=options.device,
                                   model=model, num_workers=options.num_workers,
                                   description=f"reference {path.name}")
    if cache_file is not None:
        extra = {} if activations.spatial is None else {"spatial": activations.spatial}
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as handle:
            # float32 holds the network's output exactly
            np.savez(handle, features=activations.features.astype(np.float32), source=str(path), **extra)
    return activations


def _read_adm_statistics(path: Path) -> dict:
    """mu/sigma (and mu_s/sigma_s when present) of an ADM reference batch, checked; whether it has images."""
    with np.load(path) as data:
        found = set(data.files)
        if not {"mu", "sigma"} <= found:
            return {"found": sorted(found), "has_images": "arr_0" in found}
        statistics = {name: data[name].astype(np.float64) for name in ("mu", "sigma", "mu_s", "sigma_s")
                      if name in found}
    check_statistics(statistics["mu"], statistics["sigma"], str(path), "mu/sigma")
    if "mu_s" in statistics and "sigma_s" in statistics:
        check_statistics(statistics["mu_s"], statistics["sigma_s"], str(path), "mu_s/sigma_s")
    return {"statistics": statistics, "has_images": "arr_0" in found}


def load_reference(path: str | os.PathLike, *, model: InceptionFeatures | None = None,
                   inception_path: str | os.PathLike | None = None, options: FeatureOptions | None = None,
                   **option_fields) -> ReferenceStats:
    """Reference statistics from an ADM reference batch .npz (mu, sigma, optional mu_s/sigma_s and arr_0 images),
    a samples .npz (arr_0, features computed), or an image folder (recursive). Computed features are cached in
    `cache_dir` (a FeatureOptions field, also accepted as a keyword like batch_size and device)."""
    path = Path(path)
    options = options or FeatureOptions(**option_fields)
    if not path.exists():
        raise FileNotFoundError(f"reference not found: {path} (an ADM reference .npz, a samples .npz or a folder)")
    if not (path.is_dir() or (path.is_file() and path.suffix == ".npz")):
        raise ValueError(f"{path}: expected an .npz (ADM reference batch or samples) or a folder of images")
    model = model if model is not None else InceptionFeatures(find_inception_weights(inception_path))
    kind = "image_folder" if path.is_dir() else "samples_npz"
    if path.is_file():
        adm = _read_adm_statistics(path)
        if "statistics" in adm:
            return _adm_reference(path, adm, model, options)
        if not adm["has_images"]:
            raise ValueError(f"{path} holds {adm['found']}: expected 'mu' and 'sigma' (an ADM reference batch) or "
                             "'arr_0' (uint8 images [N, H, W, 3])")
    activations = _cached_activations(path, model, options)
    mu, sigma = feature_statistics(activations.features)
    reference = ReferenceStats(mu, sigma, activations.features, len(activations.features), str(path), kind)
    if activations.spatial is not None:
        reference.spatial_mu, reference.spatial_sigma = feature_statistics(activations.spatial)
        reference.spatial_features = activations.spatial
    return reference


def _adm_reference(path: Path, adm: dict, model: InceptionFeatures, options: FeatureOptions) -> ReferenceStats:
    statistics = adm["statistics"]
    features = _cached_activations(path, model, options).features if adm["has_images"] else None
    return ReferenceStats(statistics["mu"], statistics["sigma"], features, None if features is None else len(features),
                          str(path), "adm_reference", ADM_REFERENCE_NOTE, spatial_mu=statistics.get("mu_s"),
                          spatial_sigma=statistics.get("sigma_s"))
