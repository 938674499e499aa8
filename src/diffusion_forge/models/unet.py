"""Our U-Net denoiser: the DDPM architecture, written to be read in one sitting.

    x_t ─ conv_in ─ [down level 0] ─ [down level 1] ─ ... ─ mid (res, attn, res) ─ ... ─ [up level 0] ─ conv_out ─ ε̂
                          └──────────── skip connections (concatenated) ─────────────────────┘
    t ─ sinusoidal embedding ─ MLP ─ added inside every residual block (plus a class embedding when conditioned)

Every level holds `layers_per_block` residual blocks (optionally each followed by self-attention) and then
halves (down path) or doubles (up path) the resolution, except the last level. Modules are named so that
``state_dict()`` keys and shapes are exactly those of diffusers' ``UNet2DModel`` for ``to_diffusers_config()``
(DownBlock2D / AttnDownBlock2D, UNetMidBlock2D, UpBlock2D / AttnUpBlock2D), so exporting a trained model to a
diffusers folder is a plain ``load_state_dict``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, (batch,) -> (batch, dim), as [cos | sin].

    Frequencies run from 1 down to 1/max_period geometrically (DDPM's "positional" embedding; equal to
    diffusers' ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)``).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column at the end


def broadcast_timesteps(t, batch: int, device) -> torch.Tensor:
    """A number, a 0-d tensor or a (batch,) tensor -> a (batch,) tensor on ``device``."""
    t = torch.as_tensor(t, device=device)
    return t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)


class TimestepMLP(nn.Module):
    """Sinusoidal features -> linear -> SiLU -> linear (diffusers' ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-dropout-conv, plus the skip."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, groups: int, dropout: float, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


# Up to this many tokens attention is computed as softmax(q k^T / sqrt(d)) v with two matmuls: on a CPU, torch's
# fused kernel is slower there, most under bf16 autocast, whose flash backward took 21 ms against 5.2 ms
# (forward + backward, batch 64, 2 heads of 32, 49 tokens: the default recipe's 7x7 level; fp32 7.7 against
# 6.6 ms). From 196 tokens on the fused kernel wins in fp32 and the matrices grow as tokens^2.
EXPLICIT_ATTENTION_TOKENS = 64


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dimensions, (..., tokens, d)."""
    if q.shape[-2] > EXPLICIT_ATTENTION_TOKENS:
        return F.scaled_dot_product_attention(q, k, v)
    weights = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return weights.softmax(-1) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, head_dim: int, groups: int, eps: float):
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention_head_dim={head_dim} must divide the channel count {channels}")
        self.heads = channels // head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)  # (b, hw, c)

        def split_heads(z):  # (b, hw, c) -> (b, heads, hw, c / heads)
            return z.reshape(b, h * w, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = (split_heads(proj(tokens)) for proj in (self.to_q, self.to_k, self.to_v))
        out = attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the U: residual blocks, each optionally followed by attention, then a resampler."""

    def __init__(self, c_ins: list[int], c_out: int, temb_dim: int, attention: bool, resample: str | None,
                 cfg: dict):
        super().__init__()
        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        self.resnets = nn.ModuleList(ResBlock(c, c_out, temb_dim, groups, cfg["dropout"], eps) for c in c_ins)
        self.attentions = nn.ModuleList(
            SelfAttention(c_out, cfg["attention_head_dim"], groups, eps) for _ in c_ins) if attention else None
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(c_out)])

    def block(self, i: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.resnets[i](h, temb)
        return h if self.attentions is None else self.attentions[i](h)


class MidBlock(nn.Module):
    """At the lowest resolution: residual block, attention, residual block."""

    def __init__(self, channels: int, temb_dim: int, attention: bool, cfg: dict):
        super().__init__()
        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        self.resnets = nn.ModuleList(ResBlock(channels, channels, temb_dim, groups, cfg["dropout"], eps)
                                     for _ in range(2))
        self.attentions = nn.ModuleList(
            [SelfAttention(channels, cfg["attention_head_dim"], groups, eps)]) if attention else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h, temb)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h, temb)


