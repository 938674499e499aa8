"""checkpoint.py: safetensors + JSON, atomic folders, keep-last-K, validation of corrupt or foreign files."""
from __future__ import annotations

import json

import pytest
import torch

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

