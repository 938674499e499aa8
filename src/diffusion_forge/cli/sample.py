"""`dforge sample`: draw samples from a trained run folder into a picture or an .npz file."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample a trained run folder into a .png grid or an .npz file",
                       description="Load a run folder written by `dforge train` (its newest checkpoint, EMA weights "
                                   "by default) and sample it. Image i uses the seed SEED + i, so an image depends "
                                   "on its seed only, not on --n or --batch-size.",
                       formatter_class=argparse.HelpFormatter)
    p.add_argument("run", help="run folder written by `dforge train`")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: %(default)s)")
    p.add_argument("--sampler", default=None,
                   help="sampler name (euler, euler_ancestral, ddim, dpmpp_2m, dpmpp_2m_sde, unipc, ...; `auto`: the "
                        "most accurate one for --steps); default: the run's own (its config keys sampler, "
                        "sampler_options)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample_steps)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise of the ancestral / SDE samplers (1: DDPM-like; above 1 more fresh noise each step; "
                        "default: the run's sampler_options)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the first sample; sample i uses seed + i (default: %(default)s)")
    p.add_argument("--out", default="samples.png",
                   help="output file: .png (a grid) or .npz (key `images`: uint8 N x H x W x C) "
                        "(default: %(default)s)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights instead of their EMA")
    p.add_argument("--step", type=int, default=None, help="use the checkpoint of this step (default: newest)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per network call (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    import numpy as np
    import torch

    from ..io.checkpoint import CheckpointError, load_model_from_run
    from ..training import generate, save_samples
    from . import UserError

    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {out.name!r}")
    if args.n < 1 or (args.steps is not None and args.steps < 1) or args.batch_size < 1:
        raise UserError("--n, --steps and --batch-size must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        trained = load_model_from_run(args.run, use_ema=not args.no_ema, step=args.step, device=device)
    except CheckpointError as e:
        raise UserError(str(e)) from e
    cfg = trained.config
    if args.sampler is None:  # the run's own sampler and options
        sampler, options = cfg.get("sampler", "dpmpp_2m"), dict(cfg.get("sampler_options") or {})
    else:
        sampler, options = (None if args.sampler == "auto" else args.sampler), {}
    if args.eta is not None:
        options["eta"] = args.eta
    steps = args.steps or cfg.get("sample_steps", 20)
    x = generate(trained, args.n, seed=args.seed, sampler=sampler, steps=steps, batch_size=args.batch_size,
                 sampler_options=options)
    images = x.ndim == 4
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npz":
        from ..io.files import atomic_write_bytes

        if images:
            from ..data import to_uint8

            arrays = {"images": to_uint8(x)}
        else:
            arrays = {"samples": x.numpy().astype(np.float32)}
        atomic_write_bytes(out, _npz_bytes(arrays))
    else:
        save_samples(x, out, title=f"samples of {args.run}")
    print(f"wrote {args.n} samples of {args.run} (step {trained.step}, {'EMA' if not args.no_ema else 'trained'} "
          f"weights, {sampler or 'auto'} {options or ''} with {steps} steps) to {out}")
    return 0


def _npz_bytes(arrays: dict) -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()
