"""An MLP denoiser for vectors: 2-D toy distributions, embeddings, flattened small images.

    x_t ─ linear ─ [residual block + time embedding] x depth ─ LayerNorm ─ linear ─ prediction
    t ─ sinusoidal embedding ─ MLP ─┘ (added in every block)

Any input shape (batch, ...) works: it is flattened to (batch, dim) and the output is reshaped back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .unet import TimestepMLP, broadcast_timesteps, timestep_embedding


class ResidualMLPBlock(nn.Module):
    """LayerNorm -> linear -> SiLU (+ time embedding) -> dropout -> linear, added to the input."""

    def __init__(self, width: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear_1 = nn.Linear(width, width)
        self.time_emb_proj = nn.Linear(temb_dim, width)
        self.dropout = nn.Dropout(dropout)
        self.linear_2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        z = F.silu(self.linear_1(self.norm(h)) + self.time_emb_proj(F.silu(temb)))
        return h + self.linear_2(self.dropout(z))


MLP_DEFAULTS = dict(
    dim=2,                 # size of one flattened sample (2 for toy 2-D data)
    hidden=256,            # width of the residual stream
    depth=4,               # number of residual blocks
    time_embed_dim=128,    # number of sinusoidal features (then an MLP to the hidden width)
    dropout=0.0,
    num_class_embeds=None,  # int = class-conditional: class_labels in [0, num_class_embeds)
)


class MLPDenoiser(nn.Module):
    """``model(x_t, t, class_labels=None) -> prediction`` for vector data; t in training units [0, T-1]."""

    def __init__(self, **config):
        super().__init__()
        unknown = set(config) - set(MLP_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown MLP option(s) {sorted(unknown)}; known: {sorted(MLP_DEFAULTS)}")
        cfg = self.config = {**MLP_DEFAULTS, **config}
        width = cfg["hidden"]
        self.time_embedding = TimestepMLP(cfg["time_embed_dim"], width)
        n_cls = cfg["num_class_embeds"]
        self.class_embedding = nn.Embedding(n_cls, width) if n_cls else None
        self.proj_in = nn.Linear(cfg["dim"], width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(width, width, cfg["dropout"]) for _ in range(cfg["depth"]))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, cfg["dim"])
        nn.init.zeros_(self.proj_out.weight)  # start as the zero predictor: a calm first few hundred steps
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        if cond:
            raise TypeError(f"this MLP takes no conditioning {sorted(cond)} (only class_labels)")
        shape = x.shape
        h = x.reshape(shape[0], -1)
        if h.shape[1] != self.config["dim"]:
            raise ValueError(f"the MLP was built for {self.config['dim']} numbers per sample, "
                             f"got shape {tuple(shape)} ({h.shape[1]} per sample)")
        t = broadcast_timesteps(t, shape[0], x.device)
        temb = self.time_embedding(timestep_embedding(t, self.config["time_embed_dim"]).to(x.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this MLP is class-conditional: pass class_labels")
            temb = temb + self.class_embedding(class_labels).to(temb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given but the model was built without num_class_embeds")
        h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(self.norm_out(h)).reshape(shape)

