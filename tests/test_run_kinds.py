"""Latent and text runs through the tools that were built for pixel runs: `dforge eval`, `dforge viz trajectory /
samplers`, the web page's generation, and the run loader's attachments (io/run_extras.py).

A latent run here: the session's tiny digits VAE (tests/test_vae.py: 8x8 digits padded to 16 px, 4 x 4 x 4
latents) and a tiny U-Net trained 10 steps; a text run: digits with their captions, the bundled MiniLM encoder,
a tiny UNet2DConditionModel trained 5 steps. What is checked is the plumbing (images out, prompts in, the same
numbers as a second, direct computation with ``generate``), not sample quality.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_vae import tiny_vae

from diffusion_forge.cli import main
from diffusion_forge.data import to_uint8
from diffusion_forge.denoise.guidance import ClassifierFreeGuidance
from diffusion_forge.io.checkpoint import load_model_from_run
from diffusion_forge.models.text import prompt_cond
from diffusion_forge.models.vae import decode_latents
from diffusion_forge.sampling.generate import generate
from diffusion_forge.training import Trainer, merge_config
from diffusion_forge.viz import record_trajectory
from diffusion_forge.web import generation as gen

FAST = {"data.source": "digits", "model.preset": "tiny", "optim.batch_size": 32, "optim.warmup_steps": 2,
        "run.sample_every": 0, "sample.n": 4, "sample.steps": 2, "run.checkpoint_every": 1000,
        "run.guide_snapshot_step": 0, "run.log_every": 10, "run.mixed_precision": "no"}
EVAL = ["--n", "6", "--steps", "2", "--sampler", "euler", "--features", "effnet", "--no-kid", "--no-pr",
        "--no-memorization", "--nll-n", "4", "--nll-t", "2"]


def _train(folder, flags):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)         # module fixtures run before conftest's one_thread
    try:
        Trainer(merge_config(flags={**FAST, **flags}), folder, progress=False).fit()
    finally:
        torch.set_num_threads(threads)
    return folder


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    vae = tiny_vae(tmp_path_factory)
    run = tmp_path_factory.mktemp("kinds") / "latent"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFORGE_CACHE", str(run.parent / "cache"))
        return _train(run, {"data.latent": vae, "optim.steps": 10})


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("kinds") / "text"
    return _train(run, {"conditioning.kind": "text", "conditioning.max_length": 16, "conditioning.dropout": 0.1,
                        "optim.steps": 5})


# -- the loader (io/run_extras.py) ------------------------------------------------------------------

def test_the_loader_attaches_vae_text_encoder_and_prompts_outside_the_state_dict(latent_run, text_run):
    L, T = load_model_from_run(latent_run), load_model_from_run(text_run)
    assert L.vae is not None and T.vae is None and L.text_encoder is None and T.text_encoder is not None
    for D in (L, T):
        assert all(k.startswith("model.") for k in D.state_dict())      # the network's weights only
        assert "vae" not in dict(D.named_children())
    assert L.null_cond is None and L.guidance_scale is None
    empty = T.text_encoder.encode([""])[0]
    torch.testing.assert_close(T.null_cond["encoder_hidden_states"], empty, rtol=0, atol=0)
    assert T.guidance_scale == 3.0 and len(T.prompts) == 10 and T.prompts[7] == "a handwritten seven"


# -- dforge eval ------------------------------------------------------------------------------------

def test_eval_on_a_latent_run_scores_decoded_images_and_skips_the_nll(latent_run, tmp_path, capsys):
    out, js = tmp_path / "s.npz", tmp_path / "r.json"
    assert main(["eval", str(latent_run), *EVAL, "--save-samples", str(out), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "no NLL (bits/dim)" in text and "not the likelihood of the images" in text
    report = json.loads(js.read_text())
    assert "nll" not in report and "latents" in report["nll_skipped"]
    assert any(k.startswith("FD-EffNet") for k in report["metrics"])
    D = load_model_from_run(latent_run)
    want = to_uint8(generate(D, 6, seed=0, sampler="euler", steps=2))   # decoded by generate
    images = np.load(out)["images"]
    assert images.shape == (6, 8, 8, 1) and np.array_equal(images, want)


def test_eval_on_a_text_run_samples_its_prompts_with_guidance(text_run, tmp_path, capsys):
    out, js = tmp_path / "s.npz", tmp_path / "r.json"
    argv = ["eval", str(text_run), *EVAL, "--prompt", "a handwritten seven", "--prompt", "the digit 2",
            "--guidance-scale", "2", "--save-samples", str(out), "--json", str(js)]
    assert main(argv) == 0
    assert "prompts ['a handwritten seven', 'the digit 2']; CFG w = 2" in capsys.readouterr().out
    D = load_model_from_run(text_run)
    prompts = ["a handwritten seven", "the digit 2"] * 3
    want = generate(ClassifierFreeGuidance(D, 2.0), 6, seed=0, sampler="euler", steps=2,
                    cond=prompt_cond(D, prompts)[0])
    f = np.load(out)
    assert list(f["prompts"]) == prompts and np.array_equal(f["images"], to_uint8(want))
    report = json.loads(js.read_text())
    assert report["prompts"] == ["a handwritten seven", "the digit 2"] and report["guidance"]["cfg"]["scale"] == 2
    assert report["nll"]["given"] == "their captions" and np.isfinite(report["nll"]["bpd"])

    # no --prompt: the run's own grid prompts, at its recommended scale
    assert main(["eval", str(text_run), *EVAL, "--nll-n", "0", "--save-samples", str(tmp_path / "own.npz")]) == 0
    assert list(np.load(tmp_path / "own.npz")["prompts"]) == D.prompts[:6]


def test_eval_refuses_prompts_where_they_mean_nothing(latent_run, tmp_path, capsys):
    assert main(["eval", str(latent_run), *EVAL, "--prompt", "a seven"]) == 2
    assert "--prompt needs a text-conditional run" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    assert main(["eval", str(tmp_path / "x.npz"), "--data", "digits", "--prompt", "a seven"]) == 2
    assert "--prompt steer" in capsys.readouterr().err


# -- viz -------------------------------------------------------------------------------------------

def test_trajectory_frames_of_a_latent_run_are_decoded_images(latent_run, tmp_path):
    D = load_model_from_run(latent_run)
    raw = record_trajectory(D, sampler="euler", steps=3, decode=False)
    shown = record_trajectory(D, sampler="euler", steps=3)
    assert raw["x_t"][0].shape == (1, 4, 4, 4) and shown["x_t"][0].shape == (1, 1, 8, 8)
    for key in ("x_t", "x0"):
        for z, x in zip(raw[key], shown[key]):
            torch.testing.assert_close(x, decode_latents(D.vae, z), rtol=0, atol=0)
    torch.testing.assert_close(shown["final"], decode_latents(D.vae, raw["final"]), rtol=0, atol=0)
    assert main(["viz", "trajectory", str(latent_run), "--steps", "3", "--out", str(tmp_path / "t.png")]) == 0
    assert main(["viz", "samplers", str(latent_run), "--samplers", "euler", "--step-counts", "2",
                 "--out", str(tmp_path / "s.png")]) == 0


def test_viz_takes_prompts_on_text_runs(text_run, latent_run, tmp_path, capsys):
    assert main(["viz", "trajectory", str(text_run), "--steps", "3", "--out", str(tmp_path / "own.png")]) == 0
    assert main(["viz", "trajectory", str(text_run), "--steps", "3", "--prompt", "a handwritten seven",
                 "--out", str(tmp_path / "t.png")]) == 0
    assert main(["viz", "samplers", str(text_run), "--samplers", "euler,ddim", "--step-counts", "2", "--prompt",
                 "a one", "--prompt", "a two", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert main(["viz", "trajectory", str(latent_run), "--prompt", "x", "--out", str(tmp_path / "no.png")]) == 2
    assert "--prompt needs a text-conditional run" in capsys.readouterr().err


# -- the web page's generation -----------------------------------------------------------------------

def test_web_live_strip_and_trajectory_of_a_latent_run_show_images(latent_run, tmp_path):
    D = gen.ModelStore().get(latent_run)
    events = list(gen.stream(D, gen.check_request(D, "euler", 3, n=2), tmp_path, every=0, figures=False))
    assert all(e["strip"] is not None for e in events)
    assert events[-1]["strip"].shape[0] == (2 * (8 + 1) + 1) * 8               # two rows of 8x8 images, 8x
    done = list(gen.stream(D, gen.check_request(D, "euler", 3, n=2), tmp_path / "f", every=0))[-1]
    assert done["trajectory"].stat().st_size > 5000 and done["samples"].shape == (2, 1, 8, 8)


def test_web_prompt_box_drives_a_real_text_run(text_run, tmp_path):
    D = gen.ModelStore().get(text_run)
    assert gen.model_facts(D)["text"]
    req = gen.check_request(D, "euler", 3, seed=4, n=2, prompt="a handwritten seven", guidance="2")
    last = list(gen.stream(D, req, tmp_path, every=0, figures=False))[-1]
    cond = prompt_cond(D, ["a handwritten seven"] * 2)[0]
    want = generate(ClassifierFreeGuidance(D, 2.0), 2, seed=4, sampler="euler", steps=3, cond=cond)
    torch.testing.assert_close(last["samples"], want, rtol=0, atol=0)
    assert "prompt 'a handwritten seven'" in last["text"]
    other = gen.check_request(D, "euler", 3, seed=4, n=2, prompt="a handwritten one", guidance="2")
    assert not torch.equal(list(gen.stream(D, other, tmp_path / "b", every=0, figures=False))[-1]["samples"],
                           last["samples"])
    negative = gen.check_request(D, "euler", 3, seed=4, n=2, prompt="a handwritten seven", negative="a one",
                                 guidance="2")
    assert not torch.equal(list(gen.stream(D, negative, tmp_path / "c", every=0, figures=False))[-1]["samples"],
                           last["samples"])
