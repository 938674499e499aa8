"""The VAE of latent diffusion (issue 11): models/vae.py, training/vae.py, `dforge train-vae`.

A tiny VAE is trained once per session on scikit-learn's 8x8 digits (padded to 16 px, 4 x 4 x 4 latents)
and shared with tests/test_latent.py through :func:`tiny_vae`.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from diffusion_forge.cli import main
from diffusion_forge.data import load_dataset
from diffusion_forge.models.vae import (
    crop_images,
    decode_latents,
    encode_latents,
    load_vae,
    pad_images,
    padded_size,
    vae_config,
)
from diffusion_forge.training.build import weights_digest
from diffusion_forge.training.vae import learning_rate, train_vae, vae_settings

TINY = {"data": "digits", "preset": "tiny", "steps": 250, "batch_size": 32, "eval_n": 360, "checkpoint_every": 100}
# Measured on this recipe (2 CPU cores, 1 thread): held-out PSNR 16.0-16.4 dB after 250-300 steps; predicting
# the mean training image scores 11.4 dB. 14.5 dB lies 3 dB above that baseline: a VAE that ignores its input
# (or an identity-free decoder) cannot reach it.
PSNR_FLOOR = 14.5


def tiny_vae(tmp_path_factory) -> str:
    """The session's tiny digits VAE folder (trained on first use, in a cache folder of its own)."""
    root = tmp_path_factory.getbasetemp() / "tiny-vae"
    folder = root / "vae"
    if not (folder / "config.json").is_file():
        old, threads = os.environ.get("DFORGE_CACHE"), torch.get_num_threads()
        os.environ["DFORGE_CACHE"] = str(root / "cache")
        torch.set_num_threads(1)     # module fixtures run before conftest's one_thread
        try:
            train_vae(TINY, folder, progress=False)
        finally:
            torch.set_num_threads(threads)
            if old is None:
                os.environ.pop("DFORGE_CACHE")
            else:
                os.environ["DFORGE_CACHE"] = old
    return str(folder)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return tiny_vae(tmp_path_factory)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFORGE_CACHE", str(tmp_path / "cache"))


def test_presets_and_padding():
    assert padded_size(28, 4) == 32 and padded_size(32, 8) == 32 and padded_size(64, 8) == 64 and padded_size(8) == 16
    from diffusers import AutoencoderKL

    for size, down, latent in ((28, 4, 8), (32, 8, 4), (64, 8, 8), (64, 4, 16)):
        cfg = vae_config(size, 3, down, "tiny")
        vae = AutoencoderKL(**cfg)
        x = torch.zeros(1, 3, size, size)
        vae.dforge_meta = {}
        z = vae.encode(pad_images(vae, x)).latent_dist.mean
        assert tuple(z.shape) == (1, 4, latent, latent), (size, down)
    x = torch.randn(2, 1, 28, 28)
    vae = AutoencoderKL(**vae_config(28, 1, 4, "tiny"))
    vae.dforge_meta = {"pad_value": -1.0}
    padded = pad_images(vae, x)
    assert padded.shape[-1] == 32 and torch.equal(crop_images(padded, 28), x)       # the crop undoes the pad
    assert bool((padded[..., :2, :] == -1).all()) and bool((padded[..., :, -2:] == -1).all())
    with pytest.raises(ValueError, match="preset"):
        vae_config(32, 1, 4, "huge")
    with pytest.raises(ValueError, match="downsample"):
        vae_config(32, 1, 2)


def test_learning_rate_schedule():
    cfg = vae_settings({"steps": 100, "warmup_steps": 10, "lr": 1e-3, "min_lr": 1e-4})
    assert learning_rate(0, cfg) == pytest.approx(1e-4) and learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(100, cfg) == pytest.approx(1e-4)
    mid = 10 + 45     # halfway through the cosine: (lr + min_lr) / 2
    assert learning_rate(mid, cfg) == pytest.approx(5.5e-4)


def test_reconstruction_psnr_on_held_out_images(vae_dir):
    meta = json.loads(open(os.path.join(vae_dir, "dforge_vae.json")).read())
    assert meta["held_out"] == 360 and meta["data_size"] == 8 and meta["padded_size"] == 16
    assert meta["psnr"] >= PSNR_FLOOR, meta
    assert meta["psnr"] >= meta["psnr_mean_image"] + 3
    # a second computation, on [0, 255]: PSNR = 10 log10(255^2 / MSE) per image, averaged
    vae = load_vae(vae_dir)
    test = load_dataset("digits", split="test")
    x, _ = test.get_batch(torch.arange(len(test)))
    x_hat = decode_latents(vae, encode_latents(vae, x))
    assert x_hat.shape == x.shape and float(x_hat.min()) >= -1 and float(x_hat.max()) <= 1
    a, b = (x.numpy().astype(np.float64) + 1) * 127.5, (x_hat.numpy().astype(np.float64) + 1) * 127.5
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    assert float(np.mean(10 * np.log10(255.0 ** 2 / mse))) == pytest.approx(meta["psnr"], abs=0.01)


