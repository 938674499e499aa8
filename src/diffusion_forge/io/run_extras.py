"""What a loaded run's Denoiser carries besides its network (used by ``io.checkpoint.denoiser_from_checkpoint``).

* the network's ``diffusion_config`` (schedule, prediction, null condition) from a checkpoint's ``extra``
  (recorded whole by format version 2, in pieces by version 1) and the number of classes K: a
  class-conditional run's null condition is the class id K;
* a text run's (conditioning.kind=text) text encoder, loaded by the name its config records, and its null
  condition: the empty prompt's token states, recomputed (``models.text.restore_null_cond``), never stored;
* the attributes sampling reads: ``.config``, ``.step``, ``.num_classes``, ``.guidance_scale`` (the scale
  recorded at training, else what the config resolves to now; None without a null condition),
  ``.checkpoint_path``, ``.class_frequencies`` (a class-conditional run's p(c) over its training labels; None for
  other runs and for runs trained before it was recorded), ``.text_encoder``, ``.prompts`` (a text run's grid
  prompts) and ``.vae`` (a latent run's AutoencoderKL from ``RUN/vae/``, else None), attached with
  ``object.__setattr__`` so that it is no registered submodule and the Denoiser's state_dict stays the network's.
"""
from __future__ import annotations

from .state import CheckpointError


def run_diffusion_config(ckpt, config: dict) -> tuple[dict, int, object]:
    """(diffusion_config, num_classes, text_encoder or None) of a checkpoint whose nested config is ``config``."""
    extra = ckpt.state.get("extra", {})
    diffusion = dict(extra.get("diffusion_config") or {})
    diffusion.setdefault("schedule", extra.get("schedule"))
    diffusion.setdefault("prediction", config["diffusion"]["prediction"])
    if diffusion["schedule"] is None or diffusion["prediction"] is None:
        raise CheckpointError(f"{ckpt.path} records no noise schedule or prediction type")
    num_classes = int(extra.get("num_classes") or config["conditioning"].get("num_classes") or 0)
    diffusion.setdefault("null_cond", {"class_labels": num_classes} if num_classes else None)
    text_encoder = None
    if config["conditioning"]["kind"] == "text":  # the run names its text encoder; the empty prompt is recomputed
        from ..models.text import load_text_encoder, restore_null_cond

        c = config["conditioning"]
        try:
            text_encoder = load_text_encoder(c["text_encoder"], c["max_length"])
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
        diffusion["null_cond"] = restore_null_cond(diffusion.get("null_cond"), text_encoder, str(ckpt.path))
    return diffusion, num_classes, text_encoder


def attach_run_extras(denoiser, ckpt, config: dict, num_classes: int, text_encoder, device) -> None:
    """Set the attributes of the module docstring on a run's Denoiser (its network already loaded)."""
    from ..training.config import recommended_guidance_scale

    extra = ckpt.state.get("extra", {})
    denoiser.config, denoiser.step, denoiser.num_classes = config, ckpt.step, num_classes
    # the scale recorded at training (the recipe's recommendation then), else what the config resolves to now
    scale = extra["guidance_scale"] if "guidance_scale" in extra else recommended_guidance_scale(config)
    denoiser.guidance_scale = scale if denoiser.model.diffusion_config.get("null_cond") else None
    denoiser.checkpoint_path = ckpt.path
    denoiser.class_frequencies = extra.get("class_frequencies")   # p(c) of a class-conditional run's data, or None
    denoiser.text_encoder = text_encoder                 # prompts -> cond: models.text.prompt_cond(denoiser, ...)
    denoiser.prompts = extra.get("prompts")              # a text run's grid prompts (None otherwise)
    vae = None
    if config["data"].get("latent"):  # a latent run decodes with the VAE it keeps in RUN/vae/ (not a submodule)
        from ..models.vae import run_vae

        vae = run_vae(ckpt.path.parent.parent, device)
    object.__setattr__(denoiser, "vae", vae)
