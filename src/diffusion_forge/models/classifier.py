"""A noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021), and its folder.

Trained on noisy inputs x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with t ~ U{0..T-1} of the
denoiser's own schedule, it gives the gradient that classifier guidance adds to the score:

    grad_x log p(y | x_t) = grad_x [logits_y - logsumexp(logits)].

Images (C, H, W): a small conv net, one residual block per level (GroupNorm-SiLU-conv, the time embedding
added, GroupNorm-SiLU-conv, the skip: the U-Net's ``ResBlock``), a stride-2 downsample between levels, then
GroupNorm-SiLU, a global average pool and a linear head. Vectors (D,) and signals (C, L): the flattened input
through the MLP denoiser's residual blocks, then LayerNorm and a linear head. The timestep t (float, training
units [0, T-1]) enters every block through the sinusoidal embedding and ``TimestepMLP`` of ``models.unet``.

A classifier folder (written by ``training.classifier.train_classifier``, ``dforge train-classifier``):

    CLS/config.json         kind "noise_classifier", format_version 1, num_classes, sample_shape, schedule
                            (NoiseSchedule.to_dict()), model (the build config), data, steps, accuracy by
                            t band, and the SHA-256 of model.safetensors
    CLS/model.safetensors   the weights (never a pickle)
"""
from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io.state import sha256
from .mlp import ResidualMLPBlock
from .unet import Downsample, ResBlock, TimestepMLP, broadcast_timesteps, timestep_embedding

KIND = "noise_classifier"
FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

# Presets sized for a 2-core CPU: "tiny" trains in seconds on 8x8 digits (tests); "small" gives a useful
# MNIST classifier in a minute or two. conv: channels per level; mlp: width and number of residual blocks.
CLASSIFIER_PRESETS = {
    "conv": {"tiny": dict(channels=(8, 16), time_embed_dim=16, norm_num_groups=4),
             "small": dict(channels=(16, 32, 64), time_embed_dim=32, norm_num_groups=8)},
    "mlp": {"tiny": dict(hidden=32, depth=2, time_embed_dim=16),
            "small": dict(hidden=128, depth=3, time_embed_dim=32)},
}
OPTIONS = {"conv": ("channels", "time_embed_dim", "norm_num_groups", "dropout"),
           "mlp": ("hidden", "depth", "time_embed_dim", "dropout")}


def architecture(sample_shape) -> str:
    """"conv" for images (C, H, W), "mlp" for vectors (D,) and signals (C, L)."""
    return "conv" if len(sample_shape) == 3 else "mlp"


