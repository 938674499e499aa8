"""The denoiser: the one object that training, sampling and guidance meet at.

In sigma space (Karras et al. 2022) the state is

    x = x_t / sqrt(alpha_bar) = x_0 + sigma * eps,        alpha_bar = 1 / (1 + sigma^2),

and a network ``model(x_t, t, **cond)`` trained on a discrete :class:`NoiseSchedule` with a prediction type
("epsilon", "sample" or "v_prediction") is seen through D(x, sigma, **cond) ~ E[x_0 | x]. :class:`Denoiser` is
the single place where sigma maps to (x_t, t) (t = schedule.t_for_sigma(sigma): fractional, log-sigma
interpolation, per sample) and a prediction maps to x_0 (:func:`process.to_x0_eps`); all sigma arithmetic is
float64. At sigma = inf (SNR 0, a zero-terminal-SNR start) no sigma-space state exists: x is then x_t itself.

Wrappers are denoisers over denoisers (:class:`ClipX0`, :class:`DynamicThreshold`; the guidance wrappers
follow the same pattern): each implements ``predict_x0(x_t, sigma, **cond)`` in terms of its inner
denoiser's, and inherits ``forward`` (the x -> x_t map) from :class:`DenoiserBase`, so both paths agree.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from ..core.process import check_prediction, check_prediction_at_snr0, convert, to_x0_eps
from ..core.schedules import NoiseSchedule
from ..device import model_device_dtype

F64 = torch.float64
SNR0_HINT = ("; or sample with sigmas='karras' / 'exponential', which start at a finite sigma_max")

__all__ = ["DenoiserBase", "Denoiser", "DenoiserWrapper", "ClipX0", "DynamicThreshold", "as_denoiser",
           "sigma_batch", "network_autocast"]


def sigma_batch(sigma, batch: int) -> torch.Tensor:
    """sigma as a float64 CPU tensor of shape (batch,): a Python float or 0-d tensor broadcasts."""
    s = sigma.detach().to("cpu", F64) if isinstance(sigma, torch.Tensor) else torch.tensor(sigma, dtype=F64)
    if s.ndim == 0:
        return s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape (batch,) = ({batch},), got {tuple(s.shape)}")
    return s


def _rows(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A float64 (batch,) coefficient cast once to x's dtype and broadcast against x."""
    return c.to(x.dtype).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))


def _cond_to(cond: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cond.items()}


