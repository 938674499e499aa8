"""Text prompts (issue 11): a frozen text encoder fed to a UNet2DConditionModel through cross-attention.

The end-to-end part trains a tiny text-conditional U-Net on scikit-learn's 8x8 digits captioned from the digit
templates (``data.captions.DIGIT_TEMPLATES``) with caption dropout 0.1, then asks for digits by prompt.

An INDEPENDENT judge, an RBF SVM fitted on the real digits (not the diffusion model, not the project's
classifier), says which digit each sample is. N = 100 samples per check, sample i asks for digit i mod 10, so
the requests are balanced: a model that ignores its prompt matches with probability exactly 1/10 whatever the
judge's bias, i.e. the matches are Binomial(100, 0.1) (mean 10, sd 3).
* ACCURACY_MIN = 0.8 at w = 3, for the training templates AND for HELD_OUT_DIGIT_TEMPLATES, phrasings no
  training caption uses: P(Bin(100, 0.1) >= 80) < 1e-50 (computed below), so neither passes by luck.
* w = 0 (the unconditional branch, the empty prompt) must stay at chance: <= CHANCE_MAX = 0.3
  (P(Bin(100, 0.1) > 30) < 1e-7), which shows the accuracy comes from the prompt.
Measured with this recipe (run.seed 0, 150 steps): 0.98 (training templates) and 0.99 (held-out) at w = 3,
0.16 at w = 0.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffusion_forge as df
from diffusion_forge import training as T
from diffusion_forge.cli import main
from diffusion_forge.data import load_dataset
from diffusion_forge.data.captions import DIGIT_TEMPLATES, HELD_OUT_DIGIT_TEMPLATES, digit_caption
from diffusion_forge.denoise.guidance import _doubled_cond
from diffusion_forge.io.checkpoint import load_model_from_run
from diffusion_forge.models import build_model
from diffusion_forge.models.text import load_text_encoder, prompt_cond
from diffusion_forge.sampling.generate import generate

N, K = 100, 10
ACCURACY_MIN, CHANCE_MAX = 0.8, 0.3
L = 16
RECIPE = {"data.source": "digits", "conditioning.kind": "text", "conditioning.max_length": L,
          "conditioning.dropout": 0.1, "model.preset": "tiny", "optim.steps": 150, "optim.batch_size": 64,
          "optim.lr": 3e-3, "optim.warmup_steps": 50, "ema.decay": 0.995, "run.seed": 0, "run.mixed_precision": "no",
          "run.sample_every": 0, "run.checkpoint_every": 10_000, "run.log_every": 50, "sample.n": 10,
          "sample.steps": 10}
SAMPLING = dict(sampler="euler_ancestral", steps=10, sampler_options={"eta": 1.0})


def binomial_tail(n: int, p: float, k: int) -> float:
    return math.fsum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder("all-MiniLM-L6-v2", max_length=L)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A text-conditional run on digits (its folder and the trainer's EMA denoiser)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("digits-text")
        trainer = T.Trainer(T.merge_config(flags=RECIPE), folder, progress=False)
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert trainer.model_config["type"] == "diffusers_cond_unet" and trainer.step == RECIPE["optim.steps"]
    return folder, trainer.ema_denoiser().eval()


@pytest.fixture(scope="module")
def judge():
    from sklearn.svm import SVC

    train = load_dataset("digits", split="train")
    x, c = train.get_batch(torch.arange(len(train)))
    return SVC().fit(x.reshape(len(x), -1).numpy(), c["class_labels"].numpy())


def accuracy(D, judge, templates, scale: float) -> float:
    digits = torch.arange(N) % K
    prompts = [digit_caption(templates[(i // K) % len(templates)], int(digits[i])) for i in range(N)]
    cond, _ = prompt_cond(D, prompts)
    x = generate(df.ClassifierFreeGuidance(D, scale), N, seed=0, cond=cond, **SAMPLING)
    assert x.shape == (N, 1, 8, 8) and torch.isfinite(x).all()
    return float((judge.predict(x.clamp(-1, 1).reshape(N, -1).numpy()) == digits.numpy()).mean())


# -- the encoder and the network, against diffusers' own classes ------------------------------------

def test_encode_is_stable_diffusion_pipelines_encode_prompt(encoder, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    net = build_model({"type": "diffusers_cond_unet", "preset": "tiny", "in_channels": 4, "sample_size": 8})
    unet = UNet2DConditionModel(**net.to_diffusers_config())
    unet.load_state_dict(net.state_dict())                   # our network's weights, as they are
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8,), latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=encoder.model, tokenizer=encoder.tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    prompts = ["a handwritten three", "the digit 8 " * 12]    # the second one is truncated to L tokens
    embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=None)
    assert embeds.shape == (2, L, 384) and torch.equal(embeds, encoder.encode(prompts))
    assert torch.equal(negative, encoder.encode(["", ""]))   # the pipeline's unconditional branch: our null
    assert not encoder.use_attention_mask and not getattr(encoder.model.config, "use_attention_mask", False)
    x, t, h = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 999.0]), encoder.encode(["a", "b", ""])
    assert torch.allclose(net(x, t, encoder_hidden_states=h), unet(x, t, h).sample, atol=1e-6)
    encoder.tokenizer.save_pretrained(tmp_path / "tok")      # what an export writes: it pads to L
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "tok").model_max_length == L


def test_a_text_encoder_folder_loads_like_the_bundled_one(encoder, tmp_path):
    encoder.model.save_pretrained(tmp_path / "te")
    encoder.tokenizer.save_pretrained(tmp_path / "te")
    again = load_text_encoder(str(tmp_path / "te"), max_length=L)
    prompt = ["a drawing of the number two"]
    assert torch.allclose(again.encode(prompt), encoder.encode(prompt))


def test_encode_is_cached_frozen_and_deterministic(encoder):
    a = encoder.encode(["the digit 7", "the digit 7", "a handwritten one"])
    assert a.shape == (3, L, 384) and torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert "the digit 7" in encoder.cache and not any(p.requires_grad for p in encoder.model.parameters())
    assert not encoder.model.training
    assert torch.equal(encoder._encode_uncached(["the digit 7"])[0], a[0])   # the cache holds what encoding gives


def test_a_token_state_null_broadcasts_per_sample():
    """The empty prompt's (L, D) null against (n, L, D) prompts, even where n == L (not mistaken for rows)."""
    h, null = torch.randn(4, 4, 3), torch.randn(4, 3)
    doubled = _doubled_cond({"encoder_hidden_states": h}, {"encoder_hidden_states": null}, 4)["encoder_hidden_states"]
    assert doubled.shape == (8, 4, 3) and torch.equal(doubled[:4], h)
    assert all(torch.equal(doubled[4 + i], null) for i in range(4))
    per_sample = torch.randn(4, 4, 3)                        # negative prompts, one per sample
    doubled = _doubled_cond({"encoder_hidden_states": h}, {"encoder_hidden_states": per_sample}, 4)
    assert torch.equal(doubled["encoder_hidden_states"][4:], per_sample)


