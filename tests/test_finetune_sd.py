"""Fine-tuning a Stable Diffusion U-Net (UNet2DConditionModel, with captions): `dforge train --init-from SD_DIR`.

A tiny StableDiffusionPipeline is built offline with random weights (interop/tiny.py: 16x16 RGB images -> 8x8x4
latents, a character-level CLIP tokenizer of 16 tokens) and an image folder of 16x16 images with a metadata.jsonl
of captions. The run must train in the pipeline's latent space (its VAE), with its text encoder (encode equals
``StableDiffusionPipeline.encode_prompt`` exactly), its schedule and prediction, from its U-Net's weights; the
loss on a fixed batch (fixed latents, captions, t and noise) must go down; the run samples with `dforge sample
--prompt`, and `dforge export` gives a StableDiffusionPipeline whose U-Net holds the run's EMA weights.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_forge.cli import main
from diffusion_forge.interop.pipelines import load_pipeline
from diffusion_forge.interop.tiny import save_tiny_sd

import diffusers  # noqa: E402  (a core dependency)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
COLOURS = {"a red square": (230, 30, 30), "a blue square": (30, 30, 230)}
TRAIN = ["--no-progress", "--set", "batch_size=16", "--set", "steps=40", "--set", "sample_every=0", "--set",
         "sample_n=2", "--set", "sample_steps=2", "--set", "run.mixed_precision=no", "--set", "ema.warmup=0",
         "--set", "optim.warmup_steps=5", "--device", "cpu"]


def image_folder(folder, size=16, n=32, captions=True):
    """n images of a coloured square on grey, captioned by its colour (a metadata.jsonl of file_name / text)."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng, lines = np.random.default_rng(0), []
    for i in range(n):
        text = list(COLOURS)[i % 2]
        x = np.full((size, size, 3), 128, np.uint8)
        lo = int(rng.integers(0, size // 2))
        x[lo:lo + size // 2, lo:lo + size // 2] = COLOURS[text]
        Image.fromarray(x).save(folder / f"img_{i:02d}.png")
        lines.append(json.dumps({"file_name": f"img_{i:02d}.png", "text": text}))
    if captions:
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_sd")
    sd_dir, data = save_tiny_sd(root / "pipe"), image_folder(root / "data")
    run = root / "run"
    assert main(["train", "--init-from", str(sd_dir), "--data", str(data), "--conditioning", "text", "--out", str(run),
                 *TRAIN]) == 0
    return sd_dir, data, run


def test_fine_tuning_lowers_the_loss_in_the_pipelines_spaces(setup):
    import diffusion_forge as df
    from diffusion_forge.data import load_dataset
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.models.vae import encode_latents

    sd_dir, data, run = setup
    before, after = load_pipeline(sd_dir), load_model_from_run(run, use_ema=False)
    # the pipeline's process, latent space, text encoder and architecture
    assert after.prediction == before.prediction == "epsilon"
    torch.testing.assert_close(after.schedule.alphas_cumprod.double(), before.schedule.alphas_cumprod.double(),
                               rtol=1e-6, atol=0)
    c = after.config
    assert c["diffusion"]["schedule"] == "scaled_linear" and c["conditioning"]["kind"] == "text"
    assert c["conditioning"]["text_encoder"] == str(sd_dir.resolve()) and c["conditioning"]["max_length"] == 16
    assert c["data"]["latent"] == str((sd_dir / "vae").resolve()) and (run / "vae" / "config.json").is_file()
    assert after.sample_shape == (4, 8, 8) and type(after.model).__name__ == "DiffusersCondUNet"
    assert after.model.config.cross_attention_dim == before.model.backbone.config.cross_attention_dim
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_dir, use_safetensors=True, safety_checker=None,
                                                             requires_safety_checker=False)
    theirs, _ = pipe.encode_prompt(["a red square", ""], "cpu", 1, False)
    torch.testing.assert_close(after.text_encoder.encode(["a red square", ""]), theirs, atol=0, rtol=0)
    torch.testing.assert_close(after.null_cond["encoder_hidden_states"], theirs[1], atol=0, rtol=0)

    # the loss of the initial and the fine-tuned weights on the same fixed batch
    ds = load_dataset(str(data), split="train")
    x, _ = ds.get_batch(torch.arange(len(ds)))
    z = encode_latents(before.vae, x)
    cond = {"encoder_hidden_states": before.text_encoder.encode([ds.captions[i] for i in range(len(ds))])}
    g = torch.Generator().manual_seed(0)
    t, noise = torch.randint(0, 1000, (len(z),), generator=g), torch.randn(z.shape, generator=g)
    with torch.no_grad():
        loss = lambda D: float(df.diffusion_loss(D, z, t=t, noise=noise, cond=cond))
        assert loss(after) < 0.8 * loss(before)


def test_the_run_samples_with_prompts_and_exports_as_a_stable_diffusion_pipeline(setup, tmp_path):
    from diffusion_forge.io.checkpoint import load_model_from_run

    run = setup[2]
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--prompt", "a red square", "--prompt", "a blue square", "--n", "2", "--steps",
                 "2", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert out.is_file()
    exported = tmp_path / "export"
    assert main(["export", str(run), "--out", str(exported), "--no-samples"]) == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(exported, use_safetensors=True, safety_checker=None,
                                                             requires_safety_checker=False)
    ema = load_model_from_run(run)                       # export writes the EMA weights
    for k, v in pipe.unet.state_dict().items():
        torch.testing.assert_close(v, ema.model.state_dict()[k], atol=0, rtol=0)
    theirs, _ = pipe.encode_prompt(["a blue square"], "cpu", 1, False)
    torch.testing.assert_close(ema.text_encoder.encode(["a blue square"]), theirs, atol=0, rtol=0)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red square"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_data_that_do_not_fit_the_pipeline(setup, tmp_path, capsys):
    sd_dir = setup[0]

    def error_of(data, *extra):
        out = tmp_path / "bad-run"
        assert main(["train", "--init-from", str(sd_dir), "--data", str(data), "--out", str(out), *extra,
                     "--no-progress", "--set", "steps=1", "--set", "sample_every=0"]) == 2
        err = capsys.readouterr().err.strip()   # the image folder's "caching" bar may come first
        assert "Traceback" not in err and not (out / "checkpoints").exists()
        return err.splitlines()[-1]

    bare = image_folder(tmp_path / "bare", captions=False)
    assert "needs captions" in error_of(bare, "--conditioning", "text")
    small = image_folder(tmp_path / "small", size=8)
    assert "set data.image_size=16" in error_of(small, "--conditioning", "text")
    assert "--conditioning text" in error_of(setup[1], "--conditioning", "class")


def test_without_conditioning_the_run_is_text_conditional_and_says_so(setup, tmp_path, capsys, monkeypatch):
    from diffusion_forge.training import init_from

    monkeypatch.setattr(init_from, "_NOTED", [])
    sd_dir, data, _ = setup
    run = tmp_path / "run"
    argv = [a if a != "steps=40" else "steps=1" for a in TRAIN]
    assert main(["train", "--init-from", str(sd_dir), "--data", str(data), "--out", str(run), *argv]) == 0
    assert capsys.readouterr().out.count("training with conditioning.kind=text") == 1
    saved = json.loads((run / "config.json").read_text())
    assert saved["conditioning"]["kind"] == "text" and saved["model"]["init_from"] == str(sd_dir)
