"""The Denoiser: what a network carries, sigma per sample, the network call, wrappers (the pattern guidance
follows), the loss and the bound through it, and df.sample with a network that knows its training config."""
from __future__ import annotations

import math

import pytest
import torch

import diffusion_forge as df
from diffusion_forge.denoise.denoiser import DenoiserWrapper

torch.set_num_threads(1)
COSINE = df.NoiseSchedule.from_name("cosine", 100)
ZSNR = df.NoiseSchedule.from_name("linear", 100, beta_end=0.2, zero_terminal_snr=True)


class Net(torch.nn.Module):
    """A smooth toy network with one weight; records what it is called with."""

    def __init__(self, diffusion_config=None, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=dtype))
        if diffusion_config is not None:
            self.diffusion_config = diffusion_config
        self.calls = []

    def forward(self, x_t, t, class_labels=None):
        self.calls.append({"dtype": x_t.dtype, "t": t.clone(), "batch": len(x_t), "class_labels": class_labels})
        out = self.w * torch.tanh(x_t) + 0.3 * (t / 100).reshape(-1, *[1] * (x_t.ndim - 1))
        if class_labels is not None:
            out = out + 0.1 * class_labels.to(out).reshape(-1, *[1] * (x_t.ndim - 1))
        return out


def v_net(schedule=COSINE, **extra):
    return Net({"schedule": schedule.to_dict(), "prediction": "v_prediction", **extra})


def x_batch(n=4, seed=0):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# What the network carries

def test_schedule_prediction_and_null_cond_come_from_the_network():
    D = df.Denoiser(v_net(null_cond={"class_labels": 10}))
    assert D.prediction == "v_prediction" and D.null_cond == {"class_labels": 10}
    assert torch.equal(D.schedule.betas, COSINE.betas) and D.schedule.name == "cosine"
    assert df.Denoiser(v_net(), COSINE, "v_prediction").prediction == "v_prediction"   # agreeing: fine
    bare = df.Denoiser(Net(), COSINE)
    assert bare.prediction == "epsilon" and bare.null_cond is None and bare.sample_shape is None


def test_a_contradiction_with_the_network_is_an_error_naming_both():
    with pytest.raises(ValueError, match="prediction='epsilon' contradicts .*'v_prediction'"):
        df.Denoiser(v_net(), prediction="epsilon")
    with pytest.raises(ValueError, match=r"NoiseSchedule\('linear'.*contradicts .*NoiseSchedule\('cosine'"):
        df.Denoiser(v_net(), df.NoiseSchedule.from_name("linear", 100))
    with pytest.raises(ValueError, match="pass schedule="):
        df.Denoiser(Net())
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction"):
        df.Denoiser(Net(), COSINE, "eps")


# ---------------------------------------------------------------------------------------------
# sigma per sample, the network call

def test_sigma_per_sample_equals_one_call_per_sigma_and_maps_to_t():
    net = Net()
    D = df.Denoiser(net, COSINE, "v_prediction")
    x, sigma = x_batch(), torch.tensor([0.05, 1.0, 7.0, 300.0], dtype=torch.float64)
    x0 = D(x, sigma)
    torch.testing.assert_close(net.calls[0]["t"], COSINE.t_for_sigma(sigma).float(), rtol=0, atol=0)
    for i in range(4):
        torch.testing.assert_close(x0[i:i + 1], D(x[i:i + 1], float(sigma[i])), rtol=0, atol=1e-12)
        torch.testing.assert_close(x0[i:i + 1], D(x[i:i + 1], sigma[i]), rtol=0, atol=1e-12)  # 0-d tensor
    # D(x, sigma) = predict_x0(x_t, sigma) with x_t = x / sqrt(1 + sigma^2); the x0 of the v prediction
    x_t = x / (1 + sigma**2).sqrt()[:, None]
    ab = (1 / (1 + sigma**2))[:, None]
    v = Net.forward(net, x_t.float(), COSINE.t_for_sigma(sigma).float()).double()
    torch.testing.assert_close(x0, ab.sqrt() * x_t - (1 - ab).sqrt() * v)
    assert D.nfe == 9
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \(batch,\) = \(4,\)"):
        D(x, torch.ones(3))


def test_network_is_called_in_its_dtype_and_returns_in_the_callers():
    net = Net(dtype=torch.float64)
    D = df.Denoiser(net, COSINE)
    assert D.model_dtype == torch.float64
    out = D.network(torch.zeros(2, 3, dtype=torch.float32), torch.tensor([3.0, 4.0]))
    assert net.calls[-1]["dtype"] == torch.float64 and out.dtype == torch.float32
    assert df.Denoiser(Net(), COSINE).model_dtype == torch.float32
    assert df.Denoiser(lambda x, t: x, COSINE, model_dtype=torch.float64).model_dtype == torch.float64


