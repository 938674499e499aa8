"""Throughput: training GFLOP/s of the default recipe, sampling cost against the course model, and FD vs precision.

    python benchmarks/throughput.py                                  # (a) + (b), full size: about 3 minutes (2 cores)
    python benchmarks/throughput.py --parts train --channels-last --compile     # + the layout / compile variants
    python benchmarks/throughput.py --parts sample                   # (b) only: about 1 minute
    python benchmarks/throughput.py --parts fd --fd outputs/demo     # (c): 3 x 1000 samples, about 3 minutes
    python benchmarks/throughput.py --set preset=tiny --batch-size 8 --steps 2 --sample-batch 8 --repeats 1 \\
        --sample-steps 1                                             # a smoke run of (a) + (b): seconds

(a) Training. The default recipe (``merge_config`` of the defaults on ``--data``, plus ``--set``) built by
``diffusion_forge.training.Trainer`` itself: its network, loss, optimiser, EMA and batches. F = the FLOPs of one
training step, counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eager step: 2 FLOPs per
multiply-add of every matmul, convolution and attention product, forward and backward (elementwise work, norms
and the optimiser are not counted, as is usual for "model FLOPs"). After ``--warmup`` steps, ``--steps`` steps
of ``Trainer.train_step`` are timed (the loss read back each step, as the trainer's loop does), giving steps/s:

    images/s = batch x steps/s,    GFLOP per image = F / batch / 1e9,    effective GFLOP/s = F x steps/s / 1e9

under each ``--precisions`` (fp32 "no" and bf16 autocast), optionally with the model in torch.channels_last and
with the network under torch.compile (its compile time, the first step's time less a timed step's, is reported
apart). Target: >= 150 GFLOP/s for the default recipe's precision (run.mixed_precision=auto, plain layout).

(b) Sampling. ms per image per network evaluation at batch ``--sample-batch`` (256): one call of the Denoiser,
D(x, sigma), as every sampler makes it (float64 state in, the network in float32 or under bf16 autocast, x0
out), for our default U-Net (random weights: cost does not depend on them) and the Hugging Face course's MNIST
UNet2DModel (``COURSE_UNET`` of benchmarks/recipe.py), both at 28 x 28, timed in interleaved rounds in this one
process (median of ``--repeats`` rounds). A second column times a whole ``df.sample`` of one batch at
``--sample-steps`` steps of the recipe's sampler, divided by the images x network evaluations it made (the
sampler's own arithmetic and noise included). Target: ours (bf16) <= 0.12 x the course model in fp32.

(c) ``--fd RUN``: ``--n`` samples of a trained MNIST run with its own sampler (config sample.*, as `dforge
sample` picks it; a class-conditional run: class i mod K at its recommended guidance scale) in fp32 and under
bf16 autocast, the same seeds 0..n-1; FD-Digits of each against the MNIST test set (the digit classifier's
features, as benchmarks/recipe.py), their difference, how far the images moved, and, as the scale that
difference is judged on, the FD change from drawing another n seeds (n..2n-1) in fp32.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import diffusion_forge as df
from diffusion_forge.denoise.denoiser import Denoiser, network_autocast
from diffusion_forge.sampling.api import sampling_autocast_dtype
from diffusion_forge.sampling.generate import generate
from diffusion_forge.training import Trainer, merge_config, parse_set_flags, resolve_precision
from recipe import COURSE_UNET, CourseModel

TRAIN_TARGET, SAMPLE_TARGET = 150.0, 0.12
SHAPE = (1, COURSE_UNET["sample_size"], COURSE_UNET["sample_size"])   # MNIST, 28 x 28


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recipe_config(args, precision: str | None = None):
    flags = {"data.source": args.data, "run.device": args.device, "run.sample_every": 0, **parse_set_flags(args.set)}
    if precision is not None:
        flags["run.mixed_precision"] = precision
    if args.batch_size:
        flags["optim.batch_size"] = args.batch_size
    return merge_config(flags=flags)


# ---------------------------------------------------------------------------------------------
# (a) training

def step_flops(trainer) -> int:
    """FLOPs of one eager training step (forward + backward), counted by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step(0)[0].item()
    return counter.get_total_flops()


def channels_last(trainer) -> None:
    """The network (and its EMA copy) in torch.channels_last, and each batch's images too."""
    cl = torch.channels_last
    trainer.model.to(memory_format=cl)           # in place: the optimiser keeps the same parameters
    trainer.ema.module.to(memory_format=cl)
    batch = trainer.data.batch

    def batch_cl(idx):
        x, cond = batch(idx)
        return (x.contiguous(memory_format=cl) if x.ndim == 4 else x), cond

    trainer.data.batch = batch_cl


