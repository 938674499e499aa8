"""Latent diffusion (issue 11): data/latents.py and the latent hooks of the trainer, the run loader and generate.

Runs use the session's tiny digits VAE (tests/test_vae.py: 8x8 digits padded to 16 px, 4 x 4 x 4 latents).
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from test_vae import cache, tiny_vae, vae_dir  # noqa: F401  (fixtures: the session's tiny VAE, a cache per test)

from diffusion_forge.cli import main
from diffusion_forge.data import load_dataset
from diffusion_forge.data.latents import LatentDataset
from diffusion_forge.io.checkpoint import load_model_from_run
from diffusion_forge.models.vae import encode_latents, load_vae
from diffusion_forge.sampling.generate import generate
from diffusion_forge.training import Trainer, merge_config
from diffusion_forge.training.build import weights_digest

FAST = {"data.source": "digits", "model.preset": "tiny", "optim.batch_size": 64, "optim.warmup_steps": 5,
        "run.sample_every": 0, "sample.n": 8, "sample.steps": 4, "run.checkpoint_every": 1000,
        "run.guide_snapshot_step": 0, "run.log_every": 10}


@pytest.fixture(scope="module")
def latent_run(vae_dir, tmp_path_factory):
    """A latent run on digits, 80 steps (a few seconds)."""
    run = tmp_path_factory.mktemp("latent") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)         # module fixtures run before conftest's one_thread
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFORGE_CACHE", str(run.parent / "cache"))
        cfg = merge_config(flags={**FAST, "data.latent": vae_dir, "optim.steps": 80, "optim.lr": 3e-3})
        Trainer(cfg, run, progress=False).fit()
    torch.set_num_threads(threads)
    return run


def test_latent_dataset_matches_the_encoder_and_is_cached(vae_dir, monkeypatch, tmp_path):
    images = load_dataset("digits")
    vae = load_vae(vae_dir)
    lat = LatentDataset(images, vae, {"source": "digits"}, progress=False)
    assert lat.shape == (4, 4, 4) and lat.kind == "image" and len(lat) == len(images)
    idx = torch.tensor([0, 5, 1000])
    z, cond = lat.get_batch(idx)
    assert torch.allclose(z, encode_latents(vae, images.get_batch(idx)[0]), atol=1e-5)
    assert torch.equal(cond["class_labels"], images.labels[idx]) and lat.num_classes == 10   # passes through
    files = list((tmp_path / "cache" / "latents").glob("*.safetensors"))
    assert len(files) == 1
    from diffusion_forge.data import latents

    monkeypatch.setattr(latents, "encode_dataset", lambda *a, **k: pytest.fail("encoded again"))
    again = LatentDataset(images, vae, {"source": "digits"}, progress=False)
    assert torch.equal(again.latents, lat.latents) and again.key == lat.key
    # another VAE (other weights) gets another cache entry
    other = load_vae(vae_dir)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    monkeypatch.undo()
    assert LatentDataset(images, other, {"source": "digits"}, progress=False).key != lat.key


def test_latent_training_lowers_the_loss(latent_run):
    records = [json.loads(line) for line in (latent_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0], losses
    assert (latent_run / "samples" / "step-00000080.png").is_file()          # the trainer's grid, decoded
    assert json.loads((latent_run / "config.json").read_text())["data"]["latent"]
    assert (latent_run / "vae" / "config.json").is_file()


def test_samples_decode_to_the_data_shape_and_range(latent_run, vae_dir):
    D = load_model_from_run(latent_run)
    assert D.sample_shape == (4, 4, 4) and D.vae is not None
    assert not any(k.startswith("vae") or ".vae." in k for k in D.state_dict())      # not a submodule
    assert weights_digest(D.vae) == weights_digest(load_vae(vae_dir))
    x = generate(D, 6, seed=3, steps=5)
    assert x.shape == (6, 1, 8, 8) and float(x.min()) >= -1 and float(x.max()) <= 1
    z = generate(D, 6, seed=3, steps=5, decode=False)
    assert z.shape == (6, 4, 4, 4)
    from diffusion_forge.models.vae import decode_latents

    assert torch.allclose(decode_latents(D.vae, z), x, atol=1e-6)                     # decode = the VAE's decoder
    from diffusion_forge.denoise.denoiser import ClipX0
    from diffusion_forge.denoise.guidance import ClassifierFreeGuidance  # noqa: F401  (wrappers forward .vae)

    assert generate(ClipX0(D, 3.0), 2, seed=3, steps=5).shape == (2, 1, 8, 8)


def test_copied_run_folder_samples_identically(latent_run, tmp_path):
    before = generate(load_model_from_run(latent_run), 4, seed=7, steps=5)
    elsewhere = tmp_path / "moved"
    shutil.copytree(latent_run, elsewhere)
    config = json.loads((elsewhere / "config.json").read_text())
    config["data"]["latent"] = str(tmp_path / "gone")     # the VAE it was trained with is no longer there
    (elsewhere / "config.json").write_text(json.dumps(config))
    assert torch.equal(generate(load_model_from_run(elsewhere), 4, seed=7, steps=5), before)
    shutil.rmtree(elsewhere / "vae")
    with pytest.raises(ValueError, match="holds no vae/ folder"):
        load_model_from_run(elsewhere)


def test_cli_train_and_sample_latent(vae_dir, tmp_path, capsys):
    run = tmp_path / "r"
    sets = [x for k, v in {**FAST, "optim.steps": 3}.items() if k != "data.source" for x in ("--set", f"{k}={v}")]
    assert main(["train", "--data", "digits", "--latent", vae_dir, "--out", str(run), "--no-progress",
                 "--conditioning", "class", *sets]) == 0
    assert main(["sample", str(run), "--n", "10", "--steps", "4", "--out", str(tmp_path / "s.npz")]) == 0
    import numpy as np

    with np.load(tmp_path / "s.npz") as f:
        images = f["images"]
    assert images.shape[0] == 10 and images.shape[1:] in ((8, 8, 1), (1, 8, 8)), images.shape
    assert main(["sample", str(run), "--n", "4", "--steps", "4", "--out", str(tmp_path / "s.png")]) == 0
    # resuming with a different VAE at the same path is refused
    other = tmp_path / "other-vae"
    shutil.copytree(vae_dir, other)
    v = load_vae(other)
    with torch.no_grad():
        next(v.parameters()).add_(0.01)
    from diffusion_forge.models.vae import save_vae

    save_vae(v, other)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--set", f"data.latent={other}", "--allow-changes", "--set",
                 "optim.steps=4", "--no-progress"]) == 2
    assert "not the one" in capsys.readouterr().err


BAD = [
    ("channels", {"data.source": "{tmp}/rgb"}, r"encodes 1-channel images.*3 channel"),
    ("size", {"data.source": "{tmp}/grey16"}, r"trained on 8 px images.*16 px"),
    ("flip", {"data.flip": True}, r"data\.flip does not apply with data\.latent"),
    ("vectors", {"data.source": "moons", "model.type": "mlp"}, r"needs images"),
]


@pytest.mark.parametrize("name,flags,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(vae_dir, tmp_path, capsys, name, flags, message):
    from PIL import Image

    for folder, size, mode in (("rgb", 8, "RGB"), ("grey16", 16, "L")):
        (tmp_path / folder).mkdir()
        for i in range(4):
            Image.new(mode, (size, size), 40 * i).save(tmp_path / folder / f"{i}.png")
    sets = [x for k, v in {**FAST, "optim.steps": 1, "data.latent": vae_dir, **flags}.items()
            for x in ("--set", f"{k}={str(v).format(tmp=tmp_path)}")]
    assert main(["train", "--out", str(tmp_path / "r"), "--no-progress", *sets]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dforge train: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]) and "Traceback" not in err, err


@pytest.mark.parametrize("latent,message", [("no-such-vae", r"no VAE folder 'no-such-vae' here"),
                                            ("{tmp}", r"is not a VAE folder"),
                                            ("nobody-xyz/no-such-vae-xyz", r"cannot load the VAE")])
def test_bad_vae_names(tmp_path, capsys, monkeypatch, latent, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    latent = latent.format(tmp=tmp_path)
    assert main(["train", "--data", "digits", "--latent", latent, "--out", str(tmp_path / "r"), "--no-progress",
                 "--set", "optim.steps=1"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dforge train: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]) and "Traceback" not in err, err


def test_viz_latent(latent_run, vae_dir, tmp_path, capsys):
    from diffusion_forge.viz.latent import plot_latent

    vae = load_vae(vae_dir)
    image = load_dataset("digits", split="test")[0][0]
    shown = plot_latent(tmp_path / "a.png", image, vae, costs=None)
    assert torch.allclose(shown["latent"], encode_latents(vae, image[None])[0])
    mse = float((shown["reconstruction"] - image).pow(2).mean())
    assert shown["psnr"] == pytest.approx(10 * torch.log10(torch.tensor(4 / mse)).item(), abs=1e-4)
    out = tmp_path / "latent.png"
    assert main(["viz", "latent", str(latent_run), "--out", str(out), "--batch", "4", "--repeats", "1"]) == 0
    assert out.is_file() and "in latent space" in capsys.readouterr().out
    pixel = tmp_path / "pixel"
    cfg = merge_config(flags={**FAST, "optim.steps": 1})
    Trainer(cfg, pixel, progress=False).fit()
    assert main(["viz", "latent", str(pixel), "--out", str(tmp_path / "p.png")]) == 2
    assert "pixel space" in capsys.readouterr().err
    assert load_model_from_run(pixel).vae is None
