"""The nested config: schema, flat aliases, did-you-mean, coercion, validation by name, files, resume, the CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import diffusion_forge
from diffusion_forge import training as T
from diffusion_forge.training.config import FIELDS, FLAT_ALIASES, SECTIONS, ConfigError
from diffusion_forge.training.layers import help_rows

FIXTURES = Path(__file__).parent / "fixtures"
SRC = Path(diffusion_forge.__file__).parent.parent
TINY = ["--set", "model.type=mlp", "--set", "model.preset=tiny", "--set", "optim.batch_size=16", "--set",
        "optim.steps=2", "--set", "run.sample_every=0", "--set", "sample.n=4", "--set", "sample.steps=2",
        "--set", "run.mixed_precision=no", "--no-progress"]


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


# ---------------------------------------------------------------------------------------------
# The schema

def test_the_config_and_the_train_parser_import_no_torch():
    """training.config, training.layers, io.runs and cli/train.py's parser import no torch (the package's own
    __init__ is stubbed, so this checks these modules only)."""
    code = f"""
import argparse, sys, types
pkg = types.ModuleType("diffusion_forge"); pkg.__path__ = [{str(SRC / 'diffusion_forge')!r}]
sys.modules["diffusion_forge"] = pkg
import diffusion_forge.training as T, diffusion_forge.io.runs
cfg = T.merge_config(flags={{"optim.lr": "1e-3", "steps": "5"}})
assert T.Config.from_dict(cfg.to_dict()) == cfg
from diffusion_forge.cli import train
parser = argparse.ArgumentParser(); train.register(parser.add_subparsers())
parser.format_help()
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "accelerate"))
assert not bad, bad
print("ok")
"""
    out = python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_allowed_names_equal_the_torch_side_lists():
    from diffusion_forge.core.process import PREDICTIONS
    from diffusion_forge.core.schedules import SCHEDULE_NAMES
    from diffusion_forge.models import PRESETS
    from diffusion_forge.training import config as C

    from diffusion_forge.core.losses import NOISE_LEVELS

    assert C.SCHEDULE_NAMES == SCHEDULE_NAMES and C.PREDICTIONS == PREDICTIONS and C.NOISE_LEVELS == NOISE_LEVELS
    assert set(C.MODEL_TYPES) == set(PRESETS)


def test_every_flat_key_of_format_version_1_is_an_alias():
    old = json.loads((FIXTURES / "run_v1" / "config.json").read_text())    # the 37 keys of the first release
    assert set(old) == set(FLAT_ALIASES)
    cfg = T.Config.from_dict(old)
    for flat, dotted in FLAT_ALIASES.items():
        assert cfg.get(dotted) == old[flat], flat
    assert set(cfg.to_dict()) == {"format_version", *SECTIONS} and cfg.to_dict()["format_version"] == 2


def test_nested_flat_and_mixed_dicts_give_the_same_config():
    nested = T.Config.from_dict({"optim": {"lr": 1e-3, "steps": 7}, "data": {"source": "moons"}})
    flat = T.Config.from_dict({"lr": 1e-3, "steps": 7, "data": "moons"})
    mixed = T.Config.from_dict({"optim.lr": "1e-3", "steps": "7", "data": {"source": "moons"}, "format_version": 2})
    assert nested == flat == mixed
    assert nested.optim.lr == 1e-3 and nested.optim.steps == 7 and nested.data.source == "moons"
    assert T.Config.from_dict(nested.to_dict()) == nested and nested.flat()["optim.steps"] == 7
    with pytest.raises(ConfigError, match="optim.lr is given twice"):
        T.Config.from_dict({"lr": 1e-3, "optim.lr": 2e-3})
    with pytest.raises(ConfigError, match="format_version 3 is not one this diffusion_forge reads"):
        T.Config.from_dict({"format_version": 3})


def test_a_flat_key_prints_its_dotted_name_once_per_process():
    code = """
import diffusion_forge.training as T
for _ in range(3):
    T.merge_config(flags={"lr": "1e-3", "sample_steps": "4", "optim.steps": "9"})
