"""Training a noise-aware classifier for classifier guidance (Dhariwal & Nichol 2021).

    for step in range(steps):
        x_0, y  = a batch of labelled training items         (indices from a seeded CPU generator)
        t       ~ U{0, ..., T-1},  eps ~ N(0, I)              (the same generator)
        x_t     = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps          (core.process.q_sample)
        loss    = cross_entropy(classifier(x_t, t), y) = -mean log p(y | x_t, t)
        AdamW step (lr: linear warm-up, then cosine down to lr / 10; gradient norm clipped to 1)

The schedule is the one of the run the classifier will guide (``like=RUN``: its betas, custom betas and
zero-terminal-SNR included, and its sample shape / image size), else the default recipe's (training.config:
cosine, T = 1000, the data's own size). A classifier trained on another schedule would be asked about noise
levels it never saw at a given t, so ``check_classifier_fits`` refuses that pairing.

Afterwards the held-out accuracy (the data's test split where it has one, else a held-out slice of the
training set) is measured on clean items and in four bands of t (quarters of [0, T-1]) and stored in
``CLS/config.json``. See ``models.classifier`` for the network and the folder.
"""
from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.classifier import (CONFIG_FILE, WEIGHTS_FILE, NoiseClassifier, check_classifier_fits,
                                 is_classifier_folder, load_classifier, save_classifier)

__all__ = [
    "NoiseClassifier",
    "check_classifier_fits",
    "check_classifier_out",
    "classifier_accuracy",
    "load_classifier",
    "t_bands",
    "train_classifier",
]

WARMUP_STEPS, MIN_LR_FRACTION, GRAD_CLIP = 50, 0.1, 1.0
HELD_OUT_FRACTION = 0.1      # of the training set, when the data has no test split


# ---------------------------------------------------------------------------------------------
# Checks before any work

def check_classifier_out(out: str | os.PathLike, force: bool = False) -> Path:
    """``out`` may be new, empty, or (with ``force``) a classifier folder; anything else is refused."""
    from ..io.files import OutputError, check_writable_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; --out names the classifier's folder: choose another name")
    if out.is_dir():
        names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
        if is_classifier_folder(out):
            if not force:
                raise OutputError(f"{out} already holds a classifier; pass --force to overwrite it, or choose "
                                  "another --out")
        elif names - {WEIGHTS_FILE}:   # a run folder, pictures, ...: never overwritten
            raise OutputError(f"{out} is a folder that holds other files (not a classifier); choose a new or empty "
                              "folder for --out")
        elif names and not force:      # weights without config.json: a crash between the two writes
            raise OutputError(f"{out} holds an incomplete classifier; pass --force to overwrite it")
    check_writable_dir(out)
    return out


def _positive(name: str, value, kind=int):
    try:
        value = operator.index(value) if kind is int else float(value)
    except TypeError:
        raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, got {value!r}") from None
    if not value > 0 or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _target(like):
    """(schedule, sample shape or None, classes of the run or None, like as str): RUN's, or the default recipe's."""
    from .build import build_schedule
    from .config import Config

    if like is None:
        return build_schedule(Config()), None, None, None
    from ..io.checkpoint import load_model_from_run

    run = load_model_from_run(like, device="cpu")
    return run.schedule, tuple(run.sample_shape), int(getattr(run, "num_classes", 0) or 0) or None, str(like)


def _load(data: str, shape, split: str, progress: bool):
    from ..data import load_dataset

    size = channels = None
    if shape is not None and len(shape) == 3:  # an image run: its channels and size
        channels, size = shape[0], shape[-1]
    return load_dataset(data, image_size=size, channels=channels, split=split, progress=progress)


def _labels(ds, data: str) -> torch.Tensor:
    """All labels of a data set (int64); a set without labels -> ValueError naming it."""
    labels = getattr(ds, "labels", None)
    has = getattr(ds, "has_labels", None)
    if labels is not None and has is None:
        has = bool((torch.as_tensor(labels) >= 0).any())
    if labels is None or not has:
        raise ValueError(f"a classifier needs class labels, and data set {data!r} has none; use a labelled set "
                         "(mnist, digits, moons, an image folder with one sub-folder per class)")
    labels = torch.as_tensor(labels).long()
    if bool((labels < 0).any()):
        raise ValueError(f"{int((labels < 0).sum())} items of {data!r} have no label; give every item a class")
    return labels