def test_sigma_inf_takes_x_as_x_t_and_refuses_epsilon():
    D = df.Denoiser(Net(), ZSNR, "v_prediction")
    x = x_batch()
    torch.testing.assert_close(D(x, math.inf), D.predict_x0(x, math.inf))
    torch.testing.assert_close(D(x, math.inf), -Net.forward(D.model, x.float(), torch.full((4,), 99.0)).double())
    with pytest.raises(ValueError, match="v_prediction.*karras"):
        df.Denoiser(Net(), ZSNR, "epsilon")(x, math.inf)


# ---------------------------------------------------------------------------------------------
# Wrappers

def test_clip_and_dynamic_threshold():
    D = df.Denoiser(lambda x_t, t: 3 * x_t, COSINE, "sample", model_dtype=torch.float64)
    x = x_batch(6) * 2
    torch.testing.assert_close(df.ClipX0(D, 0.5)(x, 0.1), D(x, 0.1).clamp(-0.5, 0.5))
    raw = D(x, 0.1)
    s = raw.abs().quantile(0.8, dim=1).clamp(1.0, 2.5)[:, None]
    torch.testing.assert_close(df.DynamicThreshold(D, 0.8, 2.5)(x, 0.1), raw.clamp(-s, s) / s)
    assert df.DynamicThreshold(D, 0.8)(x, 0.1).abs().max() <= 1 + 1e-12
    with pytest.raises(ValueError, match="quantile in \\(0, 1\\]"):
        df.DynamicThreshold(D, 1.5)
    with pytest.raises(ValueError, match="> 0"):
        df.ClipX0(D, 0)
    with pytest.raises(ValueError, match="wraps a Denoiser"):
        df.ClipX0(lambda x, t: x)


def test_wrappers_delegate_to_the_inner_denoiser():
    D = df.Denoiser(v_net(null_cond={"class_labels": 3}), sample_shape=(3,))
    D.step = 12                                    # what a run loader attaches stays visible through wrappers
    W = df.DynamicThreshold(df.ClipX0(D, 2.0), 0.9)
    assert (W.schedule, W.prediction, W.sample_shape, W.null_cond, W.model, W.step) == \
        (D.schedule, "v_prediction", (3,), {"class_labels": 3}, D.model, 12)
    W(x_batch(), 1.0)
    assert W.nfe == D.nfe == 1
    W.nfe = 0
    assert D.nfe == 0 and W.network(torch.zeros(1, 3), torch.zeros(1)).shape == (1, 3)
    assert list(W.parameters()) == list(D.parameters()) and not W.eval().inner.training
    x, sigma = x_batch(), torch.tensor([0.3, 1.0, 2.0, 9.0], dtype=torch.float64)   # both paths agree
    torch.testing.assert_close(W(x, sigma), W.predict_x0(x / (1 + sigma**2).sqrt()[:, None], sigma))


class Guided(DenoiserWrapper):
    """The pattern the guidance wrappers follow: one inner call on a doubled batch with a cond dict,
    x0 = x0_null + scale (x0_cond - x0_null)."""

    def __init__(self, inner, scale):
        super().__init__(inner)
        self.scale = scale

    def predict_x0(self, x_t, sigma, **cond):
        n = len(x_t)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(n)
        both = {k: torch.cat([v, torch.full_like(v, self.null_cond[k])]) for k, v in cond.items()}
        x0 = self.inner.predict_x0(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]), **both)
        return x0[n:] + self.scale * (x0[:n] - x0[n:])


def test_a_guidance_like_wrapper_calls_the_inner_denoiser_with_a_doubled_batch():
    D = df.Denoiser(Net({"schedule": ZSNR.to_dict(), "prediction": "v_prediction",
                         "null_cond": {"class_labels": 5}}))
    G = Guided(D, 2.0)
    x, y = x_batch(), torch.tensor([0, 1, 2, 3])
    out = G(x, 0.7, class_labels=y)
    assert D.nfe == 1 and D.model.calls[-1]["batch"] == 8
    cond, null = D(x, 0.7, class_labels=y), D(x, 0.7, class_labels=torch.full_like(y, 5))
    torch.testing.assert_close(out, null + 2.0 * (cond - null))
    # every sampler runs it, from sigma = inf (zero-terminal SNR) too, with the cond dict
    for name in ("euler", "dpmpp_2m", "heun", "euler_ancestral"):
        xs = df.sample(G, shape=(4, 3), sampler=name, steps=5, cond={"class_labels": y},
                       generator=torch.Generator().manual_seed(0))
        assert xs.shape == (4, 3) and torch.isfinite(xs).all()
    assert all(c["batch"] == 8 and c["class_labels"].tolist() == [0, 1, 2, 3, 5, 5, 5, 5] for c in D.model.calls[3:])


