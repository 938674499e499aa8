"""`dforge sample`: draw samples from a trained run folder into a picture or an .npz file.

Also what the other sampling commands share (eval, viz): the sampler settings of a run, checked before
any sampling work, and the sample file's layout.
"""
from __future__ import annotations

from ..io.files import IMAGE_SUFFIXES, PLOT_SUFFIXES
from . import HelpFormatter, UserError, add_force
from .guidance_args import CONVENTION, _run_name, add_guidance_args, check_args, follows_data, guided_denoiser, with_run_defaults

# --precision's default: bf16 autocast where the hardware has it. benchmarks/throughput.py --fd measured it on the
# default recipe: FD-Digits@1k 25.51 -> 25.78, less than a new draw of seeds moves it (docs/performance.md).
DEFAULT_PRECISION = "auto"
PRECISION_HELP = ("the network's forward: no (float32), bf16 (autocast), fp16 (autocast, CUDA only) or auto (bf16 "
                  "where the hardware has it, else float32); the sampler's own arithmetic stays float64")
SIGMAS_HELP = "default (the model's own sigmas at the --spacing timesteps), karras or exponential"
SPACING_HELP = "trailing (starts at pure noise for every step count), leading or linspace; for --sigmas default"
EXAMPLES = f"""examples:
  dforge sample runs/mnist --out samples.png                          the run's own sampler and settings
  dforge sample runs/mnist-cond --class 7 --guidance-scale 3 --out sevens.png
  dforge sample runs/mnist-cond --class all --out grid.png            a row per class, the run's recommended w
  dforge sample runs/mnist-cond --class data --n 1000 --out x.npz      like the data: y ~ p(c), then x ~ p(x | y)
  dforge sample runs/mnist --classifier cls/ --class 3 --classifier-scale 2 --out threes.npz
  dforge sample runs/mnist --autoguidance --autoguidance-scale 2      guided by the run's kept early snapshot
  dforge sample runs/mnist-text --prompt "a handwritten three" --prompt "the digit 8" --guidance-scale 4 --n 16
  dforge sample runs/mnist-text --prompt "a seven" --negative-prompt "a one" --out sevens.npz
Guidance convention: {CONVENTION}.
"""


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample a trained run folder into a picture or an .npz file",
                       description="Load a run folder written by `dforge train` (its newest checkpoint, EMA weights "
                                   "by default) and sample it. Image i uses the seed SEED + i, so an image depends "
                                   "on its seed only, not on --n or --batch-size.",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("run", help="run folder written by `dforge train`")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--sampler", default=None,
                   help="sampler name (euler, euler_ancestral, ddim, dpmpp_2m, dpmpp_2m_sde, unipc, ...; `auto`: the "
                        "registry's default for --steps network evaluations, chosen on trained networks); default: "
                        "the run's own (its config sample.sampler, sample.options)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's sample.steps)")
    p.add_argument("--sampler-options", metavar="KEY=VALUE,...", default=None,
                   help="options of the sampler, e.g. eta=0.5,s_noise=1.0 (each sampler's own; checked before "
                        "sampling); added to the run's own when --sampler is not given")
    p.add_argument("--eta", type=float, default=None,
                   help="noise of the ancestral / SDE samplers (short for --sampler-options eta=X; 1: DDPM-like; "
                        "above 1 more fresh noise each step)")
    p.add_argument("--sigmas", default="default", help=f"the sigma grid: {SIGMAS_HELP}")
    p.add_argument("--spacing", default="trailing", help=f"timestep spacing: {SPACING_HELP}")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed + i")
    p.add_argument("--noise", choices=("independent", "brownian"), default="independent",
                   help="fresh noise of stochastic samplers: independent (a new draw every step, as diffusers) or "
                        "brownian (one Brownian path per seed: a seed gives nearly the same image at 10 and at 100 "
                        "steps; the same distribution of samples)")
    p.add_argument("--out", default="samples.png",
                   help=f"output file: a picture ({', '.join(IMAGE_SUFFIXES)}: a titled grid of images; vector data: "
                        "a scatter plot, .svg too) or .npz (key `images`: uint8 N x H x W x C; vector data: "
                        "`samples`, float32; plus `labels`, int64 N, when classes are drawn; `prompts`, str N, on "
                        "text runs)")
    add_force(p)
    p.add_argument("--raw-grid", action="store_true", help="a plain grid of tiles, no title or margins")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights instead of their EMA")
    p.add_argument("--step", type=int, default=None, help="use the checkpoint of this step (default: newest)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per network call")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: auto, a GPU when there is one)")
    p.add_argument("--precision", default=DEFAULT_PRECISION, help=PRECISION_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    t = p.add_argument_group("text prompts (runs trained with conditioning.kind=text)")
    t.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="what to draw; repeat it for several prompts: sample i gets prompt i mod P, the grid one "
                        "row per prompt, labelled (default: the run's grid prompts; \"\" is the unconditional "
                        "model)")
    t.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="the unguided branch of classifier-free guidance for every sample, in place of the empty "
                        "prompt: pred = pred(negative) + w (pred(prompt) - pred(negative)); needs --guidance-scale "
                        "other than 1 (or the run's recommended scale)")
    add_guidance_args(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Shared by the sampling commands

def parse_options(text: str | None, flag: str = "--sampler-options") -> dict:
    """``"eta=0.5,order=3,variant=bh1,afs=true"`` -> {"eta": 0.5, "order": 3, "variant": "bh1", "afs": True}."""
    options = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} takes KEY=VALUE[,KEY=VALUE...], got {item.strip()!r}")
        options[key.strip()] = _scalar(value.strip())
    return options


