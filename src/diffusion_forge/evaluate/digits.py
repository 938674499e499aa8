"""The MNIST digit classifier: a feature network for digit data ("FD-Digits") and a quick
"do these look like digits?" score.

A small CNN trained once on the bundled MNIST (>= 99% test accuracy), 128-d features, cached in
``cache_dir()/digit_classifier-<hash>.safetensors``; the hash covers the architecture and the training
recipe, so changing either trains a new one.

A second, independent one (``SECOND_DIGIT_RECIPE``: LeNet's layout, 256-d features, its own seed, no
augmentation and no outlier exposure) gives "FD-LeNet", a check on FD-Digits in the benchmarks: a gain that
only the first classifier's features show is a gain in that classifier, not in the samples.
"""
from __future__ import annotations

import json
import math
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.convert import to_model_range
from ..io.files import atomic_write, cache_dir, content_key
from .features import as_model_images, batched

# The recipe is part of the cache key: change anything here and a new classifier is trained.
# "outliers": each batch also shows this fraction of non-digit images (noise, smoothed noise, blends of two
# digits, digits drowned in noise) with a uniform target (outlier exposure, Hendrycks et al. 2019), so
# that noise is not called a digit with 100% confidence.
DIGIT_RECIPE = {"version": 3, "data": "mnist-train-60000", "epochs": 3, "batch": 128, "optimizer": "adamw",
                "lr": 3e-3, "schedule": "onecycle", "weight_decay": 1e-4, "augment": "shift<=2px",
                "outliers": 0.25, "outlier_weight": 0.25, "seed": 0}
_DIGIT_MODELS: dict[str, "_DigitNet"] = {}


class _DigitNet(nn.Module):
    """What every digit classifier shares: ``body`` (convolutions, flattened), ``fc`` (the feature layer),
    ``drop`` and ``head`` (10 logits). Features are relu(fc(body(x))), what the last layer sees.

    Call ``.features(x)`` for the features and ``.predict_proba(x)`` for class probabilities. x: float
    N x 1 x 28 x 28 in [-1, 1], or uint8 N x H x W x C (converted to gray and resized to 28 x 28)."""

    FEATURES = 0

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for float N x 1 x 28 x 28 in [-1, 1] (the training path: no input conversion)."""
        return self.head(self.drop(self._features(x)))

    def _prepare(self, x) -> torch.Tensor:
        return as_model_images(x, channels=1, size=28)

    def features(self, x, batch: int = 1000) -> torch.Tensor:
        """Features (N, FEATURES) in eval mode."""
        self.eval()
        return batched(self._features, self._prepare(x), batch)

    def predict_proba(self, x, batch: int = 1000) -> torch.Tensor:
        """Class probabilities (N, 10): softmax of the logits, in eval mode."""
        self.eval()
        return batched(lambda b: self.forward(b).softmax(-1), self._prepare(x), batch)


class DigitClassifier(_DigitNet):
    """The project's digit classifier: three 3x3 conv blocks with batch norm, a 128-d feature layer."""

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


class LeNetDigits(_DigitNet):
    """The second digit classifier, LeNet-5's layout (LeCun et al. 1998) widened: two 5x5 convolutions
    without padding or batch norm, each followed by 2x2 max-pooling, then a 256-d feature layer."""

    FEATURES = 256

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2),    # 28 -> 24 -> 12
                                  nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),   # 12 -> 8 -> 4
                                  nn.Flatten())
        self.fc = nn.Linear(64 * 4 * 4, self.FEATURES)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(self.FEATURES, 10)


ARCHITECTURES = {"cnn3": DigitClassifier, "lenet": LeNetDigits}   # a recipe's "arch" (absent: cnn3)

# The second, independent classifier: another layout, seed, batch and learning rate, no augmentation and no
# outlier exposure. Fixed before it scored any sample; it is never tuned on what it reports.
SECOND_DIGIT_RECIPE = {"version": 1, "arch": "lenet", "data": "mnist-train-60000", "epochs": 2, "batch": 100,
                       "optimizer": "adamw", "lr": 1e-3, "schedule": "onecycle", "weight_decay": 0.0,
                       "augment": None, "outliers": 0.0, "outlier_weight": 0.0, "seed": 1}


