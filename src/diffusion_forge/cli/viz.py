"""`dforge viz`: the pictures that teach (schedules, the forward process, trajectories, samplers)."""
from __future__ import annotations

from pathlib import Path

from ..io.files import PLOT_SUFFIXES
from . import HelpFormatter, UserError, add_force
from .guidance_args import CONVENTION, add_guidance_args, check_args, guided_denoiser, has_null, with_scale

OUT_HELP = f"output picture ({', '.join(PLOT_SUFFIXES)})"
EXAMPLES = """examples:
  dforge viz schedule --out schedules.png                     alpha_bar, SNR, log-SNR of every schedule
  dforge viz forward --data mnist --out forward.png           a digit at increasing t, per schedule
  dforge viz forward --data moons --out forward-2d.png        a 2-D distribution turning into a Gaussian
  dforge viz trajectory runs/mnist --out trajectory.png       x_t and the predicted x_0 along one sampling run
  dforge viz samplers runs/mnist --out samplers.png --samplers euler,heun,dpmpp_2m --step-counts 5,10,20
  dforge viz guidance runs/mnist-cond --scales 0,1,2,3,5 --n 8 --out guidance.png   a row per CFG scale w
  dforge viz guidance runs/mnist --classifier cls/ --scales 0,1,3 --out cg.png     classifier guidance scale s
  dforge viz latent runs/mnist-latent --out latent.png       an image, its latents, the step cost per space
Pictures: .png, .jpg or .svg (the suffix picks the format). An existing file is refused unless --force.
"""


def register(sub) -> None:
    p = sub.add_parser("viz", help="pictures: schedules, forward process, trajectories, samplers, guidance",
                       description="Draw the pictures that explain diffusion: noise schedules, data turning into "
                                   "noise, the reverse trajectory of a trained run, and samplers side by side.",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)

    s = what.add_parser("schedule", help="alpha_bar, SNR and log-SNR of every named schedule (and zero-terminal-SNR)",
                        formatter_class=HelpFormatter)
    s.add_argument("--num-timesteps", type=int, default=1000, help="T of every schedule")
    s.add_argument("--out", default="schedules.png", help=OUT_HELP)
    add_force(s)

    f = what.add_parser("forward", help="data turning into noise (images: a strip per schedule; 2-D: scatter)",
                        formatter_class=HelpFormatter)
    f.add_argument("--data", default="mnist", help="bundled name, image folder or hf:NAME; 2-D toys: moons, ...")
    f.add_argument("--index", type=int, default=0, help="which image of the data set (test split when there is one)")
    f.add_argument("--schedule", default="cosine", help="schedule for 2-D data")
    f.add_argument("--seed", type=int, default=0, help="seed of the noise")
    f.add_argument("--out", default="forward.png", help=OUT_HELP)
    add_force(f)

    for name, helptext in [("trajectory", "x_t and the predicted x_0 along one sampling run of a trained run"),
                           ("samplers", "a grid of samplers x step counts, same seeds in every cell")]:
        r = what.add_parser(name, help=helptext, formatter_class=HelpFormatter)
        r.add_argument("run", help="a run folder of `dforge train`")
        r.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
        r.add_argument("--no-ema", action="store_true", help="use the trained weights, not their EMA")
        r.add_argument("--out", default=f"{name}.png", help=OUT_HELP)
        add_force(r)
        if name == "trajectory":
            r.add_argument("--sampler", default="dpmpp_2m", help="sampler")
            r.add_argument("--steps", type=int, default=20, help="sampler steps")
            r.add_argument("--frames", type=int, default=8, help="steps shown")
        else:
            r.add_argument("--samplers", default="euler,heun,ddim,dpmpp_2m,unipc", help="comma-separated samplers")
            r.add_argument("--step-counts", default="5,10,20", help="comma-separated step counts")
            r.add_argument("--n", type=int, default=4, help="samples per cell (2-D data: points per cell)")
        r.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                       help="text runs (conditioning.kind=text): what to draw, repeatable: sample i gets prompt i "
                            "mod P (default: the run's grid prompts); shown conditionally (w = 1), as class runs")

    gd = what.add_parser("guidance", help="the same seeds at increasing guidance scale, one row per scale",
                         description=f"One row per scale, the same seeds (and classes i mod K) along every row. "
                                     f"{CONVENTION}.", formatter_class=HelpFormatter)
    gd.add_argument("run", help="a run folder of `dforge train`")
    gd.add_argument("--scales", default="0,1,2,3,5", help="comma-separated scales, one row each (distinct, >= 0)")
    gd.add_argument("--n", type=int, default=8, help="samples per row (2-D data: points per panel)")
    gd.add_argument("--seed", type=int, default=0, help="sample i uses seed + i, in every row")
    gd.add_argument("--sampler", default=None, help="sampler (default: the run's own, its config sample.sampler; "
                                                    "auto: the most accurate one for --steps)")
    gd.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's sample.steps)")
    gd.add_argument("--sampler-options", metavar="KEY=VALUE,...", help="options of the sampler, e.g. eta=0.5")
    gd.add_argument("--batch-size", type=int, default=256, help="samples per network call")
    gd.add_argument("--no-ema", action="store_true", help="use the trained weights, not their EMA")
    gd.add_argument("--out", default="guidance.png", help=OUT_HELP + "; a grid of images: .png or .jpg")
    add_force(gd)
    add_guidance_args(gd, vary=True)

    la = what.add_parser("latent", help="a latent run: an image, its latent channels, its reconstruction, and the "
                                        "cost of a training step in pixel and in latent space",
                         formatter_class=HelpFormatter)
    la.add_argument("run", help="a latent run folder (dforge train --latent VAE)")
    la.add_argument("--index", type=int, default=0, help="which image (test split when there is one)")
    la.add_argument("--batch", type=int, default=32, help="batch of the timed training steps")
    la.add_argument("--repeats", type=int, default=3, help="timed steps per space (the median is shown)")
    la.add_argument("--out", default="latent.png", help=OUT_HELP)
    add_force(la)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..io.files import check_output

    check_output(args.out, PLOT_SUFFIXES, force=args.force)      # before any work
    return {"schedule": _schedule, "forward": _forward, "trajectory": _trajectory, "samplers": _samplers,
            "guidance": _guidance, "latent": _latent}[args.what](args)


