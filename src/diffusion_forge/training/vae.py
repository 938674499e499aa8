"""Training the VAE of latent diffusion: ``dforge train-vae --data DATA --out VAE``.

For an image x in [-1, 1] (padded to the VAE's size, see ``models.vae``) with D = C H W pixel values, the
encoder gives q(z | x) = N(mu, diag sigma^2); z is drawn from it (reparameterised), decoded to x_hat, and

    loss = (1/D) sum |x - x_hat|                  (``loss=l1``; ``mse``: (1/D) sum (x - x_hat)^2)
         + kl_weight (1/D) KL(q(z | x) || N(0, I)),   KL = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)
         + perceptual_weight (1/F) sum (phi(x) - phi(x_hat))^2      (optional; phi: a feature network we ship)

i.e. the per-sample sums of the latent-diffusion VAE (Rombach et al. 2022, their KL weight 1e-6) divided by D.
The small KL weight (default 1e-5) keeps the latents near N(0, I) without blurring the reconstructions; the
scale that remains is removed by the **scaling factor** s = 1 / std(mu(x)) over the training images, stored
as ``scaling_factor`` in config.json (where diffusers keeps it), so s mu(x) has unit variance.
``phi``: the digit classifier's convolutional features for 1-channel data, EfficientNet-Lite0's feature map for
colour (off by default: it costs more than the VAE itself on a CPU).

Optimiser: AdamW, linear warm-up then cosine decay to ``min_lr``, gradient clipping. Step k draws its batch
and its posterior noise from a generator seeded by (seed, k), so a run resumed from a checkpoint (written
atomically with the optimiser state every ``checkpoint_every`` steps, at the end and on Ctrl-C) continues
exactly as an uninterrupted one. At the end: the scaling factor, the reconstruction PSNR on held-out images
(the test split of mnist / digits; else every 20th image, never trained on), PSNR = mean over images of
10 log10(2^2 / MSE) in [-1, 1] (the same number as with 255 / MSE over [0, 255]), and ``reconstructions.png``.
"""
from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings above the trainer import no torch (`dforge --help` stays fast)
    import torch

DEFAULTS = {"data": "mnist", "image_size": None, "channels": None, "preset": "small", "downsample": 4,
            "latent_channels": 4, "steps": 800, "batch_size": 32, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 50,
            "weight_decay": 0.0, "grad_clip": 1.0, "loss": "l1", "kl_weight": 1e-5, "perceptual_weight": 0.0,
            "seed": 0, "checkpoint_every": 200, "log_every": 10, "eval_n": 1000, "scale_n": 5000}
HELP = {"data": "bundled name, image folder or hf:NAME", "image_size": "resize images (none: the data's own)",
        "channels": "1 or 3 (none: the data's own)", "preset": "tiny | small | base (models/vae.py)",
        "downsample": "4 or 8: pixels per latent along each side", "latent_channels": "channels of the latent",
        "steps": "optimiser steps", "batch_size": "images per step", "lr": "peak AdamW learning rate",
        "min_lr": "end of the cosine decay", "warmup_steps": "linear warm-up steps", "weight_decay": "AdamW",
        "grad_clip": "clip the gradient norm (0: off)", "loss": "l1 | mse (reconstruction)",
        "kl_weight": "weight of KL / D", "perceptual_weight": "weight of the feature loss (0: off)",
        "seed": "initial weights, batches, noise", "checkpoint_every": "steps between checkpoints",
        "log_every": "steps between metrics.jsonl lines", "eval_n": "held-out images for the PSNR",
        "scale_n": "training images for the scaling factor"}
FIXED = ("data", "image_size", "channels", "preset", "downsample", "latent_channels", "seed")  # fixed at the start


