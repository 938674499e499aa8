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
    RMS distance, in [-1, 1] pixels, to a 500-step ancestral reference (our euler_ancestral with Brownian-tree
    noise, the same seeds: sampling/brownian.py, one Brownian path per seed, so a stochastic sampler from that
    seed converges to it as its steps grow), as a second column to a 500-step DPM-Solver++(2M) ODE reference
    (deterministic samplers converge to the latter), and as a third to the same sampler's own 500-step run from
    the same seeds (for the ODE solvers: the ODE reference), the fair column for diffusers' own Brownian-tree
    scheduler (DPMSolverSDEScheduler, torchsde's tree, seeded by noise_sampler_seed), whose path is not ours.
    Stochastic rows: ours with Brownian noise (and fresh noise, for contrast) on the trailing and Karras grids;
    diffusers' EulerAncestral, SDE-DPM-Solver++ and DPMSolverSDE. Target: at 10 NFE our best sampler closer
    to the reference than diffusers' best scheduler.
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
# Stochastic rows: (label, sampler, NFE per step, keyword arguments of sample_ours)
OURS_SDE = [("euler_ancestral (brownian)", "euler_ancestral", 1, {"noise": "brownian"}),
            ("euler_ancestral (brownian, karras)", "euler_ancestral", 1, {"noise": "brownian", "sigmas": "karras"}),
            ("dpmpp_2m_sde (brownian)", "dpmpp_2m_sde", 1, {"noise": "brownian"}),
            ("dpmpp_2m_sde (brownian, karras)", "dpmpp_2m_sde", 1, {"noise": "brownian", "sigmas": "karras"}),
            ("euler_ancestral (fresh noise)", "euler_ancestral", 1, {})]
THEIRS = {"DPMSolverMultistepScheduler": 1, "UniPCMultistepScheduler": 1, "DEISMultistepScheduler": 1,
          "EulerDiscreteScheduler": 1, "DDIMScheduler": 1, "HeunDiscreteScheduler": 2}
# diffusers' stochastic schedulers: (label, class, NFE per step, config overrides). DPMSolverSDEScheduler is its
# Brownian-tree sampler (torchsde's BrownianInterval, one seed for the batch: noise_sampler_seed).
THEIRS_SDE = [("EulerAncestralDiscreteScheduler", "EulerAncestralDiscreteScheduler", 1, {}),
              ("DPMSolverMultistep sde-dpmsolver++", "DPMSolverMultistepScheduler", 1,
               {"algorithm_type": "sde-dpmsolver++"}),
              ("DPMSolverSDEScheduler (brownian)", "DPMSolverSDEScheduler", 2, {"noise_sampler_seed": 0}),
              ("DPMSolverSDEScheduler (brownian, karras)", "DPMSolverSDEScheduler", 2,
               {"noise_sampler_seed": 0, "use_karras_sigmas": True})]


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
    steps_of = lambda nfe, per: max(1, (nfe + 1) // 2) if per == 2 else nfe     # noqa: E731  heun: 2n - 1 NFE
    refs = {"ancestral": sample_ours(D, n, sampler="euler_ancestral", steps=ref_steps, noise="brownian", **kw),
            "ode": sample_ours(D, n, sampler="dpmpp_2m", steps=ref_steps, **kw)}
    rms = lambda x, ref: float((x - ref).pow(2).mean().sqrt())     # noqa: E731

    def ours_sde(sampler, nfe, per, extra):
        return sample_ours(D, n, sampler=sampler, steps=steps_of(nfe, per), **extra, **kw)

    def theirs(cls, nfe, per, overrides):
        extra = {"clip_sample": False, "set_alpha_to_one": True} if cls == "DDIMScheduler" else {}
        sched = scheduler_from_name(D, cls, timestep_spacing="trailing", **extra, **overrides)
        return sample_scheduler(D, sched, n, steps=steps_of(nfe, per), **kw)

    # each stochastic sampler's own long run from the same seeds: where it converges (if it does)
    own = {label: ours_sde(name, ref_steps, per, extra) for label, name, per, extra in OURS_SDE}
    for label, cls, per, overrides in THEIRS_SDE:
        try:
            own[label] = theirs(cls, ref_steps, per, overrides)
        except Exception as e:                                       # e.g. DPMSolverSDEScheduler without torchsde
            print(f"    {label}: skipped ({type(e).__name__}: {e})")
    print(f"(2) {folder}: {D.pipeline_kind}, {n} images, CFG {w}, RMS distance to {ref_steps}-step references "
          "(ancestral, Brownian noise | ODE | the same sampler's own long run)")
    best = {}
    for nfe in budgets:
        rows = []
        for name, per in OURS.items():
            x = sample_ours(D, n, sampler=name, steps=steps_of(nfe, per), **kw)
            rows.append(("ours", name, rms(x, refs["ancestral"]), rms(x, refs["ode"]), rms(x, refs["ode"])))
        for label, name, per, extra in OURS_SDE:
            x = ours_sde(name, nfe, per, extra)
            rows.append(("ours", label, rms(x, refs["ancestral"]), rms(x, refs["ode"]), rms(x, own[label])))
        for name in OPTIMISED if nfe == budgets[0] else ():          # a grid from the model's own outputs
            grid = optimised_grid(D, name, nfe, kw, args)
            x = sample_ours(D, n, sampler=name, steps=len(grid) - 1, sigmas=grid, **kw)
            o = rms(x, refs["ode"])
            rows.append(("ours", f"{name} (optimised grid)", rms(x, refs["ancestral"]), o, o))
        for label, cls, per, overrides in [(c, c, p, {}) for c, p in THEIRS.items()] + THEIRS_SDE:
            if label not in own and (label, cls, per, overrides) in THEIRS_SDE:
                continue
            try:
                x = theirs(cls, nfe, per, overrides)
            except Exception as e:                                   # a scheduler that rejects the config
                print(f"    {label}: skipped ({type(e).__name__}: {e})")
                continue
            o = rms(x, refs["ode"])
            rows.append(("diffusers", label, rms(x, refs["ancestral"]), o, rms(x, own[label]) if label in own else o))
        print(f"  NFE {nfe}:")
        for who, name, a, o, self_ in sorted(rows, key=lambda r: r[2]):
            print(f"    {who:<9} {name:<40} {a:.4f} | {o:.4f} | {self_:.4f}")
        sde = set(own)                                                # the stochastic rows, ours and theirs
        best[nfe] = {who: {"ancestral": min(r[2] for r in rows if r[0] == who),
                           "ode": min(r[3] for r in rows if r[0] == who and r[1] not in sde),
                           "self": min(r[4] for r in rows if r[0] == who and r[1] in sde)}
                     for who in ("ours", "diffusers")}
    first = budgets[0]
    for col, what in (("ancestral", "the Brownian ancestral reference (any sampler)"),
                      ("self", "each stochastic sampler's own long run"), ("ode", "the ODE reference (ODE solvers)")):
        o, t = best[first]["ours"][col], best[first]["diffusers"][col]
        verdict = "a tie" if abs(o - t) <= 1e-3 * t else ("ours closer" if o < t else "diffusers closer")
        print(f"  at {first} NFE, distance to {what}: ours {o:.4f} vs diffusers {t:.4f} ({verdict})")
    o, t = best[first]["ours"]["ancestral"], best[first]["diffusers"]["ancestral"]
    print(f"  target (at {first} NFE our best closer to the ancestral reference than diffusers' best): "
          f"{'met' if o < t and abs(o - t) > 1e-3 * t else 'NOT met'}")
    if tmp is not None:
        tmp.cleanup()
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy size: 4 steps, 2 images, 2 repeats (part 2: NFE 2, 4)")
    p.add_argument("--run", help="a trained latent text run (exported, then loaded back) for part 2")
    p.add_argument("--pipeline", help="an exported / saved StableDiffusionPipeline folder for part 2")
    p.add_argument("--skip-part1", action="store_true", help="part 2 only (e.g. beside another job: part 1 is timed)")
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
    if not args.skip_part1:
        part1(args)
    if args.run or args.pipeline:
        part2(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