def _schedule(args) -> int:
    from ..viz import default_schedules, plot_schedules

    curves = plot_schedules(args.out, default_schedules(args.num_timesteps))
    print(f"wrote {args.out} ({len(curves)} schedules, T = {args.num_timesteps})")
    return 0


def _forward(args) -> int:
    import torch

    from ..core.schedules import NoiseSchedule
    from ..data import BUNDLED, TOY_SETS, load_dataset
    from ..viz import plot_forward_2d, plot_forward_strip

    name = str(args.data).lower()
    if name in TOY_SETS:
        ds = load_dataset(name, split="train")
        plot_forward_2d(args.out, ds.data[:2000].numpy(), NoiseSchedule.from_name(args.schedule, 1000), seed=args.seed,
                        title=f"The forward process on {name}: the distribution turns into a Gaussian ({args.schedule})")
    else:
        ds = load_dataset(args.data, split="test" if name in BUNDLED else "train")
        if not 0 <= args.index < len(ds):
            raise UserError(f"--index must lie in [0, {len(ds) - 1}]")
        image, _ = ds[args.index]
        plot_forward_strip(args.out, torch.as_tensor(image), seed=args.seed)
    print(f"wrote {args.out}")
    return 0


def _load(args):
    from ..io.checkpoint import load_model_from_run

    return load_model_from_run(args.run, use_ema=not args.no_ema)


def _run_cond(args, trained, n: int) -> dict | None:
    """A conditional run is shown conditionally (w = 1): on a class run sample i gets class i mod K, on a text
    run prompt i mod P (--prompt, default: the run's grid prompts)."""
    import torch

    from .sample import text_prompts

    prompts = text_prompts(args, trained, n)                  # --prompt on another run: UserError
    if prompts is not None:
        from ..models.text import prompt_cond

        return prompt_cond(trained, prompts)[0]
    k = int(getattr(trained, "num_classes", 0) or 0)
    return {"class_labels": torch.arange(n) % k} if k else None


