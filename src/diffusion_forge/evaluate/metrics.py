"""Distances between two sets of features: Frechet distance, KID, precision / recall, and the labels
that carry the feature network and the sample count with each score ("FD-EffNet@2k")."""
from __future__ import annotations

import numpy as np
import torch

F64 = torch.float64


def _f64(features) -> torch.Tensor:
    return torch.as_tensor(np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features),
                           dtype=F64)


# ---------------------------------------------------------------------------------------------
# Frechet distance

def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of N x D features."""
    f = _f64(features).numpy()
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be N x D with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    computed in float64. tr((s1 s2)^(1/2)) = sum of sqrt(eigenvalues of s1^(1/2) s2 s1^(1/2)), a
    symmetric PSD matrix, so a symmetric eigen-decomposition is used (no complex sqrtm, no
    singular-matrix failures); tiny negative eigenvalues from round-off are clipped to 0."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w1, v1 = np.linalg.eigh(s1)
    root1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T          # s1^(1/2)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def frechet_distance_features(f1, f2) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# ---------------------------------------------------------------------------------------------
# KID, precision / recall

def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018):
    the diagonal terms k(x_i, x_i) are left out of the within-set means, so E[MMD^2] = 0 when x and y
    come from the same distribution."""
    x, y = _f64(x), _f64(y)
    d, m, n = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * kxy.mean())


def kernel_inception_distance(real, fake, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID: the mean and standard deviation of unbiased MMD^2 over ``subsets`` random subsets of
    ``min(subset_size, len(real), len(fake))`` features from each set, halved when that is a whole set
    (the protocol of Binkowski et al.; MMD^2 is unbiased at any subset size, so the mean keeps its
    meaning). The name stays "KID" whatever network made the features; the label says which."""
    real, fake = _f64(real), _f64(fake)
    m = min(subset_size, len(real), len(fake))
    if m < 4:
        raise ValueError("KID needs at least 4 features in each set")
    if m == min(len(real), len(fake)):
        m //= 2   # subsets of a whole set would all be equal: halve them so the spread means something
    gen = torch.Generator().manual_seed(seed)
    values = [mmd2_unbiased(real[torch.randperm(len(real), generator=gen)[:m]],
                            fake[torch.randperm(len(fake), generator=gen)[:m]]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def _kth_neighbour_radius(f: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of f to its k-th nearest other row."""
    out = []
    for i in range(0, len(f), chunk):
        d = torch.cdist(f[i:i + chunk], f)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out)


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For each point: is ||point - centre_j|| <= radius_j for some j?"""
    out = []
    for i in range(0, len(points), chunk):
        out.append((torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019). Each set's manifold is the union of
    balls around its points with radius = distance to the k-th nearest neighbour in the same set.
    Precision: fraction of fake points inside the real manifold (are samples realistic?).
    Recall: fraction of real points inside the fake manifold (is the data's variety covered?)."""
    real, fake = _f64(real), _f64(fake)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features in each set")
    precision = _inside_any_ball(fake, real, _kth_neighbour_radius(real, k)).double().mean()
    recall = _inside_any_ball(real, fake, _kth_neighbour_radius(fake, k)).double().mean()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------------------
# Labels: the network and the sample count travel with the score

def count_label(n: int) -> str:
    """2000 -> "2k", 1500 -> "1.5k", 500 -> "500", 50000 -> "50k"."""
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


def metric_label(metric: str, net, n: int) -> str:
    """"FD-EffNet@2k", "KID-Digits@500", "FID@10k", "KID-xy@200" (the coordinates of points as features):
    the network and the sample count travel with the score."""
    suffix = {"digits": "Digits", "effnet": "EffNet", "inception": "Inception"}.get(net.name, net.name)
    head = net.label if metric == "FD" else f"{metric}-{suffix}"
    return f"{head}@{count_label(n)}"


def compare_features(net, real: torch.Tensor, fake: torch.Tensor, kid: bool = True, pr: bool = True) -> dict:
    """FD (and KID, precision, recall) between reference and sample features, keyed by labels that
    carry the network and the sample count."""
    n = len(fake)
    out = {metric_label("FD", net, n): frechet_distance_features(real, fake)}
    if kid:
        mean, std = kernel_inception_distance(real, fake)
        out[metric_label("KID", net, n)] = mean
        out[metric_label("KID", net, n) + " std"] = std
    if pr:
        p, r = precision_recall(real, fake)
        out[metric_label("precision", net, n)] = p
        out[metric_label("recall", net, n)] = r
    return out
