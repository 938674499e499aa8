"""The one checkpoint writer and reader.

A training run keeps its checkpoints under ``RUN/checkpoints/``, one folder per saved step:

    checkpoints/step-00001000/
        model.safetensors       the model's weights (as trained, not averaged)
        ema.safetensors         the EMA weights (what sampling uses by default)
        optimizer.safetensors   the optimiser's per-parameter tensors, flattened "state.<i>.<name>"
        state.json              everything else: format, format_version, step, the run's config,
                                the optimiser's non-tensor parts, EMA counters, loss scaler,
                                RNG states (base64), and a SHA-256 of each tensor file
    checkpoints/guide-00000500/ the autoguidance snapshot (run.guide_snapshot_step): the weights and EMA of
                                that step, written by the same writer, never pruned, never resumed from

Format versions: 1 (the first release) records a flat config; 2 records the nested config
(``training.config``: sections data, diffusion, model, ...) and, in ``extra``, the network's
``diffusion_config`` (schedule, prediction, null condition) and ``num_classes``. Both are read.

No pickle anywhere: safetensors for tensors, JSON for the rest. A checkpoint folder is written
under a temporary name and renamed into place once every file is complete and synced, so it
appears whole or not at all; a crash mid-write leaves the previous checkpoints untouched. Only the
newest ``keep`` checkpoints are kept: listing, resuming and pruning see ``step-*`` folders only, never the
guide snapshot. Loading checks the format, the version and the hashes and raises :class:`CheckpointError` with a clear message on a corrupt or foreign folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from .files import fsync_dir, fsync_file, write_json
from .state import (CheckpointError, check_fits, flatten_optimizer, load_strict, rng_state, set_rng_state, sha256,
                    unflatten_optimizer)

FORMAT = "diffusion_forge.checkpoint"
FORMAT_VERSION = 2
STEP_DIR = re.compile(r"^step-(\d+)$")
GUIDE_DIR = re.compile(r"^guide-(\d+)$")
KINDS = ("step", "guide")    # folder name prefixes: resumable checkpoints, the autoguidance snapshot
TENSOR_FILES = ("model", "ema", "optimizer")


# ---------------------------------------------------------------------------------------------
# Writing

def _state_dict(module) -> dict[str, torch.Tensor]:
    """A module's state as contiguous CPU tensors that share no memory (what safetensors needs)."""
    sd = module.state_dict() if hasattr(module, "state_dict") else module
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


