"""The page: a Gradio Blocks app with five tabs (Schedules, Forward process, Generate, Compare, Runs), and
the server around it (a checked port, a bounded queue, loopback by default).

Queue: every event goes through Gradio's queue, at most ``max_queue`` requests waiting (default 32); the
sampling events (Generate, Compare) share one worker (concurrency 1: on a CPU two generations at once only
slow each other down), the pictures of the other tabs have their own. A request beyond the limit gets
"the queue is full" on the page; nothing crashes.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")       # a local page phones nowhere

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

from . import generation as gen  # noqa: E402
from . import handlers as h  # noqa: E402
from .callbacks import DOWNLOAD, Callbacks, wrapped  # noqa: E402
from .ports import check_port, free_port  # noqa: E402

from .ports import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_QUEUE  # noqa: E402
INTRO = ("**Diffusion Forge**: how data turns into noise under a schedule, and how a trained model turns noise "
         "back into data. Every picture has a download button.")


def sampler_choices() -> list[str]:
    from ..sampling.registry import SAMPLERS

    return [gen.OWN, "auto", *SAMPLERS]


def build_app(models=(), outdir=None, device: str | None = "cpu", max_queue: int = DEFAULT_QUEUE) -> gr.Blocks:
    """The Blocks app over the run folders ``models`` (and their subfolders that are runs); pictures are
    written into ``outdir`` (default: a fresh temporary folder)."""
    outdir = Path(outdir or tempfile.mkdtemp(prefix="dforge-serve-"))
    found = h.find_models(models)
    cb = Callbacks(outdir, gen.ModelStore(device))
    fn = wrapped(cb)
    sampling = dict(concurrency_limit=1, concurrency_id="sampling")
    with gr.Blocks(title="Diffusion Forge") as app:
        gr.Markdown(INTRO)
        with gr.Tab("Schedules"):
            _schedules_tab(fn)
        with gr.Tab("Forward process"):
            _forward_tab(fn)
        with gr.Tab("Generate"):
            model, controls = _generate_tab(fn, found, sampling)
        with gr.Tab("Compare"):
            _compare_tab(fn, found, sampling)
        with gr.Tab("Runs"):
            _runs_tab(fn, [m for m in found if h.is_run(m)])
        if found:
            app.load(fn["controls"], model, controls, api_name=False)    # the first model's controls
    app.queue(max_size=max_queue, default_concurrency_limit=1)
    app.dforge_outdir, app.dforge_models = outdir, found
    return app


def _schedules_tab(fn) -> None:
    gr.Markdown("alpha_bar_t (signal kept), SNR_t = alpha_bar_t / (1 - alpha_bar_t) and log-SNR against t. "
                "Zero-terminal-SNR (Lin et al. 2023) rescales a schedule so that its last step is pure noise.")
    with gr.Row():
        names = gr.CheckboxGroup(h.schedule_choices(), value=["linear", "cosine"], label="schedules")
        zero = gr.Checkbox(False, label="add the zero-terminal-SNR version of each")
        T = gr.Number(1000, precision=0, label="timesteps T")
    draw = gr.Button("Draw", variant="primary")
    out = gr.Image(type="filepath", label="schedules", buttons=DOWNLOAD, elem_id="schedules-plot")
    for trigger in (draw.click, names.change, zero.change):
        trigger(fn["schedules"], [names, zero, T], out, api_name=False)


def _forward_tab(fn) -> None:
    gr.Markdown("q(x_t | x_0): x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, the same noise eps for every "
                "schedule. Move t to watch the picture drown.")
    with gr.Row():
        source = gr.Dropdown(h.bundled_image_sets(), value="digits", label="bundled image set")
        index = gr.Number(0, precision=0, label="image index")
        upload = gr.File(label="or upload a picture", type="filepath", elem_id="forward-upload")
    with gr.Row():
        t = gr.Slider(0, 999, value=250, step=1, label="t")
        names = gr.CheckboxGroup(h.schedule_choices(), value=["linear", "cosine"], label="schedules")
        zero = gr.Checkbox(False, label="zero-terminal-SNR too")
        seed = gr.Number(0, precision=0, label="noise seed")
    out = gr.Image(type="filepath", label="x_t per schedule", buttons=DOWNLOAD, elem_id="forward-plot")
    inputs = [source, index, upload, t, names, zero, seed]
    for trigger in (t.release, source.change, index.submit, upload.upload, names.change, zero.change):
        trigger(fn["forward"], inputs, out, api_name=False)
    gr.Button("Draw", variant="primary").click(fn["forward"], inputs, out, api_name="forward")
    gr.Markdown("### A 2-D distribution turning into a Gaussian")
    with gr.Row():
        from ..data import TOY_SETS

        toy = gr.Dropdown(list(TOY_SETS), value="moons", label="2-D toy set")
        sched = gr.Dropdown(h.schedule_choices(), value="cosine", label="schedule")
        zero2 = gr.Checkbox(False, label="zero-terminal-SNR")
        seed2 = gr.Number(0, precision=0, label="seed")
    out2 = gr.Image(type="filepath", label="2-D forward process", buttons=DOWNLOAD)
    gr.Button("Draw 2-D").click(fn["forward_2d"], [toy, sched, zero2, seed2], out2, api_name=False)


def _model_picker(found, elem_id: str):
    return gr.Dropdown(found, value=found[0] if found else None, allow_custom_value=True, elem_id=elem_id,
                       label="model: a run folder (or a diffusers folder); pick one or type a path")


def _generate_tab(fn, found, sampling):
    model = _model_picker(found, "gen-model")
    info = gr.Markdown(elem_id="gen-info")
    with gr.Row():
        sampler = gr.Dropdown(sampler_choices(), value=gen.OWN, label="sampler")
        steps = gr.Number(20, precision=0, label=f"steps (1..{gen.MAX_STEPS})", elem_id="gen-steps")
        seed = gr.Number(0, precision=0, label="seed (image i: seed + i)")
        n = gr.Number(16, precision=0, label=f"images (1..{gen.MAX_N})")
    with gr.Row():
        class_ = gr.Dropdown(["none"], value="none", allow_custom_value=True, visible=False, elem_id="gen-class",
                             label="class (all: image i gets class i mod K; data: drawn from the training set's "
                                   "shares, unguided)")
        guidance = gr.Number(1, label="guidance scale w (1: the conditional model)", visible=False,
                             elem_id="gen-guidance")
        last_class = gr.State("none")        # the class before a change: leaving "data" restores the run's w
        prompt = gr.Textbox(label="prompt", visible=False)
        negative = gr.Textbox(label="negative prompt (replaces the null condition)", visible=False)
    figures = gr.Checkbox(True, label="labelled figures (matplotlib, about a second more)")
    with gr.Row():
        go = gr.Button("Generate", variant="primary", elem_id="gen-go")
        stop = gr.Button("Cancel", variant="stop", elem_id="gen-cancel")
    status = gr.Textbox(label="status", interactive=False, elem_id="gen-status")
    live = gr.Image(label="trajectory so far: x_t (top), predicted x_0 (bottom)", buttons=DOWNLOAD, elem_id="gen-strip")
    with gr.Row():
        grid = gr.Image(type="filepath", label="samples", buttons=DOWNLOAD, elem_id="gen-grid")
        traj = gr.Image(type="filepath", label="trajectory", buttons=DOWNLOAD, elem_id="gen-trajectory")
    files = gr.File(label="files", file_count="multiple", interactive=False)
    controls = [class_, guidance, prompt, negative, steps, info]
    model.change(fn["controls"], model, controls, api_name=False)
    class_.change(fn["class_guidance"], [model, class_, last_class], [guidance, last_class], api_name=False)
    event = go.click(fn["generate"], [model, sampler, steps, seed, n, class_, guidance, prompt, negative, figures],
                     [status, live, grid, traj, files], api_name="generate", **sampling)
    stop.click(fn["cancel"], None, status, cancels=[event], queue=False, api_name="cancel")
    return model, controls


def _compare_tab(fn, found, sampling) -> None:
    gr.Markdown("The same seeds through two samplers: where they agree, the sampler does not matter.")
    model = _model_picker(found, "cmp-model")
    with gr.Row():
        a = gr.Dropdown(sampler_choices()[2:], value="euler", label="sampler A")
        b = gr.Dropdown(sampler_choices()[2:], value="dpmpp_2m", label="sampler B")
        steps = gr.Number(10, precision=0, label=f"steps (1..{gen.MAX_STEPS})")
        seed = gr.Number(0, precision=0, label="seed")
        n = gr.Number(8, precision=0, label=f"images (1..{gen.MAX_N})")
    with gr.Row():
        class_ = gr.Textbox("all", label="class (all, data, none or 0..K-1; class-conditional models; data: "
                                         "drawn from the training set's shares, unguided unless w is given)")
        guidance = gr.Textbox("", label="guidance scale w (empty: the run's own)")
    go = gr.Button("Compare", variant="primary")
    status = gr.Textbox(label="status", interactive=False)
    out = gr.Image(type="filepath", label="side by side", buttons=DOWNLOAD)
    go.click(fn["compare"], [model, a, b, steps, seed, n, class_, guidance], [out, status], api_name="compare",
             **sampling)


def _runs_tab(fn, runs) -> None:
    run = gr.Dropdown(runs, value=runs[0] if runs else None, allow_custom_value=True, label="run folder")
    show = gr.Button("Show", variant="primary")
    status = gr.Markdown()
    loss = gr.Image(type="filepath", label="training loss", buttons=DOWNLOAD)
    grids = gr.Gallery(label="sample grids over training", columns=4, buttons=DOWNLOAD)
    table = gr.Dataframe(label="metrics.jsonl", interactive=False, wrap=True)
    show.click(fn["run_view"], run, [loss, grids, table, status], api_name="runs")
    run.change(fn["run_view"], run, [loss, grids, table, status], api_name=False)


# ---------------------------------------------------------------------------------------------
# The server

def launch(app: gr.Blocks, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True,
           quiet: bool = False) -> str:
    """Serve ``app`` on host:port (0: a free port), after checking the port; returns the page's URL.
    ``block=False`` returns at once (the server runs in a thread; ``app.close()`` stops it)."""
    port = free_port(host) if int(port) == 0 else int(port)
    check_port(host, port)
    allowed = [str(app.dforge_outdir), *map(str, app.dforge_models)]
    app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=quiet, allowed_paths=allowed,
               show_error=False, footer_links=["api"], inbrowser=False)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if block:
        try:
            app.block_thread()
        finally:
            app.close()
    return url
