"""k-means clusters of a data set: labels for class-conditional training when the data has none.

``conditioning.kind=cluster`` trains a class-conditional network on the ids of K clusters of the training items
instead of on labels, and samples it like the data: the cluster c ~ p(c), its share of the training items, then
x ~ p(x | c), so the samples follow p(x) = sum_c p(c) p(x | c) (Adaloglou et al. 2024, "Rethinking
cluster-conditioned diffusion models for label-free image synthesis"). On MNIST at a slow day's 2,400 steps, 100
clusters of pixels take FD-Digits from 2.1-3.8x the real-vs-real floor (unconditional, three training seeds) to
1.3-2.1x; FD-EffNet, a second instrument, does not see that gain (docs/training.md, "Cluster conditioning").

The features are the items themselves: images average-pooled by an integer factor until the longer side is at
most :data:`FEATURE_SIDE` pixels (MNIST's 28 px: 14 x 14), then flattened with their channels; vectors as they
are. Lloyd's algorithm in float64 from a k-means++ start (Arthur & Vassilvitskii 2007), fitted on at most
:data:`FIT_ITEMS` items drawn by the seed, then every item is assigned to its nearest centre:

    c_i = argmin_j ||f_i - mu_j||^2,     mu_j = mean of {f_i : c_i = j}

Everything is drawn from a CPU generator seeded by ``seed``, so a resumed run finds the same clusters.
"""
from __future__ import annotations

import math

import torch

FEATURE_SIDE = 16       # images are pooled until their longer side is at most this
FIT_ITEMS = 60_000      # the centres are fitted on at most this many items (all of MNIST's training set)
CHUNK = 4096            # items read and assigned at a time


def feature_pool(shape: tuple[int, ...]) -> int:
    """The average-pooling factor p of items of ``shape``: the smallest p >= 1 with max(H, W) / p <= FEATURE_SIDE
    (1 for vectors and signals)."""
    if len(shape) != 3:
        return 1
    return max(1, math.ceil(max(shape[1:]) / FEATURE_SIDE))


def item_features(x: torch.Tensor, pool: int) -> torch.Tensor:
    """float64 (B, D): a batch of items as k-means features (images average-pooled by ``pool``, then flat)."""
    x = x.float()
    if x.ndim == 4 and pool > 1:
        x = torch.nn.functional.avg_pool2d(x, pool, ceil_mode=True)
    return x.reshape(len(x), -1).double()


def _read(ds, idx: torch.Tensor, pool: int) -> torch.Tensor:
    """The features of items ``idx`` of a data set (``get_batch`` where it has one), CHUNK at a time."""
    out = []
    for start in range(0, len(idx), CHUNK):
        part = idx[start:start + CHUNK]
        if hasattr(ds, "get_batch"):
            x = ds.get_batch(part)[0]
        else:
            x = torch.stack([torch.as_tensor(ds[int(i)][0]) for i in part])
        out.append(item_features(x, pool))
    return torch.cat(out)


def _sq_dist(f: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(N, K) squared distances ||f_i - mu_j||^2 = ||f_i||^2 - 2 f_i . mu_j + ||mu_j||^2 (clamped at 0)."""
    return ((f * f).sum(1, keepdim=True) - 2 * f @ centres.T + (centres * centres).sum(1)).clamp_min(0)


def kmeans(f: torch.Tensor, k: int, seed: int = 0, iters: int = 30) -> torch.Tensor:
    """The K centres (K, D) of Lloyd's algorithm on the rows of ``f`` from a k-means++ start: centre 1 is a
    uniform draw, centre j+1 a draw with probability proportional to the squared distance to the nearest centre so
    far. Stops when no assignment changes or after ``iters`` rounds. A cluster that empties takes the item
    farthest from its centre, so K centres always come back."""
    n = len(f)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= the number of items, got k = {k} for {n} items")
    f = f.double()
    g = torch.Generator().manual_seed(seed)
    centres = f[torch.randint(n, (1,), generator=g)]
    d2 = _sq_dist(f, centres)[:, 0]
    for _ in range(k - 1):  # k-means++: P(i) = D(i)^2 / sum D^2
        i = torch.multinomial(d2, 1, generator=g) if d2.sum() > 0 else torch.randint(n, (1,), generator=g)
        centres = torch.cat([centres, f[i]])
        d2 = torch.minimum(d2, _sq_dist(f, f[i])[:, 0])
    assign = None
    for _ in range(iters):
        d2 = _sq_dist(f, centres)
        new = d2.argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, f)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None].double(), centres)
        for j in torch.nonzero(counts == 0).reshape(-1).tolist():   # an empty cluster: the worst-fitted item
            far = d2.gather(1, assign[:, None])[:, 0].argmax()
            centres[j] = f[far]
            assign[far] = j
    return centres


def assign(f: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """int64 (N,): the nearest centre of each row of ``f``."""
    return _sq_dist(f.double(), centres).argmin(1)


def cluster_ids(ds, k: int, seed: int = 0) -> torch.Tensor:
    """int64 (len(ds),): the k-means cluster of every item of a data set (see the module docstring). The centres
    are fitted on min(len(ds), FIT_ITEMS) items drawn by ``seed``; every item is then assigned in chunks."""
    n = len(ds)
    if k > n:
        raise ValueError(f"{k} clusters need at least {k} items, and the data set has {n}")
    shape = tuple(getattr(ds, "shape", None) or torch.as_tensor(ds[0][0]).shape)
    pool = feature_pool(shape)
    g = torch.Generator().manual_seed(seed)
    fit_idx = torch.randperm(n, generator=g)[:FIT_ITEMS] if n > FIT_ITEMS else torch.arange(n)
    fit = _read(ds, fit_idx, pool)
    centres = kmeans(fit, k, seed)
    if n <= FIT_ITEMS:                       # fitted on every item, in order
        return assign(fit, centres)
    return torch.cat([assign(_read(ds, torch.arange(s, min(s + CHUNK, n)), pool), centres)
                      for s in range(0, n, CHUNK)])