# ---------------------------------------------------------------------------------------------
# df.sample with a network that knows its training config

def test_a_network_with_a_diffusion_config_samples_as_what_it_was_trained_for():
    net = v_net()
    kw = dict(shape=(5, 3), sampler="dpmpp_2m", steps=6)
    carried = df.sample(net, **kw, generator=torch.Generator().manual_seed(1))
    through_d = df.sample(df.Denoiser(net), **kw, generator=torch.Generator().manual_seed(1))
    bare = Net()
    bare.load_state_dict(net.state_dict())
    explicit = df.sample(bare, COSINE, **kw, prediction="v_prediction", generator=torch.Generator().manual_seed(1))
    as_eps = df.sample(bare, COSINE, **kw, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(carried, through_d, rtol=0, atol=0)
    torch.testing.assert_close(carried, explicit, rtol=0, atol=0)
    assert (carried - as_eps).abs().max() > 0.1                 # what the silent epsilon default used to give
    with pytest.raises(ValueError, match="prediction='epsilon' contradicts"):
        df.sample(net, shape=(2, 3), sampler="euler", steps=3, prediction="epsilon")
    with pytest.raises(ValueError, match="prediction='epsilon' contradicts the denoiser"):
        df.sample(df.Denoiser(net), shape=(2, 3), sampler="euler", steps=3, prediction="epsilon")


def test_sample_takes_cond_as_one_dict_and_wrappers_as_arguments():
    net = Net()
    y = torch.tensor([1, 2])
    df.sample(net, COSINE, (2, 3), sampler="euler", steps=2, cond={"class_labels": y})
    assert all(torch.equal(c["class_labels"], y) for c in net.calls)
    with pytest.raises(ValueError, match="cond must be a dict"):
        df.sample(net, COSINE, (2, 3), sampler="euler", steps=2, cond=y)
    with pytest.raises(ValueError, match="not both"):
        df.sample(net, COSINE, (2, 3), sampler="euler", steps=2, clip_x0=True, dynamic_threshold=0.9)
    with pytest.raises(ValueError, match="shape= is required"):
        df.sample(df.Denoiser(net, COSINE), sampler="euler", steps=2)
    seen = []
    df.sample(df.Denoiser(net, COSINE), shape=(2, 3), sampler="euler", steps=3, clip_x0=0.05, callback=seen.append)
    assert all(c["x0"].abs().max() <= 0.05 + 1e-7 for c in seen)


# ---------------------------------------------------------------------------------------------
# The loss and the bound through the Denoiser

def test_loss_through_a_denoiser_equals_the_networks_and_takes_cond():
    net, x0 = Net(), torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    y = torch.arange(6)
    kw = dict(min_snr_gamma=5.0, reduction="none")
    a = df.diffusion_loss(net, x0, COSINE, "v_prediction", generator=torch.Generator().manual_seed(3), **kw,
                          cond={"class_labels": y})
    assert torch.equal(net.calls[-1]["class_labels"], y)
    b = df.diffusion_loss(df.Denoiser(net, COSINE, "v_prediction"), x0, generator=torch.Generator().manual_seed(3),
                          class_labels=y, **kw)                              # keyword conditioning still works
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    no_labels = df.diffusion_loss(net, x0, COSINE, "v_prediction", generator=torch.Generator().manual_seed(3), **kw)
    assert not torch.allclose(a, no_labels)
    carried = df.diffusion_loss(v_net(), x0, generator=torch.Generator().manual_seed(3), **kw)
    with pytest.raises(ValueError, match="contradicts"):
        df.diffusion_loss(v_net(), x0, COSINE, "sample")
    assert carried.shape == (6,) and a.requires_grad


def test_bound_through_a_denoiser_equals_the_networks():
    sched = df.NoiseSchedule.from_name("linear", 20)
    net, x0 = Net(), torch.rand(3, 4, generator=torch.Generator().manual_seed(4)) * 2 - 1
    a = df.variational_bound(net, x0, sched, "sample", generator=torch.Generator().manual_seed(5))
    b = df.variational_bound(df.Denoiser(net, sched, "sample"), x0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = df.variational_bound_mc(df.Denoiser(net, sched, "sample"), x0, num_t=5,
                                generator=torch.Generator().manual_seed(5), cond={"class_labels": torch.ones(3)})
    assert c.shape == (3,) and net.calls[-1]["class_labels"] is not None
