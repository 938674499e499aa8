"""diffusers schedulers through df.sample(..., scheduler=...)."""
from __future__ import annotations

import pytest
import torch

import diffusion_forge as df

import diffusers  # noqa: E402  (a core dependency: never skipped)
torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers vs numpy 2
SCHED = df.NoiseSchedule.from_name("scaled_linear", 1000, 0.00085, 0.012)


def model(x_t, t):
    """A smooth deterministic toy epsilon-model, per sample."""
    return 0.9 * x_t + 0.1 * torch.tanh(x_t * (t[:, None] / 1000 + 0.5))


def config(**kw):
    return {**{k: v for k, v in SCHED.to_diffusers_config().items() if k != "rescale_betas_zero_snr"}, **kw}


def test_scheduler_runs_its_own_loop_and_is_not_mutated():
    sched = diffusers.DDIMScheduler(**config(clip_sample=False))
    seen = []
    x = df.sample(model, SCHED, (3, 4), scheduler=sched, steps=7, generator=torch.Generator().manual_seed(0),
                  callback=seen.append)
    assert x.shape == (3, 4) and torch.isfinite(x).all()
    assert len(seen) == 7 and seen[0]["t"] > seen[-1]["t"] and seen[-1]["x0"].shape == (3, 4)
    assert sched.num_inference_steps is None          # the caller's scheduler was copied, not set up


def test_scheduler_noise_is_per_sample():
    sched = diffusers.EulerAncestralDiscreteScheduler(**config())
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    big = df.sample(model, SCHED, (4, 3), scheduler=sched, steps=8, generator=gens([1, 2, 3, 4]))
    small = df.sample(model, SCHED, (2, 3), scheduler=sched, steps=8, generator=gens([4, 2]))
    torch.testing.assert_close(small, big[[3, 1]], atol=1e-5, rtol=0)


def test_scheduler_errors():
    sched = diffusers.DDIMScheduler(**config(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="prediction_type='v_prediction'"):
        df.sample(model, SCHED, (2, 3), scheduler=sched, steps=5)
    with pytest.raises(ValueError, match="not both"):
        df.sample(model, SCHED, (2, 3), sampler="euler", scheduler=sched, steps=5, prediction="v_prediction")
    with pytest.raises(ValueError, match="steps must be"):
        df.sample(model, SCHED, (2, 3), scheduler=sched, steps=0, prediction="v_prediction")


def test_scheduler_takes_a_denoiser_and_cond_with_the_samplers_callback_contract():
    sched = diffusers.DDIMScheduler(**config(clip_sample=False))
    seen, calls = [], []

    def cond_model(x_t, t, class_labels):
        calls.append(class_labels)
        return model(x_t, t) + 0.01 * class_labels[:, None]
    D = df.Denoiser(cond_model, SCHED)
    y = torch.tensor([1, 2, 3])
    x = df.sample(D, shape=(3, 4), scheduler=sched, steps=5, generator=torch.Generator().manual_seed(0),
                  cond={"class_labels": y}, callback=seen.append)
    assert x.shape == (3, 4) and D.nfe == 5 and all(torch.equal(c, y) for c in calls)
    assert [sorted(c) for c in seen] == [["sigma", "step", "t", "x0", "x_t"]] * 5
    assert all(c["sigma"] == pytest.approx(float(SCHED.sigma_at(c["t"]))) for c in seen)
    # a scheduler that reports no pred_original_sample: x0 from the network's output at t
    seen.clear()
    df.sample(D, shape=(3, 4), scheduler=diffusers.PNDMScheduler(**config(skip_prk_steps=True)), steps=4,
              cond={"class_labels": y}, callback=seen.append)
    assert all(c["x0"] is not None and c["x0"].shape == (3, 4) for c in seen)
    with pytest.raises(ValueError, match="needs one of our samplers"):
        df.sample(df.ClipX0(D), shape=(3, 4), scheduler=sched, steps=5)
    with pytest.raises(ValueError, match="clip_x0 / dynamic_threshold"):
        df.sample(D, shape=(3, 4), scheduler=sched, steps=5, clip_x0=True)
