"""Pretrained diffusers pipelines as Denoisers: loading, parity with the pipelines' own calls, guidance,
`dforge generate`, fine-tuning (model.init_from) and bad input.

Tiny pipelines are built offline with random weights (interop/tiny.py) and saved with save_pretrained.
Parity: our samplers against the diffusers pipeline's own ``__call__`` with the matching scheduler, the same
seeds (one generator per image) and the same sigmas: max |difference| of the [0, 1] images <= 1e-4
(pixels, float32 networks; measured ~1e-6) and <= 2e-4 after the VAE (measured ~1e-6).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_forge.cli import main
from diffusion_forge.interop.pipeline_sampling import sample_ours
from diffusion_forge.interop.pipelines import load_pipeline
from diffusion_forge.interop.tiny import save_tiny_ddpm, save_tiny_sd

import diffusers  # noqa: E402  (a core dependency)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
PIXEL_TOL, LATENT_TOL = 1e-4, 2e-4


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    return save_tiny_ddpm(tmp_path_factory.mktemp("ddpm") / "pipe")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def sd(sd_dir):
    return load_pipeline(sd_dir), diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, use_safetensors=True)


def gens(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def unit(x):  # our [-1, 1] NCHW -> diffusers' [0, 1] NHWC
    return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_ddpm_pipeline_becomes_a_denoiser(ddpm_dir):
    import diffusion_forge as df

    D = load_pipeline(ddpm_dir)
    sched = diffusers.DDPMScheduler.from_pretrained(ddpm_dir / "scheduler")
    assert D.pipeline_kind == "DDPMPipeline" and D.vae is None and D.text_encoder is None and D.null_cond is None
    assert D.prediction == "epsilon" and D.sample_shape == (3, 8, 8)
    torch.testing.assert_close(D.schedule.alphas_cumprod.float(), sched.alphas_cumprod, rtol=1e-5, atol=0)  # float32 cumprod
    assert set(D.state_dict()) == {f"model.backbone.{k}" for k in D.pipeline.unet.state_dict()}
    x = df.sample(D, shape=(2, 3, 8, 8), sampler="euler", steps=3)          # any of our samplers runs on it
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


@pytest.mark.parametrize("ours, theirs, config", [
    ("ddim", "DDIMScheduler", {"timestep_spacing": "trailing"}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
])
def test_pixel_parity_with_the_pipeline(ddpm_dir, ours, theirs, config):
    D = load_pipeline(ddpm_dir)
    pipe = diffusers.DDPMPipeline.from_pretrained(ddpm_dir, use_safetensors=True)
    pipe.scheduler = getattr(diffusers, theirs).from_config(pipe.scheduler.config, **config)
    pipe.set_progress_bar_config(disable=True)
    # 5 steps: DDIMScheduler steps back by T // steps, which is the trailing grid only where steps divides T
    want = pipe(batch_size=3, generator=gens(5, 3), num_inference_steps=5, output_type="np").images
    got = unit(sample_ours(D, 3, seed=5, sampler=ours, steps=5))
    assert want.std() > 0.05
    np.testing.assert_allclose(got, want, atol=PIXEL_TOL, rtol=0)


SD_CASES = [  # (our sampler, spacing, diffusers scheduler, its config overrides)
    ("dpmpp_2m", "trailing", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    # sigma-space schedulers start from sigma_max z with trailing spacing; on "leading" both start at x_t = z
    ("euler", "leading", "EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 0}),
    ("ddim", "trailing", "DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False,
                                          "set_alpha_to_one": True}),
]


@pytest.mark.parametrize("ours, spacing, theirs, config", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_stable_diffusion_parity(sd, ours, spacing, theirs, config):
    D, pipe = sd
    pipe.scheduler = getattr(diffusers, theirs).from_config(pipe.scheduler.config, **config)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(["a red cat", "a red cat"], negative_prompt=["blurry"] * 2, guidance_scale=7.5, num_inference_steps=5,
                generator=gens(3, 2), output_type="np").images
    got = unit(sample_ours(D, 2, seed=3, sampler=ours, steps=5, spacing=spacing, prompt="a red cat",
                           negative_prompt="blurry", guidance_scale=7.5))
    assert want.shape == (2, 16, 16, 3) and want.std() > 0.01
    np.testing.assert_allclose(got, want, atol=LATENT_TOL, rtol=0)


def test_guidance_scale_and_negative_prompt_change_the_output_as_in_diffusers(sd):
    D, pipe = sd
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    ours, theirs = {}, {}
    for w, neg in [(1.0, None), (7.5, None), (7.5, "blurry")]:
        theirs[w, neg] = pipe(["a cat"], negative_prompt=None if neg is None else [neg], guidance_scale=w,
                              num_inference_steps=4, generator=gens(0, 1), output_type="np").images
        ours[w, neg] = unit(sample_ours(D, 1, seed=0, sampler="dpmpp_2m", steps=4, prompt="a cat",
                                        negative_prompt=neg, guidance_scale=w))
        np.testing.assert_allclose(ours[w, neg], theirs[w, neg], atol=LATENT_TOL, rtol=0)
    for a, b in [((1.0, None), (7.5, None)), ((7.5, None), (7.5, "blurry"))]:
        assert np.abs(theirs[a] - theirs[b]).max() > 100 * LATENT_TOL    # a real change, which ours follows
        assert np.abs(ours[a] - ours[b]).max() > 100 * LATENT_TOL


def test_text_encoder_equals_encode_prompt_and_null_cond_is_the_empty_prompt(sd):
    D, pipe = sd
    theirs, _ = pipe.encode_prompt(["a cat", "dog"], "cpu", 1, False)
    torch.testing.assert_close(D.text_encoder.encode(["a cat", "dog"]), theirs, atol=0, rtol=0)
    empty, _ = pipe.encode_prompt([""], "cpu", 1, False)
    torch.testing.assert_close(D.null_cond["encoder_hidden_states"], empty[0], atol=0, rtol=0)   # (L, D)
    assert type(D.vae).__name__ == "AutoencoderKL" and D.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    assert D.sample_shape == (4, 8, 8) and D.guidance_scale == 7.5


def test_dforge_generate_loads_both_pipelines(ddpm_dir, sd_dir, tmp_path, capsys):
    out = tmp_path / "ddpm.png"
    assert main(["generate", "--model", str(ddpm_dir), "--n", "2", "--steps", "3", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    assert out.is_file() and np.load(tmp_path / "ddpm.npz")["images"].shape == (2, 8, 8, 3)
    assert "DDPMPipeline" in capsys.readouterr().out
    # Stable Diffusion: our ddim and the pipeline's own loop with DDIMScheduler give the same images
    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    common = ["--model", str(sd_dir), "--prompt", "a cat", "--negative-prompt", "blurry", "--n", "2", "--steps", "4",
              "--guidance-scale", "5", "--no-progress", "--device", "cpu"]
    assert main(["generate", *common, "--sampler", "ddim", "--out", str(ours)]) == 0
    printed = capsys.readouterr().out
    assert "ddim, 4 steps" in printed and "guidance 5" in printed and " s;" in printed
    assert main(["generate", *common, "--scheduler", "DDIMScheduler", "--scheduler-options",
                 "timestep_spacing=trailing,clip_sample=false,set_alpha_to_one=true", "--out", str(theirs)]) == 0
    a, b = (np.load(p.with_suffix(".npz"))["images"].astype(int) for p in (ours, theirs))
    assert a.shape == (2, 16, 16, 3) and np.abs(a - b).max() <= 1         # one uint8 level (rounding)
    grid = tmp_path / "compare.png"
    assert main(["generate", *common, "--compare-samplers", "dpmpp_2m,euler,ddim", "--out", str(grid)]) == 0
    saved = np.load(grid.with_suffix(".npz"))
    assert list(saved["samplers"]) == ["dpmpp_2m"] * 2 + ["euler"] * 2 + ["ddim"] * 2
    assert np.array_equal(saved["images"][4:], a.astype(np.uint8))        # the same seeds in every row


def test_bad_input(tmp_path, ddpm_dir, capsys, monkeypatch):
    def error_of(*argv):
        assert main(["generate", *argv, "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        return err

    (tmp_path / "empty").mkdir()
    assert "not a diffusers pipeline folder" in error_of("--model", str(tmp_path / "empty"))
    assert "does not exist" in error_of("--model", str(tmp_path / "missing"))
    for name, index in [("xl", {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}),
                        ("custom", {"_class_name": "DDPMPipeline", "unet": ["my_unets", "EvilUNet"]}),
                        ("remote", {"_class_name": ["pipe_code", "MyPipeline"]})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
    assert "does not support" in error_of("--model", str(tmp_path / "xl"))
    assert "never runs custom" in error_of("--model", str(tmp_path / "custom"))
    assert "never runs custom" in error_of("--model", str(tmp_path / "remote"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = error_of("--model", "nobody-at-all/not-a-cached-model")
    assert "offline" in err and "local folder" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert "takes no prompt" in error_of("--model", str(ddpm_dir), "--prompt", "a cat")
    assert "not both" in error_of("--model", str(ddpm_dir), "--sampler", "ddim", "--scheduler", "DDIMScheduler")
    assert "unknown diffusers scheduler" in error_of("--model", str(ddpm_dir), "--scheduler", "NoSuchScheduler")
    assert "applies to our samplers" in error_of("--model", str(ddpm_dir), "--scheduler", "DDIMScheduler", "--noise",
                                                 "brownian")


# ---------------------------------------------------------------------------------------------
# Fine-tuning: model.init_from

def test_fine_tuning_keeps_the_pipelines_process_and_lowers_the_loss(tmp_path):
    import diffusion_forge as df
    from diffusion_forge.data import load_dataset
    from diffusion_forge.io.checkpoint import load_model_from_run

    pipe_dir = save_tiny_ddpm(tmp_path / "pipe", channels=1, size=8,
                              scheduler={"beta_schedule": "linear", "prediction_type": "epsilon"})
    before = load_pipeline(pipe_dir)
    run = tmp_path / "run"
    assert main(["train", "--init-from", str(pipe_dir), "--data", "digits", "--out", str(run), "--no-progress",
                 "--set", "batch_size=32", "--set", "steps=40", "--set", "sample_every=0", "--set", "sample_n=4",
                 "--set", "sample_steps=2", "--set", "mixed_precision=no", "--set", "ema.warmup=0"]) == 0
    after = load_model_from_run(run, use_ema=False)
    assert after.prediction == "epsilon" and after.config["diffusion"]["schedule"] == "linear"   # the pipeline's
    assert torch.equal(after.schedule.betas, before.schedule.betas)
    assert after.config["model"]["init_from"] == str(pipe_dir) and type(after.model).__name__ == "UNet"  # ours

    x0 = torch.stack([load_dataset("digits", split="train")[i][0] for i in range(64)]).float()
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (64,), generator=g), torch.randn(x0.shape, generator=g)
    loss = lambda D: float(df.diffusion_loss(D, x0, t=t, noise=noise))   # noqa: E731
    assert loss(after) < 0.8 * loss(before)


def test_fine_tuning_refuses_data_that_do_not_fit(tmp_path, capsys):
    pipe_dir = save_tiny_ddpm(tmp_path / "rgb", channels=3, size=8)
    argv = ["train", "--init-from", str(pipe_dir), "--data", "digits", "--out", str(tmp_path / "run"), "--no-progress",
            "--set", "steps=1", "--set", "sample_every=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "takes 3-channel images and the data have 1" in err and "data.channels=3" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
