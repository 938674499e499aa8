"""checkpoint.py: safetensors + JSON, atomic folders, keep-last-K, validation of corrupt or foreign files."""
from __future__ import annotations

import json

import pytest
import torch

from diffusion_forge import training as T
from diffusion_forge.io import checkpoint as ck
from diffusion_forge.ema import EMA


def _model_and_friends(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    ema = EMA(model, 0.9)
    ema.update(model)
    return model, opt, ema


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_restores_everything_exactly(tmp_path):
    model, opt, ema = _model_and_friends()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(123)
    path = ck.save_checkpoint(tmp_path, 7, model, ema, opt, scaler, config={"lr": 1e-3}, extra={"k": [1, 2]})
    expected_next = torch.rand(3)  # what the global RNG gives right after the save

    assert path.name == "step-00000007" and sorted(p.name for p in path.iterdir()) == [
        "ema.safetensors", "model.safetensors", "optimizer.safetensors", "state.json"]
    state = json.loads((path / "state.json").read_text())
    assert state["format"] == ck.FORMAT and state["format_version"] == ck.FORMAT_VERSION and state["step"] == 7
    assert not list(tmp_path.glob("*.pt")) and not list(path.glob("*.pkl"))  # no pickle anywhere

    model2, opt2, ema2 = _model_and_friends(seed=1)
    scaler2 = torch.amp.GradScaler("cpu")
    loaded = ck.load_checkpoint(path)
    loaded.restore(model2, ema2, opt2, scaler2, rng=True)
    assert torch.equal(torch.rand(3), expected_next)
    assert _same(model.state_dict(), model2.state_dict())
    assert _same(ema.state_dict(), ema2.state_dict()) and ema2.meta() == ema.meta()
    assert scaler2.get_scale() == 1024.0
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        assert _same(s1["state"][i], s2["state"][i])
    assert loaded.config == {"lr": 1e-3} and loaded.state["extra"] == {"k": [1, 2]}


def test_keep_last_k_and_latest(tmp_path):
    model, opt, ema = _model_and_friends()
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(tmp_path / "checkpoints", step, model, ema, opt, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path / "checkpoints")] == ["step-00000030", "step-00000040"]
    assert ck.latest_checkpoint(tmp_path).step == 40          # a run folder works too
    assert ck.load_checkpoint(tmp_path).step == 40
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_crash_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, opt, ema = _model_and_friends()
    ck.save_checkpoint(tmp_path, 1, model, ema, opt)
    real_save = ck.save_file
    calls = []

    def crash_on_second_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            with open(filename, "wb") as f:      # half a file, then the "power cut"
                f.write(b"\x00" * 10)
            raise OSError("disk full (simulated)")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", crash_on_second_file)
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(tmp_path, 2, model, ema, opt)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000001"]   # step 2 never appeared
    assert ck.latest_checkpoint(tmp_path).step == 1
    monkeypatch.setattr(ck, "save_file", real_save)
    ck.save_checkpoint(tmp_path, 2, model, ema, opt)
    assert ck.latest_checkpoint(tmp_path).step == 2


def test_pruning_after_resuming_past_a_corrupt_newer_checkpoint_keeps_the_good_ones(tmp_path):
    """keep=1, a good step 500 and a corrupt step 1000: the run resumes at 500 and saves 510. Pruning must keep
    510 (and leave the corrupt 1000 alone), not keep 1000 and delete every usable checkpoint."""
    model, opt, ema = _model_and_friends()
    ck.save_checkpoint(tmp_path, 500, model, ema, opt, keep=1)
    bad = ck.save_checkpoint(tmp_path, 1000, model, ema, opt, keep=5)
    (bad / "state.json").write_text("{not json")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert ck.latest_checkpoint(tmp_path).step == 500
    ck.save_checkpoint(tmp_path, 510, model, ema, opt, keep=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000510", "step-00001000"]
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert ck.latest_checkpoint(tmp_path).step == 510


def test_corrupt_checkpoint_is_refused_and_skipped(tmp_path):
    model, opt, ema = _model_and_friends()
    ck.save_checkpoint(tmp_path, 1, model, ema, opt)
    newest = ck.save_checkpoint(tmp_path, 2, model, ema, opt)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="corrupt.*model.safetensors"):
        ck.load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert ck.latest_checkpoint(tmp_path).step == 1

    (newest / "state.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="state.json is corrupt"):
        ck.load_checkpoint(newest)


def test_foreign_and_future_files_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ck.CheckpointError, match="not a Diffusion Forge checkpoint"):
        ck.load_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "state.json").write_text(json.dumps({"format": "something.else", "step": 1}))
    with pytest.raises(ck.CheckpointError, match="not a Diffusion Forge checkpoint"):
        ck.load_checkpoint(tmp_path / "a")
    model, _, _ = _model_and_friends()
    path = ck.save_checkpoint(tmp_path / "b", 3, model)
    state = json.loads((path / "state.json").read_text())
    state["format_version"] = ck.FORMAT_VERSION + 1
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ck.CheckpointError, match="format_version"):
        ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path / "missing")