def test_scaling_factor_gives_unit_variance(vae_dir):
    vae = load_vae(vae_dir)
    config = json.loads(open(os.path.join(vae_dir, "config.json")).read())
    assert config["_class_name"] == "AutoencoderKL" and config["scaling_factor"] == pytest.approx(
        1 / json.loads(open(os.path.join(vae_dir, "dforge_vae.json")).read())["latent_std"])
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    z_train = encode_latents(vae, train.get_batch(torch.arange(len(train)))[0])
    z_test = encode_latents(vae, test.get_batch(torch.arange(len(test)))[0])
    assert float(z_train.std()) == pytest.approx(1.0, abs=1e-3)      # measured on these very images
    assert float(z_test.std()) == pytest.approx(1.0, abs=0.15)       # and on images it never saw
    # the unscaled posterior means did not have unit variance: the factor does the work
    assert abs(config["scaling_factor"] - 1) > 0.1


def test_folder_is_diffusers_layout(vae_dir):
    from diffusers import AutoencoderKL

    theirs = AutoencoderKL.from_pretrained(vae_dir)
    ours = load_vae(vae_dir)
    assert weights_digest(theirs) == weights_digest(ours)
    assert theirs.config.scaling_factor == ours.config.scaling_factor
    assert sorted(p for p in os.listdir(vae_dir) if not p.startswith(".")) == [
        "checkpoints", "config.json", "dforge_vae.json", "diffusion_pytorch_model.safetensors", "metrics.jsonl",
        "reconstructions.png"]
    # a pipeline folder's vae/ loads as well
    pipeline = os.path.join(os.path.dirname(vae_dir), "pipeline")
    if not os.path.exists(pipeline):
        theirs.save_pretrained(os.path.join(pipeline, "vae"))
    assert weights_digest(load_vae(pipeline)) == weights_digest(ours)


def test_resume_is_exact(tmp_path):
    settings = dict(TINY, steps=6, batch_size=8, eval_n=20, scale_n=64, checkpoint_every=2, warmup_steps=2)
    straight = train_vae(settings, tmp_path / "a", progress=False)
    assert straight["step"] == 6
    first = train_vae(settings, tmp_path / "b", progress=False, max_seconds=0)   # stops after one step
    assert first["time_limit"] and first["step"] == 1
    again = train_vae({}, tmp_path / "b", progress=False, max_seconds=0)         # the folder's own settings
    assert again["step"] == 2
    done = train_vae({}, tmp_path / "b", progress=False)
    assert done["step"] == 6 and done["start_step"] == 2
    a, b = load_vae(tmp_path / "a"), load_vae(tmp_path / "b")
    assert weights_digest(a) == weights_digest(b)
    assert a.config.scaling_factor == b.config.scaling_factor
    assert math.isfinite(done["psnr"])


def test_cli_train_vae(tmp_path, capsys):
    out = tmp_path / "v"
    args = ["train-vae", "--data", "digits", "--out", str(out), "--preset", "tiny", "--steps", "4", "--no-progress",
            "--set", "eval_n=16", "--set", "scale_n=64", "--set", "kl_weight=1e-4"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "PSNR" in said and "scaling_factor" in said and (out / "reconstructions.png").is_file()
    assert json.loads((out / "checkpoints" / "step-00000004" / "state.json").read_text())["config"]["kl_weight"] == 1e-4
    assert main(["train-vae", "--out", str(out), "--no-progress"]) == 0
    assert "already trained" in capsys.readouterr().out
    assert main(["train-vae", "--out", str(out), "--steps", "5", "--no-progress"]) == 0     # resume further
    assert load_vae(out).dforge_meta["steps"] == 5


BAD = [
    (["--data", "digits", "--set", "kl=1"], r"unknown train-vae setting 'kl'"),
    ([], r"--data is required"),
    (["--data", "digits", "--set", "loss=l3"], r"loss must be l1 or mse"),
    (["--data", "digits", "--downsample", "3"], r"downsample must be 4 or 8"),
    (["--data", "moons"], r"needs images"),
    (["--data", "digits", "--steps", "0"], r"steps must be a whole number >= 1"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input(tmp_path, capsys, extra, message):
    import re

    assert main(["train-vae", "--out", str(tmp_path / "v"), "--no-progress", "--preset", "tiny", *extra]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_bad_folders(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert main(["train-vae", "--data", "digits", "--out", str(tmp_path / "full")]) == 2
    assert "--force" in capsys.readouterr().err
    out = tmp_path / "v"
    assert main(["train-vae", "--data", "digits", "--out", str(out), "--preset", "tiny", "--steps", "1",
                 "--no-progress", "--set", "eval_n=8", "--set", "scale_n=16"]) == 0
    capsys.readouterr()
    assert main(["train-vae", "--out", str(out), "--preset", "small"]) == 2
    assert "cannot change on resume" in capsys.readouterr().err
    for name in (str(tmp_path / "full"), "no-such-vae", str(tmp_path / "full" / "notes.txt")):
        with pytest.raises(ValueError) as e:
            load_vae(name)
        assert "\n" not in str(e.value)
