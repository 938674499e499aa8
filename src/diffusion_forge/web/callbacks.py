"""What the page's buttons call: thin adapters from Gradio's values to the pure functions of
``handlers`` / ``generation`` and back. Every error becomes a ``gr.Error`` with one line (shown on the page
as a message, never a traceback); an unexpected one is logged with its traceback on the server's stderr."""
from __future__ import annotations

import functools
import sys
import threading
import traceback

import gradio as gr

from . import generation as gen
from . import handlers as h

DOWNLOAD = ["download", "fullscreen"]
DATA_CHOICE = "data (drawn from the training set's shares)"   # the class dropdown's label of the value "data"


def message(e: BaseException) -> str:
    """One line for the page: the CLI's own wording of expected errors (bad input, files, devices)."""
    from ..cli import BUG_REPORT, describe, is_expected

    if is_expected(e):
        return describe(e)
    traceback.print_exception(e, file=sys.stderr)
    return f"internal error: {type(e).__name__}: {' '.join(str(e).split())}; {BUG_REPORT} (see the server's log)"


def guard(fn):
    """Run ``fn``; any exception becomes a gr.Error with :func:`message`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise gr.Error(message(e), print_exception=False) from None
    return wrapper


def guard_stream(fn):
    """:func:`guard` for a generator function (its yields pass through)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:
            raise gr.Error(message(e), print_exception=False) from None
    return wrapper


class Callbacks:
    """The page's callbacks over one output folder and one store of loaded models."""

    def __init__(self, outdir, store: gen.ModelStore):
        self.outdir, self.store = outdir, store
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    # -- Schedules and the forward process ----------------------------------------------------
    def schedules(self, names, zero_snr, num_timesteps):
        path, _ = h.schedule_plot(names, bool(zero_snr), self.outdir, int(num_timesteps or 1000))
        return str(path)

    def forward(self, source, index, upload, t, names, zero_snr, seed):
        image = h.load_picture(source, int(index or 0), upload)
        path, _ = h.forward_picture(image, int(t), names, bool(zero_snr), self.outdir, int(seed or 0))
        return str(path)

    def forward_2d(self, name, schedule, zero_snr, seed):
        return str(h.forward_2d_picture(name, schedule, bool(zero_snr), self.outdir, int(seed or 0))[0])

    # -- Generate -----------------------------------------------------------------------------
    def controls(self, model):
        """The controls a model has: classes, guidance, a prompt box; its default steps; a line about it."""
        if not model:
            return (gr.update(), gr.update(), gr.update(), gr.update(), gr.update(), "pick a model")
        f = gen.model_facts(self.store.get(model))
        K = f["num_classes"]
        # "data" (shown with what it means; its value stays "data") where the run recorded its class shares p(c)
        data = [(DATA_CHOICE, "data")] if K and f["class_shares"] is not None else []
        classes = ["all", *data, *map(str, range(K))] if K else ["none"]
        if f["clusters"] and data:           # a cluster run samples like the data unless asked otherwise
            classes = [*data, "all", *map(str, range(K))]
        own = f["sampler"]
        if own is None:                      # sample.sampler none: the registry's default for the budget
            from ..sampling.registry import default_sampler

            kind = "data" if f["clusters"] else "conditional" if K or f["text"] else "unconditional"
            name, options = default_sampler(f["steps"], kind)
            own = f"the default, {name}" + "".join(f" {k}={v}" for k, v in options.items())
        info = (f"step {f['step']}, samples of shape {f['sample_shape']}; "
                f"{f'{K} k-means clusters (sampled like the data)' if f['clusters'] else f'{K} classes' if K else 'unconditional'}"
                f"{', guidance w = ' + format(f['guidance_scale'] or 1, 'g') + ' recommended' if f['guidable'] else ''}"
                f"{', text prompts' if f['text'] else ''}; its own sampler: {own}, {f['steps']} steps")
        w = 1 if classes[0] == "data" or not f["guidable"] else f["guidance_scale"]
        return (gr.update(choices=classes, value=classes[0], visible=bool(K)),
                gr.update(value=w, visible=f["guidable"]),
                gr.update(visible=f["text"]), gr.update(visible=f["text"]), gr.update(value=f["steps"]), info)

    def class_guidance(self, model, class_, previous):
        """(guidance box, the class now): picking "data" sets w = 1, so the images follow the data as with
        `dforge sample --class data` (no guidance); leaving "data" restores the model's recommended w; any other
        change keeps what the box holds."""
        if not model or class_ == previous:
            return gr.update(), class_
        f = gen.model_facts(self.store.get(model))
        if not f["guidable"]:
            return gr.update(), class_
        if class_ == "data":
            return gr.update(value=1), class_
        if previous == "data":
            return gr.update(value=f["guidance_scale"] or 1), class_
        return gr.update(), class_

    def generate(self, model, sampler, steps, seed, n, class_, guidance, prompt="", negative="", figures=True,
                 request: gr.Request = None, progress=gr.Progress()):
        """Yields (status, live strip, grid, trajectory, files) while sampling runs."""
        D = self.store.get(model)
        req = gen.check_request(D, sampler, steps, seed, n, class_, guidance, prompt, negative)
        cancel = self._cancel_event(request, fresh=True)
        yield f"sampling: {req.sampler}, {req.steps} steps ...", None, None, None, None
        for info in gen.stream(D, req, self.outdir, cancel, figures=bool(figures)):
            if info.get("done"):
                if info.get("cancelled"):
                    yield info["text"], info["strip"], None, None, None
                    return
                files = [str(info["grid"]), str(info["trajectory"])]
                yield info["text"], info["strip"], files[0], files[1], files
                return
            progress((info["step"], info["total"]), desc="sampling", unit="steps")
            yield f"step {info['step']} of {info['total']}", info["strip"], gr.update(), gr.update(), gr.update()

    def cancel(self, request: gr.Request = None):
        event = self._cancel_event(request)
        event.set()
        return "cancelled"

    def _cancel_event(self, request, fresh: bool = False) -> threading.Event:
        key = getattr(request, "session_hash", None) or "default"
        with self._lock:
            if fresh or key not in self._cancels:
                self._cancels[key] = threading.Event()
            return self._cancels[key]

    def compare(self, model, sampler_a, sampler_b, steps, seed, n, class_, guidance):
        D = self.store.get(model)
        path, samples, seconds = gen.compare(D, sampler_a, sampler_b, steps, seed, n, self.outdir, class_, guidance)
        a, b = samples
        diff = float((samples[a] - samples[b]).abs().mean())
        return str(path), f"{a} and {b}, the same seeds: {seconds:.2f} s; mean |difference| {diff:.3f}"

    # -- Runs ---------------------------------------------------------------------------------
    def run_view(self, run):
        loss = h.run_loss_picture(run, self.outdir)
        grids = h.run_sample_grids(run)
        headers, rows = h.metrics_table(run)
        status = (f"{len(rows)} records in metrics.jsonl, {len(grids)} sample grids"
                  f"{'' if loss else '; no loss logged yet'}")
        table = gr.update(value=rows or [[""]], headers=headers or ["metrics.jsonl"])
        return (str(loss) if loss else None), grids, table, status


def wrapped(cb: Callbacks) -> dict:
    """The callbacks as the page registers them: each behind :func:`guard` / :func:`guard_stream`."""
    out = {}
    for name in ("schedules", "forward", "forward_2d", "controls", "class_guidance", "cancel", "compare",
                 "run_view"):
        out[name] = guard(getattr(cb, name))
    out["generate"] = guard_stream(cb.generate)
    return out
