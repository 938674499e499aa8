"""The trainer: a diffusion model from a folder of images to a run folder of checkpoints and samples.

    config (defaults < config file < --set flags) ─► Trainer.fit():
        for step in range(start, steps):
            batch, t, noise  = drawn from generators seeded by (seed, step)   # resumable bit for bit
            loss             = diffusion_loss(model, batch, schedule, prediction, min_snr_gamma)
            AdamW step       (warm-up then constant / cosine lr, gradient clipping, accumulation, AMP)
            EMA update       (the same on every process: no communication needed)
            every N steps    log to metrics.jsonl, write a sample grid, write a checkpoint

A run folder holds ``config.json``, ``checkpoints/``, ``samples/``, ``metrics.jsonl`` and
``loss.png``. Calling the trainer on an existing run folder resumes it from its newest checkpoint.

Several processes or GPUs go through ``accelerate``: launch the same command with ``accelerate
launch`` (GPUs) or ``torchrun --nproc_per_node N`` (CPU processes, gloo). ``batch_size`` is the
global batch of one optimiser step, split over processes and accumulation steps, so a recipe means
the same thing on any hardware. Only the main process writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import signal
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .io.checkpoint import TrainedModel, latest_checkpoint, save_checkpoint
from .io.files import atomic_write_text, write_json
from .ema import EMA
from .core.losses import diffusion_loss
from .core.process import PREDICTIONS
from .core.schedules import SCHEDULE_NAMES, NoiseSchedule

PRECISIONS = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
MODEL_TYPES = ("unet", "mlp", "diffusers_unet")


# ---------------------------------------------------------------------------------------------
# The configuration: every knob of a run, with its default, in one place

@dataclass
class TrainConfig:
    # data
    data: str = "mnist"                  # bundled name (see `dforge datasets`), image folder, or hf:<name>
    image_size: int | None = None        # resize images to this size (None: the data's own size)
    channels: int | None = None          # 1 or 3 (None: the data's own)
    flip: bool = False                   # random horizontal flips
    # model
    model: str = "unet"                  # unet | mlp | diffusers_unet
    preset: str = "small"                # tiny | small | base
    model_options: dict = field(default_factory=dict)  # overrides of the preset, e.g. {"dropout": 0.1}
    # diffusion process and objective
    schedule: str = "cosine"             # linear | scaled_linear | cosine | sigmoid
    num_timesteps: int = 1000            # training timesteps T
    zero_terminal_snr: bool = False      # rescale to SNR 0 at T - 1 (needs v_prediction or sample)
    prediction: str = "v_prediction"     # epsilon | sample | v_prediction
    min_snr_gamma: float | None = 5.0    # min-SNR-gamma loss weighting (None: off)
    # optimisation
    steps: int = 2000                    # optimiser steps in the whole run
    batch_size: int = 64                 # global batch per optimiser step (all processes x accumulation)
    grad_accum: int = 1                  # micro-batches per optimiser step
    lr: float = 2e-3                     # peak learning rate of AdamW
    lr_schedule: str = "cosine"          # constant | cosine (after the warm-up)
    warmup_steps: int = 100              # linear warm-up from lr / warmup_steps to lr
    min_lr: float = 2e-4                 # where the cosine schedule ends
    weight_decay: float = 0.0            # AdamW decoupled weight decay (matrices and kernels only)
    adam_beta1: float = 0.9              # AdamW beta1
    adam_beta2: float = 0.999            # AdamW beta2
    grad_clip: float = 1.0               # clip the global gradient norm to this (0: off)
    # EMA of the weights (used for sampling)
    ema_decay: float = 0.999             # EMA decay (the most it reaches, see ema_warmup)
    ema_warmup: bool = True              # decay_k = min(ema_decay, (1 + k) / (10 + k))
    # precision and randomness
    mixed_precision: str = "auto"        # auto | no | bf16 | fp16 (auto: bf16 where the hardware has it, else fp32)
    seed: int = 0                        # initial weights, data order, t, noise: all derive from it
    # what the run writes
    log_every: int = 10                  # metrics.jsonl line and progress-bar update every N steps
    checkpoint_every: int = 500          # also at the end and on Ctrl-C
    keep_checkpoints: int = 3            # keep the newest K checkpoints
    sample_every: int = 1000             # sample grid into samples/ every N steps (0: only at the end)
    sample_n: int = 64                   # images in each grid
    sampler: str = "euler_ancestral"     # sampler of the grids, the demo and `dforge sample`
    sample_steps: int = 20               # its steps
    sampler_options: dict = field(default_factory=lambda: {"eta": 1.8})  # its options (eta > 1: more fresh noise)
    eval_every: int = 0                  # FD and (MNIST) digit confidence of eval_n EMA samples every N steps (0: off)
    eval_n: int = 256                    # samples per evaluation (small n: "FD@256", not comparable to 10k FID)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def choice(key, allowed):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of: {', '.join(allowed)}")

        choice("schedule", SCHEDULE_NAMES)
        choice("prediction", PREDICTIONS)
        choice("mixed_precision", PRECISIONS)
        choice("lr_schedule", LR_SCHEDULES)
        choice("model", MODEL_TYPES)
        for key in ("steps", "batch_size", "grad_accum", "num_timesteps", "log_every", "sample_n", "sample_steps",
                    "checkpoint_every", "keep_checkpoints", "eval_n"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "sample_every", "weight_decay", "grad_clip", "min_lr", "eval_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0 or none, got {self.min_snr_gamma}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        if self.zero_terminal_snr and self.prediction == "epsilon":
            raise ValueError("zero_terminal_snr needs prediction=v_prediction or sample "
                             "(epsilon is undefined at SNR 0)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        check_keys(d)
        return cls(**{k: coerce(k, v) for k, v in d.items()})


_HINTS: dict | None = None


def _field_types() -> dict:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(TrainConfig)
    return _HINTS


# names other tools (diffusers' training scripts, nanoGPT) use for our keys, for the "did you mean" hint
ALIASES = {"learning_rate": "lr", "train_batch_size": "batch_size", "max_train_steps": "steps", "max_steps": "steps",
           "max_iters": "steps", "gradient_accumulation_steps": "grad_accum", "lr_warmup_steps": "warmup_steps",
           "lr_scheduler": "lr_schedule", "max_grad_norm": "grad_clip", "prediction_type": "prediction",
           "beta_schedule": "schedule", "num_train_timesteps": "num_timesteps", "resolution": "image_size",
           "ema_max_decay": "ema_decay", "snr_gamma": "min_snr_gamma", "random_flip": "flip",
           "checkpointing_steps": "checkpoint_every", "checkpoints_total_limit": "keep_checkpoints"}


def check_keys(d: dict) -> None:
    """Unknown keys are errors, with the closest known names suggested."""
    known = list(_field_types())
    for key in d:
        if key not in known:
            close = ([ALIASES[key]] if key in ALIASES else []) + difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            close = list(dict.fromkeys(close))[:3]
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"unknown config key {key!r}{hint}")


def coerce(key: str, value):
    """Turn a value from a config file or a ``key=value`` flag (strings) into the field's type."""
    hint = _field_types()[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", "off", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key} cannot be none")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if base is dict or typing.get_origin(base) is dict:
            if isinstance(value, str):
                import yaml

                value = yaml.safe_load(value) or {}
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ValueError(f"{key}={value!r} is not a valid {getattr(base, '__name__', base)}")


