"""Our default training recipe against the Hugging Face diffusion course's MNIST recipe, same wall clock.

    python benchmarks/recipe.py                  # 10 minutes of training each (then sampling): ~35 minutes
    python benchmarks/recipe.py --minutes 1 --n 200      # a quick look

Each recipe trains for at most ``--minutes`` of wall-clock time in this one process (ours stops earlier
if its fixed number of steps is done), then draws ``--n`` samples at 20 network evaluations with each
of its candidate samplers; the best one (lowest FD) is reported. FD is the Frechet distance in the
128-d features of evaluate.py's MNIST digit classifier ("FD-Digits"), against the MNIST test set; the
floor is the FD of ``--n`` real training images against the same reference. "confident" is the
fraction of samples the classifier labels with probability >= 0.9.

The course recipe (Hugging Face diffusion course, unit 1, MNIST): diffusers ``UNet2DModel``
(block_out_channels (32, 64, 64), layers_per_block 2, attention in the two lower blocks),
``DDPMScheduler`` squaredcos_cap_v2 with 1000 steps, epsilon target, AdamW lr 1e-3, batch 128,
fp32, the plain diffusers loop (add_noise, MSE on the noise).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffusion_forge as df
from diffusion_forge import evaluate
from diffusion_forge.data import load_dataset, load_mnist, to_uint8
from diffusion_forge.denoise.denoiser import Denoiser
from diffusion_forge.sampling.generate import generate
from diffusion_forge.training import Trainer, merge_config

COURSE_UNET = {"sample_size": 28, "in_channels": 1, "out_channels": 1, "layers_per_block": 2,
               "block_out_channels": (32, 64, 64),
               "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
               "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")}


def train_ours(out: Path, seconds: float, seed: int) -> tuple[Denoiser, dict]:
    cfg = merge_config(flags={"data.source": "mnist", "run.seed": seed, "run.sample_every": 0})
    trainer = Trainer(cfg, out / "ours", progress=True, max_seconds=seconds)
    summary = trainer.fit()
    trained = trainer.ema_denoiser().eval()   # the EMA network, with its schedule and prediction
    return trained, {"steps": trainer.step, "batch": cfg.optim.batch_size, "train_s": summary["train_seconds"],
                     "precision": trainer.precision}


class CourseModel(torch.nn.Module):
    """The course's UNet2DModel under our call signature, for our samplers."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t).sample


