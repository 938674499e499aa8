"""The VAE of latent diffusion: a small diffusers ``AutoencoderKL``, and the two maps between pixels and latents.

    vae = load_vae("vaes/mnist")               # a folder of `dforge train-vae`, any AutoencoderKL folder,
                                               # a pipeline folder (its vae/), or a Hugging Face hub name
    z = encode_latents(vae, x)                 # x (B, C, H, W) in [-1, 1] -> z = s * mu(x), (B, c, h, w)
    x = decode_latents(vae, z)                 # -> decoder(z / s) in [-1, 1], cropped back to the data's size

The encoder gives a diagonal Gaussian posterior q(z | x) = N(mu(x), diag sigma(x)^2); latent diffusion trains on
its **mean** mu(x) (deterministic, so the latents are encoded once and cached) times the scaling factor
``s = config.scaling_factor`` = 1 / std of the latents of the training data (what diffusers and Stable Diffusion
keep there), so the diffusion sees data of unit variance. Where a VAE sets ``shift_factor`` m (SD3),
z = s (mu - m) and decoding uses z / s + m.

**Padding.** The encoder halves the size ``log2(downsample)`` times, and the latent U-Net halves it again, so
images are padded (centred, with -1: the black background of digits; white images are padded with +1) to the
next multiple of 16 px: 28-px MNIST -> 32 px -> 8 x 8 latents at 4x. ``decode_latents`` crops back to the
data's size. A VAE trained here records its data in ``dforge_vae.json`` beside ``config.json``
(``data_size``, ``padded_size``, ``pad_value``, ``channels``, the data set, the held-out PSNR), so a run
folder's ``vae/`` copy round-trips alone.

**Presets** (:data:`VAE_PRESETS`): ``tiny`` (tests: seconds on a CPU), ``small`` (the default: MNIST in
minutes on 2 cores) and ``base`` (colour, GPUs), for 32 and 64 px and downsampling 4x or 8x (3 or 4 encoder
levels).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

META_FILE = "dforge_vae.json"
PAD_MULTIPLE = 16
DOWNSAMPLES = (4, 8)

# Channels per encoder level (the first level keeps the size; each further one halves it). Latent channels:
# 4 (Stable Diffusion's number). For 1-channel MNIST at 4x that is 4 x 8 x 8 = 256 numbers for 32 x 32 = 1,024
# pixels: a 4x compression that keeps thin strokes sharp (2 channels blur them), while the cost of the latent
# U-Net is set by the 8 x 8 resolution, hardly by the channel count.
VAE_PRESETS = {
    "tiny": dict(widths=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False),
    "small": dict(widths=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=True),
    "base": dict(widths=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32, mid_block_add_attention=True),
}
PRESET_NOTES = {"tiny": "for tests: trains in seconds", "small": "the default: MNIST in ~3 minutes on 2 cores",
                "base": "colour images and GPUs"}


def padded_size(size: int, downsample: int = 4) -> int:
    """The size images are padded to: the next multiple of 16 px (16 is a multiple of 4 and 8, and leaves
    latents of even size for the U-Net: 28 -> 32)."""
    multiple = max(PAD_MULTIPLE, 2 * downsample)
    return int(math.ceil(size / multiple) * multiple)


def vae_config(image_size: int = 32, channels: int = 1, downsample: int = 4, preset: str = "small",
               latent_channels: int = 4) -> dict:
    """The ``AutoencoderKL(**config)`` keyword arguments of a preset for images of ``image_size`` px (padded to
    :func:`padded_size`) with ``channels`` channels, downsampling ``downsample`` (4 or 8) times per side."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}; choose one of: {', '.join(VAE_PRESETS)}")
    if downsample not in DOWNSAMPLES:
        raise ValueError(f"VAE downsample must be 4 or 8, got {downsample!r}")
    if channels not in (1, 3):
        raise ValueError(f"VAE channels must be 1 or 3, got {channels!r}")
    if not isinstance(latent_channels, int) or latent_channels < 1:
        raise ValueError(f"latent_channels must be a whole number >= 1, got {latent_channels!r}")
    p = VAE_PRESETS[preset]
    levels = int(math.log2(downsample)) + 1
    widths = tuple(p["widths"][:levels])
    return dict(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * levels,
                up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=widths,
                layers_per_block=p["layers_per_block"], latent_channels=latent_channels,
                norm_num_groups=p["norm_num_groups"], sample_size=padded_size(image_size, downsample),
                mid_block_add_attention=p["mid_block_add_attention"], scaling_factor=1.0)


