"""A data set in the latent space of a VAE: every image encoded once, cached on disk, served like pixels.

    ds = load_dataset("mnist")
    lat = LatentDataset(ds, load_vae("vaes/mnist"), spec={"source": "mnist"})
    z, cond = lat.get_batch(idx)        # z (B, 4, 8, 8) = s * mu(x): the posterior means times scaling_factor
    lat.shape, lat.kind                 # (4, 8, 8), "image"; labels, classes, captions: the images' own

The latents are ``models.vae.encode_latents`` of every item (the posterior mean, so encoding is deterministic
and done once). They are cached as ``<cache_dir()>/latents/<key>.safetensors``, the key hashing the VAE's
weights (``training.build.weights_digest``, which covers its scaling factor only through config, so that is
added too), the data spec (source, size, channels, split), the number of items, and the pixels of up to 64
evenly spaced items; the file is written atomically (``io.files.atomic_write``). cond passes through: a batch's
cond is the image data set's own for the same indices (class labels, caption ids).
"""
from __future__ import annotations

import numpy as np
import torch

VERSION = 1


def _pixel_probe(ds, k: int = 64) -> str:
    """A hash of up to k evenly spaced items' pixels (so a changed image folder gets a new key)."""
    import hashlib

    idx = torch.as_tensor(np.unique(np.linspace(0, len(ds) - 1, min(k, len(ds))).round().astype(np.int64)))
    x, _ = ds.get_batch(idx)
    return hashlib.sha256(x.float().numpy().tobytes()).hexdigest()[:16]


def latent_key(vae, ds, spec: dict) -> str:
    from ..io.files import content_key
    from ..training.build import weights_digest

    return content_key({"version": VERSION, "vae": weights_digest(vae), "scaling": float(vae.config.scaling_factor),
                        "shift": getattr(vae.config, "shift_factor", None), "spec": spec, "n": len(ds),
                        "shape": list(ds.shape), "cache": str(getattr(ds, "cache_path", "") or ""),
                        "pixels": _pixel_probe(ds)})


def encode_dataset(vae, ds, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """Latents (N, c, h, w) float32 of every item of ``ds`` (``encode_latents``, in index order)."""
    from tqdm.auto import tqdm

    from ..models.vae import encode_latents

    out = []
    with tqdm(total=len(ds), unit="image", desc="encoding latents", disable=not progress, leave=False) as bar:
        for lo in range(0, len(ds), batch_size):
            x, _ = ds.get_batch(torch.arange(lo, min(len(ds), lo + batch_size)))
            out.append(encode_latents(vae, x, batch_size))
            bar.update(len(x))
    return torch.cat(out)


def cached_latents(vae, ds, spec: dict, progress: bool = True) -> tuple[torch.Tensor, str]:
    """(latents of ``ds``, cache key): read from the cache, else encoded and written there (a full or
    read-only disk only costs the encoding next time)."""
    import warnings

    from safetensors.torch import load_file, save_file

    from ..io.files import atomic_write, cache_dir

    key = latent_key(vae, ds, spec)
    try:
        path = cache_dir() / "latents" / f"{key}.safetensors"
    except OSError:
        path = None
    if path is not None and path.is_file():
        try:
            z = load_file(str(path))["latents"]
            if len(z) == len(ds):
                return z, key
        except Exception:  # damaged from outside: encode again
            pass
    z = encode_dataset(vae, ds, progress=progress).contiguous()
    if path is not None:
        try:
            atomic_write(path, lambda tmp: save_file({"latents": z}, tmp, metadata={"key": key}))
        except OSError as e:
            warnings.warn(f"could not cache the latents ({e}); they are encoded again next time", UserWarning,
                          stacklevel=2)
    return z, key


class LatentDataset(torch.utils.data.Dataset):
    """The latents of an image data set, with the data protocol: ``ds[i]``, ``get_batch(idx) -> (z, cond)``,
    ``shape`` (the latent shape), ``kind`` ("image": latents are (c, h, w) arrays the U-Net takes). Labels,
    class names, captions and cond come from the image data set (``.images``); ``.vae`` is the VAE."""

    def __init__(self, images, vae, spec: dict | None = None, progress: bool = True):
        from ..models.vae import check_fits

        shape = tuple(images.shape)
        if len(shape) != 3:
            raise ValueError(f"data.latent needs images, and the data set holds items of shape {shape}; drop "
                             "data.latent for vectors and signals")
        check_fits(vae, shape[0], shape[-1], where=f"the data set {getattr(images, 'name', '') or ''}".strip())
        self.images, self.vae = images, vae
        self.latents, self.key = cached_latents(vae, images, dict(spec or {}), progress=progress)

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    @property
    def kind(self) -> str:
        return "image"

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of the images the latents decode to."""
        return tuple(self.images.shape)

    def __getattr__(self, name: str):
        # labels, classes, captions, num_classes, has_labels, has_captions, name, ...: the images' own
        if name.startswith("__") or name in ("images", "latents", "vae", "key"):
            raise AttributeError(name)
        return getattr(self.images, name)

    def get_batch(self, idx) -> tuple[torch.Tensor, dict]:
        idx = torch.as_tensor(idx, dtype=torch.long)
        _, cond = self.images.get_batch(idx)
        return self.latents[idx], cond

    def __getitem__(self, i: int):
        z, cond = self.get_batch(torch.tensor([int(i)]))
        return z[0], {k: v[0] if isinstance(v, torch.Tensor) and v.ndim else v for k, v in cond.items()}

    def __repr__(self) -> str:
        return f"LatentDataset({self.images!r} -> latents of shape {self.shape}, key {self.key})"


def latent_training_set(images, cfg, progress: bool = True):
    """(LatentDataset, VAE) for a run with ``data.latent`` set: the VAE loaded on the run's device and the
    training images encoded (cached). ``data.flip`` is refused: a flipped latent is not the latent of the
    flipped image, and flipping before encoding would double the cache for a small gain."""
    from ..device import resolve_device
    from ..models.vae import load_vae
    from ..training.config import ConfigError

    d = cfg.data
    if d.flip:
        raise ConfigError("data.flip does not apply with data.latent: a flipped latent is not the latent of the "
                          "flipped image; drop data.flip (or train in pixel space)")
    vae = load_vae(d.latent, resolve_device(cfg.run.device))
    spec = {"source": str(d.source), "image_size": d.image_size, "channels": d.channels, "split": "train"}
    return LatentDataset(images, vae, spec, progress=progress), vae