def load_config_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON file of config keys (a flat mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    d = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(d).__name__}")
    check_keys(d)
    return d


def parse_set_flags(items: list[str]) -> dict:
    """``["lr=1e-3", "steps=500"]`` -> ``{"lr": "1e-3", "steps": "500"}`` (typed later by :func:`coerce`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    check_keys(out)
    return out


def merge_config(base: dict | None = None, file: str | os.PathLike | None = None,
                 flags: dict | None = None) -> TrainConfig:
    """defaults < ``base`` (a saved run's config) < config ``file`` < ``flags``; unknown keys are errors."""
    d = TrainConfig().to_dict()
    for layer in (base or {}, load_config_file(file) if file else {}, flags or {}):
        check_keys(layer)
        d.update({k: coerce(k, v) for k, v in layer.items()})
    return TrainConfig(**d)


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{key: (old value, new value)} for every key whose value differs."""
    return {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}


class ChangedSettings(ValueError):
    """Resuming a run with settings other than those it was started with, without saying so."""


def run_config(run_dir, file=None, flags: dict | None = None, allow_changes: bool = False) -> tuple[TrainConfig, dict]:
    """The config for training into ``run_dir``: a new run merges defaults < file < flags; an existing
    run (its config.json) merges saved < file < flags and refuses any change unless ``allow_changes``.
    Returns (config, changes) with changes as {key: (old, new)}."""
    saved_path = Path(run_dir) / "config.json"
    if not saved_path.exists():
        return merge_config(None, file, flags), {}
    try:
        saved = json.loads(saved_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{saved_path} is corrupt ({e}); move the run folder away or fix the file") from e
    saved_cfg = merge_config(saved)  # the saved values, checked; new keys of this version get their defaults
    cfg = merge_config(saved, file, flags)
    changes = config_changes(saved_cfg.to_dict(), cfg.to_dict())
    if changes and not allow_changes:
        listed = ", ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())
        raise ChangedSettings(
            f"{run_dir} already holds a run with other settings ({listed}). Resume it with its own settings "
            "(drop those options), pass --allow-changes to resume with the new values, or choose another --out.")
    return cfg, changes


# ---------------------------------------------------------------------------------------------
# Determinism: every random draw of step k comes from generators seeded by (seed, k, purpose)

DATA_ORDER, STEP_NOISE, OVERFIT, GLOBAL_RNG = 1, 2, 3, 4


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of integers (mixed by NumPy's SeedSequence)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=2)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=seeded_generator(seed, epoch, DATA_ORDER))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The dataset indices of the global batch of ``step``: consecutive slices of a fresh random
    permutation per epoch, so each epoch sees every item once and any step is found directly."""
    start = step * batch_size
    out, pos = [], start
    while pos < start + batch_size:
        epoch, offset = divmod(pos, n)
        perm = epoch_permutation(n, seed, epoch)
        take = min(n - offset, start + batch_size - pos)
        out.append(perm[offset: offset + take])
        pos += take
    return torch.cat(out)


def step_noise(step: int, batch_size: int, sample_shape, num_timesteps: int, seed: int, flip: bool):
    """t (float64), noise (float32) and flip mask for the global batch of ``step``, drawn on the CPU."""
    g = seeded_generator(seed, step, STEP_NOISE)
    t = torch.randint(0, num_timesteps, (batch_size,), generator=g).to(torch.float64)
    noise = torch.randn((batch_size, *sample_shape), generator=g)
    flips = torch.rand(batch_size, generator=g) < 0.5 if flip else None
    return t, noise, flips


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """lr for optimiser step ``step`` (0-based): linear warm-up, then constant or cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Data, model, precision

class TrainingData:
    """The training set and a fast way to fetch a batch by indices (``get_batch`` of data.py's data sets)."""

    def __init__(self, cfg: TrainConfig):
        from . import data as data_module

        ds = data_module.load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels, split="train",
                                      flip=False)  # flips are drawn by the trainer, from (seed, step)
        if len(ds) == 0:
            raise ValueError(f"data set {cfg.data!r} is empty")
        self.dataset, self.n = ds, len(ds)
        self.sample_shape = tuple(torch.as_tensor(ds[0][0]).shape)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        if hasattr(self.dataset, "get_batch"):
            return self.dataset.get_batch(idx)[0].float()
        return torch.stack([torch.as_tensor(self.dataset[int(i)][0]).float() for i in idx])


def model_config(cfg: TrainConfig, sample_shape: tuple[int, ...]) -> dict:
    """What ``models.build_model`` gets: type, preset, the data's shape, then the user's overrides."""
    mc: dict = {"type": cfg.model, "preset": cfg.preset}
    if cfg.model == "mlp":
        mc["dim"] = int(np.prod(sample_shape))
    else:
        mc["in_channels"] = sample_shape[0]
        mc["sample_size"] = sample_shape[-1]
    mc.update(cfg.model_options)
    return mc


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA with bf16 support, fp16 on older CUDA; on the CPU bf16 where the CPU has
    native bf16 instructions, else fp32 ("no")."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "no"
    return "no"


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Native bf16 matrix instructions (x86 AVX512-BF16 or AMX-BF16), where emulated bf16 would be slower.
    Measured (docs/training.md): bf16 autocast trains the default U-Net about 1.3-1.8x faster on a Zen 4 CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(precision: str, device: torch.device):
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices and kernels (not biases, norms or embeddings' scales)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=1e-8)


def build_model(cfg: TrainConfig, sample_shape) -> tuple[torch.nn.Module, dict]:
    from .models import build_model as build

    torch.manual_seed(cfg.seed)  # the initial weights depend only on the seed
    model = build(model_config(cfg, sample_shape))
    return model, getattr(model, "build_config", model_config(cfg, sample_shape))


def weights_digest(module: torch.nn.Module) -> str:
    """A SHA-256 over a module's state: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving the broken state."""


# ---------------------------------------------------------------------------------------------
# The trainer

class Trainer:
    """Train ``cfg`` into ``run_dir`` (resuming it when it holds checkpoints). See :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, progress: bool = True,
                 accelerator=None, max_seconds: float | None = None):
        from accelerate import Accelerator

        self.cfg, self.run_dir, self.progress, self.max_seconds = cfg, Path(run_dir), progress, max_seconds
        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        self.device = self.acc.device
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        per_process = cfg.batch_size // cfg.grad_accum
        if per_process % self.world:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by grad_accum x processes "
                             f"= {cfg.grad_accum} x {self.world}")
        self.micro = per_process // self.world   # samples per process per micro-batch
        self.precision = resolve_precision(cfg.mixed_precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu" and self.acc.is_main_process:
            print("warning: fp16 on the CPU is slow and only useful to test the loss-scaler path; use bf16 or no")

        self.schedule = NoiseSchedule.from_name(cfg.schedule, cfg.num_timesteps,
                                                zero_terminal_snr=cfg.zero_terminal_snr)
        self.data = TrainingData(cfg)
        self.sample_shape = self.data.sample_shape
        model, self.model_config = build_model(cfg, self.sample_shape)
        self.ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)
        self.ema.module.to(self.device)
        self.model = self.acc.prepare(model)               # moved to the device; DDP-wrapped when several
        self.optimizer = make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self._stop_signal: int | None = None

    # -- the pieces of one step -------------------------------------------------------------
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def global_batch(self, step: int):
        """This process's share of the global batch of ``step``: (x0, t, noise), split in micro-batches."""
        cfg = self.cfg
        idx = batch_indices(step, cfg.batch_size, self.data.n, cfg.seed)
        t, noise, flips = step_noise(step, cfg.batch_size, self.sample_shape, cfg.num_timesteps, cfg.seed, cfg.flip)
        x0 = self.data.batch(idx)
        if flips is not None:
            x0 = torch.where(flips.reshape(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
        per_process = cfg.batch_size // self.world
        mine = slice(self.rank * per_process, (self.rank + 1) * per_process)
        x0, t, noise = x0[mine], t[mine], noise[mine]
        return [(x0[i:i + self.micro], t[i:i + self.micro], noise[i:i + self.micro])
                for i in range(0, per_process, self.micro)]

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns (mean loss over the global batch, gradient norm)."""
        cfg = self.cfg
        lr = learning_rate(step, cfg)
        # anything inside the model that draws from the global RNG (dropout) gets a stream fixed by
        # (seed, step, process): resumable, and independent across processes
        torch.manual_seed(int(seeded_generator(cfg.seed, step, self.rank, GLOBAL_RNG).initial_seed()))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        micro_batches = self.global_batch(step)
        total = torch.zeros((), device=self.device)
        for i, (x0, t, noise) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            with sync:
                with autocast(self.precision, self.device):
                    loss = diffusion_loss(self.model, x0.to(self.device), self.schedule, cfg.prediction,
                                          cfg.min_snr_gamma, t=t, noise=noise.to(self.device))
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        self.scaler.step(self.optimizer)   # skipped (and the scale lowered) on inf/NaN gradients under fp16
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.unwrapped)
        return total, grad_norm

    # -- run folder ---------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path | None:
        """Checkpoint the current step (main process writes; all processes wait for it)."""
        digests = self._gather_digests()
        path = None
        if self.acc.is_main_process:
            extra = {"model_config": self.model_config, "schedule": self.schedule.to_dict(),
                     "sample_shape": list(self.sample_shape), "num_threads": torch.get_num_threads(),
                     "num_processes": self.world, "precision": self.precision, "weights_digests": digests}
            path = save_checkpoint(self.checkpoint_dir, self.step, self.unwrapped, self.ema, self.optimizer,
                                   self.scaler, config=self.cfg.to_dict(), extra=extra,
                                   keep=self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def _gather_digests(self) -> list[dict]:
        """The model and EMA digests of every process; they must agree (checked at every checkpoint)."""
        mine = {"model": weights_digest(self.unwrapped), "ema": weights_digest(self.ema.module)}
        if self.world == 1:
            return [mine]
        from accelerate.utils import gather_object

        digests = gather_object([mine])
        if any(d != digests[0] for d in digests):
            raise RuntimeError(f"the processes' weights have drifted apart (digests {digests}); "
                               "this is a bug: please report it")
        return digests

    def resume(self) -> bool:
        """Load the newest checkpoint of the run folder, if any; returns whether it did."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        ckpt.restore(self.unwrapped, self.ema, self.optimizer, self.scaler, rng=True)
        self.step = ckpt.step
        threads = ckpt.state.get("extra", {}).get("num_threads")
        if threads is not None and threads != torch.get_num_threads() and self.acc.is_main_process:
            print(f"note: the run was checkpointed with {threads} threads and now runs with "
                  f"{torch.get_num_threads()}: losses will not match an uninterrupted run bit for bit")
        return True

    def _log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write_samples(self) -> Path:
        """A grid of ``sample_n`` EMA samples (fixed seeds, so grids of successive steps compare)."""
        trained = TrainedModel(self.ema.module, self.schedule, self.cfg.prediction, self.sample_shape,
                               self.cfg.to_dict(), self.step)
        x = generate(trained, self.cfg.sample_n, seed=0, sampler=self.cfg.sampler, steps=self.cfg.sample_steps,
                     device=self.device, sampler_options=self.cfg.sampler_options)
        return save_samples(x, self.run_dir / "samples" / f"step-{self.step:08d}.png",
                            title=f"{self.run_dir.name}, step {self.step}")

    def evaluate(self) -> dict:
        """evaluate.py's quick check on eval_n EMA samples (fixed seeds, the run's sampler)."""
        from .evaluate import evaluate_during_training

        cfg = self.cfg
        return evaluate_during_training(self.ema.module, self.schedule, cfg.prediction, cfg.data, n=cfg.eval_n,
                                        sample_shape=self.sample_shape, sampler=cfg.sampler, steps=cfg.sample_steps,
                                        image_size=cfg.image_size, channels=cfg.channels,
                                        sampler_options=cfg.sampler_options)

    # -- the loop -----------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _diverged_message(self, loss_value: float) -> str:
        last = latest_checkpoint(self.run_dir, verify=False)
        where = f"the last good checkpoint, {last.path}, is intact" if last else "no checkpoint was written yet"
        return (f"the loss is {loss_value} at step {self.step + 1}; stopped without saving ({where}). "
                f"Try a lower lr (now {self.cfg.lr}), grad_clip=1, mixed_precision=no or bf16 instead of fp16, "
                "and check that the data lies in [-1, 1] (`dforge train --overfit-batch` checks the pipeline).")

    def fit(self) -> dict:
        """Train to ``cfg.steps``. Returns a summary dict; raises :class:`TrainingDiverged` on NaN/inf.

        Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, return with
        ``summary["interrupted"] = True``; a second Ctrl-C stops at once. The same happens when
        ``max_seconds`` of training have passed (resume later to go on)."""
        cfg, main = self.cfg, self.acc.is_main_process
        resumed = self.resume()  # first: a checkpoint that does not fit the config leaves config.json alone
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", cfg.to_dict())
            self._truncate_metrics(self.step)
            if resumed:
                print(f"resuming {self.run_dir} from step {self.step}")
        start = self.step
        summary = {"run_dir": str(self.run_dir), "start_step": start, "interrupted": False,
                   "precision": self.precision}
        if main and start == 0:
            n_params = sum(p.numel() for p in self.unwrapped.parameters())
            print(f"training {cfg.model}/{cfg.preset} ({n_params / 1e6:.2f}M parameters) on {cfg.data} "
                  f"({self.data.n} items of shape {self.sample_shape}) for {cfg.steps} steps of batch "
                  f"{cfg.batch_size}; {self.world} process(es) on {self.device}, precision {self.precision}")
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread: no handlers
                handlers[sig] = signal.signal(sig, self._on_signal)
        bar = None
        if main and self.progress and start < cfg.steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1)
        stopping, t0 = False, time.perf_counter()
        window_loss, window_n, window_start = 0.0, 0, t0
        try:
            while self.step < cfg.steps:
                loss, grad_norm = self.train_step(self.step)
                out_of_time = self.max_seconds is not None and time.perf_counter() - t0 > self.max_seconds
                stop = torch.tensor([loss.item(), float(self._stop_signal is not None or out_of_time)])
                if self.world > 1:  # the mean loss over processes, and stop if any process was asked to
                    stop = self.acc.reduce(stop.to(self.device), reduction="sum").cpu()
                    stop[0] /= self.world
                loss_value, stopping = float(stop[0]), bool(stop[1] > 0)
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(self._diverged_message(loss_value))
                self.step += 1
                window_loss, window_n = window_loss + loss_value, window_n + 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or stopping:
                    now = time.perf_counter()
                    record = {"step": self.step, "loss": window_loss / window_n, "last_loss": loss_value,
                              "lr": learning_rate(self.step - 1, cfg), "grad_norm": float(grad_norm),
                              "images_per_s": window_n * cfg.batch_size / max(now - window_start, 1e-9),
                              "time": now - t0}
                    if self.precision == "fp16":
                        record["loss_scale"] = self.scaler.get_scale()
                    if main:
                        self._log(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                        bar.update(window_n)
                    window_loss, window_n, window_start = 0.0, 0, now
                if stopping:
                    break
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.steps and main:
                    self.write_samples()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps) and main:
                    self._log({"step": self.step, **self.evaluate()})
            summary["train_seconds"] = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            if self.step > start or latest_checkpoint(self.run_dir, verify=False) is None:
                self.save()
            if main:
                if self.step > start:
                    plot_loss(self.run_dir)
                if self.step >= cfg.steps and self.step > start:
                    summary["samples"] = str(self.write_samples())
            if stopping and self._stop_signal is None:
                summary["time_limit"] = True
                if main:
                    print(f"stopped at the time limit, step {self.step}: checkpoint saved in {self.checkpoint_dir}; "
                          "run the same command again to go on")
            elif stopping:
                summary["interrupted"] = True
                if main:
                    print(f"\ninterrupted at step {self.step}: checkpoint saved in {self.checkpoint_dir}; "
                          "run the same command again to resume")
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        summary.update(step=self.step, seconds=time.perf_counter() - t0)
        return summary


def train(cfg: TrainConfig, run_dir, progress: bool = True, max_seconds: float | None = None) -> dict:
    """Train (or resume) a run; the library entry point behind ``dforge train``."""
    return Trainer(cfg, run_dir, progress=progress, max_seconds=max_seconds).fit()


# ---------------------------------------------------------------------------------------------
# Sampling a trained model with per-image seeds, and the loss curve

@torch.no_grad()
def generate(trained: TrainedModel, n: int, seed: int = 0, sampler: str | None = "dpmpp_2m", steps: int = 20,
             batch_size: int = 256, device=None, **kwargs) -> torch.Tensor:
    """n samples; image i uses a CPU generator seeded with ``seed + i``, so an image depends on its
    seed only, not on ``n`` or ``batch_size``. Returns a float32 CPU tensor in the model's range."""
    from . import sample

    device = torch.device(device) if device is not None else next(trained.model.parameters()).device
    out = []
    for lo in range(0, n, batch_size):
        k = min(batch_size, n - lo)
        gens = [torch.Generator().manual_seed(seed + lo + i) for i in range(k)]
        x = sample(trained.model, trained.schedule, shape=(k, *trained.sample_shape), sampler=sampler, steps=steps,
                   prediction=trained.prediction, generator=gens, **kwargs)
        out.append(x.float().cpu())
    return torch.cat(out)


def save_samples(x: torch.Tensor, path, title: str = "") -> Path:
    """Images (N x C x H x W in [-1, 1]) as a grid; vectors (2-D toy data) as a scatter plot."""
    from .viz import _plt, save_figure, save_image_grid

    if x.ndim == 4:
        from .data import to_uint8

        return save_image_grid(to_uint8(x), path)
    plt = _plt()
    pts = x.reshape(len(x), -1).float().numpy()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(pts[:, 0], pts[:, 1 if pts.shape[1] > 1 else 0], s=4, alpha=0.6)
    ax.set(title=title, aspect="equal")
    return save_figure(fig, path)


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def plot_loss(run_dir, path=None) -> Path | None:
    """loss.png: the logged training loss against the step (log scale), with a smoothed curve."""
    from .viz import _plt, save_figure

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        return None
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 10:
        k = max(2, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, lw=1.8, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=f"Training loss: {Path(run_dir).name}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path or Path(run_dir) / "loss.png")


# ---------------------------------------------------------------------------------------------
# One-batch overfit: does the pipeline learn at all?

OVERFIT_RATIO = 0.1  # pass when the final loss is below this fraction of the initial loss


def overfit_batch(cfg: TrainConfig, steps: int = 300, batch_size: int = 16, progress: bool = True) -> dict:
    """Train on ONE fixed batch with fixed t and noise for ``steps`` steps (no warm-up, no EMA).

    A working model, data pipeline and loss memorise it: the loss must fall below OVERFIT_RATIO times
    its initial value. Returns {"passed", "initial", "final", "threshold", "verdict", "data_range"}."""
    torch.manual_seed(cfg.seed)
    schedule = NoiseSchedule.from_name(cfg.schedule, cfg.num_timesteps, zero_terminal_snr=cfg.zero_terminal_snr)
    data = TrainingData(cfg)
    batch_size = min(batch_size, data.n)
    g = seeded_generator(cfg.seed, 0, OVERFIT)
    x0 = data.batch(torch.randperm(data.n, generator=g)[:batch_size])
    t = torch.randint(0, cfg.num_timesteps, (batch_size,), generator=g).to(torch.float64)
    noise = torch.randn(x0.shape, generator=g)
    model, _ = build_model(cfg, data.sample_shape)
    opt = make_optimizer(model, cfg)
    for group in opt.param_groups:
        group["lr"] = cfg.lr
    losses = []
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, unit="step", desc="overfit one batch")
    for _ in iterator:
        loss = diffusion_loss(model, x0, schedule, cfg.prediction, cfg.min_snr_gamma, t=t, noise=noise)
        if not torch.isfinite(loss):
            losses.append(float("nan"))
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if progress:
            iterator.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    k = max(1, min(10, len(losses) // 10))
    initial, final = float(np.mean(losses[:k])), float(np.mean(losses[-k:]))
    threshold = OVERFIT_RATIO * initial
    lo, hi = float(x0.min()), float(x0.max())
    passed = math.isfinite(final) and final < threshold
    if passed:
        verdict = (f"PASS: the loss on one fixed batch fell from {initial:.4f} to {final:.4f}, below the threshold "
                   f"{threshold:.4f} ({OVERFIT_RATIO:g} x initial) in {len(losses)} steps: the model, data and loss "
                   "can learn. If samples are still noise: train longer, and sample with the same prediction and "
                   "schedule the model was trained with.")
    else:
        verdict = (f"FAIL: the loss on one fixed batch went from {initial:.4f} to {final:.4f}, not below "
                   f"{threshold:.4f} ({OVERFIT_RATIO:g} x initial) in {len(losses)} steps. Check the learning rate "
                   f"(lr={cfg.lr}), the model size, and the data range.")
    if lo < -1.01 or hi > 1.01 or lo >= -0.01:
        verdict += (f" WARNING: the data lies in [{lo:.3g}, {hi:.3g}]; diffusion models expect images scaled to "
                    "[-1, 1] (x / 127.5 - 1).")
    return {"passed": passed, "initial": initial, "final": final, "threshold": threshold, "verdict": verdict,
            "losses": losses, "data_range": [lo, hi]}