def _save_tensors(tensors: dict, path: Path) -> None:
    """safetensors' writer; its I/O errors (a full disk: "code: 28") become the OSError they are."""
    try:
        save_file(tensors, str(path), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    except Exception as e:
        code = re.search(r"code: (\d+)", str(e)) if type(e).__name__ == "SafetensorError" else None
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def save_checkpoint(root: str | os.PathLike, step: int, model, ema=None, optimizer=None, scaler=None,
                    config: dict | None = None, extra: dict | None = None, keep: int = 3, save_rng: bool = True,
                    kind: str = "step") -> Path:
    """Write ``root/step-<step>/`` atomically and keep only the newest ``keep`` checkpoints.

    ``model`` is an ``nn.Module`` (unwrapped) or a state dict; ``ema`` an :class:`~.ema.EMA`;
    ``optimizer`` a torch optimiser; ``scaler`` a GradScaler (its state goes to JSON). ``kind="guide"``
    writes ``root/guide-<step>/`` instead (the autoguidance snapshot): nothing is pruned, and it is never
    listed, resumed from or pruned as a ``step-*`` checkpoint."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {', '.join(KINDS)}, got {kind!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    name = f"{kind}-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        state: dict = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
                       "config": config or {}, "extra": extra or {}, "files": {}}
        files = {"model": _state_dict(model)}
        if ema is not None:
            files["ema"] = ema.state_dict()
            state["ema"] = ema.meta()
        if optimizer is not None:
            files["optimizer"], state["optimizer"] = flatten_optimizer(optimizer.state_dict())
        if scaler is not None and scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        if save_rng:
            state["rng"] = rng_state()
        for name, tensors in files.items():
            path = tmp / f"{name}.safetensors"
            _save_tensors(tensors, path)
            fsync_file(path)
            state["files"][name] = sha256(path)
        write_json(tmp / "state.json", state)
        fsync_dir(tmp)
        aside = None
        if final.exists():  # saving the same step again: move the old one aside first
            aside = root / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if kind == "step":
        prune_checkpoints(root, keep, upto=step)
    return final


def prune_checkpoints(root: str | os.PathLike, keep: int, upto: int | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints at or below step ``upto`` (renamed away first, so never
    half-deleted in place). Newer folders (a corrupt one a resume skipped) never count towards ``keep``, so
    pruning cannot remove the good checkpoint the run resumed from and keep only a broken newer one."""
    if keep < 1:
        return
    folders = [p for p in list_checkpoints(root) if upto is None or int(STEP_DIR.match(p.name)[1]) <= upto]
    for old in folders[:-keep]:
        trash = old.with_name(f".tmp-trash-{old.name}-{os.getpid()}")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading

def list_checkpoints(root: str | os.PathLike, kind: str = "step") -> list[Path]:
    """Checkpoint folders ``step-*`` under ``root``, oldest first (by step); ``kind="guide"``: the
    autoguidance snapshots ``guide-*`` instead (never among the step-* ones)."""
    root, pattern = Path(root), {"step": STEP_DIR, "guide": GUIDE_DIR}[kind]
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


@dataclass
class Checkpoint:
    """A loaded checkpoint: its folder, step, JSON state and tensor files (loaded on first use)."""

    path: Path
    state: dict
    _tensors: dict = field(default_factory=dict, repr=False)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def config(self) -> dict:
        return self.state.get("config", {})

    def has(self, name: str) -> bool:
        return name in self.state["files"]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._tensors:
            if not self.has(name):
                raise CheckpointError(f"checkpoint {self.path} holds no {name} weights")
            try:
                self._tensors[name] = load_file(str(self.path / f"{name}.safetensors"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"cannot read {self.path / (name + '.safetensors')}: {e}") from e
        return self._tensors[name]

    def restore(self, model=None, ema=None, optimizer=None, scaler=None, rng: bool = False) -> None:
        """Load what is given from this checkpoint (strictly: every weight must match)."""
        if model is not None:
            load_strict(model, self.tensors("model"), self.path / "model.safetensors")
        if ema is not None:
            if not self.has("ema"):
                raise CheckpointError(f"checkpoint {self.path} holds no EMA weights")
            check_fits(ema.module, self.tensors("ema"), self.path / "ema.safetensors")
            ema.load(self.tensors("ema"), self.state["ema"])
        if optimizer is not None:
            optimizer.load_state_dict(unflatten_optimizer(self.tensors("optimizer"), self.state["optimizer"]))
        if scaler is not None and "scaler" in self.state and scaler.is_enabled():
            scaler.load_state_dict(self.state["scaler"])
        if rng and "rng" in self.state:
            set_rng_state(self.state["rng"])


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Open a checkpoint folder (or a run folder / its ``checkpoints/``: then the newest valid one)
    and validate it: format, format_version, and (``verify``) the SHA-256 of each tensor file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not (path / "state.json").exists() and (list_checkpoints(path) or (path / "checkpoints").is_dir()):
        return _newest_or_raise(path, verify)
    state_file = path / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path} is not a Diffusion Forge checkpoint (no state.json)")
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_file} is corrupt: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a Diffusion Forge checkpoint (format {state.get('format')!r} "
                              f"in state.json, expected {FORMAT!r})" if isinstance(state, dict)
                              else f"{state_file} is not a Diffusion Forge checkpoint")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(f"{path} has checkpoint format_version {version!r}; this version of "
                              f"diffusion_forge reads versions 1..{FORMAT_VERSION} (upgrade it?)")
    for key in ("step", "files"):
        if key not in state:
            raise CheckpointError(f"{state_file} is corrupt: no {key!r} entry")
    for name, digest in state["files"].items():
        f = path / f"{name}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {f.name} is missing")
        if verify and sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {f.name} does not match its recorded SHA-256")
    return Checkpoint(path, state)


def _checkpoint_root(root: Path) -> Path:
    return root / "checkpoints" if (root / "checkpoints").is_dir() else root


