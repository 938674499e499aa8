"""DDPM against Stable Diffusion's design, one run, same machine: pixel-space against latent-space diffusion.

    python benchmarks/latent.py                 # the costs (minutes), then 2 x 10 minutes of MNIST training + scoring
    python benchmarks/latent.py --quick         # toy sizes: proves the script runs (a minute or two)
    python benchmarks/latent.py --only costs    # just the table of costs

1. **Costs** at 32 and 64 px, colour (bundled emoji): one training step of the same U-Net (``--preset``) on
   pixels (3 x S x S) and on the latents of a VAE (4 x S/f x S/f, f = 4 and 8: Stable Diffusion's 8), batch
   ``--batch``: the median wall-clock time of ``--repeats`` steps (``viz.latent.measure_step``: forward, MSE,
   backward, AdamW) and the peak memory of a fresh process doing only that (GPU: max_memory_allocated; CPU:
   the rise of the peak resident set, ``ru_maxrss``); and the sampling time per image (20 network
   evaluations, ``generate``; latent: the VAE's decoding included). The latents' encoding is not in the step:
   latent runs encode the data once (``data/latents.py``). Target: a latent step >= 4x cheaper at 64 px.
2. **Quality at equal budgets** on MNIST: ``--minutes`` of wall clock each. The pixel model is the default
   recipe (``benchmarks/recipe.py``'s "ours"). The latent model's budget includes its VAE: ``dforge train-vae``'s
   defaults (small preset, 4x, 4 x 8 x 8 latents), the encoding of the 60,000 training images, then the latent
   recipe :data:`LATENT_RECIPE` for the time left. Both are scored as recipe.py scores: FD-Digits@``--n``
   against the MNIST test set, the best of the run's sampler candidates at 20 NFE. Target: the latent FD within
   2x of the pixel FD.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
# The latent recipe: a wider U-Net than pixel space can afford (8 x 8 latents are 12x fewer positions than 28 x 28
# pixels), more steps; everything else the default recipe.
LATENT_RECIPE = {"model.preset": "small", "model.options": {"block_out_channels": [64, 128, 128]},
                 "optim.steps": 3000, "optim.warmup_steps": 200}
SAMPLERS = "euler_ancestral:eta=1.8;euler_ancestral:eta=1.4;dpmpp_2m"


# ---------------------------------------------------------------------------------------------
# 1. Costs: each measurement in a fresh process, so its peak memory is its own

def probe(spec: dict) -> dict:
    """One measurement (run in a child process): a training step's time and peak memory, sampling time."""
    import resource

    from diffusion_forge.core.schedules import NoiseSchedule
    from diffusion_forge.denoise import Denoiser
    from diffusion_forge.models.vae import build_vae, vae_config
    from diffusion_forge.sampling.generate import generate
    from diffusion_forge.training import merge_config
    from diffusion_forge.training.build import model_config
    from diffusion_forge.viz.latent import measure_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, f = spec["size"], spec["downsample"]
    shape = (3, size, size) if not f else (4, size // f, size // f)
    cfg = merge_config(flags={"data.source": "emoji", "model.preset": spec["preset"]})
    mc = model_config(cfg, shape)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step = _cuda_step(mc, shape, spec["batch"], spec["repeats"])
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        step = measure_step(mc, shape, spec["batch"], spec["repeats"])
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    from diffusion_forge.models import build_model

    model = build_model(mc).to(device).eval()
    model.diffusion_config = {"schedule": NoiseSchedule.from_name("cosine").to_dict(), "prediction": "v_prediction"}
    D = Denoiser(model, sample_shape=shape)
    if f:
        vae = build_vae(vae_config(size, 3, f, "small")).to(device).eval()
        vae.dforge_meta = {}
        object.__setattr__(D, "vae", vae)
    n = spec["sample_n"]
    generate(D, 1, steps=2, device=device)                        # warm-up
    start = time.perf_counter()
    x = generate(D, n, steps=20, sampler="euler", batch_size=n, device=device)
    sample_s = (time.perf_counter() - start) / n
    assert x.shape[1:] == (3, size, size)
    return {**spec, "shape": list(shape), "step_s": step["seconds"], "params": step["params"], "peak_mb": peak_mb,
            "sample_s_per_image": sample_s, "device": device.type}


def _cuda_step(mc, shape, batch, repeats) -> dict:
    from diffusion_forge.models import build_model, count_parameters

    model = build_model(dict(mc)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, target, t = torch.randn(batch, *shape, device="cuda"), torch.randn(batch, *shape, device="cuda"), \
        torch.rand(batch, device="cuda") * 999
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = (model(x, t) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return {"seconds": sorted(times)[len(times) // 2], "params": count_parameters(model)}


def costs(args) -> list[dict]:
    rows = []
    for size in (32, 64):
        for f in (0, 4, 8):
            spec = {"size": size, "downsample": f, "preset": args.preset, "batch": args.batch,
                    "repeats": args.repeats, "sample_n": args.sample_n}
            out = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)], capture_output=True,
                                 text=True, check=False)
            if out.returncode:
                raise SystemExit(f"probe {spec} failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {size:>3} px  {'pixel' if not f else f'latent {f}x':<10} {'x'.join(map(str, row['shape'])):>9}  "
                  f"step {row['step_s'] * 1000:8.1f} ms  peak {row['peak_mb']:7.1f} MB  "
                  f"sampling {row['sample_s_per_image'] * 1000:7.1f} ms/image", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# 2. MNIST at equal budgets

def train_pixel(out: Path, seconds: float, seed: int, quick: bool):
    from diffusion_forge.training import Trainer, merge_config

    flags = {"data.source": "mnist", "run.seed": seed, "run.sample_every": 0}
    if quick:
        flags.update({"model.preset": "tiny", "optim.steps": 5})
    trainer = Trainer(merge_config(flags=flags), out / "pixel", progress=True, max_seconds=seconds)
    start = time.perf_counter()
    trainer.fit()
    return trainer.ema_denoiser().eval(), {"steps": trainer.step, "total_s": time.perf_counter() - start}


def train_latent(out: Path, seconds: float, seed: int, quick: bool):
    from diffusion_forge.training import Trainer, merge_config
    from diffusion_forge.training.vae import train_vae

    start = time.perf_counter()
    vae_flags = {"data": "mnist", "seed": seed}
    if quick:
        vae_flags.update({"preset": "tiny", "steps": 5, "eval_n": 50, "scale_n": 200})
    vae = train_vae(vae_flags, out / "vae", progress=True, max_seconds=0.6 * seconds)
    vae_s = time.perf_counter() - start
    flags = {"data.source": "mnist", "data.latent": str(out / "vae"), "run.seed": seed, "run.sample_every": 0,
             **LATENT_RECIPE}
    if quick:
        flags.update({"model.preset": "tiny", "model.options": {}, "optim.steps": 5})
    trainer = Trainer(merge_config(flags=flags), out / "latent", progress=True)   # encodes the training images
    trainer.max_seconds = max(1.0, seconds - (time.perf_counter() - start))
    encoded_s = time.perf_counter() - start - vae_s
    trainer.fit()
    return trainer.ema_denoiser().eval(), {"steps": trainer.step, "vae_steps": vae["step"], "vae_s": vae_s,
                                           "encode_s": encoded_s, "vae_psnr": vae.get("psnr"),
                                           "total_s": time.perf_counter() - start}


def quality(args, out: Path) -> dict:
    from recipe import score

    from diffusion_forge import evaluate
    from diffusion_forge.data import load_mnist

    clf = evaluate.digit_classifier()
    test_images, _ = load_mnist("test")
    train_images, _ = load_mnist("train")
    ref = evaluate.feature_stats(clf.features(test_images))
    idx = np.random.default_rng(args.seed).choice(len(train_images), args.n, replace=False)
    floor = evaluate.frechet_distance(*evaluate.feature_stats(clf.features(train_images[idx])), *ref)
    rows = {"floor": floor}
    for name, fn in (("pixel", train_pixel), ("latent", train_latent)):
        print(f"training the {name} model for {args.minutes:g} minutes (all included)", flush=True)
        trained, info = fn(out, args.minutes * 60, args.seed, args.quick)
        best = score(trained, SAMPLERS.split(";"), args.n, ref, clf)
        from diffusion_forge.viz import save_image_grid

        save_image_grid(best.pop("images")[:100], out / f"{name}-samples.png", nrow=10)
        rows[name] = {**info, **best}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each MNIST model")
    p.add_argument("--n", type=int, default=1000, help="samples per model for FD-Digits")
    p.add_argument("--batch", type=int, default=64, help="batch of the timed training steps")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per row (the median is reported)")
    p.add_argument("--sample-n", type=int, default=16, help="images per sampling-time measurement")
    p.add_argument("--preset", default="small", help="the U-Net of the cost rows (the same in both spaces)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["costs", "quality"], default=None)
    p.add_argument("--out", default="outputs/bench-latent", help="folder for runs, grids and results.json")
    p.add_argument("--quick", action="store_true", help="toy sizes: check that the benchmark runs")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    if args.quick:
        args.minutes, args.n, args.batch, args.repeats, args.sample_n = 0.05, 50, 4, 1, 2
    out = Path(args.out if not args.quick else tempfile.mkdtemp(prefix="bench-latent-"))
    if (out / "pixel").exists() and args.only != "costs":
        raise SystemExit(f"{out / 'pixel'} exists: remove it (the benchmark trains from scratch) or pick --out")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"threads": torch.get_num_threads(), "quick": args.quick}
    print(f"threads: {torch.get_num_threads()}; device: {'cuda' if torch.cuda.is_available() else 'cpu'}")
    if args.only != "quality":
        print(f"Costs: U-Net {args.preset}, batch {args.batch}, emoji (colour)")
        results["costs"] = costs(args)
    if args.only != "costs":
        results["quality"] = quality(args, out)
    report(results, args)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"results: {out / 'results.json'}")
    return 0


def report(results: dict, args) -> None:
    checks = {}
    if "costs" in results:
        rows = {(r["size"], r["downsample"]): r for r in results["costs"]}
        print("\n| size | space | shape | step (ms) | x cheaper | peak memory (MB) | sampling (ms / image) |")
        print("|---|---|---|---|---|---|---|")
        for (size, f), r in rows.items():
            ratio = rows[(size, 0)]["step_s"] / r["step_s"]
            print(f"| {size} | {'pixel' if not f else f'latent {f}x'} | {'x'.join(map(str, r['shape']))} | "
                  f"{r['step_s'] * 1000:.1f} | {ratio:.1f} | {r['peak_mb']:.0f} | {r['sample_s_per_image'] * 1000:.1f} |")
        checks["latent 8x step >= 4x cheaper at 64 px"] = rows[(64, 0)]["step_s"] >= 4 * rows[(64, 8)]["step_s"]
    if "quality" in results:
        q = results["quality"]
        print(f"\nMNIST, {args.minutes:g} minutes each (latent: VAE training and encoding included), "
              f"FD-Digits@{args.n} vs the test set (floor: {q['floor']:.3f})")
        print("| model | steps | VAE | sampler | FD | FD / floor | confident |")
        print("|---|---|---|---|---|---|---|")
        for name in ("pixel", "latent"):
            r = q[name]
            vae = (f"{r['vae_steps']} steps, {r['vae_s']:.0f} s, PSNR {r['vae_psnr'] or float('nan'):.1f} dB; "
                   f"encoding {r['encode_s']:.0f} s" if name == "latent" else "-")
            print(f"| {name} | {r['steps']} | {vae} | {r['sampler']} | {r['fd']:.3f} | {r['fd'] / q['floor']:.2f} | "
                  f"{r['confident']:.1%} |")
        checks["latent FD <= 2 x pixel FD"] = q["latent"]["fd"] <= 2 * q["pixel"]["fd"]
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    results["checks"] = checks


if __name__ == "__main__":
    sys.exit(main())