def _scalar(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_samplers(names, auto: bool = True) -> None:
    """Every sampler name known (None: chosen by budget), before any work is done."""
    from ..sampling.registry import SAMPLERS as known

    bad = [n for n in names if n is not None and n not in known]
    if bad:
        raise UserError(f"unknown sampler{'s' * (len(bad) > 1)} {', '.join(map(repr, bad))}; choose from: "
                        f"{', '.join(known)}{' (or auto)' * auto}")


def resolve(sampler: str | None, steps: int, options: dict, samples: str = "unconditional") -> tuple[str, int, dict]:
    """(sampler, steps, options) as sampling will use them; a wrong option name or type is refused here,
    before any sampling work (None: the toolkit's rule picks the sampler for a budget of ``steps`` and what the
    ``samples`` are, as sampling.registry.resolve_sampler)."""
    from ..sampling.registry import SAMPLERS, resolve_sampler

    check_samplers([sampler])
    sampler, steps, options = resolve_sampler(sampler, steps, dict(options), samples)
    defaults = SAMPLERS[sampler].options
    for key, value in options.items():
        if key not in defaults:
            raise UserError(f"sampler {sampler!r} takes no option {key!r}; its options: "
                            f"{', '.join(f'{k} (default {v!r})' for k, v in defaults.items()) or 'none'}")
        if not _same_kind(value, defaults[key]):
            raise UserError(f"sampler option {key}={value!r} of {sampler!r} must be a "
                            f"{type(defaults[key]).__name__} (default {defaults[key]!r})")
    return sampler, steps, dict(options)


def _same_kind(value, default) -> bool:
    """bool for a bool option, int for an int, a number for a float, the same type otherwise."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return type(value) is type(default)


def run_settings(trained, sampler: str | None, steps: int | None, options: dict,
                 like_data: bool = False) -> tuple[str, int, dict]:
    """The sampler settings of a command: the run's own (config sample.*) unless named; ``auto``: by budget.
    Left to the rule, a conditional run's samples take its sampler for samples with a condition, except with
    ``like_data`` (``--class data`` unguided: they follow p(x)), which take the rule of such samples
    (sampling.registry.DATA_CLASS_SAMPLERS)."""
    own = trained.config["sample"]
    if sampler is None:
        sampler, options = own["sampler"], {**(own.get("options") or {}), **options}
    elif sampler == "auto":
        sampler = None
    samples = ("data" if like_data else
               "unconditional" if trained.config["conditioning"]["kind"] == "none" else "conditional")
    return resolve(sampler, steps or own["steps"], options, samples)


def check_precision(precision: str, device) -> str:
    """``--precision`` checked for ``device`` before any work (UserError naming the choices); returns what it
    means there: "bf16", "fp16" or "no"."""
    import torch

    from ..sampling.api import sampling_autocast_dtype

    try:
        dtype = sampling_autocast_dtype(precision, device)
    except ValueError as e:
        raise UserError(f"--precision: {e}") from None
    return {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def check_grid(sigmas: str, spacing: str) -> None:
    from ..core.schedules import SIGMA_GRIDS, SPACINGS

    if sigmas not in SIGMA_GRIDS:
        raise UserError(f"unknown --sigmas {sigmas!r}; choose one of: {', '.join(SIGMA_GRIDS)}")
    if spacing not in SPACINGS:
        raise UserError(f"unknown --spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")


def npz_arrays(x) -> dict:
    """What a sample file holds: ``images`` uint8 N x H x W x C; ``signals`` float32 N x C x L; else ``samples``."""
    import numpy as np

    if x.ndim == 4:
        from ..data import to_uint8

        return {"images": to_uint8(x)}
    return {"signals" if x.ndim == 3 else "samples": x.numpy().astype(np.float32)}


def write_npz(path, arrays: dict) -> None:
    import io

    import numpy as np

    from ..io.files import atomic_write_bytes

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------

def run(args) -> int:
    import time
    from pathlib import Path

    from ..io.files import check_output

    out = Path(args.out)
    if args.n < 1 or (args.steps is not None and args.steps < 1) or args.batch_size < 1:
        raise UserError("--n, --steps and --batch-size must be >= 1")
    options = parse_options(args.sampler_options)
    if args.eta is not None:
        options["eta"] = args.eta
    check_output(out, (".npz", *PLOT_SUFFIXES), force=args.force)        # before any work
    if args.sampler not in (None, "auto"):
        check_samplers([args.sampler])
    check_grid(args.sigmas, args.spacing)
    check_args(args)                                                      # the guidance flags' forms

    from ..device import resolve_device
    from ..io.checkpoint import load_model_from_run
    from ..sampling.generate import generate
    from ..viz import sample_suffixes, save_samples

    device = resolve_device(args.device)
    precision = check_precision(args.precision, device)
    trained = load_model_from_run(args.run, use_ema=not args.no_ema, step=args.step, device=device)
    args = with_run_defaults(args, trained)                   # a cluster run: --class data
    images = len(trained.sample_shape) == 3
    if out.suffix.lower() not in (".npz", *sample_suffixes(trained.sample_shape)):
        raise UserError(f"{out}: a grid of images is written as {', '.join(IMAGE_SUFFIXES)} (or .npz); "
                        f"{out.suffix} is for plots of vector data")
    if args.raw_grid and not images:
        raise UserError(f"--raw-grid draws a plain grid of images; this run's samples have shape "
                        f"{tuple(trained.sample_shape)}: leave it off")
    sampler, steps, options = run_settings(trained, args.sampler, args.steps, options, follows_data(args))
    prompts = text_prompts(args, trained)                                 # None: not a text run
    denoiser, classes, guidance = guided_denoiser(args, trained)          # every check before any sampling
    if args.negative_prompt is not None and (guidance.get("cfg") or {}).get("scale", 1) == 1:
        raise UserError("--negative-prompt replaces the empty prompt of classifier-free guidance, and none runs here "
                        "(w = 1): add --guidance-scale W (e.g. 4)")
    labels = classes.labels(args.n)
    cond = classes.cond(args.n)
    if prompts is not None:
        cond = prompt_guidance(trained, prompts, guidance, args.negative_prompt)
    start = time.time()
    x = generate(denoiser, args.n, seed=args.seed, sampler=sampler, steps=steps, sampler_options=options,
                 cond=cond, batch_size=args.batch_size, device=device, sigmas=args.sigmas,
                 spacing=args.spacing, progress=not args.no_progress, precision=precision, noise=args.noise)
    seconds = time.time() - start
    if out.suffix.lower() == ".npz":
        arrays = npz_arrays(x)
        if labels is not None:
            arrays["labels"] = labels.numpy().astype("int64")             # the class of each sample
        if prompts is not None:
            import numpy as np

            arrays["prompts"] = np.array(prompts, dtype=str)             # the prompt of each sample
        write_npz(out, arrays)
    else:
        what = "" if classes.spec in (None, "all") else f", class {classes.spec}"
        brownian = ", Brownian noise" if args.noise == "brownian" else ""
        title = (f"{Path(args.run).resolve().name}: step {trained.step}, {sampler} {steps} steps{brownian}{what}"
                 f"{guidance_title(guidance)}, seeds {args.seed}..{args.seed + args.n - 1}")
        rows = classes.row_labels(args.n) if prompts is None else [repr(p) for p in prompts]
        save_samples(x, out, title=title, raw=args.raw_grid, row_labels=rows)
    weights = "trained" if args.no_ema else "EMA"
    print(f"wrote {args.n} samples of {args.run} (step {trained.step}, {weights} weights, {sampler}"
          f"{' ' + str(options) if options else ''}, {steps} steps"
          f"{', Brownian noise' if args.noise == 'brownian' else ''}; {guidance['text']}; "
          f"{'float32' if precision == 'no' else precision + ' autocast'}; {seconds:.1f} s) to {out}")
    return 0


def text_prompts(args, trained, n: int | None = None) -> list[str] | None:
    """The prompt of each of the ``n`` (default args.n) samples of a text run (prompt i mod P; default: the
    run's grid prompts), None for other runs; --prompt / --negative-prompt on a run without text conditioning:
    UserError. A negative prompt becomes the run's null condition for this command (the unguided branch of
    CFG). Shared by sample, eval and viz."""
    given, negative = getattr(args, "prompt", None), getattr(args, "negative_prompt", None)
    n = args.n if n is None else n
    te = getattr(trained, "text_encoder", None)
    if te is None:
        if given is not None or negative is not None:
            kind = (getattr(trained, "config", None) or {}).get("conditioning", {}).get("kind", "none")
            flag = "--prompt" if given is not None else "--negative-prompt"
            hint = "--class N" if kind == "class" else "no prompt"
            raise UserError(f"{flag} needs a text-conditional run, and {_run_name(args)} was trained with "
                            f"conditioning.kind={kind}: sample it with {hint}, or train one on captions with "
                            "dforge train --conditioning text")
        return None
    chosen = list(given) if given else list(getattr(trained, "prompts", None) or [""])
    if negative is not None:
        trained.null_cond = {"encoder_hidden_states": te.encode([negative])[0]}
    return [chosen[i % len(chosen)] for i in range(n)]


def prompt_guidance(trained, prompts: list[str], guidance: dict, negative: str | None = None) -> dict:
    """The cond of a text run's per-sample ``prompts`` (``models.text.prompt_cond``); ``guidance``'s summary
    line (from ``guided_denoiser``) is rewritten to name the prompts instead of "unconditional"."""
    from ..models.text import prompt_cond

    cond = prompt_cond(trained, prompts)[0]
    neg = "" if negative is None else f", negative prompt {negative!r}"
    rest = guidance["text"].removeprefix("unconditional; ")          # classes: none on a text run
    guidance["text"] = f"prompts {list(dict.fromkeys(prompts))!r}{neg}; {rest}"
    return cond


def guidance_title(guidance: dict) -> str:
    """The guidance part of a picture's title: ", CFG w = 3, classifier s = 1" (empty when none runs)."""
    parts = []
    if guidance.get("autoguidance"):
        parts.append(f"autoguidance s = {guidance['autoguidance']['scale']:g}")
    if guidance.get("cfg") and guidance["cfg"]["scale"] != 1:
        parts.append(f"CFG w = {guidance['cfg']['scale']:g}")
    if guidance.get("classifier"):
        parts.append(f"classifier s = {guidance['classifier']['scale']:g}")
    return "".join(f", {p}" for p in parts)