def build_vae(config: dict, seed: int = 0):
    """A freshly initialised ``AutoencoderKL`` (weights from ``seed``)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**config)


def downsample_factor(vae) -> int:
    """2 ** (encoder levels - 1): pixels per latent along each side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------
# Folders

def _is_vae_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError, AttributeError):
        return False


def vae_meta(vae) -> dict:
    """What a VAE trained here records about its data (``dforge_vae.json``); {} for other VAEs."""
    return dict(getattr(vae, "dforge_meta", None) or {})


def load_vae(name_or_path: str | os.PathLike, device: str | torch.device = "cpu"):
    """An ``AutoencoderKL`` in eval mode, frozen, on ``device``, from: a folder of ``dforge train-vae`` or any
    diffusers AutoencoderKL folder (config.json + weights), a pipeline folder (its ``vae/``), or a Hugging Face
    hub name (a VAE repository, or a pipeline's ``vae`` subfolder). It carries ``.dforge_meta`` (the data it
    was trained on, see the module docstring; {} for VAEs from elsewhere) and ``.source`` (what was named).
    Anything else, or a hub name while offline: a ValueError of one line."""
    from diffusers import AutoencoderKL

    path = Path(str(name_or_path)).expanduser()
    meta: dict = {}
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"VAE {str(name_or_path)!r} is a file; give a VAE folder (from `dforge train-vae`), a "
                             "diffusers AutoencoderKL folder, a pipeline folder with vae/, or a hub name")
        folder = path if _is_vae_folder(path) else path / "vae" if _is_vae_folder(path / "vae") else None
        if folder is None:
            raise ValueError(f"{path} is not a VAE folder: no config.json of an AutoencoderKL there or in vae/ "
                             "(train one with `dforge train-vae --data DATA --out VAE`)")
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the VAE in {folder}: {' '.join(str(e).split())[:300]}") from None
        if (folder / META_FILE).is_file():
            meta = json.loads((folder / META_FILE).read_text())
    else:
        vae = _from_hub(str(name_or_path), AutoencoderKL)
    vae = vae.to(device).eval().requires_grad_(False)
    vae.dforge_meta, vae.source = meta, str(name_or_path)
    return vae