def time_training(args, precision: str, layout: bool, compiled: bool, flops: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(recipe_config(args, precision), Path(tmp) / "run", progress=False)
        dev, batch = trainer.device, trainer.cfg.optim.batch_size
        if flops is None:
            flops = step_flops(trainer)
        if layout:
            channels_last(trainer)
        if compiled:
            trainer.denoiser.model = torch.compile(trainer.model)   # the loss calls the network through it
        times = []
        for step in range(1, args.warmup + args.steps + 1):
            t0 = time.perf_counter()
            trainer.train_step(step)[0].item()   # .item(): the loop reads the loss back every step
            sync(dev)
            times.append(time.perf_counter() - t0)
        timed = times[args.warmup:]
        per_step = sum(timed) / len(timed)
        return {"precision": trainer.precision, "channels_last": layout, "compile": compiled, "batch": batch,
                "flops": flops, "step_s": per_step, "images_per_s": batch / per_step,
                "gflop_per_image": flops / batch / 1e9, "gflops": flops / per_step / 1e9,
                "compile_s": times[0] - statistics.median(timed) if compiled else None, "device": str(dev)}


def train_part(args) -> list[dict]:
    variants = [(p, cl, c) for p in args.precisions.split(",") for cl in [False] + [True] * args.channels_last
                for c in [False] + [True] * args.compile]
    default = resolve_precision(recipe_config(args).run.mixed_precision, torch.device(resolve_device(args.device)))
    rows, flops = [], None
    for precision, layout, compiled in variants:
        print(f"training: precision {precision}, channels_last {layout}, compile {compiled} ...", flush=True)
        try:
            row = time_training(args, precision, layout, compiled, flops)
        except Exception as e:   # e.g. torch.compile without a working C++ toolchain: report, go on
            print(f"  failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        flops = row["flops"]
        row["default"] = row["precision"] == default and not layout and not compiled
        rows.append(row)
    print(f"\n(a) Training step of the default recipe on {args.data}: {torch.get_num_threads()} threads, "
          f"{rows[0]['device'] if rows else '?'}; {args.steps} timed steps after {args.warmup}; "
          "FLOPs by torch.utils.flop_counter")
    head = (f"{'precision':<9} {'layout':<13} {'compile':<7} {'batch':>5} {'ms/step':>8} {'images/s':>9} "
            f"{'GFLOP/img':>9} {'GFLOP/s':>8} {'compile s':>9}  >= {TRAIN_TARGET:g}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        cs = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        print(f"{r['precision']:<9} {'channels_last' if r['channels_last'] else 'contiguous':<13} "
              f"{'yes' if r['compile'] else 'no':<7} {r['batch']:>5} {r['step_s'] * 1e3:>8.1f} "
              f"{r['images_per_s']:>9.1f} {r['gflop_per_image']:>9.3f} {r['gflops']:>8.1f} {cs:>9}  "
              f"{'PASS' if r['gflops'] >= TRAIN_TARGET else 'FAIL'}{'  (the recipe default)' * r['default']}")
    return rows


def resolve_device(spec: str) -> torch.device:
    from diffusion_forge.device import resolve_device as resolve

    return resolve(spec)


# ---------------------------------------------------------------------------------------------
# (b) sampling

def our_network(args, device) -> Denoiser:
    from diffusion_forge.training.build import build_network, build_schedule

    cfg = recipe_config(args)
    schedule = build_schedule(cfg)
    net, _ = build_network(cfg, SHAPE, schedule)
    return Denoiser(net.to(device).eval().requires_grad_(False), sample_shape=SHAPE)


def course_network(device) -> Denoiser:
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = CourseModel(UNet2DModel(**COURSE_UNET)).to(device).eval().requires_grad_(False)
    return Denoiser(net, df.NoiseSchedule.from_name("cosine", 1000), "epsilon", sample_shape=SHAPE)


@torch.no_grad()
def forward_seconds(D: Denoiser, x: torch.Tensor, sigma: torch.Tensor, amp) -> float:
    """One network evaluation as a sampler makes it: D(x, sigma), the state float64 (the samplers' on the CPU)."""
    with network_autocast(D, amp):
        sync(x.device)
        t0 = time.perf_counter()
        D(x, sigma)
        sync(x.device)
        return time.perf_counter() - t0


@torch.no_grad()
def sampler_seconds(D: Denoiser, args, device, precision: str) -> tuple[float, int]:
    """A whole df.sample of one batch with the recipe's sampler: (seconds, network evaluations)."""
    cfg = recipe_config(args)
    gens = [torch.Generator().manual_seed(i) for i in range(args.sample_batch)]
    D.nfe = 0
    sync(device)
    t0 = time.perf_counter()
    df.sample(D, shape=(args.sample_batch, *SHAPE), sampler=cfg.sample.sampler, steps=args.sample_steps,
              sampler_options=cfg.sample.options, generator=gens, device=device, precision=precision)
    sync(device)
    return time.perf_counter() - t0, D.nfe


def sample_part(args) -> dict:
    device = resolve_device(args.device)
    models = {"ours": our_network(args, device), "course": course_network(device)}
    precisions = args.precisions.split(",")
    variants = [(m, p) for m in models for p in precisions]
    b = args.sample_batch
    x = torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(
        device, torch.float32 if device.type == "mps" else torch.float64)
    sigma = torch.full((b,), 2.0, dtype=torch.float64)
    amps = {p: sampling_autocast_dtype(p, device) for p in precisions}
    for m, p in variants:   # warm-up (first-call allocations, oneDNN kernel selection)
        forward_seconds(models[m], x, sigma, amps[p])
    times = {v: [] for v in variants}
    for r in range(args.repeats):   # interleaved rounds, so load changes hit every variant alike
        print(f"sampling: round {r + 1}/{args.repeats}", flush=True)
        for m, p in variants:
            times[(m, p)].append(forward_seconds(models[m], x, sigma, amps[p]))
    rows = {}
    for m, p in variants:
        s, nfe = sampler_seconds(models[m], args, device, p)
        rows[f"{m} {p}"] = {"model": m, "precision": p, "ms": statistics.median(times[(m, p)]) / b * 1e3,
                            "sampler_ms": s / (b * nfe) * 1e3, "nfe": nfe}
    base = rows.get("course no")
    print(f"\n(b) Sampling cost at batch {b}, 28 x 28, {torch.get_num_threads()} threads, {device}: ms per image "
          f"per network evaluation (median of {args.repeats}); 'in df.sample': one batch at {args.sample_steps} "
          "steps of the recipe's sampler")
    head = (f"{'model':<7} {'precision':<9} {'ms/img/NFE':>10} {'in df.sample':>12} {'x course fp32':>13} "
            f"{'x course same':>13}")
    print(head + "\n" + "-" * len(head))
    for r in rows.values():
        same = rows.get(f"course {r['precision']}")
        ratio = f"{r['ms'] / base['ms']:.3f}" if base else ""
        print(f"{r['model']:<7} {r['precision']:<9} {r['ms']:>10.3f} {r['sampler_ms']:>12.3f} {ratio:>13} "
              f"{r['ms'] / same['ms'] if same else float('nan'):>13.3f}")
    checks = {}
    for p in precisions:
        if base and f"ours {p}" in rows:
            ratio = rows[f"ours {p}"]["ms"] / base["ms"]
            checks[f"ours {p} <= {SAMPLE_TARGET} x course fp32"] = ratio <= SAMPLE_TARGET
        if p != "no" and f"course {p}" in rows:
            ratio = rows[f"ours {p}"]["ms"] / rows[f"course {p}"]["ms"]
            checks[f"ours {p} <= {SAMPLE_TARGET} x course {p} (same precision)"] = ratio <= SAMPLE_TARGET
    for k, v in checks.items():
        print(f"  {'PASS' if v else 'FAIL'}  {k}")
    return {"rows": rows, "checks": checks}


# ---------------------------------------------------------------------------------------------
# (c) FD against precision

def fd_part(args) -> dict:
    from diffusion_forge import evaluate
    from diffusion_forge.cli.sample import run_settings
    from diffusion_forge.data import load_mnist, to_uint8
    from diffusion_forge.io.checkpoint import load_model_from_run

    device = resolve_device(args.device)
    trained = load_model_from_run(args.fd, device=device)
    if getattr(trained, "text_encoder", None) is not None or tuple(trained.sample_shape) != SHAPE:
        raise SystemExit(f"--fd needs an MNIST image run of shape {SHAPE} without text conditioning; {args.fd} "
                         f"has samples of shape {tuple(trained.sample_shape)}")
    sampler, steps, options = run_settings(trained, None, None, {})
    k = trained.num_classes or 0
    clf = evaluate.digit_classifier()
    ref = evaluate.feature_stats(clf.features(load_mnist("test")[0]))

    def draw(precision: str, seed: int) -> tuple[np.ndarray, float]:
        cond = {"class_labels": torch.arange(args.n) % k} if k else None
        guidance = {"guidance_scale": trained.guidance_scale} if k and trained.guidance_scale else {}
        t0 = time.perf_counter()
        x = generate(trained, args.n, seed=seed, sampler=sampler, steps=steps, sampler_options=options, cond=cond,
                     batch_size=args.sample_batch, device=device, progress=True, precision=precision, **guidance)
        return to_uint8(x), time.perf_counter() - t0

    def fd(images) -> float:
        return evaluate.frechet_distance(*evaluate.feature_stats(clf.features(images)), *ref)

    print(f"FD check: {args.n} samples of {args.fd} (step {trained.step}, {sampler} {steps} steps {options})",
          flush=True)
    (a, ta), (b, tb) = draw("no", 0), draw("bf16", 0)
    out = {"run": str(args.fd), "step": trained.step, "sampler": sampler, "steps": steps, "n": args.n,
           "fd_fp32": fd(a), "fd_bf16": fd(b), "sample_s_fp32": ta, "sample_s_bf16": tb}
    out["fd_diff"] = out["fd_bf16"] - out["fd_fp32"]
    moved = np.abs(a.astype(np.int16) - b.astype(np.int16))
    out["mean_abs_pixel_change"], out["max_abs_pixel_change"] = float(moved.mean()), int(moved.max())
    la, lb = (clf.predict_proba(v).argmax(1) for v in (a, b))
    out["labels_changed"] = float((la != lb).float().mean())
    if not args.no_seed_check:
        out["fd_fp32_other_seeds"] = fd(draw("no", args.n)[0])
        out["seed_diff"] = out["fd_fp32_other_seeds"] - out["fd_fp32"]
    print(f"\n(c) FD-Digits@{args.n} of {args.fd}, {sampler} {steps} steps, seeds 0..{args.n - 1}")
    print(f"  fp32 {out['fd_fp32']:.4f} ({ta:.0f} s)   bf16 {out['fd_bf16']:.4f} ({tb:.0f} s)   "
          f"bf16 - fp32 {out['fd_diff']:+.4f}")
    print(f"  pixels moved: mean {out['mean_abs_pixel_change']:.3f} of 255, max {out['max_abs_pixel_change']}; "
          f"classifier labels changed: {out['labels_changed']:.1%}")
    if "seed_diff" in out:
        ok = abs(out["fd_diff"]) <= abs(out["seed_diff"])
        out["unchanged"] = ok
        print(f"  fp32 at seeds {args.n}..{2 * args.n - 1}: {out['fd_fp32_other_seeds']:.4f} "
              f"(another draw moves FD by {out['seed_diff']:+.4f})")
        print(f"  {'PASS' if ok else 'FAIL'}  |FD change from bf16| <= |FD change from other seeds|")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--parts", default="train,sample", help="comma-separated: train, sample, fd (fd needs --fd RUN)")
    p.add_argument("--data", default="mnist", help="training data of the recipe (part a)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides (repeatable)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: the recipe's)")
    p.add_argument("--precisions", default="no,bf16", help="comma-separated: no, bf16, fp16 (CUDA)")
    p.add_argument("--steps", type=int, default=40, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed training steps first: a process's first steps run slower while oneDNN builds its "
                        "kernels (compile happens here too)")
    p.add_argument("--channels-last", action="store_true", help="also time the model in torch.channels_last")
    p.add_argument("--compile", action="store_true", help="also time the network under torch.compile")
    p.add_argument("--sample-batch", type=int, default=256, help="batch of the sampling timings (and of --fd)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds of sampling timings")
    p.add_argument("--sample-steps", type=int, default=5, help="steps of the whole-df.sample timing")
    p.add_argument("--fd", default=None, metavar="RUN", help="a trained MNIST run folder for part (c)")
    p.add_argument("--n", type=int, default=1000, help="samples per FD (part c)")
    p.add_argument("--no-seed-check", action="store_true", help="part (c) without the second block of seeds")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    parts = {s.strip() for s in args.parts.split(",") if s.strip()} | ({"fd"} if args.fd else set())
    if parts - {"train", "sample", "fd"} or ("fd" in parts and not args.fd):
        p.error("--parts takes train, sample, fd; fd needs --fd RUN")
    for prec in args.precisions.split(","):
        try:
            sampling_autocast_dtype(prec, resolve_device(args.device))
        except ValueError as e:
            p.error(f"--precisions: {e}")
    torch.manual_seed(0)
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    with contextlib.suppress(KeyboardInterrupt):
        if "train" in parts:
            results["train"] = train_part(args)
        if "sample" in parts:
            results["sample"] = sample_part(args)
        if "fd" in parts:
            results["fd"] = fd_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
