"""Where and how a run computes: the device and processes, mixed precision, the optimiser and its lr.

Mixed precision: ``no`` (fp32), ``bf16`` (autocast; weights, optimiser, EMA and the loss stay float32),
``fp16`` (autocast and a GradScaler) or ``auto`` (bf16 where the hardware has it, else fp16 on old GPUs,
else fp32). The learning rate of optimiser step s (0-based), with W warm-up steps and S steps in all:

    lr_s = lr (s + 1) / W                                               s < W   (linear warm-up)
    lr_s = lr                                                           constant
    lr_s = min_lr + (lr - min_lr) (1 + cos(pi p)) / 2,  p = (s - W) / (S - W)    cosine
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from .config import Config


def make_accelerator(device_spec: str = "auto"):
    """An ``accelerate.Accelerator`` on the run's device (run.device, checked by ``device.resolve_device``).
    Under ``accelerate launch`` / ``torchrun`` each process gets its own device from its rank."""
    from accelerate import Accelerator

    from ..device import resolve_device

    device = resolve_device(device_spec)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device.index)
    return Accelerator(cpu=device.type == "cpu", mixed_precision="no")


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


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices and kernels (not biases, norms or embeddings' scales)."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # torch's fused kernel updates every tensor in one pass: the same update rule, about 7% off a CPU training
    # step of the default recipe (docs/performance.md); it takes float parameters on the CPU and CUDA
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in decay + rest)
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=1e-8, fused=fused)


def learning_rate(step: int, cfg) -> float:
    """lr for optimiser step ``step`` (0-based), see the module docstring; ``cfg`` a Config or its optim section."""
    o = getattr(cfg, "optim", cfg)
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.lr_schedule == "constant":
        return o.lr
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def clip_gradients(params: list, max_norm: float) -> torch.Tensor:
    """The global gradient norm ||g||_2 over ``params``, after scaling g by min(1, max_norm / ||g||) when
    max_norm > 0 (the norm returned is the one before clipping)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
