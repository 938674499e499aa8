"""Conditioning and guidance on the command line: `dforge sample`, `dforge eval RUN` and `dforge viz guidance`
with --class, --guidance-scale, --classifier and --autoguidance, on tiny runs trained in seconds."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from diffusion_forge.cli import main

# tiny U-Nets on the bundled 8x8 "digits" (labelled, 10 classes): a run in about a second
TINY = ["--data", "digits", "--set", "preset=tiny", "--set", "batch_size=16", "--set", "steps=4",
        "--set", "sample_every=0", "--set", "sample.n=4", "--set", "sample.steps=2",
        "--set", "run.mixed_precision=no", "--no-progress"]
FAST = ["--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """cond: class-conditional (label dropout 0.1, the snapshot of step 2 kept); nodrop: class-conditional
    with conditioning.dropout=0 (no null class); uncond: unconditional, another schedule, no snapshot."""
    root = tmp_path_factory.mktemp("guidance-runs")
    torch.set_num_threads(1)
    flags = {"cond": ["--set", "conditioning.kind=class", "--set", "run.guide_snapshot_step=2"],
             "nodrop": ["--set", "conditioning.kind=class", "--set", "conditioning.dropout=0"],
             "uncond": ["--set", "diffusion.schedule=linear", "--set", "run.guide_snapshot_step=0"]}
    for name, extra in flags.items():
        assert main(["train", "--out", str(root / name), *TINY, *extra]) == 0, name
    return {name: root / name for name in flags}


@pytest.fixture(scope="module")
def classifiers(runs, tmp_path_factory):
    """lin: fits `uncond` (its linear schedule, 1x8x8), not `cond` (cosine); moons: 2-D points, not images."""
    from diffusion_forge.training.classifier import train_classifier

    root = tmp_path_factory.mktemp("classifiers")
    torch.set_num_threads(1)
    train_classifier("digits", root / "lin", like=runs["uncond"], steps=3, batch_size=16, preset="tiny",
                     progress=False, eval_n=20)
    train_classifier("moons", root / "moons", steps=3, batch_size=16, preset="tiny", progress=False, eval_n=20)
    return {"lin": root / "lin", "moons": root / "moons"}


def _sample(run, out, *flags) -> dict:
    assert main(["sample", str(run), "--out", str(out), *FAST, *flags]) == 0
    with np.load(out) as f:
        return {k: f[k] for k in f.files}


def _plain(run, n, labels=None):
    """What the run gives without any guidance wrapper: generate() over the loaded run, the run's sampler, at
    `dforge sample`'s default precision (auto: bf16 autocast where the CPU has it)."""
    from diffusion_forge.data import to_uint8
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.sampling.generate import generate

    trained = load_model_from_run(run)
    cond = None if labels is None else {"class_labels": torch.as_tensor(labels)}
    x = generate(trained, n, seed=0, sampler=trained.config["sample"]["sampler"], steps=2,
                 sampler_options=trained.config["sample"]["options"], cond=cond, precision="auto")  # the CLI's default
    return to_uint8(x)


# ---------------------------------------------------------------------------------------------
# What runs

def test_class_all_writes_balanced_labels_and_says_what_ran(runs, tmp_path, capsys):
    got = _sample(runs["cond"], tmp_path / "x.npz", "--n", "23", "--class", "all", "--guidance-scale", "2")
    assert list(got) == ["images", "labels"]
    assert got["labels"].dtype == np.int64 and (got["labels"] == np.arange(23) % 10).all()   # sample i: i mod K
    assert got["images"].shape == (23, 8, 8, 1)
    out = capsys.readouterr().out
    from diffusion_forge.sampling.registry import default_sampler
    assert default_sampler(2)[0] in out and "2 steps" in out and "CFG w = 2" in out and "i mod 10" in out
    assert out.rstrip().endswith(f"to {tmp_path / 'x.npz'}") and " s) to " in out          # the seconds
    got = _sample(runs["cond"], tmp_path / "y.npz", "--n", "5", "--class", "7")
    assert (got["labels"] == 7).all()
    from diffusion_forge.training.config import RECOMMENDED_GUIDANCE_SCALE
    assert f"CFG w = {RECOMMENDED_GUIDANCE_SCALE:g} (the run's recommended scale)" in capsys.readouterr().out
    assert list(_sample(runs["uncond"], tmp_path / "u.npz", "--n", "3")) == ["images"]   # unconditional: no labels


