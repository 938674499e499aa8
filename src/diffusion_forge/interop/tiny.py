"""Tiny diffusers pipelines with random weights, built offline: for tests, benchmarks and the docs' examples.

``save_tiny_ddpm(folder)`` writes a DDPMPipeline (a UNet2DModel whose config is exactly one of our U-Nets'),
``save_tiny_sd(folder)`` a StableDiffusionPipeline (UNet2DConditionModel + AutoencoderKL + CLIPTextModel and
a CLIP tokenizer made from a byte-level vocabulary written here, no merges: every character is a token).
Both are saved with ``save_pretrained`` (safetensors) and load with the pipelines' own ``from_pretrained``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

__all__ = ["save_tiny_ddpm", "save_tiny_sd", "tiny_clip_tokenizer", "SD_BETAS"]

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of the 256 bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer(max_length: int = 16):
    """A CLIPTokenizer over single characters (512 tokens + start / end), ``model_max_length`` = max_length."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length)


def save_tiny_ddpm(folder, seed: int = 0, channels: int = 3, size: int = 8, scheduler: dict | None = None,
                   pipeline: str = "DDPMPipeline") -> Path:
    """A DDPMPipeline (or DDIMPipeline) folder: our tiny U-Net as a UNet2DModel, a DDPMScheduler (or
    DDIMScheduler) of the given config (default: diffusers' linear 1e-4 .. 0.02, 1000 steps, epsilon)."""
    import diffusers

    from ..models import build_model

    torch.manual_seed(seed)
    ours = build_model({"type": "unet", "preset": "tiny", "in_channels": channels, "sample_size": size})
    unet = diffusers.UNet2DModel(**ours.to_diffusers_config())
    unet.load_state_dict(ours.state_dict())
    kind = "DDIMScheduler" if pipeline == "DDIMPipeline" else "DDPMScheduler"
    sched = getattr(diffusers, kind)(**{"clip_sample": False, **(scheduler or {})})
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=sched)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def tiny_sd_components(seed: int = 0, max_length: int = 16) -> dict:
    """The components of a tiny StableDiffusionPipeline: 8x8x4 latents of 16x16 RGB images."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=16,
                                        bos_token_id=512, eos_token_id=513, pad_token_id=513))
    sched = diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tiny_clip_tokenizer(max_length), scheduler=sched,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_sd(folder, seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline folder (see :func:`tiny_sd_components`)."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline(**tiny_sd_components(seed))
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)
