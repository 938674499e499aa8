"""The Generate and Compare tabs without Gradio: loading a model once, checking a request, and a generation
that reports every step (so the page can draw the trajectory while it runs) and can be cancelled.

Sampling goes through the one seeded loop, ``sampling.generate.generate``: image i uses the CPU generator
seeded ``seed + i``, so the page shows exactly what ``dforge sample RUN --seed SEED`` draws. Classifier-free
guidance: pred = pred_uncond + w (pred_cond - pred_uncond) (w = 1: the conditional model).
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .handlers import is_pipeline, is_run, out_path

MAX_STEPS = 200          # steps a request may ask for (a CPU server stays responsive)
MAX_N = 64               # images per request
STRIP_FRAMES = 12        # steps shown in the live trajectory strip
OWN = "run's own"        # the sampler choice that uses the run's config sample.sampler


class Cancelled(Exception):
    """Raised inside the sampler's callback when the user pressed Cancel."""


class ModelStore:
    """Loaded models by folder, each loaded once (EMA weights, newest checkpoint). Run folders load through
    ``io.checkpoint.load_model_from_run``; diffusers pipeline folders through
    ``interop.pipelines.load_pipeline`` where that module exists."""

    def __init__(self, device: str | None = "cpu"):
        self.device = device
        self._models: dict[str, object] = {}
        self._lock = threading.Lock()

    def get(self, path) -> object:
        if not path or not str(path).strip():
            raise ValueError("pick a model: a run folder written by `dforge train` (or a diffusers folder)")
        p = Path(str(path).strip()).expanduser()
        if not p.exists():
            raise ValueError(f"no run folder at {p}: it does not exist (give a folder written by `dforge train`)")
        key = str(p.resolve())
        with self._lock:
            if key not in self._models:
                self._models[key] = self._load(p)
            return self._models[key]

    def _load(self, p: Path):
        if is_pipeline(p):
            load_pipeline = pipeline_loader()
            if load_pipeline is None:
                raise ValueError(f"{p} is a diffusers folder; this version of diffusion_forge cannot load those "
                                 "(no diffusion_forge.interop.pipelines): give a run folder of `dforge train`")
            return load_pipeline(str(p), self.device)
        if not is_run(p):
            raise ValueError(f"{p} is not a run folder of `dforge train` (no config.json, no checkpoints/)")
        from ..io.checkpoint import load_model_from_run

        return load_model_from_run(p, device=self.device)


def pipeline_loader():
    """``interop.pipelines.load_pipeline``, or None while that module does not exist."""
    try:
        from ..interop.pipelines import load_pipeline
    except ImportError:
        return None
    return load_pipeline


def model_facts(D) -> dict:
    """What the page offers for a model: classes (K, 0 for none; the training set's class shares p(c) that the
    run recorded, for the class "data"), guidance (a null condition to guide against, and the recommended
    scale w), a prompt (a ``.text_encoder``), its sampler defaults."""
    from ..cli.guidance_args import cluster_run

    own = (getattr(D, "config", None) or {}).get("sample", {}) or {}
    return {"num_classes": int(getattr(D, "num_classes", 0) or 0), "guidable": bool(getattr(D, "null_cond", None)),
            "class_shares": getattr(D, "class_frequencies", None),     # p(c) of the training labels, or None
            "clusters": cluster_run(D),                                 # k-means ids: sampled like the data
            "guidance_scale": getattr(D, "guidance_scale", None), "text": getattr(D, "text_encoder", None) is not None,
            "sampler": own.get("sampler"), "steps": int(own.get("steps") or 20),
            "sample_shape": tuple(getattr(D, "sample_shape", ()) or ()), "step": getattr(D, "step", None)}


@dataclass
class Request:
    """A checked generation request."""
    sampler: str
    steps: int
    options: dict
    seed: int
    n: int
    labels: torch.Tensor | None = None
    guidance: float | None = None
    prompt: str | None = None
    negative: str | None = None
    text: dict = field(default_factory=dict)
    classes: str | None = None       # "data": the labels were drawn from the training set's shares p(c)


