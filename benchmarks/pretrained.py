"""Pretrained pipelines: dforge's path against diffusers' own pipeline call, and our samplers against diffusers'
schedulers on a trained, exported network.

    python benchmarks/pretrained.py --quick                     # part 1 at toy size (seconds)
    python benchmarks/pretrained.py                             # part 1: 25 steps, 8 images, 5 repeats
    python benchmarks/pretrained.py --run runs/latent-text      # + part 2 on a trained latent text run
    python benchmarks/pretrained.py --pipeline exported/        # part 2 on an exported SD folder directly

(1) Seconds per image, in one process after loading, on a tiny Stable-Diffusion-shaped pipeline saved with
    random weights (interop/tiny.py: UNet2DConditionModel + AutoencoderKL + CLIPTextModel, 16x16 images): the
    diffusers ``StableDiffusionPipeline.__call__`` with DPMSolverMultistepScheduler (trailing) against
    ``sample_ours(D, sampler="dpmpp_2m")`` (what ``dforge generate`` runs: prompt encoding, CFG, sampling,
    VAE decoding), the same prompt, negative prompt, guidance 7.5, steps and seeds; the median over
    ``--repeats`` calls after a warm-up call, and the max |difference| of the [0, 1] images. Target: dforge
    within 1.1x of diffusers' time.
(2) With ``--run RUN`` (a latent text run, exported with ``dforge export`` and loaded back as a
    StableDiffusionPipeline) or ``--pipeline DIR``: our deterministic samplers against diffusers' schedulers at
    10, 20 and 50 network evaluations (NFE; Heun-type methods get the step count that fits), plus iPNDM and
    DPM-Solver++(2M) at 10 NFE on grids optimised from the guided network's own outputs
    (sampling.grids.optimize_sigmas, from other noise draws than the benchmark's seeds, no data; its cost grows
    with the square of the NFE, so only at the target's budget), measured as the
    RMS distance, in [-1, 1] pixels, to a 500-step ancestral reference (our euler_ancestral, the same seeds),
    and, as a second column, to a 500-step DPM-Solver++(2M) ODE reference (deterministic samplers converge to
    the latter). Target: at 10 NFE our best sampler closer to the reference than diffusers' best scheduler.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

OURS = {"dpmpp_2m": 1, "unipc": 1, "ipndm": 1, "deis": 1, "euler": 1, "heun": 2}          # NFE per step
OPTIMISED = ("ipndm", "dpmpp_2m")                                                        # + sigmas=optimize_sigmas(...)
THEIRS = {"DPMSolverMultistepScheduler": 1, "UniPCMultistepScheduler": 1, "DEISMultistepScheduler": 1,
          "EulerDiscreteScheduler": 1, "DDIMScheduler": 1, "HeunDiscreteScheduler": 2}


def part1(args) -> dict:
    import diffusers
    import numpy as np

    from diffusion_forge.interop.pipeline_sampling import sample_ours
    from diffusion_forge.interop.pipelines import load_pipeline
    from diffusion_forge.interop.tiny import save_tiny_sd

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_sd(Path(tmp) / "sd")
        D = load_pipeline(folder)
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, safety_checker=None,
                                                                 requires_safety_checker=False)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    n, steps = args.n, args.steps
    common = dict(prompt="a fox", negative_prompt="blurry", guidance_scale=7.5)

    def theirs():
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        return pipe([common["prompt"]] * n, negative_prompt=[common["negative_prompt"]] * n, guidance_scale=7.5,
                    num_inference_steps=steps, generator=gens, output_type="np").images

    def ours():
        D.text_encoder.cache.clear()            # no prompt cache across repeats: the same work as diffusers
        x = sample_ours(D, n, seed=0, sampler="dpmpp_2m", steps=steps, batch_size=n, **common)
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()

    times = {}
    for name, fn in (("diffusers", theirs), ("dforge", ours)):
        fn()                                    # warm-up
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            image = fn()
            runs.append((time.perf_counter() - start) / n)
        times[name] = (statistics.median(runs), image)
    diff = float(np.abs(times["dforge"][1] - times["diffusers"][1]).max())
    ratio = times["dforge"][0] / times["diffusers"][0]
    print(f"(1) tiny SD pipeline, {steps} steps, {n} images, CFG 7.5, DPM-Solver++(2M) trailing, "
          f"{torch.get_num_threads()} threads")
    for name in ("diffusers", "dforge"):
        print(f"    {name:<10} {times[name][0] * 1000:8.2f} ms / image")
    print(f"    dforge / diffusers = {ratio:.3f}x (target <= 1.1x: {'met' if ratio <= 1.1 else 'NOT met'}); "
          f"max |image difference| = {diff:.2e}")
    return {"ratio": ratio, "diff": diff}


def optimised_grid(D, sampler: str, nfe: int, kw: dict, args):
    """sampling.grids.optimize_sigmas on the guided denoiser the samplers see (same prompt and scale), from
    ``--grid-n`` noise draws of seed 10_000 (not the benchmark's seeds 0..n-1)."""
    from diffusion_forge.interop.pipeline_sampling import _guided, pipeline_cond
    from diffusion_forge.sampling.grids import optimize_sigmas

    cond, null = pipeline_cond(D, args.grid_n, kw["prompt"], None, None)
    return optimize_sigmas(_guided(D, kw["guidance_scale"], null), sampler, nfe, shape=D.sample_shape,
                           n=args.grid_n, seed=10_000, cond=cond, teacher_steps=args.grid_teacher,
                           max_evals=args.grid_evals)


def part2(args) -> dict:
    from diffusion_forge.interop.pipeline_sampling import sample_ours, sample_scheduler, scheduler_from_name
    from diffusion_forge.interop.pipelines import load_pipeline

    folder = Path(args.pipeline) if args.pipeline else None
    tmp = None
    if folder is None:
        from diffusion_forge.interop.export import export_run

        tmp = tempfile.TemporaryDirectory()
        folder = export_run(args.run, Path(tmp.name) / "exported", samples=False)
    D = load_pipeline(folder)
    n, w, prompt = args.n, args.guidance, args.prompt
    ref_steps = 20 if args.quick else 500
    budgets = (2, 4) if args.quick else (10, 20, 50)
    kw = dict(prompt=prompt if D.text_encoder is not None else None, guidance_scale=w)
    refs = {"ancestral": sample_ours(D, n, sampler="euler_ancestral", steps=ref_steps, **kw),
            "ode": sample_ours(D, n, sampler="dpmpp_2m", steps=ref_steps, **kw)}
    rms = lambda x, ref: float((x - ref).pow(2).mean().sqrt())     # noqa: E731
    print(f"(2) {folder}: {D.pipeline_kind}, {n} images, CFG {w}, RMS distance to {ref_steps}-step references "
          "(ancestral | ODE)")
    best = {}
    for nfe in budgets:
        rows = []
        for name, per in OURS.items():
            steps = max(1, (nfe + 1) // 2) if per == 2 else nfe       # heun: 2n - 1 evaluations
            x = sample_ours(D, n, sampler=name, steps=steps, **kw)
            rows.append(("ours", name, rms(x, refs["ancestral"]), rms(x, refs["ode"])))
        for name in OPTIMISED if nfe == budgets[0] else ():          # a grid from the model's own outputs
            grid = optimised_grid(D, name, nfe, kw, args)
            x = sample_ours(D, n, sampler=name, steps=len(grid) - 1, sigmas=grid, **kw)
            rows.append(("ours", f"{name} (optimised grid)", rms(x, refs["ancestral"]), rms(x, refs["ode"])))
        for name, per in THEIRS.items():
            steps = max(1, (nfe + 1) // 2) if per == 2 else nfe
            try:
                extra = {"clip_sample": False, "set_alpha_to_one": True} if name == "DDIMScheduler" else {}
                sched = scheduler_from_name(D, name, timestep_spacing="trailing", **extra)
                x = sample_scheduler(D, sched, n, steps=steps, **kw)
            except Exception as e:                                   # a scheduler that rejects the config
                print(f"    {name}: skipped ({type(e).__name__}: {e})")
                continue
            rows.append(("diffusers", name, rms(x, refs["ancestral"]), rms(x, refs["ode"])))
        print(f"  NFE {nfe}:")
        for who, name, a, o in sorted(rows, key=lambda r: r[2]):
            print(f"    {who:<9} {name:<30} {a:.4f} | {o:.4f}")
        best[nfe] = {who: min(r[2] for r in rows if r[0] == who) for who in ("ours", "diffusers")}
    first = budgets[0]
    met = best[first]["ours"] < best[first]["diffusers"]
    print(f"  at {first} NFE: ours {best[first]['ours']:.4f} vs diffusers {best[first]['diffusers']:.4f} "
          f"(target: ours closer: {'met' if met else 'NOT met'})")
    if tmp is not None:
        tmp.cleanup()
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy size: 4 steps, 2 images, 2 repeats (part 2: NFE 2, 4)")
    p.add_argument("--run", help="a trained latent text run (exported, then loaded back) for part 2")
    p.add_argument("--pipeline", help="an exported / saved StableDiffusionPipeline folder for part 2")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompt", default="a photo")
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale of part 2")
    p.add_argument("--grid-n", type=int, default=32, help="noise draws for the optimised grids of part 2")
    p.add_argument("--grid-teacher", type=int, default=256, help="teacher steps of the optimised grids")
    p.add_argument("--grid-evals", type=int, default=120, help="sampler runs of the grids' coordinate search")
    args = p.parse_args()
    if args.quick:
        args.steps, args.n, args.repeats = 4, 2, 2
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    part1(args)
    if args.run or args.pipeline:
        part2(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