class DenoiserBase(torch.nn.Module):
    """What every denoiser shares: D(x, sigma, **cond) = predict_x0(x_t, sigma, **cond) with
    x_t = x sqrt(alpha_bar) = x / sqrt(1 + sigma^2), and x_t = x where sigma = inf."""

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """x_0 for x = x_0 + sigma eps; sigma a float64 (batch,) tensor or a scalar (+inf: x is x_t)."""
        sigma = sigma_batch(sigma, x.shape[0])
        root = torch.where(torch.isinf(sigma), torch.ones_like(sigma), (1 + sigma * sigma).sqrt())
        return self.predict_x0(x / _rows(root, x), sigma, **cond)  # x_t = x / sqrt(1 + sigma^2)

    def predict_x0(self, x_t: torch.Tensor, sigma, **cond) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_raw(self, x_t: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """This denoiser's x_0 re-expressed as its ``prediction`` type (eps / v / x_0) at (x_t, sigma): the raw
        prediction of a wrapper, which classifier-free guidance combines (a Denoiser returns its network's)."""
        x0 = self.predict_x0(x_t, sigma, **cond)
        return self.prediction_from_x0(x0, x_t, sigma)

    def prediction_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
        """The prediction of type ``self.prediction`` that x_0 at (x_t, sigma) corresponds to
        (:func:`process.convert` from "sample": eps = (x_t - sqrt(alpha_bar) x_0) / sqrt(1 - alpha_bar))."""
        alpha_bar = snr0_checked_alpha_bar(self.prediction, sigma_batch(sigma, x_t.shape[0]))
        return convert(x0, "sample", self.prediction, x_t, alpha_bar)

    def x0_from_prediction(self, pred: torch.Tensor, x_t: torch.Tensor, sigma) -> torch.Tensor:
        """x_0 implied by a raw prediction of type ``self.prediction`` at (x_t, sigma) (:func:`process.to_x0_eps`
        at alpha_bar = 1 / (1 + sigma^2); 0 at sigma = inf). The map is affine in ``pred`` with coefficients
        that depend on (x_t, sigma) only, so it commutes with affine combinations of predictions."""
        alpha_bar = snr0_checked_alpha_bar(self.prediction, sigma_batch(sigma, x_t.shape[0]))
        return to_x0_eps(pred, self.prediction, x_t, alpha_bar)[0]


def snr0_checked_alpha_bar(prediction: str, sigma: torch.Tensor) -> torch.Tensor:
    """alpha_bar = 1 / (1 + sigma^2) per sample (0 at sigma = inf), refusing epsilon prediction at SNR 0."""
    alpha_bar = torch.where(torch.isinf(sigma), torch.zeros_like(sigma), 1 / (1 + sigma * sigma))
    check_prediction_at_snr0(prediction, bool((alpha_bar == 0).any()), SNR0_HINT)
    return alpha_bar


class Denoiser(DenoiserBase):
    """D(x, sigma, **cond) -> x_0 over a network ``model(x_t, t, **cond)`` (t float32 (batch,) in [0, T-1]).

    ``schedule`` and ``prediction`` default to what the network carries in ``model.diffusion_config``
    (``{"schedule": NoiseSchedule.to_dict(), "prediction": str, "null_cond": dict}``, set by the trainer and
    the run loader); an explicit one that contradicts it is a ValueError. A bare network: prediction
    "epsilon" (as diffusers), schedule required. ``model_dtype``: the dtype the network is called in
    (default: its parameters', else float32). ``nfe`` counts network evaluations (one per batch call).
    ``autocast_dtype``: None (the network runs in ``model_dtype``), or torch.bfloat16 / torch.float16: the
    network's forward runs under ``torch.autocast`` in that dtype, its output still returned in x_t's dtype,
    so everything around it (sigmas, the samplers' updates, the noise) keeps its own precision; set it for
    one call with :func:`network_autocast` (``df.sample(..., precision="bf16")`` does).
    """

    def __init__(self, model: Callable, schedule: NoiseSchedule | None = None, prediction: str | None = None, *,
                 sample_shape=None, model_dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(model, DenoiserBase):
            raise ValueError("model is already a Denoiser; pass it to df.sample / a wrapper as it is")
        if not callable(model):
            raise ValueError(f"model must be a network model(x_t, t, **cond), got {type(model).__name__}")
        carried = getattr(model, "diffusion_config", None) or {}
        own_schedule = carried.get("schedule")
        if isinstance(own_schedule, dict):
            own_schedule = NoiseSchedule.from_dict(own_schedule)
        own_prediction = carried.get("prediction")
        if schedule is None and own_schedule is None:
            raise ValueError("this network carries no diffusion_config, so the schedule it was trained on is "
                             "unknown: pass schedule= (e.g. df.NoiseSchedule.from_name('cosine'))")
        if schedule is not None and own_schedule is not None and not same_schedule(schedule, own_schedule):
            raise ValueError(f"schedule {schedule!r} contradicts the network's own {own_schedule!r} (from its "
                             "diffusion_config, the schedule it was trained with); leave schedule unset to use it")
        if prediction is not None and own_prediction is not None and prediction != own_prediction:
            raise ValueError(f"prediction={prediction!r} contradicts the network's own prediction "
                             f"{own_prediction!r} (from its diffusion_config, what it was trained to predict); "
                             "leave prediction unset to use it")
        self.model = model
        self.schedule = schedule if schedule is not None else own_schedule
        self.prediction = check_prediction(prediction or own_prediction or "epsilon")
        self.null_cond = carried.get("null_cond")
        shape = sample_shape if sample_shape is not None else carried.get("sample_shape")
        self.sample_shape = tuple(int(v) for v in shape) if shape is not None else None
        self.model_dtype = model_device_dtype(model, None, model_dtype)[1]
        self.autocast_dtype: torch.dtype | None = None
        self.nfe = 0

    def network(self, x_t: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The network's raw output (its prediction type) at x_t and timestep t, called in ``model_dtype``
        (under ``torch.autocast`` in ``autocast_dtype`` when set) and returned in x_t's dtype."""
        self.nfe += 1
        amp = (contextlib.nullcontext() if self.autocast_dtype is None
               else torch.autocast(x_t.device.type, dtype=self.autocast_dtype))
        with amp:
            out = self.model(x_t.to(self.model_dtype), t, **_cond_to(cond, x_t.device))
        return out.to(x_t.dtype)

    def predict_x0(self, x_t: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """x_0 from the network's own input x_t at noise level sigma (per sample; +inf: SNR 0):
        alpha_bar = 1 / (1 + sigma^2), t = schedule.t_for_sigma(sigma), x_0 = to_x0_eps(network(x_t, t))."""
        return self.x0_from_prediction(self.predict_raw(x_t, sigma, **cond), x_t, sigma)

    def predict_raw(self, x_t: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """The network's raw prediction at x_t and noise level sigma: network(x_t, t = schedule.t_for_sigma(sigma))."""
        sigma = sigma_batch(sigma, x_t.shape[0])
        snr0_checked_alpha_bar(self.prediction, sigma)  # refuse eps at SNR 0 before calling the network
        t = self.schedule.t_for_sigma(sigma).to(torch.float32).to(x_t.device)
        return self.network(x_t, t, **cond)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, prediction={self.prediction!r}"


@contextlib.contextmanager
def network_autocast(denoiser: DenoiserBase, dtype: torch.dtype | None):
    """For the duration of the block, every :class:`Denoiser` inside ``denoiser`` (the wrapped ones, a guiding
    model's too) calls its network under ``torch.autocast(dtype)`` (None: as it is); restored after."""
    nets = [m for m in denoiser.modules() if isinstance(m, Denoiser)]
    before = [m.autocast_dtype for m in nets]
    try:
        for m in nets:
            m.autocast_dtype = dtype
        yield denoiser
    finally:
        for m, old in zip(nets, before):
            m.autocast_dtype = old


def same_schedule(a: NoiseSchedule, b: NoiseSchedule) -> bool:
    """Two schedules describe the same training process: equal length and betas (to 1e-12 relative)."""
    return a.num_timesteps == b.num_timesteps and bool(torch.allclose(a.betas, b.betas, rtol=1e-12, atol=0))


# ---------------------------------------------------------------------------------------------
# Wrappers: denoisers over denoisers

class DenoiserWrapper(DenoiserBase):
    """A denoiser over an inner one. Subclasses implement ``predict_x0`` through ``self.inner.predict_x0``
    (or ``self.inner(x, sigma, **cond)``, with any batch and cond: guidance doubles the batch). Every other
    attribute (schedule, prediction, sample_shape, null_cond, nfe, network, model, model_dtype, and whatever
    a loader attached) is the inner denoiser's."""

    def __init__(self, inner: DenoiserBase):
        super().__init__()
        if not isinstance(inner, DenoiserBase):
            raise ValueError(f"{type(self).__name__} wraps a Denoiser; got {type(inner).__name__} (build one with "
                             "df.Denoiser(model, schedule, prediction))")
        self.inner = inner

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules ("inner")
        except AttributeError:
            if name.startswith("__") or name == "inner":
                raise
            return getattr(super().__getattr__("inner"), name)

    @property
    def nfe(self) -> int:
        return self.inner.nfe

    @nfe.setter
    def nfe(self, value: int) -> None:
        self.inner.nfe = value


class ClipX0(DenoiserWrapper):
    """x_0 clamped to [-value, value] (DDPM's clip_sample)."""

    def __init__(self, inner: DenoiserBase, value: float = 1.0):
        super().__init__(inner)
        if isinstance(value, bool) or not value > 0:
            raise ValueError(f"ClipX0 value must be a number > 0, got {value!r}")
        self.value = float(value)

    def predict_x0(self, x_t: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self.inner.predict_x0(x_t, sigma, **cond).clamp(-self.value, self.value)

    def extra_repr(self) -> str:
        return f"value={self.value}"


class DynamicThreshold(DenoiserWrapper):
    """Dynamic thresholding (Saharia et al. 2022, Imagen): s = the ``quantile`` of |x_0| per sample, clamped
    to [1, max_value]; x_0 <- clamp(x_0, -s, s) / s."""

    def __init__(self, inner: DenoiserBase, quantile: float, max_value: float = math.inf):
        super().__init__(inner)
        if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile <= 1:
            raise ValueError(f"dynamic_threshold must be a quantile in (0, 1], got {quantile!r}")
        if not max_value >= 1:
            raise ValueError(f"dynamic threshold max_value must be >= 1, got {max_value!r}")
        self.quantile, self.max_value = float(quantile), float(max_value)

    def predict_x0(self, x_t: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x0 = self.inner.predict_x0(x_t, sigma, **cond)
        s = x0.abs().reshape(x0.shape[0], -1).quantile(self.quantile, dim=1).clamp(1.0, self.max_value)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return x0.clamp(-s, s) / s  # x_0 <- clamp(x_0, -s, s) / s

    def extra_repr(self) -> str:
        return f"quantile={self.quantile}, max_value={self.max_value}"


# ---------------------------------------------------------------------------------------------

def as_denoiser(model, schedule: NoiseSchedule | None = None, prediction: str | None = None, *,
                model_dtype: torch.dtype | None = None, sample_shape=None) -> DenoiserBase:
    """A (wrapped) Denoiser as it is (an explicit schedule / prediction must agree with it; a loaded run is
    one), or a network made into a Denoiser."""
    if isinstance(model, DenoiserBase):
        if schedule is not None and not same_schedule(schedule, model.schedule):
            raise ValueError(f"schedule {schedule!r} contradicts the denoiser's own {model.schedule!r}; "
                             "pass schedule=None with a Denoiser")
        if prediction is not None and prediction != model.prediction:
            raise ValueError(f"prediction={prediction!r} contradicts the denoiser's own prediction "
                             f"{model.prediction!r}; pass prediction=None with a Denoiser")
        return model
    return Denoiser(model, schedule, prediction, sample_shape=sample_shape, model_dtype=model_dtype)