def _newest_valid(root: Path, verify: bool = True) -> tuple[Checkpoint | None, list[CheckpointError]]:
    """The newest valid checkpoint under ``root`` and the errors of the newer ones that are not."""
    failures = []
    for path in reversed(list_checkpoints(_checkpoint_root(Path(root)))):
        try:
            return load_checkpoint(path, verify=verify), failures
        except CheckpointError as e:
            failures.append(e)
    return None, failures


def _warn_skipped(failures: list[CheckpointError]) -> None:
    for e in failures:
        warnings.warn(f"skipping checkpoint: {e}", UserWarning, stacklevel=3)


def _newest_or_raise(root: Path, verify: bool = True) -> Checkpoint:
    """The newest valid checkpoint, or why there is none: none written yet, or N corrupt ones (named, why)."""
    found, failures = _newest_valid(root, verify)
    if found is None and not failures:
        raise CheckpointError(f"{root} holds no complete checkpoint yet (training writes one every "
                              f"run.checkpoint_every steps); train it first: dforge train --out {root}")
    if found is None:
        raise CheckpointError(f"{root} holds {len(failures)} corrupt checkpoint{'s' * (len(failures) > 1)} and no "
                              f"valid one: {'; '.join(map(str, failures))}. Restore the run folder from a copy, or "
                              "train again into a new folder")
    _warn_skipped(failures)
    return found


def latest_checkpoint(root: str | os.PathLike, verify: bool = True) -> Checkpoint | None:
    """The newest valid checkpoint under ``root`` (a run folder or its ``checkpoints/``), or None.
    A corrupt newer one is skipped with a warning naming it."""
    found, failures = _newest_valid(Path(root), verify)
    _warn_skipped(failures)
    return found


# ---------------------------------------------------------------------------------------------
# A trained model, ready to sample

def nested_config(config: dict) -> dict:
    """A checkpoint's config as the nested dict of ``training.config`` (a flat version-1 one converted)."""
    from ..training.config import Config

    try:
        return Config.from_dict(config).to_dict()
    except ValueError as e:
        raise CheckpointError(f"the run's config does not fit this version of diffusion_forge: {e}") from e


def _run_root(run_dir: Path) -> Path:
    """The checkpoints/ folder of a run folder, or CheckpointError: no such folder, a file, not a run folder."""
    if not run_dir.exists():
        raise CheckpointError(f"no run folder at {run_dir}: it does not exist")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run folder of `dforge train`")
    root = _checkpoint_root(run_dir)
    if root == run_dir and not (run_dir / "config.json").is_file() and not list_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} is not a run folder of `dforge train` (it has no config.json and no "
                              "checkpoints/ folder)")
    return root


def find_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """The checkpoint of a run folder to sample: the newest valid one (corrupt newer ones skipped with a
    warning), or the one of ``step``. CheckpointError says what is wrong: no such folder, not a run folder,
    no checkpoint yet, N corrupt checkpoints (named, with why), or the steps there are."""
    run_dir = Path(run_dir)
    if (run_dir / "state.json").is_file():      # a checkpoint folder itself
        return load_checkpoint(run_dir)
    root = _run_root(run_dir)
    if step is not None:
        wanted = root / f"step-{int(step):08d}"
        if not wanted.is_dir() and (root / f"guide-{int(step):08d}").is_dir():
            wanted = root / f"guide-{int(step):08d}"          # the autoguidance snapshot of that step
        if not wanted.is_dir():
            steps = [int(STEP_DIR.match(p.name).group(1)) for p in list_checkpoints(root)]
            there = f"its checkpoints are of step {', '.join(map(str, steps))}" if steps else "it holds no checkpoint"
            guides = [GUIDE_DIR.match(p.name).group(1).lstrip("0") or "0" for p in list_checkpoints(root, "guide")]
            there += f" (and the autoguidance snapshot of step {', '.join(guides)})" if guides else ""
            raise CheckpointError(f"{run_dir} has no checkpoint of step {step}; {there}")
        return load_checkpoint(wanted)
    return _newest_or_raise(run_dir)