def _architecture(recipe: dict) -> type[_DigitNet]:
    arch = recipe.get("arch", "cnn3")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown digit classifier arch {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]


def _digit_key(recipe: dict) -> str:
    return content_key({"recipe": recipe, "arch": repr(_architecture(recipe)())})


def default_key() -> str:
    """The cache key of the classifier :func:`digit_classifier` gives without a recipe."""
    return _digit_key(DIGIT_RECIPE)


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


def train_digit_classifier(recipe: dict | None = None, progress: bool = True) -> tuple[_DigitNet, float]:
    """Train the classifier from ``recipe`` on bundled MNIST; returns (model, test accuracy).
    The loss is cross-entropy on the digits minus ``outlier_weight`` times the mean log-probability of the
    outliers (cross-entropy to the uniform distribution, up to a constant). A recipe with ``"limit": n``
    trains on the first n training images only and ``"test_limit": m`` measures the accuracy on the first
    m test images (fast tests)."""
    from ..data import load_mnist

    recipe = recipe or DIGIT_RECIPE
    images, labels = load_mnist("train")
    limit = recipe.get("limit")
    if limit:
        images, labels = images[:limit], labels[:limit]
    x, y = to_model_range(images), torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    model = _architecture(recipe)()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    steps_per_epoch = math.ceil(len(x) / recipe["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=recipe["epochs"] * steps_per_epoch)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        what = "the second MNIST digit classifier" if recipe.get("arch", "cnn3") != "cnn3" else "the MNIST digit classifier"
        bar = tqdm(total=recipe["epochs"] * steps_per_epoch, desc=f"training {what} (once)",
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


def digit_classifier(recipe: dict | None = None, progress: bool = True) -> _DigitNet:
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

        model = _architecture(recipe)()
        model.load_state_dict(load_file(str(path)), strict=True)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        model.test_accuracy = float(meta.get("test_accuracy", "nan"))
    else:
        start = time.time()
        model, acc = train_digit_classifier(recipe, progress=progress)
        model.test_accuracy = acc
        meta = {"recipe": json.dumps(recipe, sort_keys=True), "test_accuracy": f"{acc:.4f}",
                "train_seconds": f"{time.time() - start:.1f}", "features": str(model.FEATURES)}
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
        if progress:
            print(f"digit classifier: test accuracy {acc:.2%}, cached at {path}", file=sys.stderr)
    model.eval().requires_grad_(False)
    _DIGIT_MODELS[key] = model
    return model


def digit_confidence_score(images, threshold: float = 0.9, model: DigitClassifier | None = None) -> float:
    """Fraction of images the digit classifier (``model``, default the cached one) labels with max
    probability >= ``threshold`` (a quick "do these look like digits?" score; real MNIST scores ~0.95)."""
    probs = (model or digit_classifier()).predict_proba(images)
    return float((probs.max(1).values >= threshold).float().mean())


class DigitFeatures:
    """The digit classifier as a feature network ("FD-Digits", 128-d)."""

    name = "digits"
    label = "FD-Digits"
    dims = DigitClassifier.FEATURES

    def __init__(self):
        self.model = digit_classifier()
        self.key = default_key()

    def describe(self) -> dict:
        return {"network": "digit-classifier", "key": self.key, "size": 28}

    def features(self, images, batch: int = 1000, progress: str | None = None) -> torch.Tensor:
        return self.model.features(images, batch)


def digit_accuracy(images, labels, model: DigitClassifier | None = None) -> float:
    """Fraction of images the digit classifier (``model``, default the cached one) assigns to the digit asked
    for: mean over i of [argmax_k p(k | image_i) == labels_i] (real MNIST test digits: its test accuracy,
    ~99.3%; chance: 10%). ``images`` as :meth:`DigitClassifier.predict_proba` takes them; ``labels`` int (N,)."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    if len(labels) != len(images):
        raise ValueError(f"labels must hold one digit per image ({len(images)}), got {len(labels)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ValueError(f"labels must be digits 0..9, got {int(labels.min())}..{int(labels.max())}")
    predicted = (model or digit_classifier()).predict_proba(images).argmax(1)
    return float((predicted == labels).float().mean())
