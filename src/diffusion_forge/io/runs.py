"""Run folders: the config file a user hands in, the metrics a run logs, and its loss curve.

A run folder (written by ``dforge train``) holds ``config.json`` (the nested config, format_version 2;
format_version 1 folders hold the flat one), ``checkpoints/``, ``samples/``, ``metrics.jsonl`` (one JSON
record per line) and ``loss.png``. Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def _config_error(message: str):
    from ..training.config import ConfigError

    return ConfigError(message)


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML (or, for ``.json``, JSON) mapping of config keys: nested sections, dotted or flat keys.

    A syntax error is one line naming the file and the line (no parser traceback)."""
    path = Path(path)
    if not path.is_file():
        raise _config_error(f"config file {path} does not exist" if not path.exists()
                            else f"config file {path} is a folder, not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _config_error(f"cannot read config file {path}: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            d = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as e:
            raise _config_error(f"{path}, line {e.lineno}: invalid JSON ({e.msg})") from None
    else:
        import yaml

        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise _config_error(f"{path}{line}: invalid YAML ({problem})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise _config_error(f"{path} must hold a mapping of config keys (e.g. `optim: {{lr: 1e-3}}`), "
                            f"got {type(d).__name__}")
    return d


def read_run_config(run_dir: str | os.PathLike) -> dict | None:
    """The raw dict of ``run_dir/config.json`` (flat for format_version 1, nested for 2), or None if absent."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _config_error(f"{path} is corrupt ({e}); move the run folder away or fix the file") from None
    if not isinstance(d, dict):
        raise _config_error(f"{path} is corrupt (not a mapping); move the run folder away or fix the file")
    return d


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def plot_loss(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path | None:
    """loss.png: the logged training loss against the step (log scale), with a running mean of k points."""
    import numpy as np

    from ..viz import _plt, save_figure

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        return None
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 10:
        k = max(2, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")  # mean of k consecutive points
        ax.plot(steps[k - 1:], smooth, lw=1.8, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title=f"Training loss: {Path(run_dir).name}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path or Path(run_dir) / "loss.png")
