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
