"""The web page's functions (`dforge serve`), called directly: values against closed forms and against the
toolkit's own generate(); the checks that turn bad input into one line; the port check.
Also the helpers the browser and load tests share: a tiny trained run and a server on a free port."""
from __future__ import annotations

import contextlib
import math
import socket
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import torch

from diffusion_forge.core.schedules import NoiseSchedule
from diffusion_forge.web import generation as gen
from diffusion_forge.web import handlers as h
from diffusion_forge.web.ports import check_port


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny U-Net trained 2 steps on the bundled 8x8 digits (as tests/test_cli.py's image run), trained once
    per test session and shared by test_web*.py."""
    from test_cli import IMAGE_RUN

    from diffusion_forge.cli import main

    run = tmp_path_factory.getbasetemp() / "web-tiny-run"
    if not (run / "checkpoints").is_dir():
        torch.set_num_threads(1)
        assert main(["train", "--out", str(run), *IMAGE_RUN]) == 0
    return run


@pytest.fixture(scope="module")
def tiny_class_run(tmp_path_factory):
    """tiny_run's recipe, class-conditional (label dropout 0.1: a null class): it records the digits' p(c)."""
    from test_cli import IMAGE_RUN

    from diffusion_forge.cli import main

    run = tmp_path_factory.getbasetemp() / "web-tiny-class-run"
    if not (run / "checkpoints").is_dir():
        torch.set_num_threads(1)
        assert main(["train", "--out", str(run), *IMAGE_RUN, "--set", "conditioning.kind=class"]) == 0
    return run


@contextlib.contextmanager
def serving(models, outdir, max_queue: int = 32):
    """The page on a free loopback port, in this process; closed on exit. Yields (app, url)."""
    from diffusion_forge.web.app import build_app, launch

    app = build_app([str(m) for m in models], outdir=outdir, max_queue=max_queue)
    url = launch(app, port=0, block=False, quiet=True)
    try:
        yield app, url
    finally:
        app.close()


# ---------------------------------------------------------------------------------------------
# Schedules and the forward process

def test_schedule_curves_are_the_schedules_own_and_the_closed_form(tmp_path):
    path, curves = h.schedule_plot(["linear", "cosine", h.SD], True, tmp_path, num_timesteps=1000)
    assert path.is_file() and path.stat().st_size > 1000
    assert list(curves) == ["linear", "linear, zero-SNR", "cosine", "cosine, zero-SNR", h.SD, f"{h.SD}, zero-SNR"]
    # linear: alpha_bar_t = prod_{s<=t} (1 - beta_s), beta linear from 1e-4 to 0.02 (diffusers' defaults)
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    np.testing.assert_allclose(curves["linear"]["alpha_bar"], ab, rtol=1e-12)
    np.testing.assert_allclose(curves["linear"]["snr"], ab / (1 - ab), rtol=1e-10)
    np.testing.assert_allclose(curves["linear"]["log_snr"], np.log(ab / (1 - ab)), rtol=1e-10)
    # Stable Diffusion's scaled_linear: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012)
    sd = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    np.testing.assert_allclose(curves[h.SD]["alpha_bar"], sd, rtol=1e-12)
    np.testing.assert_array_equal(curves["cosine"]["alpha_bar"], NoiseSchedule.from_name("cosine").alphas_cumprod.numpy())
    for label in ("linear, zero-SNR", "cosine, zero-SNR"):          # pure noise at the last step, data kept at 0
        assert curves[label]["alpha_bar"][-1] == 0 and curves[label]["log_snr"][-1] == -math.inf
        plain = curves[label.split(",")[0]]["alpha_bar"][0]
        assert curves[label]["alpha_bar"][0] == pytest.approx(plain, rel=1e-12)


@pytest.mark.parametrize("names, message", [([], "pick at least one"), (["cubic"], "unknown schedule 'cubic'")])
def test_bad_schedule_choices_are_one_line(names, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        h.schedule_plot(names, False, tmp_path)


def test_forward_frames_are_q_sample_in_closed_form(tmp_path):
    image = h.load_picture("digits", 5)
    assert image.shape == (1, 8, 8) and image.min() >= -1 and image.max() <= 1
    path, frames = h.forward_picture(image, 300, ["linear", "cosine"], False, tmp_path, seed=7)
    assert path.is_file() and frames.shape == (3, 1, 8, 8)
    eps = torch.randn(image.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(frames[0], image.double())
    for row, name in zip(frames[1:], ["linear", "cosine"]):
        ab = NoiseSchedule.from_name(name).alphas_cumprod[300]
        torch.testing.assert_close(row, ab.sqrt() * image.double() + (1 - ab).sqrt() * eps)
    zero = h.forward_frames(image, 999, h.schedule_set(["linear"], True), seed=7)
    torch.testing.assert_close(zero[1], eps)                  # zero-terminal-SNR: x_{T-1} is the noise itself
    with pytest.raises(ValueError, match=r"t must lie in \[0, 999\]"):
        h.forward_frames(image, 1000, h.schedule_set(["linear"]))


def test_uploaded_pictures_are_read_and_other_files_refused(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    x = h.load_picture(upload=tmp_path / "a.png")
    assert x.shape == (3, 20, 30)
    torch.testing.assert_close(x, torch.as_tensor(rgb).permute(2, 0, 1).float() / 127.5 - 1)
    Image.fromarray(np.zeros((200, 100), np.uint8)).save(tmp_path / "grey.png")
    assert h.load_picture(upload=tmp_path / "grey.png").shape == (1, h.MAX_SIDE, h.MAX_SIDE // 2)  # shrunk
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ValueError, match="notes.txt is not a picture"):
        h.load_picture(upload=tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r"index must lie in \[0, 359\]"):
        h.load_picture("digits", 360)


def test_forward_2d_turns_into_a_gaussian(tmp_path):
    path, data = h.forward_2d_picture("moons", "cosine", True, tmp_path)
    assert path.is_file() and data["t"][-1] == 999
    last = data["points"][-1]                                 # zero-SNR: x_{T-1} = eps exactly, N(0, I)
    assert abs(last.mean()) < 0.1 and abs(last.std() - 1) < 0.05


# ---------------------------------------------------------------------------------------------
# Requests

def _fake(num_classes=0, null=None, scale=None, text=False):
    D = types.SimpleNamespace(num_classes=num_classes, null_cond=null, guidance_scale=scale,
                              config={"sample": {"sampler": "euler", "steps": 12, "options": {}}}, step=1,
                              sample_shape=(1, 8, 8))
    if text:
        D.text_encoder = object()
    return D


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), r"steps must lie in \[1, 200\], got 0"), (dict(steps=201), r"steps must lie in \[1, 200\]"),
    (dict(steps="ten"), "steps must be a whole number"), (dict(steps=2.5), "steps must be a whole number"),
    (dict(n=0), r"number of images must lie in \[1, 64\]"), (dict(sampler="nope"), "unknown sampler 'nope'"),
    (dict(prompt="a cat"), "takes no prompt"), (dict(class_="3"), "unconditional: it has no classes"),
    (dict(guidance=3), "has no null condition"), (dict(seed=-1), "seed must lie in")])
def test_bad_requests_are_one_line_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gen.check_request(_fake(), **{"steps": 5, **kwargs})


def test_requests_take_the_models_classes_guidance_and_defaults():
    req = gen.check_request(_fake(), sampler=gen.OWN, steps=None)
    assert (req.sampler, req.steps, req.labels, req.guidance) == ("euler", 12, None, None)
    cond = _fake(num_classes=10, null={"class_labels": 10}, scale=2.5)
    req = gen.check_request(cond, "heun", 4, n=12)
    assert req.labels.tolist() == [i % 10 for i in range(12)] and req.guidance == 2.5
    req = gen.check_request(cond, "heun", 4, n=3, class_="7", guidance="0")
    assert req.labels.tolist() == [7, 7, 7] and req.guidance == 0
    with pytest.raises(ValueError, match=r"class must lie in \[0, 9\]"):
        gen.check_request(cond, "heun", 4, class_=10)
    from diffusion_forge.sampling.registry import default_sampler
    assert gen.check_request(cond, "auto", 10).sampler == default_sampler(10)[0]   # the budget rule of the registry
    # "auto" takes the registry's table for the model's conditioning: its options, not only its name
    for D, conditional in ((_fake(), False), (cond, True), (_fake(text=True), True)):
        name, options = default_sampler(10, "conditional" if conditional else "unconditional")
        req = gen.check_request(D, "auto", 10)
        assert (req.sampler, {k: req.options[k] for k in options}) == (name, options)
    assert default_sampler(10)[1] != default_sampler(10, "conditional")[1]   # else the loop shows nothing


def test_the_model_line_names_the_default_for_the_models_conditioning():
    from diffusion_forge.sampling.registry import default_sampler
    from diffusion_forge.web.callbacks import Callbacks

    for D, conditional in ((_fake(), False), (_fake(num_classes=10, null={"class_labels": 10}, scale=2.5), True)):
        D.config = {"sample": {"sampler": None, "steps": 12}}
        info = Callbacks(None, types.SimpleNamespace(get=lambda m, D=D: D)).controls("m")[-1]
        name, options = default_sampler(12, "conditional" if conditional else "unconditional")
        own = f"its own sampler: the default, {name}" + "".join(f" {k}={v}" for k, v in options.items())
        assert info.endswith(f"{own}, 12 steps"), info


def test_prompts_go_through_prompt_cond_and_negative_prompts_replace_the_null(monkeypatch, tiny_run):
    from diffusion_forge.denoise.guidance import ClassifierFreeGuidance

    calls = []
    negative_null = {"encoder_hidden_states": torch.ones(4, 3)}

    def prompt_cond(denoiser, prompts, negative_prompts=None):     # models/text.py's contract
        calls.append((prompts, negative_prompts))
        return {"encoder_hidden_states": torch.zeros(len(prompts), 4, 3)}, negative_null

    monkeypatch.setitem(sys.modules, "diffusion_forge.models.text", types.SimpleNamespace(prompt_cond=prompt_cond))
    D = gen.ModelStore().get(tiny_run)                     # a real denoiser, dressed as a text run
    object.__setattr__(D, "text_encoder", object())
    D.null_cond, D.guidance_scale = {"encoder_hidden_states": torch.zeros(4, 3)}, 5.0
    req = gen.check_request(D, "euler", 3, n=2, prompt="a cat", negative="blurry")
    assert req.prompt == "a cat" and req.guidance == 5.0
    denoiser, cond = gen.guided(D, req)
    assert calls == [(["a cat", "a cat"], ["blurry", "blurry"])]
    assert isinstance(denoiser, ClassifierFreeGuidance) and denoiser.scale == 5.0
    assert denoiser.null_cond["encoder_hidden_states"] is negative_null["encoder_hidden_states"]   # not D's zeros
    assert cond["encoder_hidden_states"].shape == (2, 4, 3)
    denoiser, _ = gen.guided(D, gen.check_request(D, "euler", 3, n=2, prompt="a cat", guidance=1))
    assert denoiser is D                                    # w = 1: the conditional model, no second branch


# ---------------------------------------------------------------------------------------------
# Generation on a trained run

def test_a_stream_yields_steps_and_ends_with_what_generate_draws(tiny_run, tmp_path):
    from diffusion_forge.sampling.generate import generate

    D = gen.ModelStore().get(tiny_run)
    assert gen.ModelStore().get(tiny_run) is not D and gen.model_facts(D)["num_classes"] == 0
    req = gen.check_request(D, "heun", 4, seed=3, n=5)
    events = list(gen.stream(D, req, tmp_path, every=0, figures=False))
    assert [e["step"] for e in events[:-1]] == list(range(1, len(events)))       # every step reported, in order
    assert all(e["strip"].shape[0] == (2 * (8 + 1) + 1) * 8 for e in events[:-1])  # x_t, x_0 rows, 8x enlarged
    last = events[-1]
    assert last["done"] and last["grid"].is_file() and last["trajectory"].is_file()
    torch.testing.assert_close(last["samples"], generate(D, 5, seed=3, sampler="heun", steps=4), rtol=0, atol=0)
    labelled = list(gen.stream(D, gen.check_request(D, "euler", 2, n=2), tmp_path, every=0))[-1]
    assert labelled["trajectory"].stat().st_size > 5000                       # the matplotlib figure


def test_cancel_stops_the_sampler_at_its_next_step(tiny_run, tmp_path):
    D = gen.ModelStore().get(tiny_run)
    cancel = threading.Event()
    events = []
    for e in gen.stream(D, gen.check_request(D, "euler", 50, n=2), tmp_path, cancel, every=0):
        events.append(e)
        if e["step"] == 3:
            cancel.set()
    assert events[-1]["cancelled"] and 3 <= events[-1]["step"] < 50
    assert "cancelled after" in events[-1]["text"]


def test_compare_is_the_same_seeds_through_two_samplers(tiny_run, tmp_path):
    from diffusion_forge.sampling.generate import generate

    D = gen.ModelStore().get(tiny_run)
    path, samples, _ = gen.compare(D, "euler", "dpmpp_2m", 3, 4, 3, tmp_path)
    assert path.is_file() and list(samples) == ["euler", "dpmpp_2m"]
    for name, x in samples.items():
        torch.testing.assert_close(x, generate(D, 3, seed=4, sampler=name, steps=3), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pick two different samplers"):
        gen.compare(D, "euler", "euler", 3, 0, 2, tmp_path)


def test_missing_models_and_foreign_folders_are_one_line(tmp_path):
    store = gen.ModelStore()
    with pytest.raises(ValueError, match="no run folder at .*nope: it does not exist"):
        store.get(tmp_path / "nope")
    with pytest.raises(ValueError, match="is not a run folder"):
        store.get(tmp_path)
    with pytest.raises(ValueError, match="pick a model"):
        store.get("")


def test_class_data_draws_the_cli_labels_unguided_with_the_data_rule(tiny_class_run, tmp_path):
    """class "data": image i's label is data_class_labels(p(c), n, seed)[i], as `dforge sample --class data
    --seed SEED`; no guidance and the sampler rule of samples drawn like the data (DATA_CLASS_SAMPLERS) unless
    w is given."""
    from diffusion_forge.sampling.generate import data_class_labels, generate
    from diffusion_forge.sampling.registry import resolve_sampler

    D = gen.ModelStore().get(tiny_class_run)
    p_c = D.class_frequencies
    assert len(p_c) == 10 and gen.model_facts(D)["guidable"] and D.guidance_scale is not None
    req = gen.check_request(D, gen.OWN, 4, seed=7, n=6, class_="data")        # own sampler none: the rule
    assert req.labels.tolist() == data_class_labels(p_c, 6, 7).tolist() and req.guidance is None
    assert req.labels.tolist() != (torch.arange(6) % 10).tolist()             # not the class i mod K of "all"
    assert (req.sampler, req.steps, req.options) == resolve_sampler(None, 4, {}, "data")
    assert (req.sampler, req.steps, req.options) != resolve_sampler(None, 4, {}, "conditional")
    assert gen.guided(D, req)[0] is D                                        # no CFG wrapper
    last = list(gen.stream(D, req, tmp_path, every=0, figures=False))[-1]
    direct = generate(D, 6, seed=7, cond={"class_labels": data_class_labels(p_c, 6, 7)}, sampler=req.sampler,
                      steps=req.steps, sampler_options=req.options)
    torch.testing.assert_close(last["samples"], direct, rtol=0, atol=0)
    assert "classes drawn from the training set's shares" in last["text"] and "w =" not in last["text"]
    # a named sampler is kept; w = 1 given is still unguided and the rule of samples that follow the data
    assert gen.check_request(D, "heun", 4, n=2, class_="data").sampler == "heun"
    one = gen.check_request(D, "auto", 4, n=2, class_="data", guidance=1)
    assert (one.sampler, one.steps, one.options) == resolve_sampler(None, 4, {}, "data")
    # w = 2 given: classifier-free guidance on the same labels, and the rule of conditional samples
    two = gen.check_request(D, "auto", 4, seed=7, n=6, class_="data", guidance=2)
    assert two.labels.tolist() == req.labels.tolist() and two.guidance == 2
    assert (two.sampler, two.steps, two.options) == resolve_sampler(None, 4, {}, "conditional")
    assert gen.guided(D, two)[0].scale == 2
    path, samples, _ = gen.compare(D, "euler", "heun", 2, 7, 3, tmp_path, class_="data")   # the Compare tab
    assert path.is_file()
    torch.testing.assert_close(samples["euler"], generate(D, 3, seed=7, sampler="euler", steps=2,
                                                          cond={"class_labels": data_class_labels(p_c, 3, 7)}),
                               rtol=0, atol=0)


def test_class_data_is_offered_and_refused_where_the_run_has_no_shares(tiny_class_run):
    from diffusion_forge.web.callbacks import DATA_CHOICE, Callbacks

    D = gen.ModelStore().get(tiny_class_run)
    page = Callbacks(None, types.SimpleNamespace(get=lambda m: D))
    choices = page.controls("m")[0]["choices"]
    assert choices[:2] == ["all", (DATA_CHOICE, "data")] and choices[2:] == [str(c) for c in range(10)]
    assert page.class_guidance("m", "data", "all")[0]["value"] == 1          # data: w = 1, unguided
    assert page.class_guidance("m", "3", "data")[0]["value"] == D.guidance_scale   # back: the run's w
    assert "value" not in page.class_guidance("m", "3", "all")[0]           # else what the box holds stays
    with pytest.raises(ValueError, match="this model is unconditional: it has no classes"):
        gen.check_request(_fake(), "euler", 4, class_="data")
    D.class_frequencies = None                                               # a run trained before p(c) was kept
    assert "data" not in [c[1] for c in page.controls("m")[0]["choices"] if isinstance(c, tuple)]
    with pytest.raises(ValueError, match=r"records no class shares \(trained before runs recorded them\): pick "
                                         "all or a class id"):
        gen.check_request(D, "euler", 4, class_="data")


# ---------------------------------------------------------------------------------------------
# Runs

def test_runs_tab_shows_the_runs_own_records(tiny_run, tmp_path):
    from diffusion_forge.io.runs import read_metrics

    assert h.find_models([tiny_run.parent]) == [str(tiny_run)] or str(tiny_run) in h.find_models([tiny_run.parent])
    assert h.find_models([tiny_run, tiny_run]) == [str(tiny_run)]
    headers, rows = h.metrics_table(tiny_run)
    records = read_metrics(tiny_run)
    assert headers[0] == "step" and len(rows) == len(records) > 0
    assert [r[headers.index("loss")] for r in rows] == pytest.approx([r["loss"] for r in records], rel=1e-5)
    assert h.run_loss_picture(tiny_run, tmp_path).is_file()
    assert h.run_sample_grids(tiny_run)[-1][1] == "step 2"
    with pytest.raises(ValueError, match="is not a run folder"):
        h.metrics_table(tmp_path)


# ---------------------------------------------------------------------------------------------
# The command and its port

def test_a_taken_port_is_one_line_before_gradio_loads(capsys):
    from diffusion_forge.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is taken"):
            check_port("127.0.0.1", port)
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"port {port} on 127.0.0.1 is taken" in err and "--port N" in err
    assert main(["serve", "--max-queue", "0"]) == 2
    with pytest.raises(ValueError, match="not an address"):
        check_port("no-such-host.invalid", 80)


def test_help_imports_no_gradio():
    code = ("import sys; from diffusion_forge.cli import build_parser; build_parser(); "
            "import diffusion_forge.web, diffusion_forge.web.ports; print('gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]        # (no torch either: tests/test_cli.py checks that)


def test_errors_become_page_messages_not_tracebacks():
    import gradio as gr

    from diffusion_forge.web.callbacks import guard, guard_stream

    def bad():
        raise ValueError("steps must lie in [1, 200], got 0")

    def boom():
        yield 1
        raise KeyError("x")

    with pytest.raises(gr.Error, match=r"steps must lie in \[1, 200\], got 0"):
        guard(bad)()
    with pytest.raises(gr.Error, match="internal error: KeyError"):
        list(guard_stream(boom)())
