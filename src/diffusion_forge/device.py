"""The one device and dtype resolution: what `--device` means, and where a network's tensors live."""
from __future__ import annotations

import torch

DEVICE_KINDS = ("cpu", "cuda", "mps")


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """``None`` or "auto": CUDA when present, else Apple MPS when present, else the CPU. Otherwise "cpu",
    "cuda", "cuda:N" or "mps", checked against this machine (ValueError naming the fix when absent)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {spec!r}; use one of: auto, cpu, cuda, cuda:N, mps") from None
    if device.type not in DEVICE_KINDS:
        raise ValueError(f"unsupported device {spec!r}; use one of: auto, cpu, cuda, cuda:N, mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: this PyTorch build has no CUDA or no GPU is visible "
                             f"(torch {torch.__version__}); use --device cpu, or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ValueError(f"--device {spec}: Apple MPS is not available on this machine; use --device cpu")
    return device


def model_device_dtype(model, device=None, dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """Where a network's parameters live and their floating dtype (CPU / float32 for a plain function),
    unless given explicitly."""
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None and param.is_floating_point() else torch.float32)
    return device, dtype
