"""Guidance wrappers: classifier-free guidance, classifier guidance and autoguidance, as denoisers over denoisers.

Each is a :class:`DenoiserWrapper`: it implements ``predict_x0(x_t, sigma, **cond)`` over its inner denoiser(s)
and inherits ``forward(x, sigma, **cond)`` (x_t = x / sqrt(1 + sigma^2); x_t = x at sigma = inf, the start of
a zero-terminal-SNR schedule), so every sampler runs every wrapper and they compose with each other and with
:class:`ClipX0` / :class:`DynamicThreshold` (put those outermost: ``ClipX0(ClassifierFreeGuidance(D, 3))``).

The convention of every scale w: guided = unguided + w (guiding - unguided), so w = 1 is the model without
guidance and w = 0 the unguided / weaker branch. The combinations are computed as
``torch.lerp(unguided, guiding, w)``, which is exact at w = 0 and w = 1 (and when both branches are equal).
"""
from __future__ import annotations

import math

import torch

from ..device import model_device_dtype
from .denoiser import DenoiserBase, DenoiserWrapper, _rows, sigma_batch

__all__ = ["ClassifierFreeGuidance", "ClassifierGuidance", "AutoGuidance", "rescale_guidance", "num_classes_of",
           "check_class_labels", "check_scale", "check_interval"]


def check_scale(scale, what: str = "guidance scale") -> float:
    """A finite number >= 0 (0: the unguided branch, 1: no guidance)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (1: no guidance, 0: the unguided branch), "
                         f"got {scale!r}")
    return float(scale)


def check_interval(interval) -> tuple[float, float] | None:
    """None (guide at every sigma) or (sigma_lo, sigma_hi) with 0 <= sigma_lo < sigma_hi (sigma_hi may be inf)."""
    if interval is None:
        return None
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be a pair (sigma_lo, sigma_hi), e.g. (0.3, 5.0), got "
                         f"{interval!r}") from None
    if not (0 <= lo < hi) or math.isnan(hi):
        raise ValueError(f"guidance interval (sigma_lo, sigma_hi) needs 0 <= sigma_lo < sigma_hi, got ({lo}, {hi})")
    return lo, hi


def num_classes_of(D) -> int | None:
    """K, the number of classes a denoiser's network knows: ``D.num_classes`` (set by the run loader), else the
    null class id of ``D.null_cond`` (the null id is K); None when unknown."""
    k = getattr(D, "num_classes", None)
    if isinstance(k, int) and not isinstance(k, bool) and k > 0:
        return k
    null = getattr(D, "null_cond", None) or {}
    k = null.get("class_labels") if isinstance(null, dict) else None
    if isinstance(k, torch.Tensor) and k.numel() == 1:
        k = int(k)
    return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None


def check_class_labels(labels, num_classes: int | None, allow_null: bool = False, what: str = "the model") -> None:
    """Class ids must lie in [0, K) (or [0, K] with ``allow_null``: K is the null class, i.e. unconditional)."""
    if labels is None or num_classes is None:
        return
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"class_labels must be integer class ids, got dtype {labels.dtype}")
    if labels.numel() == 0:
        return
    top = num_classes if allow_null else num_classes - 1
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > top:
        bad = lo if lo < 0 else hi
        null = f" ({num_classes} is the null class: unconditional)" if allow_null else ""
        raise ValueError(f"class id {bad} is out of range: {what} knows classes 0..{num_classes - 1}{null}; "
                         f"pass class ids in that range")


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4), exactly diffusers' ``rescale_noise_cfg``: the guided
    prediction's std (per sample, over all other dims, unbiased) is rescaled to the conditional one's and mixed
    in by ``rescale``: out = r * guided * std(cond) / std(guided) + (1 - r) * guided."""
    dims = list(range(1, cond.ndim))
    std_cond, std_guided = cond.std(dim=dims, keepdim=True), guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return rescale * rescaled + (1 - rescale) * guided


