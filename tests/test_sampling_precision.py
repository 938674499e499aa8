"""Sampling under bf16 autocast (``precision=`` of df.sample / generate, ``dforge sample --precision``): only the
network's forward runs in bf16, the sampler's state and arithmetic keep their float64 working dtype, a seed
gives the same sample whatever the batch, and bad values are one clear error.

Tolerance of bf16 against fp32: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.002 per value), and
the error of each network evaluation passes through the sampler's steps. On the tiny U-Net below (8 steps,
samples of size ~1) we allow a mean |bf16 - fp32| of 0.01 and a maximum of 0.05 (measured: ~0.0025 and
~0.013), i.e. under 1 % of the distance between samples of two different seeds (~1.2); and require a mean
difference above 1e-4, so bf16 really ran (fp32 run twice is bit-identical)."""
from __future__ import annotations

import time

import pytest
import torch
from test_cli import image_run  # noqa: F401  (the module's tiny digits run, trained in a second)

import diffusion_forge as df
from diffusion_forge.cli import main
from diffusion_forge.denoise.denoiser import DenoiserWrapper
from diffusion_forge.models import build_model
from diffusion_forge.sampling.generate import generate
from diffusion_forge.training.precision import resolve_precision

torch.set_num_threads(1)
COSINE = df.NoiseSchedule.from_name("cosine", 1000)
KW = dict(sampler="dpmpp_2m", steps=8)


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model({"preset": "tiny", "sample_size": 8, "in_channels": 1}).eval()


def denoiser(net) -> df.Denoiser:
    return df.Denoiser(net, COSINE, "v_prediction", sample_shape=(1, 8, 8))


def watch_convs(net) -> list:
    """The dtype of every Conv2d output of ``net`` (the activations autocast puts in bf16), as they happen."""
    seen = []
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


