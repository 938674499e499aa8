"""The restructure reproduces the numbers of the code before it (tests/fixtures/golden_v1.npz, made by
tests/fixtures/make_golden.py at commit 825424d): the denoiser's x0 for every prediction type and schedule
end (1e-7, float64), the loss on a fixed batch and seed (1e-6), and every sampler's samples for a fixed toy
model and seed (1e-6), with and without a wrapper that leaves x0 unchanged.

Regenerated on purpose (issue 13, tests/fixtures/regen_pndm_deis.py): the 8 entries ``samples/pndm/*/default/*``
and ``samples/deis/*``. pndm's Runge-Kutta stages on the default (timestep) grids now sit at the timestep
midpoint t - delta/2 (F-PNDM, diffusers' PNDMScheduler) instead of the sigma average, and deis lowers its
order on the last steps of a grid of fewer than 15 steps (diffusers' lower_order_final), so both now equal
diffusers (tests/test_sampler_parity.py). Every other entry, pndm's on Karras' grid included, is the old code's."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusion_forge as df
from diffusion_forge.sampling.registry import SAMPLERS

GOLDEN = np.load(Path(__file__).parent / "fixtures" / "golden_v1.npz")
SCHEDULES = {"cosine": df.NoiseSchedule.from_name("cosine"), "linear": df.NoiseSchedule.from_name("linear"),
             "zsnr": df.NoiseSchedule.from_name("scaled_linear", zero_terminal_snr=True)}


def toy_model(x_t, t, class_labels=None):
    """A fixed smooth function of (x_t, t): deterministic, no weights (the same in every version).
    Copied from tests/fixtures/make_golden.py."""
    tt = t.double().reshape(-1, *[1] * (x_t.ndim - 1)) / 1000.0
    out = torch.sin(1.3 * x_t.double()) * (0.6 + 0.4 * tt) + 0.2 * torch.cos(3.0 * tt) - 0.1 * x_t.double() * tt
    if class_labels is not None:
        out = out + 0.05 * class_labels.double().reshape(-1, *[1] * (x_t.ndim - 1))
    return out.to(x_t.dtype)


def close(mine: torch.Tensor, key: str, atol: float) -> None:
    want = torch.from_numpy(GOLDEN[key])
    torch.testing.assert_close(mine.to(want.dtype), want, atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


DENOISER_KEYS = sorted(k for k in GOLDEN.files if k.startswith("denoiser/"))
LOSS_KEYS = sorted(k for k in GOLDEN.files if k.startswith("loss/"))
SAMPLE_KEYS = sorted(k for k in GOLDEN.files if k.startswith("samples/"))


def test_every_golden_array_is_checked():
    assert len(DENOISER_KEYS) == 3 * 3 * 3 + 2 and len(LOSS_KEYS) == 12
    assert len(SAMPLE_KEYS) == 14 * 5 + 6 and {k.split("/")[1] for k in SAMPLE_KEYS} == set(SAMPLERS)


@pytest.mark.parametrize("key", DENOISER_KEYS)
def test_denoiser_x0_equals_the_old_wrapper(key):
    _, sname, pred, label = key.split("/")
    sigma = float(GOLDEN[f"denoiser_sigma/{sname}/{pred}/{label}"])
    x = torch.from_numpy(GOLDEN["denoiser_x"])
    D = df.Denoiser(toy_model, SCHEDULES[sname], pred, model_dtype=torch.float64)
    x0 = D.predict_x0(x, sigma) if math.isinf(sigma) else D(x, sigma)
    close(x0, key, 1e-7)
    # the same through a wrapper that leaves x0 unchanged, with sigma as a per-sample float64 tensor
    W = df.ClipX0(D, 1e9)
    per_sample = torch.full((len(x),), sigma, dtype=torch.float64)
    close(W.predict_x0(x, per_sample) if math.isinf(sigma) else W(x, per_sample), key, 1e-7)
    if math.isinf(sigma):   # D(x, inf) takes x as x_t itself
        close(D(x, sigma), key, 1e-7)
    assert W.nfe == D.nfe == (3 if math.isinf(sigma) else 2)


@pytest.mark.parametrize("key", LOSS_KEYS)
def test_loss_through_the_denoiser_equals_the_old_loss(key):
    _, sname, pred, gamma = key.split("/")
    gamma = None if gamma == "None" else float(gamma)
    x0 = torch.from_numpy(GOLDEN["loss_x0"])
    old_call = df.diffusion_loss(toy_model, x0, SCHEDULES[sname], pred, min_snr_gamma=gamma,
                                 generator=torch.Generator().manual_seed(3), reduction="none")
    close(old_call, key, 1e-6)
    D = df.Denoiser(toy_model, SCHEDULES[sname], pred)
    via_denoiser = df.diffusion_loss(D, x0, min_snr_gamma=gamma, generator=torch.Generator().manual_seed(3),
                                     reduction="none")
    close(via_denoiser, key, 1e-6)


def _case(key):
    """(sampler, schedule name, grid, prediction, extra sample() arguments) of a golden samples key."""
    name, sname, grid, pred, *extra = key.split("/")[1:]
    kwargs = {"clip_x0": {"clip_x0": True}, "dynamic_threshold": {"dynamic_threshold": 0.9},
              "class_labels": {"cond": {"class_labels": torch.tensor([0, 1, 2])}}}
    return name, sname, grid, pred, kwargs[extra[0]] if extra else {}


def _gens():
    return [torch.Generator().manual_seed(10 + i) for i in range(3)]


@pytest.mark.parametrize("key", SAMPLE_KEYS)
def test_every_sampler_gives_the_old_samples(key):
    name, sname, grid, pred, extra = _case(key)
    sched = SCHEDULES[sname]
    x = df.sample(toy_model, sched, (3, 2, 4, 4), sampler=name, steps=6, prediction=pred, generator=_gens(),
                  sigmas=grid, dtype=torch.float64, **extra)
    close(x, key, 1e-6)
    # a Denoiser in place of the network and schedule, under a wrapper that leaves x0 unchanged
    D = df.Denoiser(toy_model, sched, pred, model_dtype=torch.float64)
    wrapped = df.ClipX0(D, 1e9)
    cond = extra.pop("cond", None)
    y = df.sample(wrapped, shape=(3, 2, 4, 4), sampler=name, steps=6, generator=_gens(), sigmas=grid, cond=cond,
                  **extra)
    assert y.dtype == torch.float64
    close(y, key, 1e-6)