def _held_out(data: str, ds, labels, shape, seed: int, eval_n: int, progress: bool):
    """(train indices, held-out x, held-out labels, description): the test split where the data has one, else
    a held-out slice (a seeded permutation's first 10%, at most eval_n) kept out of training."""
    from ..data import BUNDLED

    test = None
    if str(data).strip().lower() in BUNDLED or str(data).startswith("hf:"):
        try:
            test = _load(data, shape, "test", progress)
        except ValueError:            # no test split (emoji, some Hugging Face sets)
            test = None
    if test is not None and len(test) == len(ds) and torch.equal(test.get_batch([0])[0], ds.get_batch([0])[0]):
        test = None                   # the loader ignored the split: the same items
    g = torch.Generator().manual_seed(seed + 1)
    if test is not None:
        test_labels = _labels(test, f"{data} (test split)")
        pick = torch.randperm(len(test), generator=g)[:eval_n]
        return torch.arange(len(ds)), test.get_batch(pick)[0], test_labels[pick], f"{len(pick)} items of the test split"
    n_hold = min(eval_n, max(1, int(len(ds) * HELD_OUT_FRACTION)))
    if len(ds) - n_hold < 1:
        raise ValueError(f"data set {data!r} has {len(ds)} items: too few to hold some out for the accuracy")
    perm = torch.randperm(len(ds), generator=g)
    hold = perm[:n_hold]
    return perm[n_hold:].sort().values, ds.get_batch(hold)[0], labels[hold], f"{n_hold} held-out training items"


# ---------------------------------------------------------------------------------------------
# Accuracy