class HandAutocast(torch.nn.Module):
    """The second computation: the same network with its forward wrapped in torch.autocast by hand."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x_t, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.net(x_t, t)


def test_bf16_is_the_autocast_forward_and_stays_close_to_fp32():
    net = tiny_unet()
    D = denoiser(net)
    seen = watch_convs(net)
    fp32 = generate(D, 8, seed=0, **KW)
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    bf16 = generate(D, 8, seed=0, precision="bf16", **KW)
    assert set(seen) == {torch.bfloat16}                               # autocast really ran inside the network
    assert bf16.dtype == torch.float32 and D.autocast_dtype is None    # returned in float32; switched off after
    # bit for bit the network wrapped in autocast by hand, sampled at precision "no"
    hand = generate(denoiser(HandAutocast(net)), 8, seed=0, **KW)
    assert torch.equal(bf16, hand)
    diff = (bf16 - fp32).abs()
    assert 1e-4 < diff.mean() < 0.01 and diff.max() < 0.05, (diff.mean(), diff.max())
    other_seed = generate(D, 8, seed=100, **KW)
    assert diff.mean() < 0.01 * (other_seed - fp32).abs().mean()
    assert torch.equal(generate(D, 8, seed=0, **KW), fp32)            # fp32 itself is deterministic


class Recorder(DenoiserWrapper):
    """Records the dtype of the state the sampler passes in and of the x0 it gets back."""

    def __init__(self, inner):
        super().__init__(inner)
        self.seen = []

    def predict_x0(self, x_t, sigma, **cond):
        x0 = self.inner.predict_x0(x_t, sigma, **cond)
        self.seen.append((x_t.dtype, x0.dtype))
        return x0


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m", "unipc", "heun"])
def test_the_sampler_state_keeps_its_working_dtype(sampler):
    net = tiny_unet()
    inputs = []
    net.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].dtype))
    R = Recorder(denoiser(net))
    x = df.sample(R, shape=(3, 1, 8, 8), sampler=sampler, steps=4, generator=torch.Generator().manual_seed(0),
                  precision="bf16")
    assert x.dtype == torch.float32
    assert R.seen and set(R.seen) == {(torch.float64, torch.float64)}   # x and x0 in the CPU working dtype
    assert set(inputs) == {torch.float32}                                # the network gets its own dtype in


def test_a_seed_gives_the_same_sample_whatever_the_batch_under_bf16():
    D = denoiser(tiny_unet())
    kw = dict(sampler="euler_ancestral", steps=6, sampler_options={"eta": 1.0}, precision="bf16")
    a = generate(D, 5, seed=7, batch_size=5, **kw)
    b = generate(D, 5, seed=7, batch_size=2, **kw)
    c = generate(D, 2, seed=10, batch_size=1, **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(c, a[3:], atol=1e-5, rtol=0)
    one = df.sample(D, shape=(1, 1, 8, 8), generator=[torch.Generator().manual_seed(9)],
                    sampler="euler_ancestral", steps=6, eta=1.0, precision="bf16")
    torch.testing.assert_close(a[2:3], one, atol=1e-5, rtol=0)


def test_every_network_of_a_wrapped_denoiser_runs_under_autocast():
    main_net, weak_net = tiny_unet(0), tiny_unet(1)
    seen_main, seen_weak = watch_convs(main_net), watch_convs(weak_net)
    D = df.AutoGuidance(denoiser(main_net), denoiser(weak_net), scale=2.0)
    df.sample(D, shape=(2, 1, 8, 8), sampler="euler", steps=2, precision="bf16")
    assert set(seen_main) == set(seen_weak) == {torch.bfloat16}
    assert D.inner.autocast_dtype is None and D.weaker.autocast_dtype is None
    # a diffusers scheduler's loop calls the same network: autocast there too
    from diffusers import DDIMScheduler

    seen_main.clear()
    inner = denoiser(main_net)
    df.sample(inner, shape=(2, 1, 8, 8), steps=2, precision="bf16",
              scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"))
    assert set(seen_main) == {torch.bfloat16} and inner.autocast_dtype is None


def test_autocast_is_switched_off_after_a_failure():
    class Boom(torch.nn.Module):
        def forward(self, x_t, t):
            raise RuntimeError("boom")

    D = denoiser(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        df.sample(D, shape=(1, 1, 8, 8), sampler="euler", steps=2, precision="bf16")
    assert D.autocast_dtype is None


def test_bad_precision_is_one_clear_value_error():
    D = denoiser(tiny_unet())
    with pytest.raises(ValueError, match="precision='fp16' runs on CUDA only, and this is cpu"):
        generate(D, 2, precision="fp16", **KW)
    with pytest.raises(ValueError, match="unknown precision 'half'; choose one of: no .*bf16, fp16 .*auto"):
        df.sample(D, shape=(1, 1, 8, 8), precision="half", **KW)
    # auto: bf16 where training's resolve_precision says so (a CPU with native bf16), else fp32
    auto = generate(D, 2, seed=0, precision="auto", **KW)
    expected = "bf16" if resolve_precision("auto", torch.device("cpu")) == "bf16" else "no"
    assert torch.equal(auto, generate(D, 2, seed=0, precision=expected, **KW))


def test_dforge_sample_precision(image_run, tmp_path, capsys):  # noqa: F811
    import numpy as np

    def images(precision):
        out = tmp_path / f"{precision}.npz"
        assert main(["sample", str(image_run), "--n", "6", "--steps", "3", "--out", str(out),
                     "--precision", precision]) == 0
        return np.load(out)["images"].astype(int), capsys.readouterr().out

    fp32, said = images("no")
    assert "float32" in said
    bf16, said = images("bf16")
    assert "bf16 autocast" in said
    assert bf16.shape == fp32.shape == (6, 8, 8, 1)
    assert np.abs(bf16 - fp32).max() <= 8                                # of 255 levels
    assert main(["sample", str(image_run), "--out", str(tmp_path / "h.npz"), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--precision: precision='fp16' runs on CUDA only" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "h.npz").exists()


def test_the_progress_bar_counts_every_step_of_every_batch(capsys):
    D = denoiser(tiny_unet())
    generate(D, 5, seed=0, sampler="euler", steps=3, batch_size=2, progress=True, precision="bf16")
    err = capsys.readouterr().err
    assert "sampling:" in err and "3/9" in err and "9/9" in err and "samples=5/5" in err   # 3 batches x 3 steps

    def slow(x_t, t):   # slower than tqdm's refresh interval (0.1 s): every step shows
        time.sleep(0.12)
        return 0.1 * x_t
    generate(df.Denoiser(slow, COSINE, sample_shape=(2,)), 2, sampler="euler", steps=3, progress=True)
    err = capsys.readouterr().err
    assert "1/3" in err and "2/3" in err                                   # within one batch, step by step
