"""`dforge export`: a run as a diffusers folder that diffusers loads as it is, with its model card.

Round trip: ``DDPMPipeline.from_pretrained(exported)`` (its DDPMScheduler: the run's schedule and prediction,
clip_sample off, trailing spacing) with one generator per image, seeds 0..n-1, gives the images of
``dforge sample RUN --sampler ddpm`` at the same steps: uint8 images equal to one level (rounding of floats
that agree to ~1e-5).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from diffusion_forge.cli import main
from diffusion_forge.interop.export import export_denoiser
from diffusion_forge.interop.pipelines import load_pipeline
from diffusion_forge.interop.tiny import save_tiny_sd

import diffusers  # noqa: E402  (a core dependency)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
RUN = ["--data", "digits", "--set", "preset=tiny", "--set", "batch_size=16", "--set", "steps=3",
       "--set", "sample_every=0", "--set", "sample_n=4", "--set", "sample_steps=2", "--set", "mixed_precision=no",
       "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--out", str(folder), *RUN]) == 0
    return folder


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_round_trip_through_ddpm_pipeline(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert "exported" in capsys.readouterr().out
    for f in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
              "scheduler/scheduler_config.json", "README.md", "samples.png"):
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob("*.tmp")) and not list(out.rglob("*.bin"))
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "unconditional-image-generation"
    assert meta["datasets"] == ["digits"] and "diffusers" in meta["tags"] and meta["license"] == "apache-2.0"
    assert "**EMA** weights" in card and "![samples](samples.png)" in card and "| loss |" in card

    pipe = diffusers.DDPMPipeline.from_pretrained(out, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"            # the run's, not diffusers' default
    theirs = pipe(batch_size=4, generator=gens(4), num_inference_steps=10, output_type="np").images
    npz = tmp_path / "ours.npz"
    assert main(["sample", str(run), "--sampler", "ddpm", "--steps", "10", "--n", "4", "--out", str(npz),
                 "--no-progress", "--device", "cpu"]) == 0
    ours = np.load(npz)["images"].astype(int)
    theirs = np.round(theirs * 255).astype(int)
    assert ours.shape == theirs.shape == (4, 8, 8, 1) and theirs.std() > 5
    assert np.abs(ours - theirs).max() <= 1


def test_export_refuses_an_existing_folder_without_force(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out), "--no-samples"]) == 0
    before = digest(out)
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert digest(out) == before                                             # nothing overwritten
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert (out / "samples.png").is_file() and not list(tmp_path.glob("exported.*"))


def test_class_conditional_run_exports_a_unet_with_class_embeddings(tmp_path):
    run = tmp_path / "cond"
    assert main(["train", "--out", str(run), *RUN, "--conditioning", "class"]) == 0
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert not (out / "model_index.json").exists() and (out / "dforge.json").is_file()
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet", use_safetensors=True)
    assert unet.config.num_class_embeds == 11                                 # 10 classes + the null class
    card = (out / "README.md").read_text()
    assert "class-conditional" in front_matter(card)["tags"]
    loop = card.split("```python\n")[1].split("```")[0].replace('"REPO"', repr(str(out)))
    scope: dict = {}
    exec(loop, scope)                                                         # the card's ten-line loop runs
    images = scope["images"]
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all() and images.std() > 0.01
    D = load_pipeline(out)                                                    # and dforge generate reads it back
    assert D.num_classes == 10 and D.null_cond == {"class_labels": 10} and D.guidance_scale is not None
    assert main(["generate", "--model", str(out), "--class", "3", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "threes.png"), "--no-progress"]) == 0


def test_text_latent_denoiser_exports_a_stable_diffusion_pipeline(tmp_path):
    """The latent-text branch, on a Denoiser with .vae and .text_encoder (a loaded tiny SD pipeline)."""
    from diffusion_forge.interop.pipeline_sampling import sample_ours

    D = load_pipeline(save_tiny_sd(tmp_path / "sd"))
    out = export_denoiser(D, tmp_path / "exported", prompts=["a cat"])
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir(), sub
    assert front_matter((out / "README.md").read_text())["pipeline_tag"] == "text-to-image"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, use_safetensors=True)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["a cat"] * 2, guidance_scale=3.0, num_inference_steps=4, generator=gens(2), output_type="np").images
    ours = sample_ours(D, 2, seed=0, sampler="dpmpp_2m", steps=4, prompt="a cat", guidance_scale=3.0)
    ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=0)


def test_a_trained_latent_text_run_exports_and_its_pipeline_samples_as_we_do(tmp_path, tmp_path_factory, monkeypatch,
                                                                            capsys):
    """A real latent text run (tiny VAE + digit captions + UNet2DConditionModel), exported: the
    StableDiffusionPipeline that diffusers loads from the folder, with DPMSolverMultistepScheduler, CFG w = 3 and a
    negative prompt, gives the latents our dpmpp_2m gives on the run itself (same seeds; 2e-4 in latent units),
    and `dforge generate` reads the folder back."""
    from test_vae import tiny_vae

    from diffusion_forge.interop.pipeline_sampling import sample_ours
    from diffusion_forge.io.checkpoint import load_model_from_run

    monkeypatch.setenv("DFORGE_CACHE", str(tmp_path / "cache"))
    vae = tiny_vae(tmp_path_factory)
    assert main(["train", "--out", str(tmp_path / "run"), *RUN, "--latent", str(vae), "--conditioning", "text"]) == 0
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    assert front_matter((out / "README.md").read_text())["pipeline_tag"] == "text-to-image"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, use_safetensors=True)
    assert type(pipe.unet) is diffusers.UNet2DConditionModel        # plain diffusers classes, no code of ours
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    D = load_model_from_run(tmp_path / "run")
    size = D.vae.config.sample_size if isinstance(D.vae.config.sample_size, int) else None
    theirs = pipe(["a handwritten three"] * 2, negative_prompt=["the digit 5"] * 2, guidance_scale=3.0,
                  num_inference_steps=4, generator=gens(2), output_type="latent", height=size, width=size).images
    ours = sample_ours(D, 2, seed=0, sampler="dpmpp_2m", steps=4, prompt="a handwritten three",
                       negative_prompt="the digit 5", guidance_scale=3.0, decode_latents=False)
    assert ours.shape == theirs.shape == (2, *D.sample_shape)
    np.testing.assert_allclose(ours.numpy(), theirs.float().numpy(), atol=2e-4, rtol=0)
    assert main(["generate", "--model", str(out), "--prompt", "a handwritten two", "--n", "2", "--steps", "3",
                 "--out", str(tmp_path / "two.png"), "--no-progress"]) == 0


def test_export_never_replaces_the_run_it_exports(run, capsys):
    """--out on (or around, or inside) the run folder is refused even with --force: the run is left as it was."""
    before = digest(run)
    for out in (run, run / "exported", run.parent):
        assert main(["export", str(run), "--out", str(out), "--force"]) == 2
        assert "would overlap the run folder" in capsys.readouterr().err
    assert digest(run) == before
