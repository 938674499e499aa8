"""The noise-aware classifier of classifier guidance: training, accuracy by noise level, its folder, the checks
that it fits a denoiser, `--like RUN`, and `dforge train-classifier`."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusion_forge.cli import main
from diffusion_forge.core.schedules import NoiseSchedule
from diffusion_forge.data import load_dataset
from diffusion_forge.denoise import Denoiser
from diffusion_forge.denoise.denoiser import same_schedule
from diffusion_forge.models.classifier import NoiseClassifier
from diffusion_forge.training.classifier import (check_classifier_fits, classifier_accuracy, load_classifier, t_bands,
                                                 train_classifier)

TINY = dict(preset="tiny", batch_size=64, lr=3e-3, progress=False, seed=0)   # seconds on one thread


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))


@pytest.fixture(scope="module")
def digits_cls(tmp_path_factory):
    """A tiny classifier of scikit-learn's 8x8 digits (1,437 train, 360 test items), default recipe's schedule."""
    torch.set_num_threads(1)
    return train_classifier("digits", tmp_path_factory.mktemp("cls") / "digits", steps=400, **TINY)


@pytest.fixture(scope="module")
def digits_test():
    ds = load_dataset("digits", split="test")
    x, cond = ds.get_batch(torch.arange(len(ds)))
    return x, cond["class_labels"]


def test_accurate_on_nearly_clean_inputs(digits_cls, digits_test):
    """At t <= 50 (cosine: alpha_bar >= 0.99) the classifier reads the digit. Threshold 60% of the 360 test
    digits, chance 10%: a classifier that ignores its input is right on each item with probability at most the
    largest class share (~11%), and P(Binomial(360, 0.11) >= 216) < 1e-80, so this cannot pass by luck."""
    x, y = digits_test
    n, share = len(y), float(torch.bincount(y).max()) / len(y)
    acc = classifier_accuracy(digits_cls, x, y, digits_cls.schedule, t=(0, 50), seed=3)
    assert share < 0.12 and binomial_tail(n, share, math.ceil(0.6 * n)) < 1e-80
    assert acc >= 0.6, f"accuracy {acc:.3f} at t <= 50"
    assert digits_cls.info["accuracy"]["clean"] >= 0.6


def test_accuracy_falls_to_chance_at_the_last_step(digits_cls, digits_test):
    """At t = T - 1 the input is (almost) pure noise: sqrt(alpha_bar) < 1e-3, so no classifier can beat the largest
    class share (~11%) but by sampling error (std 1.6% on 360 items); 25% is 8 std above it."""
    x, y = digits_test
    T = digits_cls.schedule.num_timesteps
    assert float(digits_cls.schedule.alphas_cumprod[-1].sqrt()) < 1e-3
    assert classifier_accuracy(digits_cls, x, y, digits_cls.schedule, t=T - 1, seed=4) <= 0.25
    acc = digits_cls.info["accuracy"]
    bands = [acc[f"t {lo}-{hi}"] for lo, hi in t_bands(T)]
    assert bands[-1] < bands[0] - 0.2, f"accuracy by band {bands}: no fall with the noise level"


def test_folder_and_round_trip(digits_cls, digits_test):
    folder = digits_cls.path
    info = json.loads((folder / "config.json").read_text())
    assert info["kind"] == "noise_classifier" and info["format_version"] == 1
    assert info["num_classes"] == 10 and info["sample_shape"] == [1, 8, 8] and info["steps"] == 400
    assert info["schedule"] == NoiseSchedule.from_name("cosine", 1000).to_dict()     # the default recipe's
    assert info["data"]["source"] == "digits" and "test split" in info["data"]["held_out"]
    assert set(info["accuracy"]) == {"clean", "t 0-249", "t 250-499", "t 500-749", "t 750-999"}
    assert not any(p.suffix in (".pt", ".pth", ".pkl", ".bin") for p in folder.iterdir())
    loaded = load_classifier(folder)
    assert not loaded.training and loaded.info == digits_cls.info and loaded.num_classes == 10
    x = digits_test[0][:16]
    t = torch.linspace(0, 999, 16)
    assert torch.equal(loaded(x, t), digits_cls(x, t))
    # guidance needs d log p(y | x_t) / d x_t through the frozen classifier
    xg = x.clone().requires_grad_(True)
    loaded.log_prob(xg, t, digits_test[1][:16]).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_training_is_deterministic_by_seed(tmp_path):
    a = train_classifier("digits", tmp_path / "a", steps=15, **TINY)
    b = train_classifier("digits", tmp_path / "b", steps=15, **TINY)
    c = train_classifier("digits", tmp_path / "c", steps=15, **{**TINY, "seed": 1})
    wa, wb = (load_file(str(tmp_path / f"{k}/model.safetensors")) for k in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.info["accuracy"] == b.info["accuracy"]
    assert not torch.equal(a.head.weight, c.head.weight)


class Net(torch.nn.Module):
    """A stand-in network carrying what a trained one carries."""

    def __init__(self, schedule, shape, null_cond=None):
        super().__init__()
        self.diffusion_config = {"schedule": schedule.to_dict(), "prediction": "v_prediction",
                                 "null_cond": null_cond, "sample_shape": list(shape)}

    def forward(self, x, t, **cond):
        return torch.zeros_like(x)


def test_check_fits_refuses_another_schedule_size_or_class_count(digits_cls):
    cosine = NoiseSchedule.from_name("cosine", 1000)
    check_classifier_fits(digits_cls, Denoiser(Net(cosine, (1, 8, 8))))                           # unconditional
    check_classifier_fits(digits_cls, Denoiser(Net(cosine, (1, 8, 8), {"class_labels": 10})))     # 10 classes
    with pytest.raises(ValueError, match=r"another noise schedule \(cosine, T=1000\).*linear.*--like"):
        check_classifier_fits(digits_cls, Denoiser(Net(NoiseSchedule.from_name("linear", 1000), (1, 8, 8))))
    with pytest.raises(ValueError, match="another noise schedule.*--like"):
        check_classifier_fits(digits_cls, Denoiser(Net(NoiseSchedule.from_name("cosine", 500), (1, 8, 8))))
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\).*\(1, 28, 28\).*--like copies the run's image size"):
        check_classifier_fits(digits_cls, Denoiser(Net(cosine, (1, 28, 28))))
    with pytest.raises(ValueError, match="10 classes apart and the model knows 5.*on the run's data"):
        check_classifier_fits(digits_cls, Denoiser(Net(cosine, (1, 8, 8), {"class_labels": 5})))
    run_like = Denoiser(Net(cosine, (1, 8, 8)))
    run_like.num_classes = 3                         # what load_model_from_run attaches
    with pytest.raises(ValueError, match="knows 3"):
        check_classifier_fits(digits_cls, run_like)


def test_an_explicit_schedule(tmp_path):
    linear = NoiseSchedule.from_name("linear", 200, beta_start=2e-4, beta_end=0.03)
    cls = train_classifier("digits", tmp_path / "lin", steps=3, schedule=linear, **TINY)
    assert load_classifier(tmp_path / "lin").info["schedule"] == linear.to_dict()
    check_classifier_fits(cls, Denoiser(Net(linear, (1, 8, 8))))
    with pytest.raises(ValueError, match=r"\(linear 0.0002..0.03, T=200\).*\(cosine, T=1000\)"):
        check_classifier_fits(cls, Denoiser(Net(NoiseSchedule.from_name("cosine", 1000), (1, 8, 8))))
    with pytest.raises(ValueError, match="not both"):
        train_classifier("digits", tmp_path / "x", like=tmp_path, schedule=linear, steps=2, **TINY)


def test_like_run_copies_a_custom_beta_zero_snr_schedule(tmp_path, digits_cls):
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.training import merge_config, train

    cfg = merge_config(flags={"data.source": "moons", "model.type": "mlp", "model.preset": "tiny",
                              "optim.batch_size": 32, "optim.steps": 3, "optim.warmup_steps": 1,
                              "run.mixed_precision": "no", "run.sample_every": 0, "run.log_every": 1,
                              "diffusion.schedule": "linear", "diffusion.num_timesteps": 100,
                              "diffusion.beta_start": 0.0003, "diffusion.beta_end": 0.03,
                              "diffusion.zero_terminal_snr": True})
    train(cfg, tmp_path / "run", progress=False)
    run = load_model_from_run(tmp_path / "run")
    cls = train_classifier("moons", tmp_path / "cls", like=tmp_path / "run", steps=30, **TINY)
    assert cls.schedule.num_timesteps == 100 and cls.schedule.zero_terminal_snr
    assert torch.equal(cls.schedule.betas, run.schedule.betas) and cls.schedule.betas[-1] == 1.0
    assert cls.info["schedule"] == run.schedule.to_dict() and cls.info["like"] == str(tmp_path / "run")
    loaded = load_classifier(tmp_path / "cls")
    assert same_schedule(loaded.schedule, run.schedule) and loaded.sample_shape == (2,)
    check_classifier_fits(loaded, run)
    assert "held-out training" not in loaded.info["data"]["held_out"]      # moons has a test split
    with pytest.raises(ValueError, match="another noise schedule"):
        check_classifier_fits(digits_cls, run)
    # the run's image size is copied too: digits (8x8) against a 2-D-point run is refused before training
    with pytest.raises(ValueError, match="shape"):
        train_classifier("digits", tmp_path / "cls2", like=tmp_path / "run", steps=2, **TINY)


def test_mlp_classifier_on_vectors_beats_chance(tmp_path):
    """moons: two classes; with 2,000 test points (1,000 held out here) 80% at t <= 20 is impossible by luck
    (P(Binomial(1000, 0.5) >= 800) < 1e-80)."""
    cls = train_classifier("moons", tmp_path / "moons", steps=300, eval_n=1000, **TINY)
    ds = load_dataset("moons", split="test")
    x, cond = ds.get_batch(torch.arange(1000))
    assert binomial_tail(1000, 0.5, 800) < 1e-80
    assert classifier_accuracy(cls, x, cond["class_labels"], cls.schedule, t=(0, 20)) >= 0.8


def test_bad_input(tmp_path, digits_cls):
    with pytest.raises(ValueError, match="'swiss_roll' has none"):
        train_classifier("swiss_roll", tmp_path / "x", steps=2, **TINY)
    with pytest.raises(ValueError, match="does not exist"):
        load_classifier(tmp_path / "nowhere")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"format_version": 2}')
    with pytest.raises(ValueError, match=r"run.* is not a noise classifier folder.*dforge train-classifier"):
        load_classifier(tmp_path / "run")
    with pytest.raises(ValueError, match="holds other files"):
        train_classifier("digits", tmp_path / "run", steps=2, **TINY)
    with pytest.raises(ValueError, match="at least 2 classes"):
        NoiseClassifier(1, (2,))
    with pytest.raises(ValueError, match="takes samples of shape"):
        digits_cls(torch.zeros(2, 1, 28, 28), torch.zeros(2))
    bad = tmp_path / "bad"
    shutil.copytree(digits_cls.path, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt.*--force"):
        load_classifier(bad)


def test_cli_refuses_an_existing_classifier_without_force(tmp_path, digits_cls, capsys):
    out = tmp_path / "cls"
    shutil.copytree(digits_cls.path, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["train-classifier", "--data", "digits", "--out", str(out), "--preset", "tiny", "--steps", "3",
            "--batch-size", "16", "--no-progress"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dforge train-classifier: error:") and "--force" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(args + ["--force"]) == 0
    assert json.loads((out / "config.json").read_text())["steps"] == 3
    assert "wrote" in capsys.readouterr().out


def test_cli_on_data_without_labels_gives_one_line(tmp_path, capsys):
    assert main(["train-classifier", "--data", "swiss_roll", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "'swiss_roll' has none" in err[0] and "Traceback" not in captured.err


def test_parser_stays_torch_free_and_help_shows_defaults(capsys):
    code = ("from diffusion_forge.cli import build_parser; build_parser(); import sys; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(SystemExit):
        main(["train-classifier", "--help"])
    text = capsys.readouterr().out
    assert "(default: 1000)" in text and "(default: small)" in text and "--like" in text and "examples:" in text