def test_weights_of_another_model_are_refused_by_name(tmp_path):
    model, _, _ = _model_and_friends()
    path = ck.save_checkpoint(tmp_path, 1, model)
    other = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
    with pytest.raises(ck.CheckpointError, match="shape differs: 2.bias, 2.weight"):
        ck.load_checkpoint(path).restore(other)


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    model, _, _ = _model_and_friends()
    ck.save_checkpoint(tmp_path, 5, model)
    with torch.no_grad():
        model[0].weight.add_(1)
    ck.save_checkpoint(tmp_path, 5, model)
    assert torch.equal(ck.load_checkpoint(tmp_path).tensors("model")["0.weight"], model[0].weight)
    assert len(ck.list_checkpoints(tmp_path)) == 1 and not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------
# Run folders: format_version 1 (the fixture made by the old code) and the loader's messages

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def test_format_version_1_run_folder_loads_as_a_denoiser():
    model = ck.load_model_from_run(FIXTURES / "run_v1")
    assert ck.FORMAT_VERSION == 2 and ck.load_checkpoint(FIXTURES / "run_v1").state["format_version"] == 1
    assert model.step == 9 and model.sample_shape == (2,) and model.num_classes == 0
    assert model.config["format_version"] == 2                       # the flat version-1 config, nested
    assert model.config["diffusion"]["prediction"] == "v_prediction" and model.config["data"]["source"] == "moons"
    carried = model.model.diffusion_config
    assert carried["prediction"] == "v_prediction" and carried["schedule"]["name"] == "cosine"
    assert carried["null_cond"] is None
    assert model.prediction == "v_prediction" and model.schedule.num_timesteps == 1000
    assert not model.model.training and not any(p.requires_grad for p in model.model.parameters())
    from diffusion_forge.denoise import Denoiser

    assert isinstance(model, Denoiser)
    x0 = model(torch.zeros(3, 2, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64))
    assert x0.shape == (3, 2) and torch.isfinite(x0).all()


def test_format_version_1_run_resumes_and_samples_as_the_old_code(tmp_path):
    """The fixture was sampled by the old code after step 12 (8 samples, seeds 0..7, euler, 4 steps, EMA);
    its step-12 checkpoint was then removed. Resuming it to step 12 and sampling through the new loader
    gives the same samples."""
    import shutil

    import numpy as np

    from diffusion_forge.cli import main
    from diffusion_forge.sampling.generate import generate

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_v1", run)
    assert main(["train", "--out", str(run), "--no-progress"]) == 0
    model = ck.load_model_from_run(run)
    assert model.step == 12
    x = generate(model, 8, seed=0, sampler="euler", steps=4)
    expected = np.load(FIXTURES / "run_v1_samples_euler4.npy")
    assert np.abs(x.numpy() - expected).max() < 1e-6


def _two_checkpoints(tmp_path):
    model, opt, ema = _model_and_friends()
    for step in (3, 6):
        ck.save_checkpoint(tmp_path / "checkpoints", step, model, ema, opt)
    return tmp_path


