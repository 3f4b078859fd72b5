"""The metric maths: FID (`frechet_distance` of `feature_statistics`), Inception Score and k-NN
precision/recall, from features and class probabilities (numpy, scipy and torch only)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.linalg import sqrtm
from scipy.special import xlogy


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of `features` (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    When the matrix square root is not finite (the product is singular, typical for fewer samples
    than feature dimensions) it is retried with `eps` added to both diagonals, with a warning.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.ndim != 1:
        raise ValueError(f"mu1 must be a vector of shape (D,), got {mu1.shape}")
    dim = mu1.shape[0]
    for name, value, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if value.shape != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu1 {mu1.shape}, got {value.shape}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")

    covmean = sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: sqrtm(sigma1 @ sigma2) is not finite (singular product); "
                      f"adding eps={eps} to the diagonal of both covariances", RuntimeWarning, stacklevel=2)
        offset = eps * np.eye(dim)
        covmean = sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives sqrtm of a PSD product a tiny imaginary part; a large one means an input
        # is not a covariance matrix (not symmetric positive semi-definite).
        max_imag = np.abs(np.diagonal(covmean).imag).max()
        if max_imag > 1e-3:
            raise ValueError(f"sigma1 @ sigma2 has a matrix square root with imaginary part {max_imag:.3g} "
                             "(> 1e-3); sigma1 and sigma2 must be symmetric positive semi-definite")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x[KL(p(y|x) || p(y))]) of predictive distributions `probs` (N, C).

    The rows are cut into `splits` contiguous chunks (no shuffle, as in ADM's evaluator); p(y) is
    each chunk's mean prediction. Returns the mean and standard deviation over the chunks.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got {probs.shape}")
    if not 1 <= splits <= probs.shape[0]:
        raise ValueError(f"splits must be in [1, {probs.shape[0]}] (the number of rows of probs), got {splits}")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs must hold probability rows: non-negative and summing to 1 (atol 1e-3)")
    scores = []
    for chunk in np.array_split(probs, splits):
        marginal = chunk.mean(axis=0, keepdims=True)  # (1, C)
        kl = (xlogy(chunk, chunk) - xlogy(chunk, marginal)).sum(axis=1)  # xlogy: 0 log 0 = 0
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real_features: np.ndarray | torch.Tensor, fake_features: np.ndarray | torch.Tensor,
                     k: int = 3, batch_size: int = 1000, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN manifolds.

    Each point's ball has the radius of its k-th nearest neighbour within its own set.
    precision: fraction of fake points inside at least one real ball (sample quality);
    recall: fraction of real points inside at least one fake ball (coverage).
    Distances are computed `batch_size` rows at a time, so memory is O(batch_size * N).
    """
    real = _as_feature_tensor(real_features, "real_features", device, dtype)
    fake = _as_feature_tensor(fake_features, "fake_features", device, dtype)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"fake_features must have {real.shape[1]} columns like real_features, got {fake.shape[1]}")
    max_k = min(len(real), len(fake)) - 1
    if not 1 <= k <= max_k:
        raise ValueError(f"k must be in [1, {max_k}] (one less than the smaller set), got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    real_radii = _knn_radii(real, k, batch_size)  # (N_real,)
    fake_radii = _knn_radii(fake, k, batch_size)  # (N_fake,)
    fake_in_real = torch.empty(len(fake), dtype=torch.bool, device=real.device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    # One pass over fake-vs-real distances serves both directions.
    for start in range(0, len(fake), batch_size):
        stop = start + batch_size
        dist = torch.cdist(fake[start:stop], real)  # (B, N_real)
        fake_in_real[start:stop] = (dist <= real_radii).any(dim=1)
        real_in_fake |= (dist <= fake_radii[start:stop, None]).any(dim=0)
    return fake_in_real.double().mean().item(), real_in_fake.double().mean().item()


def _as_feature_tensor(features: np.ndarray | torch.Tensor, name: str, device: str | torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.as_tensor(features).to(device=device, dtype=dtype)
    if tensor.ndim != 2 or len(tensor) < 2:
        raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {tuple(tensor.shape)}")
    return tensor


def _knn_radii(points: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour in `points` (itself excluded)."""
    radii = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for start in range(0, len(points), batch_size):
        dist = torch.cdist(points[start:start + batch_size], points)  # (B, N)
        # The point itself is the nearest at distance 0, so the k-th neighbour is the (k+1)-th value.
        radii[start:start + batch_size] = dist.kthvalue(k + 1, dim=1).values
    return radii
