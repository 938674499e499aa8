"""The evaluation pipelines: every metric for a set of samples (``dforge eval``), and the quick check
the trainer runs every ``run.eval_every`` steps."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..data.convert import to_uint8
from .digits import digit_confidence_score
from .features import (DIGIT_DATA, Coordinates, as_model_images, default_networks, feature_network,
                       load_reference_images, reference_features)
from .memorisation import memorization
from .metrics import compare_features, count_label


def evaluate_images(images, data: str, networks: list[str] | None = None, n_ref: int | None = None,
                    split: str = "train", kid: bool = True, pr: bool = True, memorize: bool = True,
                    inception_weights=None, progress: bool = True) -> tuple[dict, dict]:
    """Every metric for uint8 samples N x H x W x C against data set ``data`` (loaded at the samples'
    size and channel count). Returns (metrics: label -> number, extras: memorisation details)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"samples must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    if images.shape[-1] == 4:   # RGBA: composite on white, as the feature networks do
        images = to_uint8(as_model_images(images))
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


@torch.no_grad()
def evaluate_during_training(denoiser, data: str, n: int = 256, image_size: int | None = None,
                             channels: int | None = None, sampler: str | None = None, steps: int = 20,
                             sampler_options: dict | None = None, seed: int = 0, cond: dict | None = None) -> dict:
    """A fast, small-n quality check for metrics.jsonl: n samples from ``denoiser`` through the seeded loop
    ``sampling.generate.generate`` (sample i from seed + i; ``sampler=None`` picks by the NFE budget
    ``steps``), then, by the kind of data: images -> FD-Digits and digit confidence for MNIST, FD-EffNet
    for other image data (reference features are cached, so only the first call pays for them);
    vectors -> FD of the coordinates (FD-xy); signals -> FD of the flattened values (FD-raw), both against
    the first max(n, 2000) training items. ``data``: the data set spec the model was trained on;
    ``image_size``, ``channels``: as it was loaded; ``cond``: per-sample conditioning for ``generate``.
    Returns {"FD-Digits@256": ..., "digit_confidence@256": ..., "eval_seconds": ...} (JSON-able)."""
    from ..data import load_dataset
    from ..sampling.generate import generate

    start = time.time()
    shape = getattr(denoiser, "sample_shape", None)
    if shape is None:
        shape = tuple(load_dataset(data, image_size=image_size, channels=channels).shape)
    was_training = getattr(denoiser, "training", False)
    if hasattr(denoiser, "eval"):
        denoiser.eval()
    try:
        x = generate(denoiser, n, seed=seed, sampler=sampler, steps=steps, sampler_options=sampler_options,
                     cond=cond, sample_shape=tuple(shape))
    finally:
        if was_training:
            denoiser.train()
    metrics: dict = {}
    if x.ndim == 4:
        images = to_uint8(x)
        for name in ["digits"] if str(data).lower() in DIGIT_DATA else ["effnet"]:
            net = feature_network(name)
            real = reference_features(net, data, n, image_size=images.shape[1], channels=images.shape[3],
                                      progress=False)
            metrics.update(compare_features(net, real, net.features(images), kid=False, pr=False))
            if name == "digits":
                metrics[f"digit_confidence@{count_label(n)}"] = digit_confidence_score(images)
    else:
        ds = load_dataset(data, image_size=image_size, channels=channels, split="train")
        real = ds.get_batch(torch.arange(min(len(ds), max(n, 2000))))[0]
        net = Coordinates("xy" if x.ndim == 2 else "raw")
        metrics.update(compare_features(net, net.features(real), net.features(x), kid=False, pr=False))
    metrics["eval_seconds"] = round(time.time() - start, 2)
    return metrics