def test_the_loader_says_what_is_wrong(tmp_path):
    run = _two_checkpoints(tmp_path / "run")
    with pytest.raises(ck.CheckpointError, match=r"no checkpoint of step 1234; its checkpoints are of step 3, 6"):
        ck.find_checkpoint(run, step=1234)
    assert ck.find_checkpoint(run, step=3).step == 3 and ck.find_checkpoint(run).step == 6
    for step in ("step-00000003", "step-00000006"):
        (run / "checkpoints" / step / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match=r"holds 2 corrupt checkpoints and no valid one: .*step-00000006 is "
                                                 r"corrupt: model\.safetensors .*SHA-256.*step-00000003"):
        ck.find_checkpoint(run)
    (tmp_path / "other").mkdir()
    with pytest.raises(ck.CheckpointError, match="is not a run folder"):
        ck.find_checkpoint(tmp_path / "other")
    with pytest.raises(ck.CheckpointError, match="it does not exist"):
        ck.find_checkpoint(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ck.CheckpointError, match="is a file"):
        ck.find_checkpoint(tmp_path / "file")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "config.json").write_text("{}")
    with pytest.raises(ck.CheckpointError, match="no complete checkpoint yet"):
        ck.find_checkpoint(tmp_path / "new")


def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    run = _two_checkpoints(tmp_path)
    (run / "checkpoints" / "step-00000006" / "ema.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping checkpoint: checkpoint .*step-00000006 is corrupt"):
        assert ck.find_checkpoint(run).step == 3


def test_a_guide_snapshot_is_never_listed_pruned_or_resumed_from(tmp_path):
    """checkpoints/guide-<step>/ is written by the same atomic writer, survives keep=1 pruning of many step-*
    checkpoints, and is never the newest checkpoint, even when its step is higher than theirs."""
    model, opt, ema = _model_and_friends()
    root = tmp_path / "checkpoints"
    guide = ck.save_checkpoint(root, 50, model, ema, kind="guide", save_rng=False)
    assert guide.name == "guide-00000050" and sorted(p.name for p in guide.iterdir()) == [
        "ema.safetensors", "model.safetensors", "state.json"]                   # no optimiser, no RNG
    for step in (10, 20, 30, 40):
        ck.save_checkpoint(root, step, model, ema, opt, keep=1)
    assert [p.name for p in ck.list_checkpoints(root)] == ["step-00000040"]
    assert [p.name for p in ck.list_checkpoints(root, "guide")] == ["guide-00000050"]
    assert ck.load_checkpoint(guide).step == 50 and "rng" not in ck.load_checkpoint(guide).state
    ck.save_checkpoint(root, 5, model, ema, opt, keep=1)       # an older step (a resume past a newer one):
    assert [p.name for p in ck.list_checkpoints(root)] == ["step-00000005", "step-00000040"] and guide.is_dir()
    assert ck.latest_checkpoint(tmp_path).step == 40 and ck.load_checkpoint(tmp_path).step == 40
    assert ck.find_checkpoint(tmp_path, step=50).path == guide                  # step=N reaches the snapshot
    with pytest.raises(ck.CheckpointError, match=r"its checkpoints are of step 5, 40 \(and the autoguidance snapshot "
                                                 r"of step 50\)"):
        ck.find_checkpoint(tmp_path, step=30)
    assert not list(root.glob(".tmp-*"))
    with pytest.raises(ValueError, match="checkpoint kind must be one of step, guide"):
        ck.save_checkpoint(root, 1, model, kind="best")


# ---------------------------------------------------------------------------------------------
# The autoguidance snapshot the trainer keeps (run.guide_snapshot_step)

_TINY = {"data.source": "moons", "model.type": "mlp", "model.preset": "tiny", "optim.batch_size": 32,
         "run.mixed_precision": "no", "run.log_every": 1, "run.sample_every": 0, "sample.n": 8, "sample.steps": 2,
         "optim.warmup_steps": 5}


def _tiny(overrides: dict):
    return T.merge_config(flags={**_TINY, **overrides})