def test_the_text_unet_asks_for_its_condition():
    net = build_model({"type": "diffusers_cond_unet", "preset": "tiny", "in_channels": 1, "sample_size": 8})
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        net(torch.randn(2, 1, 8, 8), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(batch, tokens, 384\)"):
        net(torch.randn(2, 1, 8, 8), torch.ones(2), encoder_hidden_states=torch.randn(2, 5, 7))


# -- a trained text-conditional model ------------------------------------------------------------------

def test_the_thresholds_cannot_be_reached_by_chance():
    assert binomial_tail(N, 1 / K, math.ceil(ACCURACY_MIN * N)) < 1e-50
    assert binomial_tail(N, 1 / K, math.floor(CHANCE_MAX * N) + 1) < 1e-7


def test_the_run_reloads_with_its_text_encoder_and_null_prompt(run, encoder):
    folder, D = run
    loaded = load_model_from_run(folder)
    assert loaded.text_encoder is encoder                   # the one instance of (name, max_length, device)
    assert torch.equal(loaded.null_cond["encoder_hidden_states"], encoder.encode([""])[0])
    assert loaded.guidance_scale == 3.0 and loaded.prompts == [digit_caption(DIGIT_TEMPLATES[0], d) for d in range(10)]
    cond, _ = prompt_cond(loaded, ["a handwritten four"] * 3)
    assert torch.allclose(generate(loaded, 3, cond=cond, **SAMPLING), generate(D, 3, cond=cond, **SAMPLING), atol=1e-5)


def test_different_prompts_give_different_samples_from_the_same_seed(run, judge):
    _, D = run
    three, seven = (prompt_cond(D, [p] * 10)[0] for p in ("a handwritten three", "a handwritten seven"))
    x3 = generate(df.ClassifierFreeGuidance(D, 3.0), 10, seed=5, cond=three, **SAMPLING)
    x7 = generate(df.ClassifierFreeGuidance(D, 3.0), 10, seed=5, cond=seven, **SAMPLING)
    assert (x3 - x7).abs().amax(dim=(1, 2, 3)).min() > 0.5   # every pair differs, not only on average
    assert (judge.predict(x3.reshape(10, -1).numpy()) == 3).mean() >= 0.8
    assert (judge.predict(x7.reshape(10, -1).numpy()) == 7).mean() >= 0.8


def test_the_empty_prompt_takes_the_unconditional_path(run):
    _, D = run
    cond, null = prompt_cond(D, [""] * 6)
    assert torch.equal(cond["encoder_hidden_states"][0], null["encoder_hidden_states"])
    plain = generate(D, 6, seed=0, cond=cond, **SAMPLING)
    as_null = generate(D, 6, seed=0, cond={"encoder_hidden_states": null["encoder_hidden_states"].expand(6, L, 384)},
                       **SAMPLING)
    guided = generate(df.ClassifierFreeGuidance(D, 4.0), 6, seed=0, cond=cond, **SAMPLING)   # lerp(u, u, w) = u
    assert torch.equal(plain, as_null) and torch.allclose(guided, plain, atol=1e-5)


@pytest.mark.parametrize("templates", [DIGIT_TEMPLATES, HELD_OUT_DIGIT_TEMPLATES], ids=["training", "held-out"])
def test_the_model_follows_prompts_far_above_chance(run, judge, templates):
    _, D = run
    guided, unconditional = accuracy(D, judge, templates, 3.0), accuracy(D, judge, templates, 0.0)
    assert guided >= ACCURACY_MIN, (guided, unconditional)
    assert unconditional <= CHANCE_MAX, unconditional


def test_dforge_sample_takes_prompts(run, tmp_path, capsys):
    folder, _ = run
    out = tmp_path / "s.npz"
    argv = ["sample", str(folder), "--prompt", "a handwritten three", "--prompt", "the digit 8", "--n", "4",
            "--steps", "4", "--no-progress", "--negative-prompt", "a handwritten one", "--guidance-scale", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    saved = np.load(out)
    assert saved["images"].shape == (4, 8, 8, 1) and "labels" not in saved
    assert saved["prompts"].tolist() == ["a handwritten three", "the digit 8"] * 2
    assert "negative prompt 'a handwritten one'" in capsys.readouterr().out
    assert main([*argv, "--out", str(tmp_path / "grid.png")]) == 0 and (tmp_path / "grid.png").stat().st_size > 0
    assert main(["sample", str(folder), "--negative-prompt", "x", "--guidance-scale", "1", "--out",
                 str(tmp_path / "n.png")]) == 2
    assert "--negative-prompt replaces the empty prompt" in capsys.readouterr().err
    assert main(["sample", str(folder), "--class", "3", "--out", str(tmp_path / "c.png")]) == 2
    assert "is text-conditional" in capsys.readouterr().err and not (tmp_path / "c.png").exists()


def test_an_unknown_text_encoder_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["train", "--data", "digits", "--out", str(tmp_path / "r"), "--set", "conditioning.kind=text", "--set",
            "conditioning.text_encoder=no-such-org/no-such-encoder", "--no-progress", "--set", "optim.steps=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "cannot load text encoder 'no-such-org/no-such-encoder'" in err and "all-MiniLM-L6-v2" in err
    assert not (tmp_path / "r" / "checkpoints").exists()