def vae_settings(overrides: dict | None = None, base: dict | None = None) -> dict:
    """DEFAULTS < base (a resumed run's) < overrides, each value checked (ValueError naming the key)."""
    cfg = dict(DEFAULTS, **(base or {}))
    for key, value in (overrides or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown train-vae setting {key!r}; known: {', '.join(DEFAULTS)}")
        cfg[key] = value
    ints = ("downsample", "latent_channels", "steps", "batch_size", "warmup_steps", "seed", "checkpoint_every",
            "log_every", "eval_n", "scale_n")
    for key in ints:
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or (cfg[key] < 1 and key not in
                                                                           ("warmup_steps", "seed")):
            raise ValueError(f"train-vae {key} must be a whole number >= 1, got {cfg[key]!r}")
    for key in ("lr", "min_lr", "weight_decay", "grad_clip", "kl_weight", "perceptual_weight"):
        if not isinstance(cfg[key], (int, float)) or cfg[key] < 0 or (key == "lr" and cfg[key] == 0):
            raise ValueError(f"train-vae {key} must be a number >= 0 (lr > 0), got {cfg[key]!r}")
    if cfg["loss"] not in ("l1", "mse"):
        raise ValueError(f"train-vae loss must be l1 or mse, got {cfg['loss']!r}")
    return cfg


def learning_rate(step: int, cfg: dict) -> float:
    """Linear warm-up from lr / warmup to lr, then cosine from lr to min_lr at the last step."""
    w, n = cfg["warmup_steps"], cfg["steps"]
    if step < w:
        return cfg["lr"] * (step + 1) / w
    frac = (step - w) / max(1, n - w)
    return cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * min(1.0, frac)))


def split_data(cfg: dict):
    """(training images, held-out images): the test split of mnist / digits; else every 20th image held out."""
    import torch

    from ..data import load_dataset

    kw = dict(image_size=cfg["image_size"], channels=cfg["channels"])
    train = load_dataset(cfg["data"], split="train", **kw)
    if len(train.shape) != 3:
        raise ValueError(f"train-vae needs images, and {cfg['data']!r} holds items of shape {train.shape}")
    if str(cfg["data"]).lower() in ("mnist", "digits"):
        return train, torch.arange(len(train)), load_dataset(cfg["data"], split="test", **kw), None
    idx = torch.arange(len(train))
    if len(train) < 20:
        raise ValueError(f"{cfg['data']!r} has {len(train)} images; train-vae needs at least 20 (every 20th is "
                         "held out to measure the reconstructions)")
    return train, idx[idx % 20 != 19], train, idx[idx % 20 == 19]


def psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per image: 10 log10(2^2 / mean (x - x_hat)^2), images in [-1, 1] (peak-to-peak 2)."""
    import torch

    mse = (x.float() - x_hat.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def perceptual_network(channels: int):
    """phi(x in [-1, 1]) -> a list of feature maps, differentiable, frozen: the digit classifier's three conv
    blocks (1 channel, at 28 px) or EfficientNet-Lite0's feature map (3 channels, at 128 px)."""
    import torch.nn.functional as F

    if channels == 1:
        from ..evaluate.digits import digit_classifier

        body = digit_classifier().body

        def phi(x):
            x, feats = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False), []
            for i, layer in enumerate(body):
                x = layer(x)
                if i in (0, 2, 4):
                    feats.append(x)
            return feats
        return phi
    from ..evaluate.features import EffNetFeatures

    net = EffNetFeatures()
    return lambda x: [net.net.feature_map(net._prepare(x))]