T.merge_config(base={"ema_decay": 0.9})      # a saved run's flat config is read silently
"""
    out = python(code)
    assert out.returncode == 0, out.stderr
    notes = [line for line in out.stderr.splitlines() if line.startswith("note:")]
    assert notes == ["note: config key 'lr' is now 'optim.lr' (the old name still works)",
                     "note: config key 'sample_steps' is now 'sample.steps' (the old name still works)"]


@pytest.mark.parametrize("key, hint", [
    ("learning_rate", r"did you mean lr \(optim.lr\)"),
    ("optim.learning_rate", "did you mean optim.lr"),
    ("optm.lr", "did you mean optim.lr"),
    ("conditioning.knd", "did you mean conditioning.kind"),
    ("num_classes", "did you mean conditioning.num_classes"),
    ("sample", r"did you mean sample.n or sample.sampler or sample.steps\? \(sample is a section"),
    ("zzzz", "the sections are data, diffusion, model, conditioning, optim, ema, run, sample"),
])
def test_unknown_keys_get_a_did_you_mean(key, hint):
    with pytest.raises(ConfigError, match=rf"unknown config key '{key}'; {hint}"):
        T.merge_config(flags={key: "1"})


def test_strings_are_typed_by_the_field():
    cfg = T.merge_config(flags={"optim.steps": "1e3", "data.flip": "yes", "diffusion.min_snr_gamma": "none",
                                "model.options": "{dropout: 0.1}", "sample.options.s_noise": "1.01",
                                "sample.sampler": "null", "diffusion.beta_start": "8.5e-4", "diffusion.schedule":
                                "scaled_linear"})
    assert (cfg.optim.steps, cfg.data.flip, cfg.diffusion.min_snr_gamma) == (1000, True, None)
    assert cfg.model.options == {"dropout": 0.1} and cfg.sample.sampler is None
    assert cfg.sample.options == {"s_noise": 1.01}
    kept = T.merge_config(base={"sample": {"options": {"eta": 1.8}}}, flags={"sample.options.s_noise": "1.01"})
    assert kept.sample.options == {"eta": 1.8, "s_noise": 1.01}        # one option set, the others kept
    assert cfg.diffusion.beta_start == 0.00085
    for bad, message in (({"optim.steps": "2.5"}, "optim.steps='2.5' is not a valid int"),
                         ({"optim.steps": True}, "optim.steps=True is not a valid int"),
                         ({"data.flip": "maybe"}, "data.flip='maybe' is not a valid bool"),
                         ({"data.source": None}, "data.source cannot be none"),
                         ({"data.source": {"a": 1}}, "data.source=\\{'a': 1\\} is not a valid str"),
                         ({"model.options": "[1, 2]"}, "model.options='\\[1, 2\\]' is not a valid dict"),
                         ({"optim.lr.x": "1"}, "unknown config key 'optim.lr.x'")):
        with pytest.raises(ConfigError, match=message):
            T.merge_config(flags=bad)


@pytest.mark.parametrize("bad, message", [
    ({"conditioning.kind": "image"}, "conditioning.kind='image' is not one of: none, class"),
    ({"conditioning.dropout": "0.1"}, "conditioning.dropout=0.1 needs a condition to drop: set conditioning.kind=class"),
    ({"conditioning.kind": "class", "conditioning.dropout": "1.5"}, r"conditioning.dropout must lie in \[0, 1\)"),
    ({"diffusion.beta_end": "0.012"}, "diffusion.beta_end does not apply to the cosine schedule"),
    ({"diffusion.schedule": "linear", "diffusion.beta_start": "0.1", "diffusion.beta_end": "0.01"},
     "0 < beta_start < beta_end < 1"),
    ({"ema.decay": "1"}, r"ema.decay must lie in \[0, 1\)"),
    ({"optim.lr": "0"}, "optim.lr must be > 0"),
    ({"data.channels": "2"}, "data.channels must be 1, 3 or none"),
    ({"sample.steps": "0"}, "sample.steps must be >= 1"),
    ({"diffusion.noise_levels": "lognormal"}, "diffusion.noise_levels='lognormal' is not one of: uniform, log_normal"),
    ({"diffusion.log_sigma_std": "0"}, "diffusion.log_sigma_std must be > 0"),
])
def test_values_are_validated_by_name(bad, message):
    with pytest.raises(ConfigError, match=message):
        T.merge_config(flags=bad)


def test_help_rows_come_from_the_field_metadata():
    rows = {key: (default, text) for key, default, text in help_rows()}
    assert list(rows) == list(FIELDS)
    assert rows["diffusion.prediction"][0] == "v_prediction" and rows["sample.options"][0] == "{}"
    assert rows["data.image_size"][0] == "none" and rows["ema.warmup"][0] == "true"
    assert rows["optim.lr"][1] == "peak learning rate of AdamW" and rows["sample.n"][1].endswith("[was: sample_n]")
    assert rows["diffusion.beta_start"][1].startswith("first beta")


# ---------------------------------------------------------------------------------------------
# Files and resume

@pytest.mark.parametrize("name, text, line", [
    ("bad.yaml", "optim:\n  lr: 1e-3\n  steps: [10\n", 4),
    ("bad.json", '{"optim": {"lr": 1e-3,\n  "steps" 10}}', 2),
])
def test_a_config_file_with_a_syntax_error_names_the_file_and_the_line(tmp_path, name, text, line):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as e:
        T.merge_config(None, tmp_path / name)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / name}, line {line}: invalid") and "\n" not in message
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of config keys"):
        T.merge_config(None, tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("optim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'optim.lrr'; did you mean optim.lr"):
        T.merge_config(None, tmp_path / "typo.yaml")


def test_resume_compares_a_flat_version_1_config_with_nested_settings(tmp_path):
    shutil.copy(FIXTURES / "run_v1" / "config.json", tmp_path / "config.json")
    assert T.run_config(tmp_path, None, {"optim.steps": "12", "lr": "0.002"})[1] == {}
    with pytest.raises(T.ChangedSettings, match=r"other settings \(optim.steps: 12 -> 20\)"):
        T.run_config(tmp_path, None, {"optim.steps": "20"})
    (tmp_path / "more.yaml").write_text("optim: {steps: 20}\n")
    cfg, changes = T.run_config(tmp_path, tmp_path / "more.yaml", {}, allow_changes=True)
    assert changes == {"optim.steps": (12, 20)} and cfg.data.source == "moons"
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))      # the same run, saved as version 2
    assert T.run_config(tmp_path, None, {"steps": "20"})[1] == {}


def test_a_new_run_must_name_its_data(tmp_path):
    with pytest.raises(ConfigError, match=r"holds no run yet.*a new run needs its data named: add --data mnist"):
        T.run_config(tmp_path / "photoss", None, {}, require_data=True)
    assert not (tmp_path / "photoss").exists()
    assert T.run_config(tmp_path / "new", None, {"data": "moons"}, require_data=True)[0].data.source == "moons"


# ---------------------------------------------------------------------------------------------
# The command line

def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_train_help_lists_every_dotted_key_with_its_default():
    from diffusion_forge.cli.train import epilog

    text = epilog()
    for key, default, _ in help_rows():
        assert f"\n  {key} " in text and default in text.split(f"\n  {key} ", 1)[1].split("\n", 1)[0], key
    assert "v_pre{}ion" not in text and "v_prediction" in text


def test_train_refuses_bad_out_folders_and_devices(tmp_path, capsys):
    from diffusion_forge.cli import main

    assert main(["train", "--out", str(tmp_path / "photoss")]) == 2
    assert "a new run needs its data named: add --data mnist" in _err(capsys)
    assert not (tmp_path / "photoss").exists()
    (tmp_path / "file").write_text("keep me")
    assert main(["train", "--data", "moons", "--out", str(tmp_path / "file"), *TINY]) == 2
    assert "is a file, not a run folder" in _err(capsys) and (tmp_path / "file").read_text() == "keep me"
    assert main(["train", "--data", "moons", "--out", str(tmp_path / "r"), "--device", "tpu9", *TINY]) == 2
    assert "unknown device 'tpu9'" in _err(capsys) and not (tmp_path / "r").exists()
    (tmp_path / "bad.yaml").write_text("optim:\n  lr: [1\n")
    assert main(["train", "--out", str(tmp_path / "r"), "--config", str(tmp_path / "bad.yaml")]) == 2
    err = _err(capsys)
    assert "bad.yaml, line 3: invalid YAML" in err and len(err.strip().splitlines()) == 1


def test_print_config_prints_the_nested_config(tmp_path, capsys):
    from diffusion_forge.cli import main

    assert main(["train", "--out", str(tmp_path / "r"), "--data", "digits", "--set", "optim.lr=0.005",
                 "--device", "cpu", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["format_version"] == 2 and cfg["optim"]["lr"] == 0.005 and cfg["data"]["source"] == "digits"
    assert cfg["run"]["device"] == "cpu" and not (tmp_path / "r").exists()


def test_stable_diffusion_betas_train_from_the_command_line(tmp_path):
    """scaled_linear 0.00085..0.012 (Stable Diffusion's schedule) through --set, into the checkpoint."""
    from diffusion_forge.cli import main
    from diffusion_forge.io.checkpoint import load_checkpoint, load_model_from_run

    sd = ["--set", "diffusion.schedule=scaled_linear", "--set", "diffusion.beta_start=0.00085",
          "--set", "diffusion.beta_end=0.012", "--set", "diffusion.prediction=epsilon"]
    assert main(["train", "--data", "moons", "--out", str(tmp_path), *sd, *TINY]) == 0
    schedule = load_checkpoint(tmp_path).state["extra"]["schedule"]
    assert (schedule["name"], schedule["beta_start"], schedule["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    D = load_model_from_run(tmp_path)
    assert D.prediction == "epsilon"
    assert D.schedule.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert D.schedule.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    assert D.model.diffusion_config["schedule"]["beta_end"] == 0.012


def test_the_conditioning_flag_equals_the_set_form(tmp_path, capsys):
    from diffusion_forge.cli import main
    from diffusion_forge.cli.train import epilog

    configs = []
    for form in (["--conditioning", "class"], ["--set", "conditioning.kind=class"]):
        assert main(["train", "--data", "digits", *form, "--print-config"]) == 0
        configs.append(json.loads(capsys.readouterr().out))
    assert configs[0] == configs[1] and configs[0]["conditioning"]["kind"] == "class"
    assert configs[0]["conditioning"]["dropout"] == 0.1 and configs[0]["sample"]["guidance_scale"] is None
    assert configs[0] != json.loads(json.dumps(T.merge_config(flags={"data": "digits"}).to_dict()))
    out = subprocess.run([sys.executable, "-m", "diffusion_forge", "train", "--help"], capture_output=True, text=True,
                         timeout=120, check=False).stdout
    assert "--conditioning KIND" in out and "conditioning.kind=" in out.rsplit("--conditioning KIND", 1)[1][:400]
    # text conditioning (issue 11; was "not available yet"): a config kind, with the text encoder's keys
    assert main(["train", "--data", "digits", "--conditioning", "text", "--print-config"]) == 0
    text = json.loads(capsys.readouterr().out)["conditioning"]
    assert text["kind"] == "text" and text["text_encoder"] == "all-MiniLM-L6-v2" and text["max_length"] == 32
    assert main(["train", "--data", "moons", "--conditioning", "text", "--out", str(tmp_path / "t"),
                 "--no-progress"]) == 2
    assert "conditioning.kind=text needs captions, and data set 'moons' has none" in _err(capsys)
    assert main(["train", "--data", "digits", "--conditioning", "clas", "--print-config"]) == 2
    assert "conditioning.kind='clas' is not one of: none, class" in _err(capsys)
    assert "--conditioning class" in epilog()


def test_train_help_lists_the_guidance_keys_with_their_defaults():
    from diffusion_forge.cli.train import epilog

    rows = {key: (default, text) for key, default, text in help_rows()}
    assert rows["conditioning.dropout"][0] == "0.1" and "null class" in rows["conditioning.dropout"][1]
    assert rows["sample.guidance_scale"][0] == "none"
    assert "pred_uncond + w (pred_cond - pred_uncond)" in rows["sample.guidance_scale"][1]
    assert "1.25 for class-conditional runs" in rows["sample.guidance_scale"][1]
    assert rows["run.guide_snapshot_step"][0] == "500" and "autoguidance" in rows["run.guide_snapshot_step"][1]
    lines = epilog().splitlines()
    for key, default in (("conditioning.dropout", "0.1"), ("sample.guidance_scale", "none"),
                         ("run.guide_snapshot_step", "500")):
        line = next(line for line in lines if line.startswith(f"  {key} "))
        assert line.split()[1] == default, line


def test_old_run_configs_without_the_new_keys_load_with_their_defaults(tmp_path):
    """A format_version 2 config.json written before the guidance keys existed (conditioning.dropout 0.0 saved
    explicitly, no sample.guidance_scale, no run.guide_snapshot_step) resumes unchanged."""
    saved = T.merge_config(flags={"data": "moons"}).to_dict()
    saved["conditioning"]["dropout"] = 0.0
    del saved["sample"]["guidance_scale"], saved["run"]["guide_snapshot_step"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg, changes = T.run_config(tmp_path, None, {})
    assert changes == {} and cfg.conditioning.dropout == 0.0
    assert cfg.sample.guidance_scale is None and cfg.run.guide_snapshot_step == 500
    with pytest.raises(ConfigError, match="conditioning.dropout=0.2 needs a condition to drop"):
        T.run_config(tmp_path, None, {"conditioning.dropout": "0.2"}, allow_changes=True)


def test_settings_changed_with_allow_changes_take_effect_on_resume(tmp_path):
    """The optimiser and EMA states come back from the checkpoint with their saved hyper-parameters; the
    changed ones (allowed by name) must replace them, not only be written to config.json."""
    base = {"data.source": "moons", "model.type": "mlp", "model.preset": "tiny", "optim.batch_size": 16,
            "run.mixed_precision": "no", "run.sample_every": 0, "run.guide_snapshot_step": 0, "optim.steps": 2}
    T.train(T.merge_config(flags=base), tmp_path, progress=False)
    new = {"optim.steps": "3", "optim.weight_decay": "0.05", "optim.adam_beta2": "0.95", "ema.decay": "0.5"}
    cfg, changes = T.run_config(tmp_path, None, new, allow_changes=True)
    assert set(changes) == {"optim.steps", "optim.weight_decay", "optim.adam_beta2", "ema.decay"}
    trainer = T.Trainer(cfg, tmp_path, progress=False)
    assert trainer.resume() and trainer.step == 2
    decay, rest = trainer.optimizer.param_groups
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.05, 0.0)
    assert decay["betas"] == rest["betas"] == (0.9, 0.95)
    assert trainer.ema.decay == 0.5


def test_new_runs_sample_with_the_registrys_default_and_saved_runs_keep_their_own():
    """sample.sampler none (the default): every new run, conditional or not, samples with the registry's default
    for its budget (DEFAULT_SAMPLERS, chosen on trained networks; eta 1.4 was also measured best under guidance);
    options the user sets go over it; a saved run's sampler and options win."""
    from diffusion_forge.sampling.registry import DEFAULT_SAMPLERS, SAMPLERS, resolve_sampler
    from diffusion_forge.training.layers import merge_config

    name, options = DEFAULT_SAMPLERS[max(k for k in DEFAULT_SAMPLERS if k <= 20)]
    for kind in ("none", "class", "text"):
        s = merge_config(flags={"conditioning.kind": kind}).sample
        assert (s.sampler, s.options, s.steps) == (None, {}, 20)
        assert resolve_sampler(s.sampler, s.steps, s.options) == (name, 20, {**SAMPLERS[name].options, **options})
    s = merge_config(flags={"conditioning.kind": "class", "sample.options.eta": "1.0"}).sample
    assert resolve_sampler(s.sampler, s.steps, s.options)[2]["eta"] == 1.0
    saved = merge_config(flags={"conditioning.kind": "class"}).to_dict()
    saved["sample"].update(sampler="euler_ancestral", options={"eta": 1.8})   # a run made before this default
    s = merge_config(base=saved).sample
    assert (s.sampler, s.options) == ("euler_ancestral", {"eta": 1.8})