def _int(value, what: str, lo: int, hi: int | None) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a whole number, got {value!r}") from None
    if f != int(f):
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    v = int(f)
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{what} must lie in [{lo}, {hi}], got {v}" if hi is not None else f"{what} must be >= {lo}")
    return v


def check_request(D, sampler=None, steps=None, seed=0, n=16, class_=None, guidance=None, prompt=None,
                  negative=None) -> Request:
    """Every check before any sampling: the sampler and its step count (1..MAX_STEPS), the seed, n
    (1..MAX_N), the class (needs a class-conditional model), the guidance scale (needs a null condition),
    the prompt (needs a text model). A bad value is a ValueError saying what to change.

    The class: "all" (image i: class i mod K), "none", a class id 0..K-1, or "data" (as `dforge sample
    --class data`): image i's class drawn from the training set's shares p(c) with seed + i; unguided (then
    the sampler rule of samples that follow p(x), DATA_CLASS_SAMPLERS) unless a guidance scale other than 1 is
    given (then the rule of conditional samples)."""
    from ..sampling.generate import data_class_labels
    from ..sampling.registry import SAMPLERS, resolve_sampler

    facts = model_facts(D)
    steps = _int(facts["steps"] if steps in (None, "") else steps, "steps", 1, MAX_STEPS)
    seed, n = _int(seed or 0, "the seed", 0, 2**62), _int(16 if n in (None, "") else n, "the number of images", 1, MAX_N)
    sampler = None if sampler in (None, "", OWN) else str(sampler)
    options = {}
    if sampler is None:
        sampler, options = facts["sampler"], dict(((getattr(D, "config", None) or {}).get("sample") or {}).get("options") or {})
    elif sampler == "auto":
        sampler = None
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from: {', '.join(SAMPLERS)} (or auto)")
    K = facts["num_classes"]
    class_ = None if class_ is None else str(class_).strip().lower()
    if facts["clusters"] and class_ in (None, ""):      # a cluster run: like the data unless a class is asked for
        class_ = "data"
    labels = None
    if class_ == "data":
        why = ("is unconditional: it has no classes (leave the class on none)" if not K else
               "records no class shares (trained before runs recorded them): pick all or a class id")
        if not K or facts["class_shares"] is None:
            raise ValueError(f"the class data draws each image's class from the shares p(c) of the run's training "
                             f"labels, and this model {why}")
        labels = data_class_labels(facts["class_shares"], n, seed)   # y_i ~ p(c), from seed + i (as the CLI)
    elif class_ not in (None, "", "all", "none"):
        if not K:
            raise ValueError("this model is unconditional: it has no classes to pick (leave the class on none)")
        c = _int(class_, "the class", 0, K - 1)
        labels = torch.full((n,), c, dtype=torch.long)
    elif K and class_ != "none":
        labels = torch.arange(n) % K                       # class i mod K: every class in turn
    prompt = (prompt or "").strip() or None
    negative = (negative or "").strip() or None
    if (prompt or negative) and not facts["text"]:
        raise ValueError("this model takes no prompt (it was not trained on captions): leave the prompt empty")
    if guidance not in (None, ""):
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise ValueError(f"the guidance scale must be a number, got {guidance!r}") from None
        if not facts["guidable"]:
            if guidance != 1:
                raise ValueError("this model has no null condition (trained unconditionally or with "
                                 "conditioning.dropout=0): classifier-free guidance does not apply; leave it at 1")
            guidance = None
        elif not 0 <= guidance <= 50:
            raise ValueError(f"the guidance scale must lie in [0, 50], got {guidance:g}")
    elif class_ != "data":                                 # "data": p(x) = sum_c p(c) p(x | c), the unguided model
        guidance = facts["guidance_scale"] if facts["guidable"] else None
    else:
        guidance = None
    # what the samples are, for the sampler rule: classes drawn from p(c) and unguided (w = 1) follow the data
    samples = ("data" if class_ == "data" and guidance in (None, 1) else
               "conditional" if K or facts["text"] else "unconditional")
    sampler, steps, options = resolve_sampler(sampler, steps, options, samples)
    return Request(sampler, steps, options, seed, n, labels, guidance, prompt, negative,
                   classes="data" if class_ == "data" else None)


