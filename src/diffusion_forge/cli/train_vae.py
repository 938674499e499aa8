"""`dforge train-vae`: train the small VAE (a diffusers AutoencoderKL) that latent diffusion runs in."""
from __future__ import annotations

EXAMPLES = """examples:
  dforge train-vae --data mnist --out vaes/mnist          MNIST (padded to 32 px) -> 4 x 8 x 8 latents
  dforge train --data mnist --latent vaes/mnist --out runs/mnist-latent     latent diffusion with it
  dforge train-vae --data emoji --out vaes/emoji --downsample 8 --set image_size=64    colour, 8x
  dforge train-vae --out vaes/mnist                        resume (also after Ctrl-C)
  dforge train-vae --data digits --out vaes/d --preset tiny --steps 300    a toy in seconds

settings (--set KEY=VALUE; the flags below set the same keys):
"""


def register(sub) -> None:
    from . import HelpFormatter

    p = sub.add_parser("train-vae", help="train the VAE of latent diffusion (or resume a VAE folder)",
                       description="Train a small diffusers AutoencoderKL on images: reconstruction loss (L1) plus a "
                                   "small KL term (optionally a perceptual term), AdamW, resumable. The folder gets "
                                   "config.json (with scaling_factor = 1 / std of the training latents) and "
                                   "diffusion_pytorch_model.safetensors (diffusers' layout), dforge_vae.json (its "
                                   "data and held-out PSNR), reconstructions.png, metrics.jsonl and checkpoints/.",
                       formatter_class=HelpFormatter, epilog=epilog())
    p.add_argument("--data", help="images: a bundled name (mnist, digits, emoji), a folder or hf:NAME (new folder)")
    p.add_argument("--out", required=True, help="the VAE folder (created, or resumed when it holds checkpoints)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 800)")
    p.add_argument("--preset", default=None, help="tiny, small or base (default: small)")
    p.add_argument("--downsample", type=int, default=None, help="4 or 8 pixels per latent along a side (default: 4)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="any setting below, e.g. kl_weight=1e-4 (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much training, with a checkpoint (run again to go on)")
    p.add_argument("--force", action="store_true", help="train into an existing folder that is no VAE folder "
                                                        "(its VAE files are replaced)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def epilog() -> str:
    from ..training.vae import DEFAULTS, HELP

    return EXAMPLES + "\n".join(f"  {k:<18} {str(v):<8} {HELP[k]}" for k, v in DEFAULTS.items())


def parse_sets(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> {key: value}, values read as YAML scalars (1e-4, 64, none, l1)."""
    import yaml

    from . import UserError

    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set takes KEY=VALUE, got {pair!r}")
        parsed = yaml.safe_load(value) if value.strip() else None
        if isinstance(parsed, str):
            try:
                parsed = float(parsed)   # YAML reads 1e-4 as a string
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out


def run(args) -> int:
    from pathlib import Path

    from ..device import resolve_device
    from ..io.files import OutputError, check_writable_dir
    from ..training.vae import saved_settings, train_vae
    from . import UserError

    flags = parse_sets(args.overrides)
    for key, value in (("data", args.data), ("steps", args.steps), ("preset", args.preset),
                       ("downsample", args.downsample)):
        if value is not None:
            flags[key] = value
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the VAE")
    resuming = saved_settings(out) is not None
    if not resuming:
        if "data" not in flags:
            raise UserError("--data is required for a new VAE folder (e.g. --data mnist)")
        if out.is_dir() and any(out.iterdir()) and not args.force:
            raise OutputError(f"{out} exists and holds no VAE checkpoints; pass --force to train into it, or "
                              "choose another --out")
    device = resolve_device(args.device)
    check_writable_dir(out)
    summary = train_vae(flags, out, device=device, progress=not args.no_progress,
                        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    if summary["interrupted"] or summary["time_limit"]:
        print(f"stopped at step {summary['step']}: checkpoint saved in {out / 'checkpoints'}; run the same "
              "command again to go on")
        return 130 if summary["interrupted"] else 0
    if "psnr" not in summary:
        print(f"{out} is already trained to step {summary['step']} (raise it with --steps N)")
        return 0
    print(f"trained {out} to step {summary['step']} in {summary['train_seconds']:.0f} s: held-out PSNR "
          f"{summary['psnr']:.2f} dB (the mean image: {summary['psnr_mean_image']:.2f} dB), latents "
          f"{'x'.join(map(str, summary['latent_shape']))}, scaling_factor {summary['scaling_factor']:.4f}; "
          f"reconstructions: {out / 'reconstructions.png'}; use it: dforge train --latent {out} ...")
    return 0