class VAETrainer:
    """Train (or resume) a VAE folder; see the module docstring. ``fit()`` returns a summary dict."""

    def __init__(self, cfg: dict, out, device="cpu", progress: bool = True, max_seconds: float | None = None):
        import torch

        from ..models.vae import build_vae, padded_size, vae_config

        self.cfg, self.out, self.progress, self.max_seconds = cfg, Path(out), progress, max_seconds
        self.device = torch.device(device)
        self.train, self.train_idx, self.held, self.held_idx = split_data(cfg)
        c, size = self.train.shape[0], self.train.shape[-1]
        self.vae = build_vae(vae_config(size, c, cfg["downsample"], cfg["preset"], cfg["latent_channels"]),
                             cfg["seed"]).to(self.device)
        border = self._border_mean()
        self.meta = {"format": "diffusion_forge.vae", "version": 1, "data": str(cfg["data"]), "data_size": size,
                     "channels": c, "padded_size": padded_size(size, cfg["downsample"]),
                     "pad_value": -1.0 if border < 0 else 1.0, "downsample": cfg["downsample"],
                     "preset": cfg["preset"]}
        self.vae.dforge_meta = self.meta
        self.opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.phi = perceptual_network(c) if cfg["perceptual_weight"] > 0 else None
        self.step, self._stop = 0, False

    def _border_mean(self) -> float:
        import torch

        x, _ = self.train.get_batch(self.train_idx[:1000])
        return float(torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], -1).mean())

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Generator]:
        """Step's images (unpadded) and the generator that drew them (it draws the posterior noise next)."""
        import torch

        g = torch.Generator().manual_seed(self.cfg["seed"] * 1_000_003 + step)
        pick = self.train_idx[torch.randint(len(self.train_idx), (self.cfg["batch_size"],), generator=g)]
        x, _ = self.train.get_batch(pick)
        return x.float().to(self.device), g

    def losses(self, x: torch.Tensor, g: torch.Generator) -> dict:
        """The loss terms of a batch x (unpadded); the reconstruction is compared on the data's own pixels only
        (the padding is not data), so D = C x data_size^2 (KL: over the latent of the padded image, also / D)."""
        import torch

        from ..models.vae import crop_images, pad_images

        cfg, d = self.cfg, x[0].numel()
        post = self.vae.encode(pad_images(self.vae, x)).latent_dist
        eps = torch.randn(post.mean.shape, generator=g).to(x.device)
        x_hat = crop_images(self.vae.decode(post.mean + post.std * eps).sample, x.shape[-1])
        rec = (x - x_hat).abs().mean() if cfg["loss"] == "l1" else (x - x_hat).pow(2).mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).flatten(1).sum(1).mean() / d
        out = {"rec": rec, "kl": kl, "loss": rec + cfg["kl_weight"] * kl}
        if self.phi is not None:
            pairs = zip(self.phi(x), self.phi(x_hat))
            out["perceptual"] = sum((a - b).pow(2).mean() for a, b in pairs)
            out["loss"] = out["loss"] + cfg["perceptual_weight"] * out["perceptual"]
        return out

    def train_step(self, step: int) -> dict:
        import torch

        for group in self.opt.param_groups:
            group["lr"] = learning_rate(step, self.cfg)
        self.vae.train()
        out = self.losses(*self.batch(step))
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if self.cfg["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.cfg["grad_clip"])
        self.opt.step()
        return {k: float(v.detach()) for k, v in out.items()}

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> None:
        from ..io.checkpoint import save_checkpoint

        save_checkpoint(self.out / "checkpoints", self.step, self.vae, optimizer=self.opt, config=self.cfg,
                        extra={"kind": "vae", "meta": self.meta}, keep=2, save_rng=False)

    def resume(self) -> bool:
        from ..io.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(self.out / "checkpoints") if (self.out / "checkpoints").is_dir() else None
        if ckpt is None:
            return False
        ckpt.restore(self.vae, optimizer=self.opt)
        self.step = ckpt.step
        return True

    def _log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- the end ----------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Scaling factor, held-out PSNR, reconstructions.png and the VAE folder (config.json last)."""
        import torch

        from ..data.convert import to_uint8
        from ..models.vae import decode_latents, encode_latents, save_vae
        from ..viz import save_image_grid

        self.vae.eval()
        cfg, vae = self.cfg, self.vae
        vae.register_to_config(scaling_factor=1.0)
        pick = self.train_idx[torch.linspace(0, len(self.train_idx) - 1, min(cfg["scale_n"], len(self.train_idx)))
                              .round().long()]
        z = encode_latents(vae, self.train.get_batch(pick)[0])
        std = float(z.std())
        vae.register_to_config(scaling_factor=1.0 / std)
        held = self.held_idx if self.held_idx is not None else torch.arange(len(self.held))
        held = held[:cfg["eval_n"]]
        x = self.held.get_batch(held)[0]
        x_hat = decode_latents(vae, encode_latents(vae, x))
        train_mean = self.train.get_batch(pick)[0].mean(0, keepdim=True)
        self.meta.update(psnr=float(psnr(x, x_hat).mean()), psnr_mean_image=float(psnr(x, train_mean.expand_as(x))
                                                                                    .mean()),
                         scaling_factor=1.0 / std, latent_std=std, latent_mean=float(z.mean()), steps=self.step,
                         latent_shape=list(z.shape[1:]), held_out=len(held), loss=cfg["loss"],
                         kl_weight=cfg["kl_weight"])
        save_vae(vae, self.out, self.meta)
        k = min(16, len(x))
        pics = to_uint8(torch.cat([x[:k], x_hat[:k]]))
        save_image_grid(pics, self.out / "reconstructions.png", row_labels=["original"] * k + ["reconstruction"] * k,
                        title=f"{cfg['data']}: held-out images and their reconstructions, PSNR "
                              f"{self.meta['psnr']:.1f} dB (step {self.step})")
        return dict(self.meta)

    def _on_signal(self, signum, frame):
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        resumed = self.resume()
        self.out.mkdir(parents=True, exist_ok=True)
        if resumed:
            print(f"resuming {self.out} from step {self.step}")
        else:
            n = sum(p.numel() for p in self.vae.parameters())
            print(f"training VAE {self.cfg['preset']} ({n / 1e6:.2f}M parameters, {self.cfg['downsample']}x) on "
                  f"{self.cfg['data']} ({len(self.train_idx)} images of shape {tuple(self.train.shape)}, padded to "
                  f"{self.meta['padded_size']} px) for {self.cfg['steps']} steps of batch {self.cfg['batch_size']}")
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)} \
            if __import__("threading").current_thread() is __import__("threading").main_thread() else {}
        start, t0, stopped = self.step, time.perf_counter(), False
        bar = tqdm(total=self.cfg["steps"], initial=self.step, unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            while self.step < self.cfg["steps"]:
                out = self.train_step(self.step)
                if not math.isfinite(out["loss"]):
                    raise ValueError(f"the VAE loss is {out['loss']} at step {self.step + 1}; lower lr "
                                     f"(now {self.cfg['lr']})")
                self.step += 1
                bar.update(1)
                bar.set_postfix(rec=f"{out['rec']:.4f}", refresh=False)
                if self.step % self.cfg["log_every"] == 0:
                    self._log({"step": self.step, **out, "lr": learning_rate(self.step - 1, self.cfg),
                               "time": time.perf_counter() - t0})
                out_of_time = self.max_seconds is not None and time.perf_counter() - t0 > self.max_seconds
                if self._stop or out_of_time:
                    stopped = True
                    break
                if self.step % self.cfg["checkpoint_every"] == 0 and self.step < self.cfg["steps"]:
                    self.save()
        finally:
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        if self.step > start:
            self.save()
        summary = {"step": self.step, "start_step": start, "interrupted": stopped and self._stop,
                   "time_limit": stopped and not self._stop, "train_seconds": time.perf_counter() - t0}
        if self.step >= self.cfg["steps"] and (self.step > start or not (self.out / "config.json").is_file()):
            summary.update(self.finish())
        return summary


def saved_settings(out) -> dict | None:
    """The settings of the newest checkpoint of a VAE folder (None: no checkpoint yet)."""
    from ..io.checkpoint import latest_checkpoint

    root = Path(out) / "checkpoints"
    ckpt = latest_checkpoint(root, verify=False) if root.is_dir() else None
    return dict(ckpt.config) if ckpt is not None else None


def train_vae(overrides: dict | None = None, out="vae", device="cpu", progress: bool = True,
              max_seconds: float | None = None) -> dict:
    """Train (or resume) the VAE folder ``out``; settings: :data:`DEFAULTS` < the folder's own < ``overrides``
    (a resumed folder refuses a change of the keys in :data:`FIXED`). Returns the summary (and the VAE's
    record: psnr, scaling_factor, ... once trained to the end)."""
    saved = saved_settings(out)
    if saved is not None:
        changed = [k for k in FIXED if k in (overrides or {}) and overrides[k] != saved.get(k)]
        if changed:
            raise ValueError(f"{out} was trained with {', '.join(f'{k}={saved.get(k)!r}' for k in changed)}; these "
                             "cannot change on resume: choose a new --out folder")
    cfg = vae_settings(overrides, base=saved)
    return VAETrainer(cfg, out, device=device, progress=progress, max_seconds=max_seconds).fit()