def test_class_data_draws_the_training_shares_unguided(runs, tmp_path, capsys):
    """--class data: labels from the p(c) the run recorded (the digits set's own label shares, counted here a
    second way), drawn per seed, and the conditional model (w = 1) unless --guidance-scale is given."""
    from diffusion_forge.data import load_dataset
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.sampling.generate import data_class_labels

    labels = np.asarray(load_dataset("digits", split="train").labels)
    p_c = load_model_from_run(runs["cond"]).class_frequencies
    assert np.allclose(p_c, np.bincount(labels, minlength=10) / len(labels), atol=1e-12)
    got = _sample(runs["cond"], tmp_path / "d.npz", "--n", "12", "--class", "data", "--seed", "5")
    assert (got["labels"] == data_class_labels(p_c, 12, seed=5).numpy()).all()
    assert (got["images"] == _plain_seeded(runs["cond"], got["labels"], seed=5)).all()     # unguided: exactly
    out = capsys.readouterr().out
    assert "training set's shares p(c)" in out and "conditional model (w = 1, no guidance)" in out
    from diffusion_forge.sampling.registry import CONDITIONAL_SAMPLERS, DATA_CLASS_SAMPLERS, DEFAULT_SAMPLERS
    assert DATA_CLASS_SAMPLERS[1][1]["s_tmax"] == 3 and "s_tmax" not in CONDITIONAL_SAMPLERS[1][1]
    assert DEFAULT_SAMPLERS[1][1]["s_tmax"] == 5                        # three tables, three rules
    assert "'s_tmax': 3.0" in out                                       # the rule of samples that follow the data
    _sample(runs["cond"], tmp_path / "b.npz", "--n", "12", "--class", "all", "--guidance-scale", "1")
    assert "'s_tmax': inf" in capsys.readouterr().out                   # class i mod K: the conditional rule
    guided = _sample(runs["cond"], tmp_path / "g.npz", "--n", "12", "--class", "data", "--seed", "5",
                     "--guidance-scale", "3")
    assert (guided["labels"] == got["labels"]).all() and (guided["images"] != got["images"]).any()
    assert "CFG w = 3" in capsys.readouterr().out


def _plain_seeded(run, labels, seed):
    """The conditional network, unguided, with the rule's sampler for samples that follow the data, 2 steps."""
    from diffusion_forge.data import to_uint8
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.sampling.generate import generate
    from diffusion_forge.sampling.registry import default_sampler

    trained = load_model_from_run(run)
    name, options = default_sampler(2, "data")
    x = generate(trained, len(labels), seed=seed, sampler=name, steps=2, sampler_options=options,
                 cond={"class_labels": torch.as_tensor(labels)}, precision="auto")
    return to_uint8(x)


def test_data_class_labels_follow_the_shares_and_the_seed():
    from diffusion_forge.sampling.generate import data_class_labels

    p_c = [0.7, 0.2, 0.1, 0.0]
    y = data_class_labels(p_c, 20_000, seed=3).numpy()
    counts = np.bincount(y, minlength=4)
    sd = np.sqrt(20_000 * np.array(p_c) * (1 - np.array(p_c)))            # binomial standard deviations
    assert (np.abs(counts - 20_000 * np.array(p_c)) <= 5 * sd + 1e-9).all() and counts[3] == 0
    assert (data_class_labels(p_c, 7, seed=3).numpy() == y[:7]).all()          # a label depends on its seed only
    assert (data_class_labels(p_c, 5, seed=5).numpy() == y[2:7]).all()         # sample i: seed + i
    assert (data_class_labels([2, 2], 50, seed=0).numpy() == data_class_labels([0.5, 0.5], 50).numpy()).all()
    for bad in ([], [0, 0], [1, -1], [[0.5, 0.5]], [float("nan"), 1]):
        with pytest.raises(ValueError, match="frequencies must be"):
            data_class_labels(bad, 3)


