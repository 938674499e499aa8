"""The pure functions behind the Schedules, Forward process and Runs tabs (no Gradio here: the tests call
them directly). Every picture is written into ``outdir`` by the project's own figure writers (``viz``,
``io.runs.plot_loss``) and returned as a path, so the page can show it and offer it as a download.

Bad input raises ``ValueError`` with one line saying what is wrong and how to fix it; the page shows it.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import torch

SD = "scaled_linear (SD)"      # scaled_linear with Stable Diffusion's betas 0.00085 .. 0.012
MAX_SIDE = 64                  # uploaded pictures are shrunk to at most this many pixels a side
TOY_POINTS = 2000
_counter = itertools.count()


def out_path(outdir: str | os.PathLike, stem: str, suffix: str = ".png") -> Path:
    """A fresh file name in ``outdir`` (one per picture, so two users never overwrite each other's)."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    return outdir / f"{stem}-{os.getpid()}-{next(_counter):06d}{suffix}"


# ---------------------------------------------------------------------------------------------
# Schedules

def schedule_choices() -> list[str]:
    from ..core.schedules import SCHEDULE_NAMES

    return [*SCHEDULE_NAMES, SD]


def schedule_set(names, zero_snr: bool = False, num_timesteps: int = 1000) -> dict:
    """{label: NoiseSchedule} for the picked names; ``zero_snr`` adds each one's zero-terminal-SNR rescale
    (Lin et al. 2023: sqrt(alpha_bar) shifted and scaled so that alpha_bar_{T-1} = 0) next to it."""
    from ..core.schedules import SCHEDULE_NAMES, NoiseSchedule

    names = [names] if isinstance(names, str) else list(names or [])
    if not names:
        raise ValueError("pick at least one schedule")
    bad = [n for n in names if n not in (*SCHEDULE_NAMES, SD)]
    if bad:
        raise ValueError(f"unknown schedule {bad[0]!r}; choose from: {', '.join(schedule_choices())}")
    T = int(num_timesteps)
    if T < 2 or T > 10_000:
        raise ValueError(f"the number of timesteps must lie in [2, 10000], got {T}")
    out = {}
    for name in names:
        base, betas = ("scaled_linear", (0.00085, 0.012)) if name == SD else (name, (None, None))
        out[name] = NoiseSchedule.from_name(base, T, *betas)
        if zero_snr:
            out[f"{name}, zero-SNR"] = NoiseSchedule.from_name(base, T, *betas, zero_terminal_snr=True)
    return out


def schedule_plot(names, zero_snr: bool, outdir, num_timesteps: int = 1000) -> tuple[Path, dict]:
    """alpha_bar_t, SNR_t = alpha_bar_t / (1 - alpha_bar_t) and log SNR_t of the picked schedules in one
    figure (``viz.plot_schedules``). Returns (picture, {label: {"alpha_bar", "snr", "log_snr"}})."""
    from ..viz import plot_schedules

    path = out_path(outdir, "schedules")
    curves = plot_schedules(path, schedule_set(names, zero_snr, num_timesteps))
    return path, curves


# ---------------------------------------------------------------------------------------------
# Forward process

def bundled_image_sets() -> list[str]:
    from ..data import BUNDLED, TOY_SETS

    return [n for n in BUNDLED if n not in TOY_SETS]


def load_picture(source: str = "digits", index: int = 0, upload: str | os.PathLike | None = None) -> torch.Tensor:
    """One image as a float tensor C x H x W in [-1, 1]: an uploaded file (shrunk to at most 64 px a side,
    grey stays grey) when given, else image ``index`` of a bundled set (its test split where it has one)."""
    from ..data import load_dataset, to_model_range

    if upload:
        from PIL import Image, UnidentifiedImageError

        name = Path(upload).name
        try:
            with Image.open(upload) as im:
                im.load()
                im = im.convert("L" if im.mode in ("L", "LA", "I", "I;16", "1", "P") and _grey(im) else "RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise ValueError(f"{name} is not a picture this page can read: upload a PNG, JPEG, GIF, BMP or WebP "
                             "image") from None
        im.thumbnail((MAX_SIDE, MAX_SIDE))
        arr = np.array(im)
        arr = arr[..., None] if arr.ndim == 2 else arr
        return torch.as_tensor(to_model_range(arr[None])[0]).float()
    if source not in bundled_image_sets():
        raise ValueError(f"unknown image set {source!r}; choose one of: {', '.join(bundled_image_sets())}, "
                         "or upload a picture")
    ds = load_dataset(source, split="test", progress=False)
    index = int(index)
    if not 0 <= index < len(ds):
        raise ValueError(f"the image index must lie in [0, {len(ds) - 1}] for {source}, got {index}")
    return torch.as_tensor(ds[index][0]).float()


def _grey(im) -> bool:
    if im.mode != "P":
        return True
    rgb = np.asarray(im.convert("RGB"))
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def forward_frames(image: torch.Tensor, t: int, schedules: dict, seed: int = 0) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps under each schedule (float64, one row per
    schedule), with the same eps ~ N(0, I) (seeded) for every schedule."""
    from ..core.process import q_sample

    first = next(iter(schedules.values()))
    T = first.num_timesteps
    t = int(t)
    if not 0 <= t < T:
        raise ValueError(f"t must lie in [0, {T - 1}], got {t}")
    x0 = torch.as_tensor(image).double()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    tt = torch.tensor([float(t)], dtype=torch.float64)
    return torch.cat([q_sample(x0[None], tt, noise[None], s) for s in schedules.values()])


def forward_picture(image: torch.Tensor, t: int, names, zero_snr: bool, outdir, seed: int = 0) -> tuple[Path, torch.Tensor]:
    """x_0, then x_t for each picked schedule side by side (one titled row, a column per schedule).
    Returns (picture, frames (1 + S, C, H, W): x_0 and each schedule's x_t)."""
    from ..data import to_uint8
    from ..viz import save_image_grid

    schedules = schedule_set(names, zero_snr)
    frames = torch.cat([torch.as_tensor(image).double()[None], forward_frames(image, t, schedules, seed)])
    path = out_path(outdir, f"forward-t{int(t)}")
    save_image_grid(to_uint8(frames.float()), path, nrow=len(frames), title=f"q(x_t | x_0) at t = {int(t)}",
                    col_labels=["x_0", *[_short(k) for k in schedules]])
    return path, frames


def _short(label: str) -> str:
    return label.replace("scaled_linear", "sc.lin.").replace(", zero-SNR", " 0SNR")


def forward_2d_picture(name: str, schedule: str, zero_snr: bool, outdir, seed: int = 0) -> tuple[Path, dict]:
    """A 2-D toy distribution at increasing t, next to N(0, I) (``viz.plot_forward_2d``)."""
    from ..data import TOY_SETS, toy_2d
    from ..viz import plot_forward_2d

    if name not in TOY_SETS:
        raise ValueError(f"unknown 2-D toy set {name!r}; choose one of: {', '.join(TOY_SETS)}")
    sched = schedule_set([schedule], False)[schedule] if not zero_snr else schedule_set([schedule], True)[
        f"{schedule}, zero-SNR"]
    points = toy_2d(name, TOY_POINTS, seed=int(seed))[0]
    path = out_path(outdir, f"forward-{name}")
    data = plot_forward_2d(path, points, sched, seed=int(seed),
                           title=f"{name} under q(x_t | x_0): the distribution turns into a Gaussian "
                                 f"({schedule}{', zero-SNR' if zero_snr else ''})")
    return path, data


# ---------------------------------------------------------------------------------------------
# Runs

def is_run(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "config.json").is_file() or (p / "checkpoints").is_dir())


def is_pipeline(path: str | os.PathLike) -> bool:
    """A diffusers pipeline folder (``model_index.json``), e.g. one `dforge export` wrote."""
    return (Path(path) / "model_index.json").is_file()


def find_models(paths) -> list[str]:
    """The run folders (and diffusers pipeline folders) among ``paths`` and their immediate subfolders, in
    order, each once: `dforge serve runs/` offers every run under runs/."""
    found: list[str] = []
    for given in paths or []:
        p = Path(given).expanduser()
        if is_run(p) or is_pipeline(p):
            found.append(str(p))
        elif p.is_dir():
            found += [str(c) for c in sorted(p.iterdir()) if c.is_dir() and (is_run(c) or is_pipeline(c))]
    return list(dict.fromkeys(found))


def check_run(run: str | None) -> Path:
    if not run or not str(run).strip():
        raise ValueError("pick a run folder (one written by `dforge train`), or type its path")
    p = Path(str(run).strip()).expanduser()
    if not p.exists():
        raise ValueError(f"no run folder at {p}: it does not exist (give a folder written by `dforge train`)")
    if not is_run(p):
        raise ValueError(f"{p} is not a run folder of `dforge train` (it has no config.json and no checkpoints/)")
    return p


def run_loss_picture(run, outdir) -> Path | None:
    """The run's training loss against the step (``io.runs.plot_loss``); None when it logged no loss yet."""
    from ..io.runs import plot_loss

    return plot_loss(check_run(run), out_path(outdir, "loss"))


def run_sample_grids(run) -> list[tuple[str, str]]:
    """[(picture, "step N")] of the grids the trainer wrote into samples/, oldest first."""
    folder = check_run(run) / "samples"
    if not folder.is_dir():
        return []
    grids = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    return [(str(p), f"step {int(p.stem[5:])}" if p.stem[5:].isdigit() else p.stem) for p in grids]


def metrics_table(run) -> tuple[list[str], list[list]]:
    """(headers, rows) of metrics.jsonl: one row per record, a column per key (step first)."""
    from ..io.runs import read_metrics

    records = read_metrics(check_run(run))
    keys = list(dict.fromkeys(k for r in records for k in r))
    keys.sort(key=lambda k: (k != "step", 0))
    rows = [[_cell(r.get(k)) for k in keys] for r in records]
    return keys, rows


def _cell(v):
    if isinstance(v, float):
        return float(f"{v:.6g}")
    return v if isinstance(v, (int, str)) or v is None else str(v)