def train_course(seconds: float, seed: int, snapshot_minutes=()) -> tuple[Denoiser, dict]:
    """The course loop for ``seconds`` of wall clock. ``snapshot_minutes``: also copy the network when each of
    these many minutes has passed, into ``info["snapshots"]`` as (denoiser, info) pairs (constant lr, no EMA:
    a copy at minute m is the run a budget of m minutes gives)."""
    import copy

    from diffusers import DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    net = UNet2DModel(**COURSE_UNET)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    schedule = df.NoiseSchedule.from_diffusers(scheduler.config)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = load_dataset("mnist")
    g = torch.Generator().manual_seed(seed)
    steps, start, todo, snapshots = 0, time.perf_counter(), sorted(snapshot_minutes), []
    bar = tqdm(desc="course recipe", unit="step")
    while time.perf_counter() - start < seconds:
        x, _ = data.get_batch(torch.randint(0, len(data), (128,), generator=g))
        noise = torch.randn(x.shape, generator=g)
        t = torch.randint(0, 1000, (128,), generator=g)
        pred = net(scheduler.add_noise(x, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        wall = time.perf_counter() - start
        while todo and wall >= 60 * todo[0]:
            D = Denoiser(CourseModel(copy.deepcopy(net)).eval(), schedule, "epsilon", sample_shape=(1, 28, 28))
            snapshots.append((D, {"steps": steps, "wall_s": wall, "minutes": todo.pop(0)}))
    bar.close()
    trained = Denoiser(CourseModel(net).eval(), schedule, "epsilon", sample_shape=(1, 28, 28))
    return trained, {"steps": steps, "batch": 128, "train_s": time.perf_counter() - start, "precision": "no",
                     "snapshots": snapshots}


def parse_sampler(spec: str) -> tuple[str, dict]:
    """"euler_ancestral:eta=1.8" -> ("euler_ancestral", {"eta": 1.8})."""
    name, _, opts = spec.partition(":")
    return name, {k: float(v) for k, v in (o.split("=") for o in opts.split(",") if o)}


def score(trained: Denoiser, samplers: list[str], n: int, ref_stats, clf) -> dict:
    """Sample n images at 20 NFE with each sampler; keep the one with the lowest FD."""
    best = None
    for spec in samplers:
        sampler, options = parse_sampler(spec)
        nfe_steps = 10 if sampler in ("heun", "dpm_2") else 20  # second-order single-step: 2 NFE per step
        t0 = time.perf_counter()
        with torch.no_grad():
            x = generate(trained, n, seed=0, sampler=sampler, steps=nfe_steps, batch_size=250,
                         sampler_options=options)
        images = to_uint8(x)
        mu, sigma = evaluate.feature_stats(clf.features(images))
        result = {"sampler": spec, "fd": evaluate.frechet_distance(mu, sigma, *ref_stats),
                  "confident": evaluate.digit_confidence_score(images), "sample_s": time.perf_counter() - t0,
                  "images": images}
        print(f"  {spec:<22} FD {result['fd']:8.3f}  confident {result['confident']:.1%}  "
              f"({result['sample_s']:.0f} s)", flush=True)
        if best is None or result["fd"] < best["fd"]:
            best = result
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock training budget of each recipe")
    p.add_argument("--n", type=int, default=1000, help="samples per recipe (and real images for the floor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench-recipe", help="folder for runs, grids and results.json")
    p.add_argument("--ours-samplers", default="euler_ancestral:eta=1.8;euler_ancestral:eta=1.6;dpmpp_2m_sde;dpmpp_2m",
                   help="candidates for our model, ';'-separated, NAME[:OPTION=VALUE,...]")
    p.add_argument("--course-samplers", default="euler_ancestral:eta=1.6;ddpm;dpmpp_2m",
                   help="candidates for the course model (same format)")
    p.add_argument("--only", choices=["ours", "course"], default=None, help="run one recipe only")
    args = p.parse_args(argv)

    out = Path(args.out)
    if (out / "ours").exists():
        raise SystemExit(f"{out / 'ours'} exists: remove it (the benchmark trains from scratch) or pick --out")
    out.mkdir(parents=True, exist_ok=True)
    clf = evaluate.digit_classifier()
    test_images, _ = load_mnist("test")
    train_images, _ = load_mnist("train")
    ref_stats = evaluate.feature_stats(clf.features(test_images))
    floor_idx = np.random.default_rng(args.seed).choice(len(train_images), args.n, replace=False)
    floor = evaluate.frechet_distance(*evaluate.feature_stats(clf.features(train_images[floor_idx])), *ref_stats)
    print(f"threads: {torch.get_num_threads()}; real-vs-real floor at n={args.n}: FD {floor:.3f}", flush=True)

    rows = {}
    for name, trainer, samplers in (("ours", lambda: train_ours(out, args.minutes * 60, args.seed),
                                     args.ours_samplers.split(";")),
                                    ("course", lambda: train_course(args.minutes * 60, args.seed),
                                     args.course_samplers.split(";"))):
        if args.only and args.only != name:
            continue
        print(f"training {name} for up to {args.minutes:g} minutes", flush=True)
        trained, info = trainer()
        info.pop("snapshots", None)
        info["images_per_s"] = info["steps"] * info["batch"] / info["train_s"]
        print(f"scoring {name} ({info['steps']} steps)", flush=True)
        best = score(trained, samplers, args.n, ref_stats, clf)
        from diffusion_forge.viz import save_image_grid
        save_image_grid(best.pop("images")[:100], out / f"{name}-samples.png", nrow=10)
        rows[name] = {**info, **best}

    print(f"\nRecipe benchmark: {args.minutes:g} min of training each, {args.n} samples at 20 NFE, "
          f"{torch.get_num_threads()} threads, FD in digit-classifier features vs the MNIST test set")
    header = f"{'recipe':<8} {'steps':>6} {'batch':>5} {'train s':>8} {'images/s':>9} {'sampler':>22} " \
             f"{'FD':>9} {'FD/floor':>9} {'confident':>9}"
    print(header + "\n" + "-" * len(header))
    for name, r in rows.items():
        print(f"{name:<8} {r['steps']:>6} {r['batch']:>5} {r['train_s']:>8.0f} {r['images_per_s']:>9.1f} "
              f"{r['sampler']:>22} {r['fd']:>9.3f} {r['fd'] / floor:>9.2f} {r['confident']:>9.1%}")
    print(f"{'real':<8} {'':>6} {'':>5} {'':>8} {'':>9} {'':>22} {floor:>9.3f} {1:>9.2f}")
    if len(rows) == 2:
        o, c = rows["ours"], rows["course"]
        checks = {"FD <= course FD / 10": o["fd"] <= c["fd"] / 10, "FD <= 5 x floor": o["fd"] <= 5 * floor,
                  "images/s >= 5 x course": o["images_per_s"] >= 5 * c["images_per_s"]}
        for k, v in checks.items():
            print(f"  {'PASS' if v else 'FAIL'}  {k}")
        rows["checks"] = checks
    rows["floor"] = floor
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