def _from_hub(name: str, cls):
    """A hub repository's AutoencoderKL (its root, else its vae/ subfolder); offline or unknown: ValueError."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise ValueError(f"no VAE folder {name!r} here, and it is no Hugging Face hub name (owner/name); train one "
                         "with `dforge train-vae --data DATA --out VAE` or give a folder")
    errors = []
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    for local_only in (True,) if offline else (True, False):     # the local hub cache first, then the network
        for sub in (None, "vae"):
            try:
                return cls.from_pretrained(name, subfolder=sub, use_safetensors=True, local_files_only=local_only)
            except Exception as e:  # huggingface_hub raises OSError, ConnectionError, its own HTTP errors, ...
                errors.append(" ".join(str(e).split()))
    text = " ".join(errors[-2:]).lower()
    unreachable = offline or any(w in text for w in ("offline", "connect", "resolve", "network", "internet"))
    why = ("the Hugging Face hub cannot be reached (offline?) and it is not in the local cache" if unreachable
           else f"there is no folder {name!r} here, and the hub has no AutoencoderKL of that name")
    raise ValueError(f"cannot load the VAE {name!r} from the Hugging Face hub: {why}; give a local VAE folder "
                     "(`dforge train-vae`) or download it while online")


def save_vae(vae, folder: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write ``vae`` in diffusers' layout (config.json with scaling_factor, diffusion_pytorch_model.safetensors)
    plus ``dforge_vae.json`` (``meta``, or the VAE's own) into ``folder``: each file written whole to a
    temporary folder beside it and renamed into place (weights first, config.json last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".vae-tmp-"))
    try:
        vae.save_pretrained(str(tmp), safe_serialization=True)
        meta = vae_meta(vae) if meta is None else meta
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        from ..io.files import fsync_dir, fsync_file

        names = ["diffusion_pytorch_model.safetensors", META_FILE, "config.json"]
        for name in names:
            fsync_file(tmp / name)
        for name in names:
            os.replace(tmp / name, folder / name)
        fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def copy_vae(vae, folder: str | os.PathLike) -> Path:
    """The VAE as a folder of its own (a run's ``vae/``), created atomically: written under a temporary name
    and renamed, so the folder is whole or absent."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_vae(vae, tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Pixels <-> latents

def _factors(vae) -> tuple[float, float]:
    s = float(vae.config.scaling_factor)
    m = getattr(vae.config, "shift_factor", None)
    return s, float(m) if m is not None else 0.0


def pad_images(vae, x: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) padded, centred, to the VAE's padded size (its record, else :func:`padded_size`) with its
    pad value (-1 unless recorded otherwise)."""
    meta = vae_meta(vae)
    h, w = x.shape[-2:]
    target = int(meta.get("padded_size") or padded_size(max(h, w), downsample_factor(vae)))
    if target < max(h, w):
        raise ValueError(f"images of {h}x{w} px are larger than the {target} px this VAE was trained for")
    top, left = (target - h) // 2, (target - w) // 2
    if top == left == 0 and h == w == target:
        return x
    return F.pad(x, (left, target - w - left, top, target - h - top), value=float(meta.get("pad_value", -1.0)))


def crop_images(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """The centred ``size`` x ``size`` crop (the inverse of :func:`pad_images`); None: x as it is."""
    if size is None or size >= x.shape[-1]:
        return x
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def check_fits(vae, channels: int, size: int, where: str = "the data") -> None:
    """One clear ValueError when ``vae`` cannot encode images of ``channels`` x ``size`` x ``size``."""
    name = getattr(vae, "source", "the VAE")
    c = int(vae.config.in_channels)
    if c != channels:
        raise ValueError(f"the VAE {name} encodes {c}-channel images and {where} has {channels} channel(s); use "
                         f"--set data.channels={c}, or train a VAE on this data: dforge train-vae --data ... --out VAE")
    meta = vae_meta(vae)
    trained = meta.get("data_size")
    if trained is not None and int(trained) != int(size):
        raise ValueError(f"the VAE {name} was trained on {trained} px images and {where} has {size} px ones; use "
                         f"--set data.image_size={trained}, or train a VAE at this size: dforge train-vae")


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """z = s (mu(x) - m): the **posterior mean** mu(x) of q(z | x) for images x in [-1, 1] (padded as
    :func:`pad_images`), times the scaling factor s (shift m: 0 unless the VAE sets shift_factor). float32 on
    the CPU, encoded ``batch_size`` images at a time on the VAE's device."""
    s, m = _factors(vae)
    p = next(vae.parameters())
    out = []
    for chunk in x.split(batch_size):
        mean = vae.encode(pad_images(vae, chunk.to(p.device, p.dtype))).latent_dist.mean
        out.append(((mean.float() - m) * s).cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, size: int | None = None, batch_size: int = 256) -> torch.Tensor:
    """x = clamp(decoder(z / s + m), -1, 1), cropped to ``size`` (default: the data size the VAE records);
    float32 on the CPU."""
    s, m = _factors(vae)
    size = size if size is not None else vae_meta(vae).get("data_size")
    p = next(vae.parameters())
    out = []
    for chunk in z.split(batch_size):
        x = vae.decode(chunk.to(p.device, p.dtype) / s + m).sample
        out.append(crop_images(x.float().clamp(-1, 1), size).cpu())
    return torch.cat(out)


def keep_run_vae(run_dir: str | os.PathLike, vae) -> Path:
    """A latent run's copy of its VAE, ``RUN/vae/``, written (atomically) at the start of training; a run that
    already has one must have the same weights (resuming with a retrained VAE would mix two latent spaces)."""
    from ..training.build import weights_digest

    folder = Path(run_dir) / "vae"
    if (folder / "config.json").is_file():
        kept = load_vae(folder)
        if weights_digest(kept) != weights_digest(vae) or float(kept.config.scaling_factor) != float(
                vae.config.scaling_factor):
            raise ValueError(f"the VAE {getattr(vae, 'source', '')} is not the one {run_dir} was trained with "
                             f"(kept in {folder}); resume with --set data.latent={folder}, or train a new run")
        return folder
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return copy_vae(vae, folder)


def run_vae(run_dir: str | os.PathLike, device: str | torch.device = "cpu"):
    """The VAE a latent run folder keeps (``RUN/vae/``); a run folder without one: a ValueError saying so."""
    folder = Path(run_dir) / "vae"
    if not _is_vae_folder(folder):
        raise ValueError(f"{run_dir} is a latent run (data.latent is set) but holds no vae/ folder to decode its "
                         "samples with; copy the whole run folder, vae/ included")
    return load_vae(folder, device)
