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
    nested = {k: v for k, v in TrainConfig().to_dict().items() if k != "format_version"}
    assert nested and all(isinstance(keys, dict) for keys in nested.values())
    for section, keys in nested.items():
        for key in keys:
            assert f"\n  {section}.{key} " in text, f"{section}.{key}"


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
    assert (cfg["optim"]["lr"], cfg["optim"]["steps"]) == (0.005, 11)


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


# ---------------------------------------------------------------------------------------------
# The newcomer's path: fast help with defaults; the sampling options of the API

def test_building_the_parser_imports_no_torch():
    """`dforge --help` answers fast: building every subcommand's parser imports no torch."""
    import subprocess
    import sys

    code = ("from diffusion_forge.cli import build_parser; build_parser(); import sys; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", [["eval"], ["viz", "schedule"], ["viz", "forward"], ["viz", "trajectory"],
                                     ["viz", "samplers"], ["sample"]])
def test_help_shows_defaults(command):
    p = _subparser(command[0])
    for name in command[1:]:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    text = " ".join(p.format_help().split())
    for action in p._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and action.help:
            assert f"default: {action.default}" in text or "default:" in action.help, (command, action.dest)
    assert "--force" in text and "--verbose" in text


def test_sample_refuses_an_existing_output_unless_forced(image_run, tmp_path, capsys):
    out = tmp_path / "x.npz"
    out.write_bytes(b"old")
    assert main(["sample", str(image_run), "--n", "2", "--steps", "2", "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert main(["sample", str(image_run), "--n", "2", "--steps", "2", "--out", str(out), "--force"]) == 0
    assert np.load(out)["images"].shape == (2, 8, 8, 1)


def test_sample_grid_options_and_sampler_options_reach_the_sampler(image_run, tmp_path, capsys):
    def images(*flags):
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}.npz"
        assert main(["sample", str(image_run), "--n", "3", "--steps", "3", "--out", str(out), *flags]) == 0
        return np.load(out)["images"]

    base = images("--sampler", "euler_ancestral", "--sampler-options", "eta=0")
    assert (images("--sampler", "ddim") == base).all()                       # ddim is euler_ancestral at eta 0
    assert (images("--sampler", "euler_ancestral", "--sampler-options", "eta=1.0,s_noise=1.0") != base).any()
    assert (images("--sampler", "ddim", "--sigmas", "karras") != base).any()
    assert (images("--sampler", "ddim", "--spacing", "leading") != base).any()
    assert "sampling" in capsys.readouterr().err                             # the progress bar (tqdm, stderr)


def test_sample_noise_brownian_reaches_the_stochastic_samplers_only(image_run, tmp_path, capsys):
    def images(*flags):
        out = tmp_path / f"n{len(list(tmp_path.iterdir()))}.npz"
        assert main(["sample", str(image_run), "--n", "3", "--steps", "3", "--out", str(out), "--no-progress",
                     *flags]) == 0
        return np.load(out)["images"]

    fresh = images("--sampler", "euler_ancestral")
    tree = images("--sampler", "euler_ancestral", "--noise", "brownian")
    assert (tree != fresh).any() and (images("--sampler", "euler_ancestral", "--noise", "brownian") == tree).all()
    assert (images("--sampler", "ddim", "--noise", "brownian") == images("--sampler", "ddim")).all()  # no fresh noise
    assert main(["sample", str(image_run), "--n", "2", "--steps", "2", "--noise", "brownian", "--no-progress",
                 "--out", str(tmp_path / "t.png")]) == 0
    assert "Brownian noise" in capsys.readouterr().out                       # it says what ran


def test_sample_grids_are_titled_and_raw_on_request(image_run, tmp_path):
    from PIL import Image

    assert main(["sample", str(image_run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "raw.png"),
                 "--raw-grid"]) == 0
    assert main(["sample", str(image_run), "--n", "4", "--steps", "2", "--out", str(tmp_path / "t.png")]) == 0
    assert Image.open(tmp_path / "raw.png").size == (2 + 2 * (8 + 2), 2 + 2 * (8 + 2))     # 2 x 2 tiles of 8 px
    assert Image.open(tmp_path / "t.png").size[0] > 100                                     # readable, with a title


# ---------------------------------------------------------------------------------------------
# The error boundary

def _command_raising(monkeypatch, error):
    from diffusion_forge.cli import datasets

    def run(args):
        raise error
    monkeypatch.setattr(datasets, "run", run)


def test_unexpected_errors_show_a_traceback_and_ask_for_a_bug_report(monkeypatch, capsys):
    _command_raising(monkeypatch, KeyError("oops"))
    assert main(["datasets"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "please report it" in err


def test_verbose_shows_the_traceback_of_an_expected_error(monkeypatch, capsys):
    _command_raising(monkeypatch, ValueError("bad value"))
    assert main(["datasets"]) == 2
    err = capsys.readouterr().err
    assert err == "dforge datasets: error: bad value\n"
    for argv in (["-v", "datasets"], ["datasets", "--verbose"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.endswith("dforge datasets: error: bad value\n")


@pytest.mark.parametrize("error, code, line", [
    (KeyboardInterrupt(), 130, "dforge datasets: interrupted"),
    (BrokenPipeError(32, "Broken pipe"), 141, ""),
    (FileExistsError(17, "File exists", "runs/x"), 2, "dforge datasets: error: runs/x: a file of that name exists"),
    (OSError(28, "No space left on device", "runs/x/model.safetensors"), 2,
     "dforge datasets: error: runs/x/model.safetensors: no space left on the device (the disk is full)"),
    (PermissionError(13, "Permission denied", "/etc/x"), 2, "dforge datasets: error: /etc/x: permission denied"),
    (FileNotFoundError(2, "No such file or directory", "a.yaml"), 2, "dforge datasets: error: a.yaml: it does not exist"),
    (AssertionError("Torch not compiled with CUDA enabled"), 2,
     "dforge datasets: error: Torch not compiled with CUDA enabled (use --device cpu, or check the GPU set-up)"),
    (ValueError("two\nlines"), 2, "dforge datasets: error: two lines"),
])
def test_expected_errors_become_one_line(monkeypatch, capsys, error, code, line):
    _command_raising(monkeypatch, error)
    assert main(["datasets"]) == code
    err = capsys.readouterr().err
    assert err.strip() == line and "Traceback" not in err


def test_parse_errors_and_safetensors_errors_are_expected(monkeypatch, capsys):
    import yaml
    from safetensors import SafetensorError

    try:
        yaml.safe_load("a: [1, 2\nb: 3")
    except yaml.YAMLError as e:
        _command_raising(monkeypatch, e)
    assert main(["datasets"]) == 2
    assert capsys.readouterr().err.startswith("dforge datasets: error: not valid YAML: ")
    _command_raising(monkeypatch, SafetensorError("Error while serializing: IoError(Os { code: 30, kind: "
                                                  "ReadOnlyFilesystem, message: \"Read-only file system\" })"))
    assert main(["datasets"]) == 2
    assert capsys.readouterr().err == "dforge datasets: error: cannot write a safetensors file: read-only file system\n"


def test_warnings_print_as_one_clean_line(monkeypatch, capsys):
    import warnings

    from diffusion_forge.cli import datasets

    def run(args):
        warnings.warn("skipping photos/broken.png: cannot identify image file", UserWarning)
        return 0
    monkeypatch.setattr(datasets, "run", run)
    assert main(["datasets"]) == 0
    err = capsys.readouterr().err
    assert err == "dforge datasets: warning: skipping photos/broken.png: cannot identify image file\n"


def test_sample_commands_pick_the_conditional_default_for_conditional_runs():
    """dforge sample / eval / viz resolve a run's sampler through run_settings: a class or text run that names no
    sampler gets CONDITIONAL_SAMPLERS (noise at every level), an unconditional one DEFAULT_SAMPLERS (s_tmax)."""
    import types

    from diffusion_forge.cli.sample import run_settings
    from diffusion_forge.sampling.registry import SAMPLERS, default_sampler

    for kind, conditional in (("class", True), ("text", True), ("none", False)):
        trained = types.SimpleNamespace(config={"sample": {"sampler": None, "steps": 20, "options": {}},
                                                "conditioning": {"kind": kind}})
        name, options = default_sampler(20, "conditional" if conditional else "unconditional")
        assert run_settings(trained, None, None, {}) == (name, 20, {**SAMPLERS[name].options, **options})
    assert run_settings(trained, None, None, {})[2]["s_tmax"] < float("inf")   # unconditional: a finite top