def guided(D, req: Request) -> tuple[object, dict]:
    """(denoiser to sample, cond): the class labels or the prompts' embeddings, wrapped in classifier-free
    guidance at scale w when the request has one (a negative prompt replaces the null condition)."""
    cond, null = {}, None
    if req.labels is not None:
        cond["class_labels"] = req.labels
    if getattr(D, "text_encoder", None) is not None:
        try:
            from ..models.text import prompt_cond
        except ImportError:
            raise ValueError("text models need diffusion_forge.models.text (not in this version)") from None
        text_cond, null = prompt_cond(D, [req.prompt or ""] * req.n,
                                      None if req.negative is None else [req.negative] * req.n)
        cond.update(text_cond)
    if req.guidance is not None and req.guidance != 1:
        from ..denoise.guidance import ClassifierFreeGuidance

        null = null if req.negative is not None else None     # else the denoiser's own null condition
        return ClassifierFreeGuidance(D, req.guidance, null_cond=null), cond
    return D, cond


def _preview(x):
    """Image 0 of a (decoded) frame as uint8 H x W x C; None for other data."""
    from ..data import to_uint8

    return to_uint8(x[:1].float().clamp(-1, 1))[0] if x.ndim == 4 else None


def strip(frames_t: list, frames_0: list):
    """The live trajectory strip: x_t (top row) and the x_0 prediction (bottom row) of image 0 at up to
    STRIP_FRAMES steps spread over the run so far, enlarged to at least 64 px a tile."""
    import math

    import numpy as np

    from ..viz.figures import _pick
    from ..viz.images import tile_rows

    picks = _pick(len(frames_t), STRIP_FRAMES)
    grid = tile_rows([np.stack([frames_t[i] for i in picks]), np.stack([frames_0[i] for i in picks])], pad=1)
    k = max(1, math.ceil(64 / min(frames_t[0].shape[:2])))
    grid = grid.repeat(k, 0).repeat(k, 1)
    return grid[..., 0] if grid.shape[-1] == 1 else grid