class NoiseClassifier(nn.Module):
    """``classifier(x_t, t) -> logits`` (batch, num_classes); t float (batch,) or a scalar in [0, T-1].

    ``NoiseClassifier(num_classes, sample_shape, preset="small", **options)``: options override the preset
    (conv: channels, time_embed_dim, norm_num_groups, dropout; mlp: hidden, depth, time_embed_dim, dropout).
    ``.config`` is the resolved, JSON-ready build config (``NoiseClassifier.from_config`` rebuilds it).
    Attributes set by training / loading: ``.info`` (the folder's config.json), ``.schedule``, ``.path``.
    """

    def __init__(self, num_classes: int, sample_shape, preset: str = "small", **options):
        super().__init__()
        sample_shape = tuple(int(v) for v in sample_shape)
        try:
            num_classes = operator.index(num_classes)
        except TypeError:
            raise ValueError(f"num_classes must be a whole number, got {num_classes!r}") from None
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
        if len(sample_shape) not in (1, 2, 3) or min(sample_shape) < 1:
            raise ValueError(f"sample_shape must be (D,), (C, L) or (C, H, W), got {sample_shape}")
        arch = architecture(sample_shape)
        if preset not in CLASSIFIER_PRESETS[arch]:
            raise ValueError(f"unknown classifier preset {preset!r}; choose one of: {', '.join(CLASSIFIER_PRESETS[arch])}")
        unknown = sorted(set(options) - set(OPTIONS[arch]))
        if unknown:
            raise ValueError(f"unknown {arch} classifier option(s) {unknown}; known: {', '.join(OPTIONS[arch])}")
        cfg = {"dropout": 0.0, **CLASSIFIER_PRESETS[arch][preset], **options}
        self.num_classes, self.sample_shape, self.arch = num_classes, sample_shape, arch
        self.config = {"arch": arch, "preset": preset, "num_classes": num_classes, "sample_shape": list(sample_shape),
                       **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}
        self.info: dict = {}
        self.schedule = None
        self.path: Path | None = None
        self.time_embed_dim = int(cfg["time_embed_dim"])
        if arch == "conv":
            self._build_conv(sample_shape[0], tuple(int(c) for c in cfg["channels"]), int(cfg["norm_num_groups"]),
                             float(cfg["dropout"]))
        else:
            self._build_mlp(math.prod(sample_shape), int(cfg["hidden"]), int(cfg["depth"]), float(cfg["dropout"]))

    def _build_conv(self, in_channels: int, chans: tuple[int, ...], groups: int, dropout: float) -> None:
        if any(c % groups for c in chans):
            raise ValueError(f"norm_num_groups={groups} must divide every channel count {chans}")
        temb_dim = 4 * chans[0]
        self.time_embedding = TimestepMLP(self.time_embed_dim, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        c_ins = (chans[0],) + chans[:-1]
        self.blocks = nn.ModuleList(ResBlock(c_in, c_out, temb_dim, groups, dropout, 1e-5)
                                    for c_in, c_out in zip(c_ins, chans))
        # a stride-2 conv after every level but the last: H -> ceil(H / 2)
        self.downsamplers = nn.ModuleList(Downsample(c) for c in chans[:-1])
        self.norm_out = nn.GroupNorm(groups, chans[-1])
        self.head = nn.Linear(chans[-1], self.num_classes)

    def _build_mlp(self, dim: int, width: int, depth: int, dropout: float) -> None:
        self.time_embedding = TimestepMLP(self.time_embed_dim, width)
        self.proj_in = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width, width, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.num_classes)

    @classmethod
    def from_config(cls, config: dict) -> NoiseClassifier:
        cfg = {k: v for k, v in config.items() if k != "arch"}
        return cls(int(cfg.pop("num_classes")), cfg.pop("sample_shape"), cfg.pop("preset", "small"), **cfg)

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Logits of p(y | x_t, t); x_t (batch, *sample_shape) in the denoiser's x_t space."""
        if tuple(x_t.shape[1:]) != self.sample_shape:
            raise ValueError(f"this classifier takes samples of shape {self.sample_shape}, got {tuple(x_t.shape[1:])}; "
                             "train one for this data with dforge train-classifier --like RUN")
        param = self.head.weight
        h = x_t.to(param.dtype)
        t = broadcast_timesteps(t, h.shape[0], h.device)
        temb = self.time_embedding(timestep_embedding(t, self.time_embed_dim).to(param.dtype))
        if self.arch == "conv":
            h = self.conv_in(h)
            for i, block in enumerate(self.blocks):
                h = block(h, temb)                               # h + conv(silu(norm(...)) + proj(temb))
                if i < len(self.downsamplers):
                    h = self.downsamplers[i](h)
            h = F.silu(self.norm_out(h)).mean(dim=(-2, -1))      # global average pool: (batch, channels)
        else:
            h = self.proj_in(h.reshape(h.shape[0], -1))
            for block in self.blocks:
                h = block(h, temb)
            h = self.norm_out(h)
        return self.head(h)

    def log_prob(self, x_t: torch.Tensor, t, y: torch.Tensor) -> torch.Tensor:
        """log p(y | x_t, t) = logits_y - logsumexp(logits), per sample (batch,)."""
        return self(x_t, t).log_softmax(-1).gather(-1, y.long().reshape(-1, 1)).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# The folder