def _trajectory(args) -> int:
    from ..viz import plot_trajectory, record_trajectory
    from .sample import check_samplers

    check_samplers([args.sampler], auto=False)
    if args.steps < 1 or args.frames < 1:
        raise UserError("--steps and --frames must be >= 1")
    trained = _load(args)
    n = 1 if len(trained.sample_shape) > 1 else 1000
    traj = record_trajectory(trained, shape=(n, *trained.sample_shape), sampler=args.sampler, steps=args.steps,
                             seed=args.seed, cond=_run_cond(args, trained, n))
    plot_trajectory(args.out, traj, frames=args.frames)
    print(f"wrote {args.out} ({args.sampler}, {args.steps} steps, seed {args.seed})")
    return 0


def _samplers(args) -> int:
    from ..viz import plot_sampler_grid, sampler_grid
    from .sample import check_samplers

    names = [s.strip() for s in args.samplers.split(",") if s.strip()]
    if not names:
        raise UserError("--samplers names no sampler")
    check_samplers(names, auto=False)              # every name, before any sampling
    try:
        counts = [int(s) for s in args.step_counts.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--step-counts must be comma-separated integers, got {args.step_counts!r}") from None
    if not counts or min(counts) < 1 or args.n < 1:
        raise UserError("--step-counts must name step counts >= 1, and --n must be >= 1")
    trained = _load(args)
    n = args.n if len(trained.sample_shape) > 1 else max(args.n, 500)
    grid = sampler_grid(trained, shape=(n, *trained.sample_shape), samplers=names, steps=counts, seed=args.seed,
                        cond=_run_cond(args, trained, n))
    plot_sampler_grid(args.out, grid)
    print(f"wrote {args.out} ({len(names)} samplers x {len(counts)} step counts, seeds {args.seed}..{args.seed + n - 1})")
    return 0


SCALE_FLAGS = {"cfg": ("guidance_scale", "--guidance-scale", "w"),
               "classifier": ("classifier_scale", "--classifier-scale", "s"),
               "autoguidance": ("autoguidance_scale", "--autoguidance-scale", "s")}
KIND_NAMES = {"cfg": "classifier-free guidance", "classifier": "classifier guidance", "autoguidance": "autoguidance"}


def _scales(text: str) -> list[float]:
    import math

    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        scales = []
    if not scales or any(not math.isfinite(s) or s < 0 for s in scales) or len(set(scales)) != len(scales):
        raise UserError(f"--scales takes distinct comma-separated numbers >= 0 (e.g. 0,1,2,3,5), got {text!r}")
    return scales


def _vary(args, trained) -> str:
    """The kind of guidance --scales sets: --vary, or auto: cfg on class-conditional runs, else classifier
    guidance with --classifier, else autoguidance with --autoguidance / --guide-with."""
    if args.vary != "auto":
        return args.vary
    if trained.num_classes and has_null(trained):
        return "cfg"
    if args.classifier:
        return "classifier"
    if args.autoguidance is not None or args.guide_with:
        return "autoguidance"
    if trained.num_classes:
        raise UserError(f"{args.run} has no null class (trained with conditioning.dropout=0), so classifier-free "
                        "guidance cannot vary: add --classifier CLS or --autoguidance, or train with "
                        "conditioning.dropout > 0")
    raise UserError(f"{args.run} is unconditional: vary classifier guidance (--classifier CLS, from dforge "
                    "train-classifier --like RUN) or autoguidance (--autoguidance [STEP] or --guide-with RUN2)")


def _guidance(args) -> int:
    import time

    from ..viz import guidance_samples, plot_guidance, sample_suffixes
    from .sample import parse_options, run_settings

    scales = _scales(args.scales)
    if args.n < 1 or (args.steps is not None and args.steps < 1) or args.batch_size < 1:
        raise UserError("--n, --steps and --batch-size must be >= 1")
    check_args(args)
    options = parse_options(args.sampler_options)
    trained = _load(args)
    if Path(args.out).suffix.lower() not in sample_suffixes(trained.sample_shape):
        raise UserError(f"{args.out}: a grid of images is written as .png or .jpg")
    kind = _vary(args, trained)
    attr, flag, symbol = SCALE_FLAGS[kind]
    if getattr(args, attr) is not None:
        raise UserError(f"--scales sets {flag} here ({KIND_NAMES[kind]}): leave {flag} off")
    sampler, steps, options = run_settings(trained, args.sampler, args.steps, options)
    cache: dict = {}     # the classifier and the guiding model load once
    built = {s: guided_denoiser(with_scale(args, kind, s), trained, cache) for s in scales}   # every check first
    _, classes, info = built[scales[0]]
    n = args.n if len(trained.sample_shape) > 1 else max(args.n, 500)
    labels = classes.labels(n)
    start = time.time()
    samples = guidance_samples({s: d for s, (d, _, _) in built.items()}, n, seed=args.seed, cond=classes.cond(n),
                               sampler=sampler, steps=steps, sampler_options=options, batch_size=args.batch_size,
                               progress=True)
    seconds = time.time() - start
    varied = {"cfg": ("CFG", "conditional model"), "classifier": ("classifier guidance",),
              "autoguidance": ("autoguidance",)}[kind]   # the parts of the description --scales replaces
    others = [part for part in info["text"].split("; ")[1:] if not part.startswith(varied)]
    unit = "row" if len(trained.sample_shape) == 3 else "panel"
    title = (f"{Path(args.run).resolve().name}: {KIND_NAMES[kind]} at increasing {symbol}, the same seeds in every "
             f"{unit} ({sampler}, {steps} steps{''.join('; ' + p for p in others)})")
    layout = plot_guidance(args.out, samples, labels=None if labels is None else [f"class {int(y)}" for y in labels],
                           title=title, symbol=symbol)
    rows = f"{layout['rows']} {'rows' if layout['kind'] == 'image' else 'panels'}"
    print(f"wrote {args.out} ({rows}, {KIND_NAMES[kind]} {symbol} = "
          f"{', '.join(f'{s:g}' for s in scales)}; {n} samples each, seeds {args.seed}..{args.seed + n - 1}, "
          f"{classes.text}; {sampler}, {steps} steps; {seconds:.1f} s)")
    return 0


def _latent(args) -> int:
    from ..data import load_dataset
    from ..viz.latent import plot_latent, step_costs

    if args.batch < 1 or args.repeats < 1:
        raise UserError("--batch and --repeats must be >= 1")
    trained = load_model_from_run_or_fail(args.run)
    d = trained.config["data"]
    ds = load_dataset(d["source"], image_size=d["image_size"], channels=d["channels"],
                      split="test" if str(d["source"]).lower() in ("mnist", "digits") else "train")
    if not 0 <= args.index < len(ds):
        raise UserError(f"--index must lie in [0, {len(ds) - 1}]")
    costs = step_costs(trained, batch=args.batch, repeats=args.repeats)
    shown = plot_latent(args.out, ds[args.index][0], trained.vae, costs,
                        title=f"{Path(args.run).resolve().name}: image {args.index} of {d['source']} in the latent "
                              f"space of its VAE")
    print(f"wrote {args.out} (latent {'x'.join(map(str, trained.sample_shape))}, reconstruction PSNR "
          f"{shown['psnr']:.1f} dB; a training step of batch {args.batch}: {costs['pixel']['seconds'] * 1000:.0f} ms "
          f"in pixel space, {costs['latent']['seconds'] * 1000:.0f} ms in latent space)")
    return 0


def load_model_from_run_or_fail(run):
    """The run's Denoiser; a pixel-space run: one line saying that `viz latent` needs a latent run."""
    from ..io.checkpoint import load_model_from_run

    trained = load_model_from_run(run)
    if getattr(trained, "vae", None) is None:
        raise UserError(f"{run} trains in pixel space (no data.latent); `dforge viz latent` shows a latent run: "
                        "train one with dforge train --latent VAE")
    return trained