def size_error(size: int, multiple: int, n_levels: int) -> str:
    """Why an image size does not fit a U-Net whose levels halve it n_levels - 1 times, and the sizes that do."""
    up = -(-size // multiple) * multiple                    # the next multiple of 2 ** (levels - 1)
    down = size // multiple * multiple
    fits = " or ".join(str(s) for s in dict.fromkeys([down, up]) if s >= multiple)
    if size < multiple:  # a few pixels: most likely not the size meant
        fits = f"{up} or more (e.g. {max(32, up)})"
    return (f"image_size {size} (the U-Net's sample_size) must be divisible by {multiple} for its {n_levels} levels; "
            f"use data.image_size={fits} (--set data.image_size=N resizes the data), or a preset with fewer levels")


UNET_DEFAULTS = dict(
    sample_size=None,            # int; None = any size divisible by 2 ** (levels - 1)
    in_channels=1,
    out_channels=None,           # None = in_channels
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    attention_levels=(2,),       # level indices (0 = full resolution) that get self-attention
    mid_attention=True,
    attention_head_dim=32,
    norm_num_groups=8,
    norm_eps=1e-5,
    dropout=0.0,
    num_class_embeds=None,       # int = class-conditional: class_labels in [0, num_class_embeds)
)


class UNet(nn.Module):
    """The DDPM U-Net; ``model(x_t, t, class_labels=None) -> prediction`` with the shape of ``x_t``.

    ``t`` holds training timesteps in [0, T-1] (floats allowed), shape (batch,) or a single value.
    """

    def __init__(self, **config):
        super().__init__()
        unknown = set(config) - set(UNET_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown U-Net option(s) {sorted(unknown)}; known: {sorted(UNET_DEFAULTS)}")
        cfg = {**UNET_DEFAULTS, **config}
        cfg["block_out_channels"] = tuple(int(c) for c in cfg["block_out_channels"])
        cfg["attention_levels"] = tuple(sorted(int(i) for i in cfg["attention_levels"]))
        cfg["out_channels"] = cfg["out_channels"] or cfg["in_channels"]
        self.config = cfg
        chans, n_levels, layers = cfg["block_out_channels"], len(cfg["block_out_channels"]), cfg["layers_per_block"]
        if any(c % cfg["norm_num_groups"] for c in chans):
            raise ValueError(f"norm_num_groups={cfg['norm_num_groups']} must divide every channel count {chans}")
        if any(not 0 <= i < n_levels for i in cfg["attention_levels"]):
            raise ValueError(f"attention_levels {cfg['attention_levels']} must lie in [0, {n_levels - 1}]")
        self.size_multiple = 2 ** (n_levels - 1)
        if cfg["sample_size"] is not None and cfg["sample_size"] % self.size_multiple:
            raise ValueError(size_error(cfg["sample_size"], self.size_multiple, n_levels))

        temb_dim = 4 * chans[0]
        self.conv_in = nn.Conv2d(cfg["in_channels"], chans[0], 3, padding=1)
        self.time_embedding = TimestepMLP(chans[0], temb_dim)
        n_cls = cfg["num_class_embeds"]
        self.class_embedding = nn.Embedding(n_cls, temb_dim) if n_cls else None

        # Down path: each level's blocks, then a downsample (not at the last level). Skip channels are recorded
        # in the order the up path pops them.
        skips, c = [chans[0]], chans[0]
        self.down_blocks = nn.ModuleList()
        for i, c_out in enumerate(chans):
            last = i == n_levels - 1
            self.down_blocks.append(Level([c] + [c_out] * (layers - 1), c_out, temb_dim,
                                          i in cfg["attention_levels"], None if last else "down", cfg))
            c = c_out
            skips += [c_out] * (layers + (0 if last else 1))

        self.mid_block = MidBlock(c, temb_dim, cfg["mid_attention"], cfg)

        # Up path, from the lowest resolution: layers + 1 blocks per level, each eating one skip.
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n_levels)):
            c_ins = []
            for _ in range(layers + 1):
                c_ins.append(c + skips.pop())
                c = chans[i]
            self.up_blocks.append(Level(c_ins, chans[i], temb_dim, i in cfg["attention_levels"],
                                        "up" if i > 0 else None, cfg))

        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], chans[0], eps=cfg["norm_eps"])
        self.conv_out = nn.Conv2d(chans[0], cfg["out_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if cond:
            raise TypeError(f"this U-Net takes no conditioning {sorted(cond)} (only class_labels)")
        if x.shape[-1] % self.size_multiple or x.shape[-2] % self.size_multiple:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be divisible by {self.size_multiple}")
        t = broadcast_timesteps(t, x.shape[0], x.device)
        temb = self.time_embedding(timestep_embedding(t, self.config["block_out_channels"][0]).to(x.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this U-Net is class-conditional: pass class_labels")
            temb = temb + self.class_embedding(class_labels).to(temb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given but the model was built without num_class_embeds")

        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for i in range(len(level.resnets)):
                h = level.block(i, h, temb)
                skips.append(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
                skips.append(h)
        h = self.mid_block(h, temb)
        for level in self.up_blocks:
            for i in range(len(level.resnets)):
                h = level.block(i, torch.cat([h, skips.pop()], dim=1), temb)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def to_diffusers_config(self) -> dict:
        """Keyword arguments for diffusers' ``UNet2DModel`` with exactly our ``state_dict`` keys and maths."""
        cfg, n = self.config, len(self.config["block_out_channels"])
        attn = [i in cfg["attention_levels"] for i in range(n)]
        return dict(
            sample_size=cfg["sample_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
            block_out_channels=list(cfg["block_out_channels"]), layers_per_block=cfg["layers_per_block"],
            down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            mid_block_type="UNetMidBlock2D", add_attention=cfg["mid_attention"],
            attention_head_dim=cfg["attention_head_dim"], norm_num_groups=cfg["norm_num_groups"],
            norm_eps=cfg["norm_eps"], dropout=cfg["dropout"], num_class_embeds=cfg["num_class_embeds"],
            time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
            downsample_type="conv", upsample_type="conv", downsample_padding=1, mid_block_scale_factor=1,
            resnet_time_scale_shift="default", center_input_sample=False,
        )