def test_the_guide_snapshot_survives_pruning_loads_and_is_not_resumed_from(tmp_path):
    """run.guide_snapshot_step=3 with keep_checkpoints=1 and a checkpoint every 2 steps: checkpoints/ ends with
    step-00000008 and guide-00000003, whose EMA equals the step-3 checkpoint of a run that keeps everything;
    resuming goes on from step 8, not 3."""
    layout = {"optim.steps": 8, "run.checkpoint_every": 2, "run.keep_checkpoints": 1, "run.guide_snapshot_step": 3}
    T.train(_tiny(layout), tmp_path / "run", progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["guide-00000003", "step-00000008"]
    assert [p.name for p in ck.list_checkpoints(ckpts)] == ["step-00000008"]
    T.train(_tiny({**layout, "run.checkpoint_every": 1, "run.keep_checkpoints": 10, "run.guide_snapshot_step": 0}),
            tmp_path / "all", progress=False)
    assert not list((tmp_path / "all" / "checkpoints").glob("guide-*"))          # 0: none
    reference = ck.load_checkpoint(tmp_path / "all" / "checkpoints" / "step-00000003").tensors("ema")

    guide = ck.load_guide_snapshot(tmp_path / "run")
    assert guide.step == 3 and guide.sample_shape == (2,) and guide.config["run"]["guide_snapshot_step"] == 3
    assert all(torch.equal(v, reference[k]) for k, v in guide.model.state_dict().items())
    assert ck.load_model_from_run(tmp_path / "run", step=3).step == 3                # step=N finds the snapshot too
    assert ck.load_model_from_run(tmp_path / "run").step == 8

    cfg, _ = T.run_config(tmp_path / "run", None, {"optim.steps": "10"}, allow_changes=True)
    trainer = T.Trainer(cfg, tmp_path / "run", progress=False)
    assert trainer.resume() and trainer.step == 8
    summary = T.train(cfg, tmp_path / "run", progress=False)
    assert (summary["start_step"], summary["step"]) == (8, 10)
    assert sorted(p.name for p in ckpts.iterdir()) == ["guide-00000003", "step-00000010"]


def test_a_run_without_a_snapshot_names_the_fix(tmp_path):
    T.train(_tiny({"optim.steps": 4}), tmp_path / "short", progress=False)     # default step 500 > 4 steps
    assert not list((tmp_path / "short" / "checkpoints").glob("guide-*"))
    fix = r"train with run.guide_snapshot_step=N \(N < optim.steps\), or guide with another, weaker run: --guide-with RUN2"
    with pytest.raises(ck.CheckpointError, match=r"holds no autoguidance snapshot .*run.guide_snapshot_step=500 is not "
                                              r"below its optim.steps=4; " + fix):
        ck.load_guide_snapshot(tmp_path / "short")
    T.train(_tiny({"optim.steps": 4, "run.guide_snapshot_step": 4}), tmp_path / "equal", progress=False)
    assert not list((tmp_path / "equal" / "checkpoints").glob("guide-*"))     # it would be the final model
    with pytest.raises(ck.CheckpointError, match=r"trained by a version of diffusion_forge that kept none; " + fix):
        ck.load_guide_snapshot(FIXTURES / "run_v1")
    with pytest.raises(ck.CheckpointError, match="it does not exist"):
        ck.load_guide_snapshot(tmp_path / "missing")


def test_a_stop_at_the_snapshot_step_still_keeps_the_snapshot(tmp_path):
    """--max-minutes (or Ctrl-C) that stops the run right at run.guide_snapshot_step: the snapshot is written
    before the stop's checkpoint, so the resumed run (which starts after that step) still has it."""
    flags = {"optim.steps": 6, "run.guide_snapshot_step": 2, "run.checkpoint_every": 100, "run.keep_checkpoints": 1}
    trainer = T.Trainer(_tiny(flags), tmp_path, progress=False)
    real = trainer.train_step

    def stop_after_step_2(step):
        out = real(step)
        if step == 1:
            trainer._stop_signal = 2          # as Ctrl-C during step 2
        return out

    trainer.train_step = stop_after_step_2
    assert trainer.fit()["interrupted"] and trainer.step == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["guide-00000002", "step-00000002"]
    guide = ck.load_checkpoint(tmp_path / "checkpoints" / "guide-00000002").tensors("ema")
    T.train(_tiny(flags), tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["guide-00000002", "step-00000006"]
    kept = ck.load_guide_snapshot(tmp_path).model.state_dict()
    assert all(torch.equal(v, guide[k]) for k, v in kept.items())              # the one of the first process
