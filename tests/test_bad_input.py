"""Every bad input gets one clear line (issue 9, and the bad-input items of issue 8).

A table: one row per case a user hit. Each row runs the command line (through ``main()``, or a real process
where one is needed) and asserts the exit status, that stderr holds no traceback, that the message names
the problem (a regular expression), and that every file that existed before is byte-identical after.
Every bug report of this kind adds a row. ``area`` names the part of the code a row exercises.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from diffusion_forge.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
FAST_TRAIN = ["--no-progress", "--set", "optim.steps=1", "--set", "run.checkpoint_every=1"]


# ---------------------------------------------------------------------------------------------
# What the rows set up in their folder

def v1_run(tmp: Path) -> None:
    """tests/fixtures/run_v1 (a format_version 1 run folder, moons, checkpoint of step 9) as tmp/run."""
    shutil.copytree(FIXTURES / "run_v1", tmp / "run")


def two_corrupt_checkpoints(tmp: Path) -> None:
    v1_run(tmp)
    ckpts = tmp / "run" / "checkpoints"
    shutil.copytree(ckpts / "step-00000009", ckpts / "step-00000006")
    state = json.loads((ckpts / "step-00000006" / "state.json").read_text())
    (ckpts / "step-00000006" / "state.json").write_text(json.dumps({**state, "step": 6}))
    for step in ("step-00000006", "step-00000009"):
        f = ckpts / step / "ema.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))


def no_checkpoint_yet(tmp: Path) -> None:
    v1_run(tmp)
    shutil.rmtree(tmp / "run" / "checkpoints" / "step-00000009")


def files(*names: str, content: bytes = b"keep me\n") -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(content)
    return setup


def both(*setups) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)
    return setup


def npz(name: str, **arrays) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        np.savez(tmp / name, **arrays)
    return setup


def png_folder(name: str, sizes, mode: str = "L", extra: dict | None = None) -> Callable[[Path], None]:
    """A folder of small images named img0.png ... (``sizes``: (w, h) each), plus ``extra`` {name: bytes}."""
    def setup(tmp: Path) -> None:
        from PIL import Image

        folder = tmp / name
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i, (w, h) in enumerate(sizes):
            shape = (h, w) if mode in ("L", "I;16") else (h, w, 3)
            dtype = np.uint16 if mode == "I;16" else np.uint8
            pixels = rng.integers(0, 1000 if mode == "I;16" else 256, size=shape).astype(dtype)
            Image.fromarray(pixels).save(folder / f"img{i}.png")          # uint16: mode I;16
        for fname, data in (extra or {}).items():
            (folder / fname).write_bytes(data)
    return setup


def dot_files_only(tmp: Path) -> None:
    png_folder("dots", [(8, 8)] * 3)(tmp)
    for p in (tmp / "dots").glob("img*.png"):
        p.rename(p.with_name("." + p.name))


# ---------------------------------------------------------------------------------------------
# The table

@dataclass
class Row:
    id: str
    argv: list[str]              # "{tmp}" is the row's folder
    phrase: str                  # a regular expression the message must match (case-insensitive)
    setup: Callable[[Path], None] | None = None
    code: int = 2
    area: str = "cli"            # the part of the code the row exercises: cli, training, data, checkpoint
    patch: str | None = None     # "read_only": tmp/ro refuses writes (EROFS); "no_cuda": torch sees no GPU
    process: bool = False        # run in a real process (a closed stdout pipe)
    absent: list[str] = field(default_factory=list)   # paths that must not exist after


NOT_IMAGES = {"broken.png": b"this is not a png"}
ROWS = [
    # -- outputs: checked before any work, never overwritten without --force
    Row("sample-out-exists", ["sample", "{tmp}/run", "--out", "{tmp}/x.npz"], r"x\.npz already exists.*--force",
        both(v1_run, files("x.npz"))),
    Row("sample-out-png-exists", ["sample", "{tmp}/run", "--out", "{tmp}/g.png"], r"already exists", both(v1_run, files("g.png"))),
    Row("sample-out-is-folder", ["sample", "{tmp}/run", "--out", "{tmp}/d.npz"], r"d\.npz is a folder",
        both(v1_run, lambda tmp: (tmp / "d.npz").mkdir())),
    Row("sample-out-is-folder-no-suffix", ["sample", "{tmp}/run", "--out", "{tmp}/run"], r"run is a folder", v1_run,
        area="io.files.check_output: a folder before the suffix"),
    Row("sample-out-parent-is-file", ["sample", "{tmp}/run", "--out", "{tmp}/f/x.npz"], r"f is a file, not a folder",
        both(v1_run, files("f"))),
    Row("sample-out-read-only", ["sample", "{tmp}/run", "--out", "{tmp}/ro/x.npz"], r"read-only file system", v1_run,
        patch="read_only"),
    Row("sample-out-suffix", ["sample", "{tmp}/run", "--out", "{tmp}/x.gif"], r"unsupported file type '\.gif'.*\.png",
        v1_run),
    Row("viz-out-exists", ["viz", "schedule", "--out", "{tmp}/s.png"], r"already exists.*--force", files("s.png")),
    Row("viz-out-read-only", ["viz", "schedule", "--out", "{tmp}/ro/s.png"], r"read-only", patch="read_only"),
    Row("viz-out-suffix", ["viz", "schedule", "--out", "{tmp}/s.gif"], r"unsupported file type.*\.svg"),
    Row("eval-json-exists", ["eval", "{tmp}/run", "--json", "{tmp}/e.json"], r"e\.json already exists",
        both(v1_run, files("e.json"))),
    Row("train-out-is-file", ["train", "--data", "moons", "--out", "{tmp}/f", *FAST_TRAIN], r"(is a file|exists)",
        files("f"), area="training"),
    Row("train-out-read-only", ["train", "--data", "moons", "--out", "{tmp}/ro/run", *FAST_TRAIN], r"read-only",
        patch="read_only", area="training", absent=["ro/run/checkpoints"]),
    Row("train-typo-of-a-run", ["train", "--out", "{tmp}/photoss", *FAST_TRAIN], r"--data", v1_run, area="training",
        absent=["photoss"]),
    # -- run folders and checkpoints
    Row("sample-no-such-run", ["sample", "{tmp}/nothing", "--out", "{tmp}/x.npz"], r"nothing: it does not exist"),
    Row("sample-not-a-run", ["sample", "{tmp}/empty", "--out", "{tmp}/x.npz"], r"not a run folder",
        lambda tmp: (tmp / "empty").mkdir()),
    Row("sample-run-is-file", ["sample", "{tmp}/f", "--out", "{tmp}/x.npz"], r"is a file, not a run folder", files("f")),
    Row("sample-no-checkpoint-yet", ["sample", "{tmp}/run", "--out", "{tmp}/x.npz"], r"no complete checkpoint yet",
        no_checkpoint_yet),
    Row("sample-all-corrupt", ["sample", "{tmp}/run", "--out", "{tmp}/x.npz"],
        r"holds 2 corrupt checkpoints.*step-00000009.*SHA-256.*step-00000006", two_corrupt_checkpoints),
    Row("sample-step-absent", ["sample", "{tmp}/run", "--step", "1234", "--out", "{tmp}/x.npz"],
        r"no checkpoint of step 1234; its checkpoints are of step 9", v1_run),
    # -- sampler settings and devices, refused before sampling
    Row("sample-unknown-sampler", ["sample", "{tmp}/run", "--sampler", "foo", "--out", "{tmp}/x.npz"],
        r"unknown sampler 'foo'.*euler", v1_run),
    Row("sample-option-syntax", ["sample", "{tmp}/run", "--sampler-options", "eta", "--out", "{tmp}/x.npz"],
        r"KEY=VALUE.*'eta'", v1_run),
    Row("sample-option-unknown", ["sample", "{tmp}/run", "--sampler", "euler", "--sampler-options", "eta=0.5",
                                  "--out", "{tmp}/x.npz"], r"'euler' takes no option 'eta'", v1_run),
    Row("sample-option-type", ["sample", "{tmp}/run", "--sampler", "euler_ancestral", "--sampler-options", "eta=abc",
                               "--out", "{tmp}/x.npz"], r"eta='abc'.*must be a float", v1_run),
    Row("sample-sigmas", ["sample", "{tmp}/run", "--sigmas", "karas", "--out", "{tmp}/x.npz"], r"unknown --sigmas 'karas'",
        v1_run),
    Row("sample-count", ["sample", "{tmp}/run", "--n", "0", "--out", "{tmp}/x.npz"], r"--n.*>= 1", v1_run),
    Row("sample-device-unknown", ["sample", "{tmp}/run", "--device", "tpu9", "--out", "{tmp}/x.npz"], r"device 'tpu9'",
        v1_run),
    Row("sample-device-no-cuda", ["sample", "{tmp}/run", "--device", "cuda", "--out", "{tmp}/x.npz"], r"no CUDA.*--device cpu",
        v1_run, patch="no_cuda"),
    Row("viz-samplers-validated-first", ["viz", "samplers", "{tmp}/no-run-needed", "--samplers", "euler,foo",
                                         "--out", "{tmp}/s.png"], r"unknown sampler 'foo'"),
    Row("viz-step-counts", ["viz", "samplers", "{tmp}/run", "--step-counts", "5,x", "--out", "{tmp}/s.png"],
        r"comma-separated integers", v1_run),
    Row("viz-trajectory-sampler", ["viz", "trajectory", "{tmp}/run", "--sampler", "foo", "--out", "{tmp}/t.png"],
        r"unknown sampler 'foo'", v1_run),
    Row("train-device-unknown", ["train", "--data", "moons", "--out", "{tmp}/r", "--set", "run.device=tpu9", *FAST_TRAIN],
        r"tpu9", area="training"),
    Row("train-device-no-cuda", ["train", "--data", "moons", "--out", "{tmp}/r", "--set", "run.device=cuda",
                                 *FAST_TRAIN], r"CUDA", area="training", patch="no_cuda"),
    # -- sample files of `dforge eval`
    Row("eval-npz-missing", ["eval", "{tmp}/none.npz", "--data", "digits"], r"none\.npz does not exist"),
    Row("eval-npz-not-zip", ["eval", "{tmp}/fake.npz", "--data", "digits"], r"fake\.npz is not an \.npz file",
        files("fake.npz", content=b"\x80\x04 hello, not a zip")),
    Row("eval-npz-is-npy", ["eval", "{tmp}/a.npz", "--data", "digits"], r"\.npy array file, not an \.npz",
        lambda tmp: np.save(tmp / "a.npz.npy", np.zeros((2, 8, 8, 1), np.uint8)) or
        (tmp / "a.npz.npy").rename(tmp / "a.npz")),
    Row("eval-npz-channels-first", ["eval", "{tmp}/s.npz", "--data", "digits"],
        r"channels first.*4 x 1 x 28 x 28.*expects uint8 N x H x W x C",
        npz("s.npz", images=np.zeros((4, 1, 28, 28), np.uint8))),
    Row("eval-npz-float", ["eval", "{tmp}/s.npz", "--data", "digits"], r"uint8 N x H x W x C.*found float32",
        npz("s.npz", images=np.zeros((4, 8, 8, 1), np.float32))),
    Row("eval-npz-no-images", ["eval", "{tmp}/s.npz", "--data", "digits"], r"no 'images' array \(found: x\)",
        npz("s.npz", x=np.zeros(3))),
    # -- config files and keys (issue 8: did-you-mean; sections that do not fit)
    Row("train-yaml-syntax", ["train", "--data", "moons", "--out", "{tmp}/r", "--config", "{tmp}/bad.yaml", *FAST_TRAIN],
        r"bad\.yaml", files("bad.yaml", content=b"lr: [1, 2\nsteps: 3\n"), area="training"),
    Row("train-json-syntax", ["train", "--data", "moons", "--out", "{tmp}/r", "--config", "{tmp}/bad.json", *FAST_TRAIN],
        r"bad\.json", files("bad.json", content=b"{lr: 1"), area="training"),
    Row("train-dotted-key-typo", ["train", "--data", "moons", "--out", "{tmp}/r", "--set", "optim.lrr=1", *FAST_TRAIN],
        r"did you mean optim\.lr", area="training"),
    Row("train-class-without-labels", ["train", "--data", "{tmp}/imgs", "--out", "{tmp}/r", "--set", "model.preset=tiny",
                                       "--set", "conditioning.kind=class", *FAST_TRAIN], r"conditioning\.kind=class.*labels",
        png_folder("imgs", [(8, 8)] * 4), area="training", absent=["r"]),
    Row("train-text-without-captions", ["train", "--data", "moons", "--out", "{tmp}/r", "--set", "conditioning.kind=text",
                                        *FAST_TRAIN], r"conditioning\.kind=text.*captions", area="training",
        absent=["r"]),
    Row("train-text-folder-without-captions", ["train", "--data", "{tmp}/imgs", "--out", "{tmp}/r", "--set",
                                               "conditioning.kind=text", *FAST_TRAIN], r"conditioning\.kind=text.*captions",
        png_folder("imgs", [(8, 8)] * 4), area="training/data", absent=["r"]),
    Row("train-text-on-mlp", ["train", "--data", "digits", "--out", "{tmp}/r", "--set", "conditioning.kind=text", "--set",
                              "model.type=mlp", *FAST_TRAIN], r"conditioning\.kind=text needs a network with "
                              r"cross-attention", area="training", absent=["r"]),
    Row("train-more-clusters-than-items", ["train", "--data", "digits", "--out", "{tmp}/new/r", "--conditioning",
                                           "cluster", "--set", "conditioning.clusters=5000", *FAST_TRAIN],
        r"conditioning\.clusters=5000 is more than the 1437 items.*at most 1437", area="training",
        absent=["new"]),      # the run folder and its new parent are not left behind, empty
    Row("train-minutes-zero", ["train", "--data", "moons", "--out", "{tmp}/r", "--minutes", "0", *FAST_TRAIN],
        r"optim\.minutes must be > 0", area="training", absent=["r"]),
    Row("sample-prompt-without-text", ["sample", "{tmp}/run", "--prompt", "a handwritten three", "--out", "{tmp}/s.png"],
        r"--prompt needs a text-conditional run.*conditioning\.kind=none", v1_run, area="cli/text"),
    Row("train-print-config-head", ["train", "--data", "moons", "--out", "{tmp}/r", "--print-config"], r"^$",
        code=141, area="cli", process=True),
    # -- data (issue 8: a corrupt image is skipped with a warning naming it)
    Row("data-corrupt-image-warns", ["datasets", "--check", "{tmp}/imgs"], r"datasets: warning: .*broken\.png",
        png_folder("imgs", [(8, 8)] * 4, extra=NOT_IMAGES), code=0, area="data"),
    Row("data-only-dot-files", ["datasets", "--check", "{tmp}/dots"], r"(skip|hidden|dot)", dot_files_only, area="data"),
    Row("data-big-photo-warns", ["datasets", "--check", "{tmp}/big"], r"warning: .*image_size",
        png_folder("big", [(3000, 2000)], mode="RGB"), code=0, area="data"),
    Row("data-1x1-image", ["train", "--data", "{tmp}/tiny", "--out", "{tmp}/r", "--set", "model.preset=tiny", *FAST_TRAIN],
        r"image_size", png_folder("tiny", [(1, 1)] * 4), area="training/data", absent=["r"]),
]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_only(monkeypatch, folder: Path) -> None:
    """Writes under ``folder`` fail with EROFS, as on a read-only mount (chmod does not stop root)."""
    folder.mkdir(exist_ok=True)
    real_open, real_mkdir = os.open, os.mkdir
    inside = lambda p: Path(os.path.abspath(p)).is_relative_to(folder)  # noqa: E731

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def _run_process(argv: list[str]) -> tuple[int, str]:
    """A real `python -m diffusion_forge` whose stdout reader has gone before it writes (`| head -1`)."""
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_forge", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    proc.stdout.close()                       # the reader exits first: every write gets EPIPE
    err = proc.stderr.read().decode()
    return proc.wait(timeout=120), err


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_gets_one_clear_line(row: Row, tmp_path, capsys, monkeypatch):
    if row.setup:
        row.setup(tmp_path)
    if row.patch == "read_only":
        _read_only(monkeypatch, tmp_path / "ro")
    if row.patch == "no_cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = _digests(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in row.argv]
    if row.process:
        code, err = _run_process(argv)
    else:
        code = main(argv)
        err = capsys.readouterr().err
    monkeypatch.undo()
    assert code == row.code, f"[{row.area}] exit status {code}, expected {row.code}; stderr: {err}"
    assert "Traceback" not in err and "Exception ignored" not in err, f"[{row.area}] {err}"
    lines = [line for line in err.splitlines() if line.strip() and "\r" not in line]   # tqdm bars redraw with \r
    if row.code == 2:
        errors = [line for line in lines if ": error: " in line]
        assert len(errors) == 1 and errors[0].startswith("dforge "), f"[{row.area}] not one error line: {err}"
    assert re.search(row.phrase, err, re.IGNORECASE | re.DOTALL), f"[{row.area}] {row.phrase!r} not in: {err}"
    after = _digests(tmp_path)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"[{row.area}] files changed or removed: {changed}"
    for name in row.absent:
        assert not (tmp_path / name).exists(), f"[{row.area}] {name} was created"
    left = [name for name in after if name not in before and Path(name).name.startswith(".")]
    assert not left, f"[{row.area}] temporary files left: {left}"


def test_a_run_folder_that_existed_is_kept_after_bad_input(tmp_path, capsys):
    """Only the folders `dforge train` itself created are removed after bad input, and only while empty."""
    (tmp_path / "mine").mkdir()
    code = main(["train", "--data", "digits", "--out", str(tmp_path / "mine"), "--conditioning", "cluster",
                 "--set", "conditioning.clusters=5000", *FAST_TRAIN])
    assert code == 2 and "is more than the 1437 items" in capsys.readouterr().err
    assert (tmp_path / "mine").is_dir()


def test_16_bit_images_are_scaled_or_refused_by_name(tmp_path, capsys):
    """A 16-bit greyscale PNG (mode I;16) must not load as saturated white."""
    png_folder("deep", [(8, 8)] * 4, mode="I;16")(tmp_path)
    code = main(["datasets", "--check", str(tmp_path / "deep")])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert re.search(r"img\d\.png", err) and re.search(r"16-bit|bit depth|I;16", err), err
        return
    assert code == 0
    from diffusion_forge.data import load_dataset

    x, _ = load_dataset(str(tmp_path / "deep")).get_batch(torch.arange(4))
    # the pixels are uniform in 0..999 of 65535: about -0.985 in [-1, 1]; saturated white would be 1
    assert float((x > 0.9).float().mean()) < 0.01 and float(x.mean()) < -0.9