def load_model_from_run(run_dir: str | os.PathLike, use_ema: bool = True, step: int | None = None,
                        device: str | torch.device | None = "cpu"):
    """Rebuild the network of a run folder written by ``dforge train`` and load its newest (or ``step``'s)
    weights, the EMA average by default, in eval mode. Returns a ``Denoiser`` (``D(x, sigma) -> x0`` with the
    run's schedule and prediction type) with ``.config`` (nested), ``.step``, ``.num_classes`` and
    ``.sample_shape``, ``.guidance_scale`` (the classifier-free guidance scale to sample with when none is
    given, None for no guidance) and ``.checkpoint_path``; its ``.model`` carries ``diffusion_config``. A text
    run (conditioning.kind=text) also has ``.text_encoder`` (``models.text.TextEncoder``, loaded by the name its
    config records), ``null_cond`` = the empty prompt's token states and ``.prompts`` (its grid prompts); other
    runs have ``.text_encoder`` None. Reads format versions 1 and 2. ``step`` may name the autoguidance snapshot's step (see :func:`load_guide_snapshot`)."""
    return denoiser_from_checkpoint(find_checkpoint(run_dir, step), use_ema, device)


def load_guide_snapshot(run_dir: str | os.PathLike, use_ema: bool = True, device: str | torch.device | None = "cpu"):
    """The autoguidance snapshot of a run folder (``checkpoints/guide-<step>/``, kept by the trainer at
    ``run.guide_snapshot_step``) as a Denoiser, exactly as :func:`load_model_from_run` returns one: the
    weaker model that ``AutoGuidance(D, weaker, scale)`` guides the run's own model with. A run without one:
    :class:`CheckpointError` naming the fix."""
    run_dir = Path(run_dir)
    snapshots = list_checkpoints(_run_root(run_dir), "guide")
    saved = _saved_config(run_dir)
    if not snapshots:
        raise CheckpointError(f"{run_dir} holds no autoguidance snapshot (checkpoints/guide-*): {_why_no_guide(saved)}"
                              "; train with run.guide_snapshot_step=N (N < optim.steps), or guide with another, "
                              "weaker run: --guide-with RUN2")
    wanted = saved.get("run", {}).get("guide_snapshot_step")     # the config's own, where several were kept
    chosen = next((p for p in snapshots if wanted and p.name == f"guide-{int(wanted):08d}"), snapshots[-1])
    return denoiser_from_checkpoint(load_checkpoint(chosen), use_ema, device)


def _saved_config(run_dir: Path) -> dict:
    """config.json of a run folder as written (nested or flat), {} when absent or unreadable."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _why_no_guide(saved: dict) -> str:
    run, steps = saved.get("run"), (saved.get("optim") or {}).get("steps")
    if not isinstance(run, dict) or "guide_snapshot_step" not in run:
        return "it was trained by a version of diffusion_forge that kept none"
    n = run["guide_snapshot_step"]
    if not n:
        return "it was trained with run.guide_snapshot_step=0"
    if steps is not None and n >= steps:
        return f"its run.guide_snapshot_step={n} is not below its optim.steps={steps}"
    return f"it stopped before step {n} (run.guide_snapshot_step)"


def denoiser_from_checkpoint(ckpt: Checkpoint, use_ema: bool = True, device: str | torch.device | None = "cpu"):
    """The Denoiser of a loaded run checkpoint (see :func:`load_model_from_run`)."""
    from ..denoise import Denoiser
    from ..device import resolve_device
    from ..models import build_model
    from .run_extras import attach_run_extras, run_diffusion_config

    device = resolve_device(device)
    extra = ckpt.state.get("extra", {})
    for key in ("model_config", "sample_shape"):
        if key not in extra:
            raise CheckpointError(f"{ckpt.path} does not record its {key} (state.json is incomplete)")
    config = nested_config(ckpt.config)
    diffusion, num_classes, text_encoder = run_diffusion_config(ckpt, config)   # what the network was trained for
    model = build_model(dict(extra["model_config"]))
    which = "ema" if use_ema and ckpt.has("ema") else "model"
    if use_ema and which != "ema":
        warnings.warn(f"{ckpt.path} has no EMA weights; using the trained weights", UserWarning, stacklevel=3)
    load_strict(model, ckpt.tensors(which), ckpt.path / f"{which}.safetensors")
    model = model.to(device).eval().requires_grad_(False)
    model.diffusion_config = diffusion
    denoiser = Denoiser(model, sample_shape=tuple(int(v) for v in extra["sample_shape"])).eval()
    attach_run_extras(denoiser, ckpt, config, num_classes, text_encoder, device)   # .config, .vae, .text_encoder...
    return denoiser
