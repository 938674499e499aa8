"""model.type ``diffusers_cond_unet``: diffusers' ``UNet2DConditionModel`` (Stable Diffusion's U-Net) under our
call signature, ``model(x_t, t, encoder_hidden_states=h) -> prediction`` shaped like ``x_t``.

The text condition enters through cross-attention (Rombach et al. 2022): in each ``CrossAttn*Block2D`` a
transformer block attends from the image features (queries) to the prompt's token states h (B, L, D) (keys
and values), softmax(Q K^T / sqrt(d)) V with K = h W_k, V = h W_v, so D = ``cross_attention_dim`` must be the
text encoder's width (384 for all-MiniLM-L6-v2). Timesteps t are float (batch,) in [0, T-1], as diffusers'.

The network IS a ``UNet2DConditionModel`` (a subclass that only changes ``forward``'s signature), so its
state dict loads into ``UNet2DConditionModel(**model.to_diffusers_config())`` as it is: that is the U-Net of
an exported ``StableDiffusionPipeline``.

Presets (sample_size must be divisible by 2 ** (levels - 1)):

    tiny   (16, 32),       cross-attention at the lower level + the middle   8x8 latents / digits, for tests
    small  (32, 64, 64),   cross-attention at the two lower levels + middle  28/32-px images or 8x8 latents, CPU
    base   (128, 256, 256, 256), 2 layers per block                          GPUs
"""
from __future__ import annotations

import functools

COND_UNET_PRESETS = {     # attention_head_dim is diffusers' name for the number of heads (as in SD's configs)
    "tiny": dict(block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2, norm_num_groups=8),
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                  norm_num_groups=16),
    "base": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=8, norm_num_groups=32),
}
COND_UNET_NOTES = {"tiny": "for tests: 8x8 digits / latents", "small": "28/32-px images or 8x8 latents on a CPU",
                   "base": "for GPUs"}
DEFAULT_CROSS_ATTENTION_DIM = 384   # all-MiniLM-L6-v2, the default text encoder


@functools.lru_cache(maxsize=1)
def cond_unet_class():
    """The class (built on first use, so that importing models does not import diffusers)."""
    import torch
    from diffusers import UNet2DConditionModel

    class DiffusersCondUNet(UNet2DConditionModel):
        """``UNet2DConditionModel`` called as ``model(x_t, t, encoder_hidden_states=h)``; its weights are the
        diffusers model's own (no wrapper, no renamed keys)."""

        def forward(self, x: torch.Tensor, t, encoder_hidden_states: torch.Tensor | None = None,
                    **cond) -> torch.Tensor:
            if cond:
                raise TypeError(f"the text-conditional U-Net takes encoder_hidden_states only, not {sorted(cond)}")
            if encoder_hidden_states is None:
                raise ValueError("this U-Net is text-conditional: pass cond={'encoder_hidden_states': h} (B, L, D), "
                                 "e.g. from diffusion_forge.models.text.prompt_cond(denoiser, prompts)")
            h = encoder_hidden_states
            if h.ndim == 2:                      # one prompt's (L, D) states for the whole batch
                h = h.expand(x.shape[0], *h.shape)
            if h.ndim != 3 or h.shape[-1] != self.config.cross_attention_dim:
                raise ValueError(f"encoder_hidden_states must be (batch, tokens, {self.config.cross_attention_dim}), "
                                 f"got {tuple(encoder_hidden_states.shape)}")
            return super().forward(x, t, h.to(x.dtype), return_dict=False)[0]

        def to_diffusers_config(self) -> dict:
            """The keyword arguments of the ``UNet2DConditionModel`` whose state dict this one's is."""
            return {k: v for k, v in self.config.items() if not k.startswith("_")}

    return DiffusersCondUNet


def build_cond_unet(preset: str | None, opts: dict):
    """A :class:`DiffusersCondUNet` from a preset and overrides (``in_channels``, ``sample_size``,
    ``cross_attention_dim``, or any ``UNet2DConditionModel`` keyword); ``out_channels`` defaults to
    ``in_channels``. Without a preset, ``opts`` are the diffusers keywords themselves (a saved build_config)."""
    opts = dict(opts)
    if preset is not None:
        base = dict(COND_UNET_PRESETS[preset])
        base.update(in_channels=opts.get("in_channels", 4), cross_attention_dim=DEFAULT_CROSS_ATTENTION_DIM)
        opts = {**base, **opts}
        opts.setdefault("out_channels", opts["in_channels"])
        size, levels = opts.get("sample_size"), len(opts["block_out_channels"])
        if size is not None and size % 2 ** (levels - 1):
            raise ValueError(f"model.type=diffusers_cond_unet preset {preset!r} halves the image {levels - 1} "
                             f"time(s), so the image side must be divisible by {2 ** (levels - 1)}, got {size}; "
                             "resize (data.image_size) or choose another preset")
    model = cond_unet_class()(**opts)
    model.build_config = {"type": "diffusers_cond_unet",
                          **{k: list(v) if isinstance(v, tuple) else v for k, v in model.to_diffusers_config().items()}}
    return model
