"""A full disk during a checkpoint write and during `dforge sample --out`.

The disk is filled by patching the write step (a tmpfs cannot be mounted here): the safetensors writer
writes half a file and fails with ENOSPC, or every fsync fails with ENOSPC (what a full disk reports when
the data reaches it). Either way: one clear error line, older checkpoints and outputs byte-identical, no
partial or temporary file left, and the run resumes (with the losses of an uninterrupted run) once the
disk has room again.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from diffusion_forge.cli import main
from diffusion_forge.io import checkpoint as ck

FIXTURES = Path(__file__).parent / "fixtures"


def _enospc(path="") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _hidden(root: Path) -> list[str]:
    """Temporary files and folders of the atomic writers (names starting with a dot)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "last_loss" in record:
            out[record["step"]] = record["last_loss"]
    return out


def _fill_disk(monkeypatch, how: str) -> None:
    if how == "safetensors-half-file":
        def half_then_full(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\x00" * 100)
            raise _enospc(filename)
        monkeypatch.setattr(ck, "save_file", half_then_full)
    elif how == "safetensors-error":      # what safetensors itself raises on a full disk
        from safetensors import SafetensorError

        def rust_error(tensors, filename, metadata=None):
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        monkeypatch.setattr(ck, "save_file", rust_error)
    else:                                  # every fsync: the data does not fit on the disk
        def no_room(fd):
            raise _enospc()
        monkeypatch.setattr(os, "fsync", no_room)


@pytest.mark.parametrize("how", ["safetensors-half-file", "safetensors-error", "fsync"])
def test_full_disk_during_a_checkpoint_write(tmp_path, capsys, monkeypatch, how):
    """The v1 fixture run (checkpoint of step 9, 12 steps, a checkpoint every 3) resumes; its checkpoint of
    step 12 meets a full disk. Then the disk has room again and the run resumes to the old losses."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_v1", run)
    old = _digests(run / "checkpoints")
    _fill_disk(monkeypatch, how)
    code = main(["train", "--out", str(run), "--no-progress"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("dforge train: error: "), err
    assert "no space left on the device" in errors[0], err
    assert _digests(run / "checkpoints") == old                       # step 9 untouched, step 12 never appeared
    assert [p.name for p in ck.list_checkpoints(run / "checkpoints")] == ["step-00000009"]
    assert _hidden(run) == [], "a partial or temporary file was left"

    assert main(["train", "--out", str(run), "--no-progress"]) == 0   # room again: resumes from step 9
    assert ck.latest_checkpoint(run).step == 12
    expected = {int(k): v for k, v in json.loads((FIXTURES / "run_v1_losses.json").read_text()).items()}
    got = _losses(run)
    for step in (10, 11, 12):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_safetensors_io_errors_become_os_errors(tmp_path, monkeypatch):
    import torch

    _fill_disk(monkeypatch, "safetensors-error")
    with pytest.raises(OSError) as info:
        ck.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2))
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("model.safetensors")
    assert list(tmp_path.iterdir()) == []                               # the temporary folder is gone


@pytest.mark.parametrize("out, force", [("x.npz", False), ("x.npz", True), ("points.png", True)])
def test_full_disk_during_sample_out(tmp_path, capsys, monkeypatch, out, force):
    """`sample --out` meets a full disk when it writes: nothing partial is left, an existing output
    (--force) keeps its old bytes, and the same command succeeds once there is room."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run_v1", run)
    target = tmp_path / "outs" / out
    target.parent.mkdir()
    if force:
        target.write_bytes(b"the old samples\n")
    before = _digests(tmp_path)
    argv = ["sample", str(run), "--n", "8", "--steps", "2", "--out", str(target), "--no-progress",
            *(["--force"] if force else [])]
    _fill_disk(monkeypatch, "fsync")
    code = main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "dforge sample: error: " in err and "no space left on the device" in err, err
    assert _digests(tmp_path) == before                                  # nothing changed, nothing added
    assert _hidden(tmp_path / "outs") == []

    assert main(argv) == 0
    assert target.stat().st_size > 100 and _hidden(tmp_path / "outs") == []
    if target.suffix == ".npz":
        with np.load(target) as f:
            assert f["samples"].shape == (8, 2) and f["samples"].dtype == np.float32