def is_classifier_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a config.json of kind "noise_classifier"."""
    try:
        return json.loads((Path(path) / CONFIG_FILE).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def save_classifier(classifier: NoiseClassifier, out: str | os.PathLike, info: dict) -> Path:
    """Write ``out/model.safetensors`` then ``out/config.json`` (``info`` + the build config and the weights'
    SHA-256), each through the one atomic writer; a crash between the two leaves a pair whose hash differs,
    which :func:`load_classifier` refuses."""
    from safetensors.torch import save_file

    from ..io.files import atomic_write, write_json

    out = Path(out)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in classifier.state_dict().items()}
    weights = atomic_write(out / WEIGHTS_FILE,
                           lambda tmp: save_file(state, tmp, metadata={"format": KIND, "format_version": "1"}))
    config = {**info, "kind": KIND, "format_version": FORMAT_VERSION, "num_classes": classifier.num_classes,
              "sample_shape": list(classifier.sample_shape), "model": classifier.config,
              "model_sha256": sha256(weights)}
    write_json(out / CONFIG_FILE, config)
    return out


def _not_a_classifier(path: Path, why: str) -> ValueError:
    hint = (" (it looks like a run folder of dforge train: pass the folder written by dforge train-classifier)"
            if (path / "checkpoints").is_dir() else "")
    return ValueError(f"{path} is not a noise classifier folder: {why}{hint}; train one with "
                      f"dforge train-classifier --data DATA --like RUN --out {path}")


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> NoiseClassifier:
    """The classifier of a folder written by ``train_classifier``, in eval mode with gradients off for its
    weights (input gradients still flow, as guidance needs); ``.info`` is config.json, ``.schedule`` the
    ``NoiseSchedule`` it was trained on, ``.path`` the folder. A folder that is not one -> ValueError."""
    from safetensors.torch import load_file

    from ..core.schedules import NoiseSchedule
    from ..device import resolve_device

    path = Path(path)
    if not path.exists():
        raise ValueError(f"no classifier at {path}: it does not exist; train one with "
                         f"dforge train-classifier --data DATA --like RUN --out {path}")
    if not path.is_dir():
        raise _not_a_classifier(path, "it is a file, not a folder")
    try:
        info = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise _not_a_classifier(path, "it has no config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG_FILE} is corrupt ({e}); train the classifier again with --force") from None
    if not isinstance(info, dict) or info.get("kind") != KIND:
        kind = info.get("kind") if isinstance(info, dict) else None
        raise _not_a_classifier(path, f"its config.json is of kind {kind!r}, not {KIND!r}")
    version = info.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{path} has classifier format_version {version!r}; this version of diffusion_forge reads "
                         f"version 1..{FORMAT_VERSION} (upgrade it?)")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"classifier {path} is incomplete: {WEIGHTS_FILE} is missing; train it again with --force")
    if info.get("model_sha256") not in (None, sha256(weights)):
        raise ValueError(f"classifier {path} is corrupt: {WEIGHTS_FILE} does not match the SHA-256 in config.json; "
                         "train it again with --force")
    try:
        classifier = NoiseClassifier.from_config(info["model"])
        classifier.load_state_dict(load_file(str(weights)))
        schedule = NoiseSchedule.from_dict(info["schedule"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"classifier {path} does not fit this version of diffusion_forge ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); train it again with --force") from None
    classifier = classifier.to(resolve_device(device)).eval().requires_grad_(False)
    classifier.info, classifier.schedule, classifier.path = info, schedule, path
    return classifier


def describe_schedule(schedule) -> str:
    """A short name of a schedule: "cosine, T=1000", "linear 0.0001..0.02, T=1000", "custom betas, T=50"."""
    if schedule.name == "cosine":
        text = "cosine"
    elif schedule.name == "custom":
        text = "custom betas"
    else:
        text = f"{schedule.name} {schedule.beta_start:g}..{schedule.beta_end:g}"
    return f"{text}, T={schedule.num_timesteps}" + (", zero-terminal-SNR" if schedule.zero_terminal_snr else "")


def denoiser_num_classes(denoiser) -> int | None:
    """The classes a denoiser knows: ``.num_classes`` of a loaded run (0 = unconditional), else K from a null
    condition {"class_labels": K}; None when unknown."""
    n = getattr(denoiser, "num_classes", None)
    if n:
        return int(n)
    null = getattr(denoiser, "null_cond", None)
    if isinstance(null, dict) and "class_labels" in null:
        return int(torch.as_tensor(null["class_labels"]).reshape(-1)[0])
    return None


def check_classifier_fits(classifier: NoiseClassifier, denoiser) -> None:
    """ValueError naming the fix unless ``classifier`` was trained for ``denoiser``: the same schedule (equal T
    and betas to 1e-12 relative), the same sample shape, and (when the denoiser knows it) the same classes."""
    from ..denoise.denoiser import same_schedule

    name = f"classifier {classifier.path}" if getattr(classifier, "path", None) else "the classifier"
    fix = "train one for this run: dforge train-classifier --data DATA --like RUN --out CLS"
    ours = getattr(classifier, "schedule", None)
    theirs = getattr(denoiser, "schedule", None)
    if ours is None:
        raise ValueError(f"{name} records no noise schedule; load it with load_classifier(CLS), or {fix}")
    if theirs is not None and not same_schedule(ours, theirs):
        raise ValueError(f"{name} was trained on another noise schedule ({describe_schedule(ours)}) than the model "
                         f"({describe_schedule(theirs)}); {fix} (--like copies the run's schedule)")
    shape = getattr(denoiser, "sample_shape", None)
    if shape is not None and tuple(shape) != tuple(classifier.sample_shape):
        raise ValueError(f"{name} takes samples of shape {tuple(classifier.sample_shape)} and the model makes "
                         f"{tuple(shape)}; {fix} (--like copies the run's image size)")
    k = denoiser_num_classes(denoiser)
    if k is not None and k != classifier.num_classes:
        raise ValueError(f"{name} tells {classifier.num_classes} classes apart and the model knows {k}; train the "
                         "classifier on the run's data: dforge train-classifier --data DATA --like RUN --out CLS")
