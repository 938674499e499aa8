"""`dforge train`, `dforge sample` and `dforge demo` through the command line's main()."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from diffusion_forge.cli import build_parser, main
from diffusion_forge.training import TrainConfig

# tiny U-Net on the bundled 8x8 "digits": an image run in a second
IMAGE_RUN = ["--data", "digits", "--set", "preset=tiny", "--set", "batch_size=16", "--set", "steps=2",
             "--set", "sample_every=0", "--set", "sample_n=4", "--set", "sample_steps=2",
             "--set", "mixed_precision=no", "--no-progress"]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits")
    torch.set_num_threads(1)
    assert main(["train", "--out", str(run), *IMAGE_RUN]) == 0
    return run


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["train", "sample", "demo"])
def test_every_option_has_help(command):
    p = _subparser(command)
    for action in p._actions:
        assert action.help, f"dforge {command} {action.option_strings or action.dest} has no --help text"


def test_train_help_lists_every_config_key_with_its_default():
    text = _subparser("train").format_help()
    for key in TrainConfig().to_dict():
        assert f"\n  {key} " in text, key


def test_train_refuses_changed_settings_unless_allowed(image_run, capsys):
    assert main(["train", "--out", str(image_run), "--set", "lr=0.01", "--set", "steps=3"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "lr: 0.002 -> 0.01" in err and "steps: 2 -> 3" in err
    assert "--allow-changes" in err
    assert "Traceback" not in err
    assert main(["train", "--out", str(image_run), "--no-progress"]) == 0          # same settings: resumes (done)
    assert "already trained to step 2" in capsys.readouterr().out


def test_train_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--data", "mnist"]) == 2
    assert "--out RUN_FOLDER is required" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--set", "learning_rate=1"]) == 2
    assert "did you mean lr" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_config_file_and_flags_merge_flags_winning(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("lr: 0.005\nsteps: 9\n")
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "run.yaml"),
                 "--set", "steps=11", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["lr"], cfg["steps"]) == (0.005, 11)


def test_overfit_batch_prints_a_verdict(capsys):
    code = main(["train", "--data", "moons", "--overfit-batch", "--overfit-steps", "100", "--no-progress",
                 "--set", "model=mlp", "--set", "lr=3e-3", "--set", "mixed_precision=no"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("PASS: the loss on one fixed batch fell from")
    assert "below the threshold" in out


def test_sample_writes_png_and_npz(image_run, tmp_path, capsys):
    assert main(["sample", str(image_run), "--n", "6", "--steps", "3", "--out", str(tmp_path / "x.npz")]) == 0
    data = np.load(tmp_path / "x.npz")
    assert list(data) == ["images"]
    assert data["images"].dtype == np.uint8 and data["images"].shape == (6, 8, 8, 1)
    assert main(["sample", str(image_run), "--n", "6", "--steps", "3", "--out", str(tmp_path / "g.png")]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size[0] > 8
    # one rule for pictures (io.files.IMAGE_SUFFIXES): a grid may be .png or .jpg; other suffixes are refused
    assert main(["sample", str(image_run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "x.jpg")]) == 0
    assert Image.open(tmp_path / "x.jpg").format == "JPEG"
    assert main(["sample", str(image_run), "--out", str(tmp_path / "x.gif")]) == 2
    assert ".png, .jpg" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_same_seed_same_image_whatever_the_batch_size(image_run):
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.training import generate

    trained = load_model_from_run(image_run)
    for sampler, options in (("dpmpp_2m", {}), ("euler_ancestral", {"eta": 1.8})):   # deterministic, stochastic
        a = generate(trained, 4, seed=0, sampler=sampler, steps=3, batch_size=4, sampler_options=options)
        b = generate(trained, 4, seed=0, sampler=sampler, steps=3, batch_size=1, sampler_options=options)
        c = generate(trained, 2, seed=2, sampler=sampler, steps=3, batch_size=3, sampler_options=options)
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a[2:], c, atol=1e-5)
        assert not torch.allclose(a[0], a[1])


def test_demo_writes_its_pictures(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "4", "--no-score", "--no-progress",
                 "--set", "steps=2", "--set", "sample_every=0", "--set", "batch_size=16",
                 "--set", "sample_n=4", "--set", "sample_steps=2"]) == 0
    for name in ("samples.png", "loss.png", "schedules.png", "forward.png", "config.json", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints").is_dir() and (out / "samples").is_dir()