def stream(D, req: Request, outdir, cancel: threading.Event | None = None, every: float = 0.25,
           figures: bool = True):
    """Run one generation, yielding dicts as it goes: {"step", "total", "strip" (uint8 array or None)} about
    every ``every`` seconds, then the last one with "done": True, "grid" (picture), "trajectory" (x_t and the
    x_0 prediction per step), "samples" (tensor), "seconds" and "text"; or "cancelled": True when ``cancel``
    was set. Closing the generator cancels the sampling too. ``figures``: a titled grid and the labelled
    figure of ``viz.plot_trajectory`` (matplotlib, about a second); else (images only) the plain tile grid
    and the strip as a picture, in milliseconds."""
    from ..sampling.generate import generate
    from ..viz import plot_trajectory, save_samples
    from ..viz.trajectories import frame_decoder

    cancel = cancel or threading.Event()
    decode = frame_decoder(D)              # a latent model: x_t and x_0 of image 0 decoded at every step
    denoiser, cond = guided(D, req)
    events: queue.Queue = queue.Queue()
    rec: dict = {"t": [], "sigma": [], "x_t": [], "x0": []}
    live_t, live_0 = [], []
    result: dict = {}

    def callback(info):
        if cancel.is_set():
            raise Cancelled
        keep = slice(None) if info["x_t"].ndim == 2 else slice(0, 1)   # 2-D data: every point; images: image 0
        rec["t"].append(float(info["t"]))
        rec["sigma"].append(float(info["sigma"]))
        rec["x_t"].append(decode(info["x_t"][keep].detach().float().cpu()))
        rec["x0"].append(decode(info["x0"][keep].detach().float().cpu()))
        pt, p0 = _preview(rec["x_t"][-1]), _preview(rec["x0"][-1])
        if pt is not None:
            live_t.append(pt), live_0.append(p0)
        events.put(len(rec["t"]))

    def work():
        try:
            result["x"] = generate(denoiser, req.n, seed=req.seed, sampler=req.sampler, steps=req.steps,
                                   sampler_options=req.options, cond=cond or None, batch_size=req.n,
                                   callback=callback)
        except BaseException as e:          # reported to the page by the generator below
            result["error"] = e
        finally:
            events.put(None)

    start = time.time()
    worker = threading.Thread(target=work, name="dforge-generate", daemon=True)
    worker.start()
    last, step = 0.0, 0
    try:
        while True:
            item = events.get()
            if item is None:
                break
            step = item
            if time.time() - last >= every:
                last = time.time()
                yield {"step": min(step, req.steps), "total": req.steps,
                       "strip": strip(live_t, live_0) if live_t else None}
        worker.join()
        seconds = time.time() - start
        error = result.get("error")
        if isinstance(error, Cancelled):
            yield {"cancelled": True, "done": True, "step": step, "total": req.steps, "seconds": seconds,
                   "text": f"cancelled after {step} of {req.steps} steps ({seconds:.1f} s)",
                   "strip": strip(live_t, live_0) if live_t else None}
            return
        if error is not None:
            raise error
        x = result["x"]
        rec.update(final=x[:1] if x.ndim > 2 else x, sampler=req.sampler, steps=req.steps)
        what = _describe(req)
        plain = not figures and bool(live_t)
        grid = save_samples(x, out_path(outdir, "samples"), raw=plain,
                            title=f"{req.sampler}, {req.steps} steps{what}, seeds {req.seed}..{req.seed + req.n - 1}")
        traj = out_path(outdir, "trajectory")
        if plain:
            _write_strip(strip(live_t, live_0), traj)
        else:
            plot_trajectory(traj, rec, frames=8)
        yield {"done": True, "step": req.steps, "total": req.steps, "grid": grid, "trajectory": traj,
               "samples": x, "seconds": seconds, "strip": strip(live_t, live_0) if live_t else None,
               "text": f"{req.n} image{'s' * (req.n != 1)}, {req.sampler} {req.steps} steps{what}, seeds {req.seed}..{req.seed + req.n - 1}: "
                       f"{seconds:.2f} s"}
    finally:
        cancel.set()                 # a closed generator (page left, Cancel) stops the sampler at its next step
        worker.join(timeout=30)


def _write_strip(picture, path) -> None:
    from PIL import Image

    from ..io.files import atomic_write

    atomic_write(path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))


def _describe(req: Request) -> str:
    parts = []
    if req.classes == "data":
        parts.append("classes drawn from the training set's shares")
    elif req.labels is not None:
        same = bool((req.labels == req.labels[0]).all()) and len(req.labels) > 1
        parts.append(f"class {int(req.labels[0])}" if same or len(req.labels) == 1 else "class i mod K")
    if req.prompt:
        parts.append(f"prompt {req.prompt!r}")
    if req.guidance is not None:
        parts.append(f"w = {req.guidance:g}")
    return "".join(f", {p}" for p in parts)


def compare(D, sampler_a: str, sampler_b: str, steps, seed, n, outdir, class_=None, guidance=None, prompt=None):
    """The same seeds through two samplers (``viz.sampler_grid`` / ``plot_sampler_grid``): returns
    (figure, {sampler: samples}, seconds). Every check runs before any sampling."""
    from ..viz import plot_sampler_grid, sampler_grid

    reqs = [check_request(D, s, steps, seed, n, class_, guidance, prompt) for s in (sampler_a, sampler_b)]
    if reqs[0].sampler == reqs[1].sampler and reqs[0].options == reqs[1].options:
        raise ValueError(f"both sides use {reqs[0].sampler}: pick two different samplers")
    start = time.time()
    grid = {}
    for req in reqs:
        denoiser, cond = guided(D, req)
        grid.update(sampler_grid(denoiser, samplers=(req.sampler,), steps=(req.steps,), n=req.n, seed=req.seed,
                                 sampler_options=req.options, cond=cond or None, batch_size=req.n))
    seconds = time.time() - start
    path = out_path(outdir, "compare")
    plot_sampler_grid(path, grid)
    return path, {k[0]: v for k, v in grid.items()}, seconds