def t_bands(num_timesteps: int, n: int = 4) -> list[tuple[int, int]]:
    """n bands of t covering [0, T-1], inclusive: for T = 1000, (0, 249), (250, 499), (500, 749), (750, 999)."""
    edges = [round(num_timesteps * k / n) for k in range(n + 1)]
    return [(lo, hi - 1) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


@torch.no_grad()
def classifier_accuracy(classifier, x0: torch.Tensor, labels: torch.Tensor, schedule=None, t=None, seed: int = 0,
                        batch_size: int = 500) -> float:
    """Fraction of items with argmax_y p(y | x_t, t) = label. ``t``: None (the clean items, fed with t = 0), an
    int, or a band (lo, hi) drawn uniformly per item; x_t = q_sample(x_0, t, eps) with eps from ``seed``."""
    from ..core.process import q_sample

    dev = classifier.head.weight.device
    n = len(x0)
    g = torch.Generator().manual_seed(seed)
    if t is None:
        ts = torch.zeros(n, dtype=torch.long)
    elif isinstance(t, (tuple, list)):
        ts = torch.randint(int(t[0]), int(t[1]) + 1, (n,), generator=g)
    else:
        ts = torch.full((n,), int(t), dtype=torch.long)
    eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    correct = 0
    for i in range(0, n, batch_size):
        x, tt = x0[i:i + batch_size], ts[i:i + batch_size]
        if t is not None:
            x = q_sample(x, tt, eps[i:i + batch_size], schedule)       # sqrt(ab) x0 + sqrt(1 - ab) eps
        pred = classifier(x.to(dev), tt.float().to(dev)).argmax(-1).cpu()
        correct += int((pred == labels[i:i + batch_size]).sum())
    return correct / max(n, 1)


def _band_accuracy(classifier, x0, labels, schedule, seed: int) -> dict:
    acc = {"clean": classifier_accuracy(classifier, x0, labels, seed=seed)}
    for k, (lo, hi) in enumerate(t_bands(schedule.num_timesteps)):
        acc[f"t {lo}-{hi}"] = classifier_accuracy(classifier, x0, labels, schedule, (lo, hi), seed=seed + 1 + k)
    return acc


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over min(50, steps / 10) steps, then lr (0.1 + 0.9 (1 + cos(pi p)) / 2), p in [0, 1]."""
    warm = min(WARMUP_STEPS, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm - 1)
    return lr * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


# ---------------------------------------------------------------------------------------------
# Training

def train_classifier(data: str, out: str | os.PathLike, like: str | os.PathLike | None = None, steps: int = 1000,
                     batch_size: int = 128, lr: float = 1e-3, preset: str = "small", seed: int = 0,
                     progress: bool = True, device: str = "auto", force: bool = False, eval_n: int = 1000,
                     weight_decay: float = 0.01, options: dict | None = None, schedule=None) -> NoiseClassifier:
    """Train a noise-aware classifier on ``data`` (labels needed) for the schedule and sample shape of the run
    ``like`` (default: the default recipe's), write ``out/config.json`` and ``out/model.safetensors``, and
    return it (eval mode; ``.info`` = config.json, ``.schedule``, ``.path``). Deterministic given ``seed`` on
    one device. ``options`` override the preset (see ``NoiseClassifier``); ``force`` overwrites an existing
    classifier folder; ``eval_n`` items are held out for the accuracy by t band; ``schedule`` (a NoiseSchedule,
    instead of ``like``) sets the schedule directly, at the data's own size."""
    from tqdm.auto import tqdm

    from ..core.process import q_sample
    from ..device import resolve_device

    steps, batch_size, eval_n = _positive("steps", steps), _positive("batch_size", batch_size), _positive("eval_n", eval_n)
    lr = _positive("lr", lr, float)
    dev = resolve_device(device)
    if schedule is not None and like is not None:
        raise ValueError("give like (a run folder) or schedule, not both: like copies the run's schedule")
    if schedule is None:
        schedule, shape, run_classes, like_name = _target(like)
    else:
        shape = run_classes = like_name = None
    out = check_classifier_out(out, force)        # before the data are read
    ds = _load(data, shape, "train", progress)
    labels = _labels(ds, data)
    sample_shape = tuple(ds.shape)
    if shape is not None and sample_shape != shape:
        raise ValueError(f"data set {data!r} has items of shape {sample_shape} and the run {like} makes {shape}; "
                         "train the classifier on the run's data")
    num_classes = int(getattr(ds, "num_classes", None) or int(labels.max()) + 1)
    if run_classes is not None and run_classes != num_classes:
        raise ValueError(f"the run {like} knows {run_classes} classes and data set {data!r} has {num_classes}; "
                         "train the classifier on the run's data")
    train_idx, x_eval, y_eval, held = _held_out(data, ds, labels, shape, seed, eval_n, progress)

    with torch.random.fork_rng(devices=[]):        # the initial weights depend only on seed
        torch.manual_seed(seed)
        classifier = NoiseClassifier(num_classes, sample_shape, preset, **(options or {}))
    classifier.to(dev).train()
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)        # every draw of the loop, on the CPU
    T = schedule.num_timesteps
    bar = tqdm(total=steps, unit="step", dynamic_ncols=True, disable=not progress, desc="classifier")
    running = None
    try:
        for step in range(steps):
            idx = train_idx[torch.randint(len(train_idx), (batch_size,), generator=g)]
            t = torch.randint(T, (batch_size,), generator=g)                  # t ~ U{0..T-1}
            x0, _ = ds.get_batch(idx)
            eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            x_t = q_sample(x0, t, eps, schedule)                             # sqrt(ab) x0 + sqrt(1 - ab) eps
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr)
            loss = F.cross_entropy(classifier(x_t.to(dev), t.float().to(dev)), labels[idx].to(dev))  # -log p(y|x_t)
            if not torch.isfinite(loss):
                raise ValueError(f"the classifier's loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(classifier.parameters(), GRAD_CLIP)
            opt.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{running:.3f}")
    finally:
        bar.close()

    classifier.eval()
    accuracy = _band_accuracy(classifier, x_eval, y_eval, schedule, seed + 2)
    info = {"schedule": schedule.to_dict(), "classes": getattr(ds, "classes", None), "like": like_name,
            "data": {"source": str(data), "image_size": sample_shape[-1] if len(sample_shape) == 3 else None,
                     "channels": sample_shape[0] if len(sample_shape) == 3 else None, "held_out": held},
            "steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "seed": seed,
            "accuracy": accuracy, "chance": 1 / num_classes, "final_loss": running}
    save_classifier(classifier, out, info)
    print(f"held-out accuracy ({held}; chance {100 / num_classes:.1f}%): "
          + "   ".join(f"{k} {100 * v:.1f}%" for k, v in accuracy.items()))
    classifier.requires_grad_(False)
    classifier.info = json.loads((out / CONFIG_FILE).read_text())   # as written: + model config, weights' hash
    classifier.schedule, classifier.path = schedule, out
    return classifier