def test_scale_one_is_the_conditional_model_and_zero_the_unconditional_one(runs, tmp_path):
    labels = np.arange(12) % 10
    w1 = _sample(runs["cond"], tmp_path / "w1.npz", "--n", "12", "--class", "all", "--guidance-scale", "1")
    assert (w1["images"] == _plain(runs["cond"], 12, labels)).all()                 # the same seeds, exactly
    w0 = _sample(runs["cond"], tmp_path / "w0.npz", "--n", "12", "--class", "all", "--guidance-scale", "0")
    uncond = _plain(runs["cond"], 12, np.full(12, 10))                              # the null class K = 10
    diff = np.abs(w0["images"].astype(int) - uncond.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99        # one batched call of both branches: rounding only
    w3 = _sample(runs["cond"], tmp_path / "w3.npz", "--n", "12", "--class", "all", "--guidance-scale", "3")
    assert (w3["images"] != w1["images"]).any()


def test_rescale_and_interval_reach_the_guidance(runs, tmp_path, capsys):
    flags = ["--n", "6", "--class", "all"]
    w1 = _sample(runs["cond"], tmp_path / "w1.npz", *flags, "--guidance-scale", "1")
    w3 = _sample(runs["cond"], tmp_path / "w3.npz", *flags, "--guidance-scale", "3")
    never = _sample(runs["cond"], tmp_path / "n.npz", *flags, "--guidance-scale", "3", "--guidance-interval", "0,1e-9")
    assert (never["images"] == w1["images"]).all()             # no step's sigma in the band: the conditional model
    rescaled = _sample(runs["cond"], tmp_path / "r.npz", *flags, "--guidance-scale", "3", "--guidance-rescale", "0.7")
    assert (rescaled["images"] != w3["images"]).any()
    out = capsys.readouterr().out
    assert "CFG w = 3 (sigma in [0, 1e-09])" in out and "CFG w = 3 (rescale 0.7)" in out


def test_autoguidance_by_itself_is_the_identity_and_by_the_snapshot_is_not(runs, tmp_path, capsys):
    base = _sample(runs["cond"], tmp_path / "b.npz", "--n", "6", "--guidance-scale", "1")
    same = _sample(runs["cond"], tmp_path / "s.npz", "--n", "6", "--guidance-scale", "1", "--autoguidance", "4",
                   "--autoguidance-scale", "3")                  # step 4 is the main checkpoint: weak == main
    assert (same["images"] == base["images"]).all()
    snap = _sample(runs["cond"], tmp_path / "g.npz", "--n", "6", "--guidance-scale", "1", "--autoguidance")
    assert (snap["images"] != base["images"]).any()
    cfg = _sample(runs["cond"], tmp_path / "c.npz", "--n", "6", "--guidance-scale", "2")
    both = _sample(runs["cond"], tmp_path / "cg.npz", "--n", "6", "--guidance-scale", "2", "--autoguidance")
    assert (both["images"] != cfg["images"]).any()                 # CFG over autoguidance, not around it
    out = capsys.readouterr().out
    assert "autoguidance s = 2 (guide: the snapshot of step 2)" in out           # the default scale, stated


def test_autoguidance_of_an_unconditional_run_defaults_to_its_own_measured_scale(tmp_path, capsys):
    """--autoguidance without a scale: 2 on conditional runs (above), 1.3 on unconditional ones (measured on the
    unconditional recipe, docs/training.md), the same samples as asking for 1.3, not those of 2."""
    torch.set_num_threads(1)
    run = tmp_path / "uncond-snap"
    assert main(["train", "--out", str(run), *TINY, "--set", "run.guide_snapshot_step=2"]) == 0
    default = _sample(run, tmp_path / "d.npz", "--n", "6", "--autoguidance")
    assert "autoguidance s = 1.3 (guide: the snapshot of step 2)" in capsys.readouterr().out
    asked = _sample(run, tmp_path / "a.npz", "--n", "6", "--autoguidance", "--autoguidance-scale", "1.3")
    two = _sample(run, tmp_path / "t.npz", "--n", "6", "--autoguidance", "--autoguidance-scale", "2")
    assert (default["images"] == asked["images"]).all() and (default["images"] != two["images"]).any()


def test_classifier_guidance_works_on_an_unconditional_run(runs, classifiers, tmp_path, capsys):
    plain = _sample(runs["uncond"], tmp_path / "p.npz", "--n", "10")
    zero = _sample(runs["uncond"], tmp_path / "z.npz", "--n", "10", "--classifier", str(classifiers["lin"]),
                   "--class", "all", "--classifier-scale", "0")
    assert (zero["images"] == plain["images"]).all() and (zero["labels"] == np.arange(10)).all()
    two = _sample(runs["uncond"], tmp_path / "t.npz", "--n", "10", "--classifier", str(classifiers["lin"]),
                  "--class", "3", "--classifier-scale", "50")
    assert (two["images"] != plain["images"]).any() and (two["labels"] == 3).all()
    assert "classifier guidance s = 50" in capsys.readouterr().out


def test_a_grid_of_all_classes_has_one_row_per_class(runs, tmp_path):
    from PIL import Image

    assert main(["sample", str(runs["cond"]), "--n", "20", "--class", "all", "--raw-grid",
                 "--out", str(tmp_path / "raw.png"), *FAST]) == 0
    assert Image.open(tmp_path / "raw.png").size == (2 + 2 * (8 + 2), 2 + 10 * (8 + 2))  # 10 rows of 2 tiles
    assert main(["sample", str(runs["cond"]), "--n", "20", "--class", "all", "--out", str(tmp_path / "t.png"),
                 *FAST]) == 0
    width, height = Image.open(tmp_path / "t.png").size
    assert height > 10 * 8 * 8 and height > width                                         # titled, enlarged


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the fix, no traceback, nothing written

def _tree(*folders) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


BAD = [
    ("cond", ["--class", "10"], ["out of range", "--class 0..9 or all"]),
    ("cond", ["--class", "seven"], ["--class takes a class id"]),
    ("uncond", ["--class", "3"], ["unconditional", "--conditioning class", "--classifier CLS"]),
    ("cond", ["--classifier", "{lin}", "--class", "3"], ["another noise schedule", "--like"]),
    ("cond", ["--classifier", "{moons}"], ["shape (2,)", "--like"]),
    ("uncond", ["--classifier", "{lin}", "--class", "data"], ["--class data", "not class-conditional", "--class all"]),
    ("nodrop", ["--guidance-scale", "2"], ["conditioning.dropout=0", "conditioning.dropout > 0"]),
    ("uncond", ["--guidance-scale", "2"], ["unconditional", "--conditioning class"]),
    ("uncond", ["--autoguidance"], ["no autoguidance snapshot", "run.guide_snapshot_step", "--guide-with"]),
    ("cond", ["--autoguidance", "3"], ["no checkpoint of step 3", "snapshot of step 2"]),
    ("uncond", ["--guide-with", "{cond}"], ["guide with a run of the same conditioning"]),
    ("cond", ["--guidance-interval", "5,1"], ["0 <= LO < HI"]),
    ("cond", ["--classifier-scale", "2"], ["add --classifier CLS"]),
]


# every row through sample; the rows of the shared run checks (guidance_args) through eval and viz guidance too
CASES = [("sample", *row) for row in BAD] + [(command, *row) for command in ("eval", "viz") for row in BAD
                                            if row[1][0] in ("--class", "--classifier", "--guidance-scale")]


@pytest.mark.parametrize("command, run, flags, phrases", CASES, ids=[f"{c[0]} {' '.join(c[2])}" for c in CASES])
def test_bad_guidance_input_is_one_line_naming_the_fix(runs, classifiers, tmp_path, capsys, command, run, flags,
                                                       phrases):
    names = {k: str(v) for k, v in {**runs, **classifiers}.items()}
    flags = [f.format(**names) for f in flags]
    out = tmp_path / ("x.json" if command == "eval" else "x.png")
    argv = {"sample": ["sample", str(runs[run]), "--out", str(out)],
            "eval": ["eval", str(runs[run]), "--json", str(out), "--n", "4"],
            "viz": ["viz", "guidance", str(runs[run]), "--out", str(out), "--vary", "autoguidance"]}[command]
    if command == "viz" and flags[0] == "--guidance-scale":
        argv[-1] = "cfg"                                   # vary CFG: its scale comes from --scales
        flags = []
    before = _tree(*runs.values(), *classifiers.values(), tmp_path)
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith(f"dforge {argv[0]}"), err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert _tree(*runs.values(), *classifiers.values(), tmp_path) == before and not out.exists()


# ---------------------------------------------------------------------------------------------
# eval and viz guidance

def test_eval_class_data_scores_samples_that_follow_the_data(runs, tmp_path):
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.sampling.generate import data_class_labels

    report = tmp_path / "e.json"
    assert main(["eval", str(runs["cond"]), "--class", "data", "--n", "10", "--steps", "2", "--seed", "3", "--no-kid",
                 "--no-pr", "--no-memorization", "--nll-n", "2", "--nll-t", "2", "--json", str(report),
                 "--save-samples", str(tmp_path / "s.npz")]) == 0
    got = json.loads(report.read_text())
    assert got["guidance"]["class"] == "data" and got["guidance"]["cfg"]["scale"] == 1.0
    assert got["sampler_options"]["s_tmax"] == 3.0                      # the rule of samples that follow the data
    with np.load(tmp_path / "s.npz") as f:
        p_c = load_model_from_run(runs["cond"]).class_frequencies
        assert (f["labels"] == data_class_labels(p_c, 10, seed=3).numpy()).all()


def test_eval_scores_guided_samples_and_reports_the_guidance(runs, tmp_path, capsys):
    report = tmp_path / "e.json"
    assert main(["eval", str(runs["cond"]), "--class", "all", "--guidance-scale", "2", "--n", "10", "--steps", "2",
                 "--no-kid", "--no-pr", "--no-memorization", "--nll-n", "2", "--nll-t", "2", "--json", str(report),
                 "--save-samples", str(tmp_path / "s.npz")]) == 0
    got = json.loads(report.read_text())
    assert got["guidance"]["cfg"] == {"scale": 2.0, "rescale": 0.0, "interval": None}
    assert got["guidance"]["class"] == "all" and "CFG w = 2" in got["guidance"]["text"]
    assert "given their labels" in capsys.readouterr().out                    # the NLL of p(x | y)
    with np.load(tmp_path / "s.npz") as f:
        assert (f["labels"] == np.arange(10) % 10).all()
    assert main(["eval", str(tmp_path / "s.npz"), "--data", "digits", "--guidance-scale", "2"]) == 2
    assert "a sample file is already sampled" in capsys.readouterr().err


def test_eval_of_an_mnist_run_reports_the_accuracy_of_the_requested_digit(tmp_path, capsys):
    run = tmp_path / "mnist"
    assert main(["train", "--out", str(run), *TINY[2:], "--data", "mnist", "--set", "steps=2",
                 "--set", "conditioning.kind=class"]) == 0
    report = tmp_path / "e.json"
    assert main(["eval", str(run), "--class", "all", "--guidance-scale", "3", "--n", "20", "--steps", "2",
                 "--features", "digits", "--no-kid", "--no-pr", "--no-memorization", "--nll-n", "0",
                 "--json", str(report)]) == 0
    metrics = json.loads(report.read_text())["metrics"]
    assert 0 <= metrics["digit_accuracy"] <= 1
    assert "digit_accuracy" in capsys.readouterr().out


def test_viz_guidance_draws_one_row_per_scale_from_the_same_seeds(runs, tmp_path, capsys):
    from PIL import Image

    sizes = {}
    for scales in ("0,1", "0,1,2,3,5"):
        out = tmp_path / f"g{len(scales)}.png"
        assert main(["viz", "guidance", str(runs["cond"]), "--scales", scales, "--n", "8", "--steps", "2",
                     "--out", str(out)]) == 0
        text = capsys.readouterr().out
        assert f"{scales.count(',') + 1} rows" in text and "w = " + scales.replace(",", ", ") in text
        sizes[scales] = Image.open(out).size
    # three more rows of 8 px tiles (+ 2 px padding), enlarged 8 times: 240 more pixels, the same width
    assert abs(sizes["0,1,2,3,5"][1] - sizes["0,1"][1] - 3 * (8 + 2) * 8) <= 2
    assert sizes["0,1,2,3,5"][0] == sizes["0,1"][0]
    assert main(["viz", "guidance", str(runs["cond"]), "--scales", "1,1", "--out", str(tmp_path / "d.png")]) == 2
    assert "distinct" in capsys.readouterr().err


def test_plot_guidance_layout_and_the_same_seeds_in_every_row(runs, tmp_path):
    from diffusion_forge import viz
    from diffusion_forge.cli.guidance_args import Classes
    from diffusion_forge.denoise.guidance import ClassifierFreeGuidance
    from diffusion_forge.io.checkpoint import load_model_from_run

    trained = load_model_from_run(runs["cond"])
    cond = Classes("all", 10).cond(6)
    denoisers = {0.0: ClassifierFreeGuidance(trained, 0.0), 1.0: trained, 4.0: ClassifierFreeGuidance(trained, 4.0)}
    samples = viz.guidance_samples(denoisers, 6, seed=3, cond=cond, sampler="ddim", steps=2)
    direct = viz.guidance_samples({1.0: trained}, 2, seed=3, cond={"class_labels": cond["class_labels"][:2]},
                                  sampler="ddim", steps=2)
    assert torch.allclose(samples[1.0][:2], direct[1.0], atol=1e-5)             # sample i: seed + i, any n
    layout = viz.plot_guidance(tmp_path / "g.png", samples, labels=[f"class {i}" for i in range(6)])
    assert layout["rows"] == 3 and layout["cols"] == 6 and layout["row_labels"] == ["w = 0", "w = 1", "w = 4"]
    assert layout["grid_shape"] == (3 * (8 + 2) + 2, 6 * (8 + 2) + 2, 1)
    points = {s: torch.randn(50, 2) for s in (0.0, 2.0)}
    layout = viz.plot_guidance(tmp_path / "p.png", points, labels=[f"class {i % 2}" for i in range(50)])
    assert layout["kind"] == "vector" and layout["rows"] == 2 and (tmp_path / "p.png").stat().st_size > 2000


def test_help_states_the_convention_and_the_defaults():
    import argparse

    from diffusion_forge.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    viz = next(a for a in sub.choices["viz"]._actions if isinstance(a, argparse._SubParsersAction))
    for parser in (sub.choices["sample"], sub.choices["eval"], viz.choices["guidance"]):
        text = " ".join(parser.format_help().split())
        assert "pred = pred_uncond + w (pred_cond - pred_uncond)" in text
        assert "w = 1 is the conditional model, w = 0 the unconditional one" in text
        assert "(default: 2 on class- or text-conditional runs, 1.3 on unconditional ones)" in text   # autoguidance
        assert "conditioning.dropout" in text and "run.guide_snapshot_step" in text
        for action in parser._actions:
            assert action.help, action.dest


def test_digit_accuracy_counts_the_requested_digit():
    from diffusion_forge.evaluate.digits import digit_accuracy

    class Stub:
        def predict_proba(self, images):
            return torch.nn.functional.one_hot(torch.as_tensor([3, 3, 1, 0]), 10).float()

    assert digit_accuracy(np.zeros((4, 28, 28, 1), np.uint8), [3, 2, 1, 5], model=Stub()) == 0.5
    with pytest.raises(ValueError, match="one digit per image"):
        digit_accuracy(np.zeros((4, 28, 28, 1), np.uint8), [3, 2], model=Stub())


def test_viz_trajectory_and_samplers_show_a_class_conditional_run_conditionally(runs, tmp_path, monkeypatch):
    """The conditional network gets class i mod K (it cannot run without labels); the trajectory's output
    equals `generate` with those labels from the same seed."""
    from diffusion_forge import viz
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.sampling.generate import generate

    seen = {}
    real = viz.record_trajectory
    monkeypatch.setattr(viz, "record_trajectory", lambda *a, **kw: seen.setdefault("traj", real(*a, **kw)))
    assert main(["viz", "trajectory", str(runs["cond"]), "--sampler", "euler", "--steps", "3",
                 "--out", str(tmp_path / "t.png")]) == 0
    D = load_model_from_run(runs["cond"])
    want = generate(D, 1, seed=0, sampler="euler", steps=3, cond={"class_labels": torch.tensor([0])})
    assert torch.allclose(seen["traj"]["final"].float().cpu(), want, atol=1e-6)
    assert main(["viz", "samplers", str(runs["cond"]), "--samplers", "euler,ddim", "--step-counts", "2,3",
                 "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