def _per_sample(value, n: int, what: str) -> torch.Tensor | None:
    """A cond value as n rows (a 0-d tensor or number broadcast to (n,), a (1, ...) tensor expanded), or None
    for a value that is not per-sample (passed as it is)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = torch.tensor(value)
    if not isinstance(value, torch.Tensor):
        return None
    if value.ndim == 0:
        return value.expand(n)
    if value.shape[0] == n:
        return value
    if value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    raise ValueError(f"{what} must hold one value per sample (batch {n}), got shape {tuple(value.shape)}")


def _doubled_cond(cond: dict, null_cond: dict, n: int) -> dict:
    """The cond of the doubled batch [cond; null]: null_cond's keys replaced in the second half, every other
    per-sample value repeated. A null value with one dimension less than the cond's (e.g. the empty prompt's
    token states (L, D) against the prompts' (n, L, D)) is one value for every sample; a number or a 0-d tensor
    too; otherwise it holds one row per sample (or one row, expanded)."""
    missing = [k for k in null_cond if k not in cond]
    if missing:
        raise ValueError(f"classifier-free guidance needs the condition to guide towards: pass cond with "
                         f"{', '.join(repr(k) for k in missing)} (e.g. cond={{'class_labels': labels}})")
    out = {}
    for key, value in cond.items():
        rows = _per_sample(value, n, f"cond[{key!r}]")
        if key in null_cond:
            if rows is None:
                raise ValueError(f"cond[{key!r}] must be a tensor (one value per sample) to be guided")
            value_null = null_cond[key]
            if isinstance(value_null, torch.Tensor) and 1 <= value_null.ndim == rows.ndim - 1:
                null = value_null.unsqueeze(0).expand(n, *value_null.shape)   # one (L, D) for all samples
            else:
                null = _per_sample(value_null, n, f"null_cond[{key!r}]")
            if null is None:
                kind = type(null_cond[key]).__name__
                raise ValueError(f"null_cond[{key!r}] must be a tensor or a number, got {kind}")
            out[key] = torch.cat([rows, null.to(rows.device, rows.dtype)])
        else:
            out[key] = value if rows is None else torch.cat([rows, rows])
    return out


class ClassifierFreeGuidance(DenoiserWrapper):
    """Classifier-free guidance (Ho & Salimans 2022) on the network's own prediction (eps, v or x_0):

        pred = pred_uncond + w (pred_cond - pred_uncond)        (w = 1: conditional, w = 0: unconditional)

    with both branches in ONE network call on the doubled batch [x_t; x_t] with cond [cond; null_cond].
    x_0 is then the x_0 of ``pred``; the map prediction -> x_0 is affine with the same coefficients for both
    branches, so this equals x0_uncond + w (x0_cond - x0_uncond) unless ``rescale`` > 0.

    null_cond: the unconditional condition, default ``D.null_cond`` (what the network was trained with under
        condition dropout; e.g. ``{"class_labels": K}``). None is an error: train with conditioning.dropout > 0.
    rescale: guidance rescale r in [0, 1] (Lin et al. 2023), exactly diffusers' ``rescale_noise_cfg`` on the
        raw predictions (:func:`rescale_guidance`); 0 is plain CFG.
    interval: (sigma_lo, sigma_hi): guide only where sigma_lo < sigma <= sigma_hi (Kynkaanniemi et al. 2024),
        elsewhere w = 1, the conditional prediction (one undoubled call when no sample of the batch is inside).
    Class ids of cond["class_labels"] must be in [0, K) when K is known (``D.num_classes`` or the null id).
    """

    def __init__(self, inner: DenoiserBase, scale: float, null_cond: dict | None = None, rescale: float = 0.0,
                 interval: tuple[float, float] | None = None):
        super().__init__(inner)
        self.scale = check_scale(scale)
        null_cond = null_cond if null_cond is not None else inner.null_cond
        if not null_cond:
            raise ValueError("this model was trained without a null condition, so classifier-free guidance has no "
                             "unconditional branch: train it with conditioning.dropout > 0 (e.g. --set "
                             "conditioning.dropout=0.1), or pass null_cond=")
        if not isinstance(null_cond, dict):
            raise ValueError(f"null_cond must be a dict of the network's keyword arguments (e.g. {{'class_labels': "
                             f"10}}), got {type(null_cond).__name__}")
        self.null_cond = dict(null_cond)
        if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale <= 1:
            raise ValueError(f"guidance rescale must be a number in [0, 1] (0: plain CFG, 0.7: Lin et al.'s "
                             f"choice), got {rescale!r}")
        self.rescale = float(rescale)
        self.interval = check_interval(interval)

    def guided(self, sigma: torch.Tensor) -> torch.Tensor:
        """Which samples are guided: sigma_lo < sigma <= sigma_hi (all without an interval); (batch,) bool."""
        if self.interval is None:
            return torch.ones_like(sigma, dtype=torch.bool)
        lo, hi = self.interval
        return (sigma > lo) & (sigma <= hi)

    def predict_x0(self, x_t: torch.Tensor, sigma, **cond) -> torch.Tensor:
        n = x_t.shape[0]
        sigma = sigma_batch(sigma, n)
        check_class_labels(cond.get("class_labels"), num_classes_of(self.inner))
        inside = self.guided(sigma)
        if not bool(inside.any()):  # outside the interval: the conditional prediction
            return self.inner.predict_x0(x_t, sigma, **cond)
        pred = self.inner.predict_raw(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]),
                                      **_doubled_cond(cond, self.null_cond, n))  # one call, batch doubled
        pred_cond, pred_uncond = pred[:n], pred[n:]
        w = _rows(torch.where(inside, torch.full_like(sigma, self.scale), torch.ones_like(sigma)), pred)
        guided = torch.lerp(pred_uncond, pred_cond, w)  # pred_uncond + w (pred_cond - pred_uncond)
        if self.rescale > 0:
            rescaled = rescale_guidance(guided, pred_cond, self.rescale)
            guided = torch.where(inside.to(pred.device).reshape(-1, *[1] * (pred.ndim - 1)), rescaled, guided)
        return self.inner.x0_from_prediction(guided, x_t, sigma)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, null_cond={self.null_cond}, rescale={self.rescale}, interval={self.interval}"


class ClassifierGuidance(DenoiserWrapper):
    """Classifier guidance (Dhariwal & Nichol 2021) with a noise-aware classifier ``classifier(x_t, t) -> logits``
    trained on x_t of D's schedule (t = schedule.t_for_sigma(sigma), float32 (batch,), as the network's):

        x0_hat = D(x, sigma) + s * sigma^2 / sqrt(1 + sigma^2) * grad_{x_t} log p(y | x_t),    y = cond["class_labels"].

    Derivation, in sigma space x = x_0 + sigma eps: Tweedie's formula gives E[x_0 | x] = x + sigma^2 grad_x log p(x),
    i.e. score = (x0_hat - x) / sigma^2; conditioning on y adds grad_x log p(y | x) to the score (Bayes), scaled by
    s, so x0_hat gains s sigma^2 grad_x log p(y | x). x = x_t sqrt(1 + sigma^2) is a bijection at fixed sigma, so
    p(y | x) = p(y | x_t) and grad_x = grad_{x_t} / sqrt(1 + sigma^2). (With alpha_bar = 1 / (1 + sigma^2) the
    coefficient is (1 - alpha_bar) / sqrt(alpha_bar): the same as guided-diffusion's
    eps_hat = eps - sqrt(1 - alpha_bar) grad log p(y | x_t).) At sigma = inf (SNR 0) x_t = eps carries no
    information about x_0, so p(y | x_t) = p(y) and the guidance term is 0 there: the classifier is not called.

    The gradient is taken under ``torch.enable_grad()`` (sampling runs under no_grad) wrt x_t in the classifier's
    dtype (its parameters', float32 for a plain function, as the network's) and returned in x_t's. Labels are for
    the classifier only: an unconditional D (no null condition and no classes) does not receive them. Class ids
    must be in [0, number of logits). Put it over CFG, not under: ``ClassifierGuidance(CFG(D), classifier, s)``.
    """

    def __init__(self, inner: DenoiserBase, classifier, scale: float):
        super().__init__(inner)
        if not callable(classifier):
            raise ValueError(f"classifier must be a noise-aware classifier(x_t, t) -> logits, got "
                             f"{type(classifier).__name__} (load one with load_classifier(path))")
        self.classifier = classifier
        self.scale = check_scale(scale, "classifier guidance scale")

    def grad_log_prob(self, x_t: torch.Tensor, sigma, labels: torch.Tensor) -> torch.Tensor:
        """grad_{x_t} log p(y | x_t) per sample (in x_t's dtype), p = softmax(classifier(x_t, t))."""
        sigma = sigma_batch(sigma, x_t.shape[0])
        param = next(iter(self.classifier.parameters()), None) if isinstance(self.classifier, torch.nn.Module) else None
        device = x_t.device if param is None else param.device
        dtype = model_device_dtype(self.classifier)[1]  # its parameters' dtype, float32 for a plain function
        t = self.schedule.t_for_sigma(sigma).to(torch.float32).to(device)
        labels = torch.as_tensor(labels).to(device).long().reshape(-1)
        if labels.shape[0] != x_t.shape[0]:
            raise ValueError(f"class_labels must hold one class per sample ({x_t.shape[0]}), got {labels.shape[0]}")
        with torch.enable_grad():
            x = x_t.detach().to(device, dtype).requires_grad_(True)
            logits = self.classifier(x, t)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(f"the classifier must return logits of shape (batch, classes), got "
                                 f"{tuple(logits.shape)}")
            check_class_labels(labels, logits.shape[1], what="the classifier")
            log_p = torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).sum()  # sum_i log p(y_i | x_t_i)
            (grad,) = torch.autograd.grad(log_p, x)
        return grad.to(x_t.device, x_t.dtype)

    def predict_x0(self, x_t: torch.Tensor, sigma, **cond) -> torch.Tensor:
        labels = cond.get("class_labels")
        if labels is None:
            raise ValueError("classifier guidance needs the class to guide towards: pass cond={'class_labels': y} "
                             "(dforge sample --class K)")
        conditional = self.inner.null_cond is not None or num_classes_of(self.inner) is not None
        inner_cond = cond if conditional else {k: v for k, v in cond.items() if k != "class_labels"}
        x0 = self.inner.predict_x0(x_t, sigma, **inner_cond)
        sigma = sigma_batch(sigma, x_t.shape[0])
        finite = torch.isfinite(sigma)
        if self.scale == 0 or not bool(finite.any()):  # at SNR 0 the guidance term is 0 (see above)
            return x0
        s = torch.where(finite, sigma, torch.zeros_like(sigma))
        coef = self.scale * s * s / (1 + s * s).sqrt()  # s * sigma^2 / sqrt(1 + sigma^2)
        return x0 + _rows(coef, x0) * self.grad_log_prob(x_t, s, labels)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class AutoGuidance(DenoiserWrapper):
    """Autoguidance (Karras et al. 2024): guide a model with a weaker version of itself (an earlier snapshot,
    a smaller run), both given the same cond and the same (x_t, sigma):

        x0 = x0_weak + w (x0_main - x0_weak)        (w = 1: the main model; weaker == main: the identity)

    Either side may itself be wrapped (e.g. ``AutoGuidance(CFG(D), CFG(weak))``, or CFG on top)."""

    def __init__(self, inner: DenoiserBase, weaker: DenoiserBase, scale: float):
        super().__init__(inner)
        if not isinstance(weaker, DenoiserBase):
            raise ValueError(f"the weaker model must be a Denoiser, got {type(weaker).__name__} (e.g. "
                             "load_guide_snapshot(run) or load_model_from_run(run, step=...))")
        a, b = inner.sample_shape, weaker.sample_shape
        if a is not None and b is not None and tuple(a) != tuple(b):
            raise ValueError(f"the weaker model makes samples of shape {tuple(b)}, the main one {tuple(a)}: guide "
                             "with a model of the same data")
        self.weaker = weaker
        self.scale = check_scale(scale, "autoguidance scale")

    def predict_x0(self, x_t: torch.Tensor, sigma, **cond) -> torch.Tensor:
        x0_main = self.inner.predict_x0(x_t, sigma, **cond)
        x0_weak = self.weaker.predict_x0(x_t, sigma, **cond)
        return torch.lerp(x0_weak, x0_main.to(x0_weak.dtype), self.scale)  # x0_weak + w (x0_main - x0_weak)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
