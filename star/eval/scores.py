"""Scores from features, pure numpy/torch and network-free: Gaussian statistics and the Frechet distance
(FID, sFID), the Inception Score, and improved precision/recall. Their inputs come from star/eval/inception.py.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (np.cov, ddof 1), as clean-fid and the ADM evaluator compute."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features [N >= 2, D] for statistics, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def check_statistics(mu: np.ndarray, sigma: np.ndarray, source: str, names: str = "mu/sigma") -> None:
    """A usable Gaussian: finite mean [D], finite symmetric PSD covariance [D, D]; else a ValueError naming
    `source`. (A NaN mean or a non-PSD sigma would give a NaN or a negative FID with exit 0.)"""
    mu_name, sigma_name = names.split("/")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{source}: {mu_name} {mu.shape} / {sigma_name} {sigma.shape}, expected [D] / [D, D]")
    if not np.isfinite(mu).all():
        raise ValueError(f"{source}: {mu_name} has {int((~np.isfinite(mu)).sum())} non-finite entries; "
                         "the reference statistics are damaged: recompute or re-download them")
    if not np.isfinite(sigma).all():
        raise ValueError(f"{source}: {sigma_name} has non-finite entries; recompute or re-download the reference")
    scale = max(float(np.abs(sigma).max()), 1e-12)
    if not np.allclose(sigma, sigma.T, rtol=0, atol=1e-6 * scale):
        raise ValueError(f"{source}: {sigma_name} is not symmetric, so not a covariance matrix")
    smallest = float(np.linalg.eigvalsh(sigma).min())
    if smallest < -1e-6 * scale * len(mu):  # round-off in a PSD matrix stays far above this
        raise ValueError(f"{source}: {sigma_name} is not positive semi-definite (eigenvalue {smallest:.3g}), so not "
                         "a covariance matrix; recompute or re-download the reference")


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


ADM_IS_SPLIT_SIZE = 5000


def inception_score(logits: np.ndarray, splits: int | None = None,
                    split_size: int = ADM_IS_SPLIT_SIZE) -> tuple[float, float, str]:
    """Mean and std over parts of exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits); and the split rule used.

    Pass the bias-free 1008-way logits `extract_features` returns. Parts, by default, as the ADM evaluator cuts
    them: consecutive chunks of `split_size` = 5000 samples (the last one may be shorter), so IS at N != 50k
    compares with published numbers (N = 50k gives the usual 10 splits). `splits`: instead cut into that many
    near-equal parts (improved-GAN's rule, what torch-fidelity and clean-fid report).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) < 1:
        raise ValueError(f"need logits [N >= 1, C], got shape {logits.shape}")
    log_probs = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)  # [N, C]
    if splits is not None:
        if not 1 <= splits <= len(logits):
            raise ValueError(f"need logits [N >= splits={splits}, C], got shape {logits.shape}")
        parts = np.array_split(log_probs, splits)
        rule = f"{splits} near-equal splits (improved-GAN)"
    else:
        if split_size < 1:
            raise ValueError(f"split_size={split_size} must be >= 1")
        parts = [log_probs[start : start + split_size] for start in range(0, len(log_probs), split_size)]
        rule = f"ADM: consecutive chunks of {split_size} samples ({len(parts)} here)"
    scores = []
    for part in parts:
        probs = np.exp(part)
        log_marginal = np.log(probs.mean(axis=0, keepdims=True))  # [1, C]
        kl = (probs * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores)), rule


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




KID_SUBSET_SIZE = 1000  # Binkowski et al. 2018 and clean-fid: subsets of 1000 samples (fewer when fewer exist)
KID_SUBSETS = 100


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3, the cubic kernel of KID: float32 dot products (as clean-fid's), the rest in
    float64 so the sums over m^2 entries keep their digits. [len(x), len(y)]"""
    return ((x @ y.T).double() / x.shape[1] + 1) ** 3


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between two equally sized sets [m, D] under the cubic kernel: the diagonals of k(x, x)
    and k(y, y) (a point with itself) are left out of their means."""
    m = len(x)
    within = _polynomial_kernel(x, x) + _polynomial_kernel(y, y)  # [m, m]
    return float((within.sum() - within.diagonal().sum()) / (m * (m - 1)) - 2 * _polynomial_kernel(x, y).sum() / m**2)


def kernel_inception_distance(real_features: np.ndarray, fake_features: np.ndarray,
                              subset_size: int = KID_SUBSET_SIZE, num_subsets: int = KID_SUBSETS, seed: int = 0,
                              device: str | torch.device = "cpu") -> tuple[float, float, int, int]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over subsets.

    Each subset draws m = min(subset_size, N_real, N_fake) samples of each set without replacement. Returns
    (mean, std over subsets, m, number of subsets). Unbiased at any m (unlike FID), so it can be compared
    across sample counts; when m equals both set sizes every subset is the same, so one is computed (std 0).
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32, device=device)  # [N_real, D]
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float32, device=device)  # [N_fake, D]
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need two feature sets [N, D] of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set, got {len(real)} and {len(fake)}")
    if m == len(real) == len(fake):
        num_subsets = 1
    rng = np.random.default_rng(seed)
    def subset(points: torch.Tensor) -> torch.Tensor:
        return points[torch.from_numpy(rng.choice(len(points), m, replace=False)).to(points.device)]

    values = [unbiased_mmd2(subset(real), subset(fake)) for _ in range(num_subsets)]
    return float(np.mean(values)), float(np.std(values)), m, num_subsets
