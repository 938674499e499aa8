"""The conditioning and guidance options of `dforge sample`, `dforge eval RUN` and `dforge viz guidance`, and
the one function that turns them into a guided denoiser (:func:`guided_denoiser`): no command builds its own.

Classifier-free guidance (Ho & Salimans 2022) on the network's own prediction (eps, v or x0):

    pred = pred_uncond + w (pred_cond - pred_uncond)        w = 1: the conditional model, w = 0: the unconditional one

Composition, innermost first (every wrapper is a denoiser over a denoiser, ``denoise/guidance.py``):

    D1 = AutoGuidance(D, D_weak, s_ag)          x0 = x0_weak + s_ag (x0_main - x0_weak)       (Karras et al. 2024)
    D2 = ClassifierFreeGuidance(D1, w, ...)     the line above, both branches in one batched call
    D3 = ClassifierGuidance(D2, classifier, s)  x0 += s sigma^2 grad_x log p(y | x)           (Dhariwal & Nichol 2021)

Parsing and the checks that need no torch run first (:func:`check_args`), so a bad flag fails before any
loading; the checks that need the run (class range, null condition, classifier fit, snapshot) run in
:func:`guided_denoiser`, before any sampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import UserError

CONVENTION = ("pred = pred_uncond + w (pred_cond - pred_uncond): w = 1 is the conditional model, w = 0 the "
              "unconditional one, w > 1 steers harder towards the class")
AUTOGUIDANCE_SCALE = 2.0          # Karras et al. 2024 report their best FIDs at 2.0-2.5; here: conditional runs
UNCONDITIONAL_AUTOGUIDANCE_SCALE = 1.3   # unconditional runs (docs/training.md, "Autoguidance of the 10-minute model")
CLASSIFIER_SCALE = 1.0            # s = 1: p(x | y) proportional to p(x) p(y | x), if the classifier were exact
SNAPSHOT = "snapshot"             # --autoguidance without a STEP
DROPOUT_FIX = "train with conditioning.dropout > 0 (e.g. --set conditioning.dropout=0.1)"
CONFIG_KEYS = ("Training keys: conditioning.kind=class (--conditioning class), conditioning.dropout (the label "
               "dropout that trains the null class), run.guide_snapshot_step (the snapshot --autoguidance uses), "
               "sample.guidance_scale (the recommended w, used when --guidance-scale is not given)")


def add_guidance_args(parser, vary: bool = False) -> None:
    """The shared options, in their own help group. ``vary``: `dforge viz guidance`, whose --scales sets the
    scale of one kind of guidance (that kind's scale flag is then refused)."""
    g = parser.add_argument_group("conditioning and guidance", f"{CONVENTION}. Composed as AutoGuidance, then "
                                  f"classifier-free guidance, then classifier guidance. {CONFIG_KEYS}.")
    g.add_argument("--class", dest="class_", metavar="N|all|data", default=None,
                   help="the class to draw (0..K-1); all: sample i gets class i mod K (balanced; grids get one "
                        "row per class); data: each sample's class drawn from the training set's class shares p(c) "
                        "(recorded by the run), with no guidance unless --guidance-scale is given, so the samples "
                        "follow the data, p(x) = sum_c p(c) p(x | c). Needs a class-conditional run or --classifier "
                        "(default: all on those, none on unconditional runs)")
    g.add_argument("--guidance-scale", type=float, metavar="W", default=None,
                   help=f"classifier-free guidance scale w: {CONVENTION} (default: the run's sample.guidance_scale "
                        "on class-conditional runs; none on unconditional runs)")
    g.add_argument("--guidance-rescale", type=float, metavar="R", default=None,
                   help="guidance rescale (Lin et al. 2023, as diffusers): the guided prediction's std rescaled to "
                        "the conditional one's, mixed in by R in [0, 1] (default: 0, plain guidance)")
    g.add_argument("--guidance-interval", metavar="LO,HI", default=None,
                   help="guide only while sigma lies in [LO, HI] (Kynkaanniemi et al. 2024); outside it the "
                        "conditional prediction (default: every step)")
    g.add_argument("--classifier", metavar="CLS", default=None,
                   help="classifier guidance with a noise-aware classifier folder (dforge train-classifier --like "
                        "RUN); works on unconditional runs too")
    g.add_argument("--classifier-scale", type=float, metavar="S", default=None,
                   help=f"classifier guidance scale: adds S grad log p(y | x_t) to the score (default: "
                        f"{CLASSIFIER_SCALE:g})")
    g.add_argument("--autoguidance", nargs="?", const=SNAPSHOT, metavar="STEP", default=None,
                   help="guide with a weaker version of the same model: the run's kept snapshot "
                        "(run.guide_snapshot_step), or the checkpoint of STEP")
    g.add_argument("--guide-with", metavar="RUN2", default=None,
                   help="autoguidance with another run (the same data shape and classes) as the weaker model")
    g.add_argument("--autoguidance-scale", type=float, metavar="S", default=None,
                   help=f"x0 = x0_weak + S (x0_main - x0_weak) (default: {AUTOGUIDANCE_SCALE:g} on class- or "
                        f"text-conditional runs, {UNCONDITIONAL_AUTOGUIDANCE_SCALE:g} on unconditional ones)")
    if vary:
        g.add_argument("--vary", choices=("auto", "cfg", "classifier", "autoguidance"), default="auto",
                       help="which scale --scales sets: auto = cfg on class-conditional runs, else classifier with "
                            "--classifier, else autoguidance")


@dataclass
class Plan:
    """The guidance flags, parsed and checked (no torch)."""

    classes: str | int | None        # None, "all" or a class id
    cfg_scale: float | None
    rescale: float | None
    interval: tuple[float, float] | None
    classifier: str | None
    classifier_scale: float | None
    autoguidance: str | int | None   # None, SNAPSHOT or a step
    guide_with: str | None
    autoguidance_scale: float | None


def _number(value, flag: str, lo: float = 0.0, hi: float = math.inf, what: str = "") -> float | None:
    if value is None:
        return None
    if not (math.isfinite(value) and lo <= value <= hi):
        band = f">= {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g}]"
        raise UserError(f"{flag} must be a number {band}, got {value!r}{what}")
    return float(value)


def parse_class(text: str | None) -> str | int | None:
    if text is None:
        return None
    if text.strip().lower() in ("all", "data"):
        return text.strip().lower()
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UserError(f"--class takes a class id (0, 1, ...), all or data, got {text!r}")
    return value


def follows_data(args) -> bool:
    """Whether the samples follow the data, p(x) = sum_c p(c) p(x | c): ``--class data`` with no guidance (no
    --guidance-scale other than 1, no classifier, no autoguidance). The sampler rule then takes the table for such
    samples (sampling.registry.DATA_CLASS_SAMPLERS: deterministic above sigma 3), which gives lower FD-Digits and
    higher recall on class-conditional MNIST runs than the rule for guided samples (docs/training.md)."""
    return (parse_class(getattr(args, "class_", None)) == "data" and getattr(args, "guidance_scale", None) in (None, 1)
            and all(getattr(args, flag, None) is None for flag in ("classifier", "autoguidance", "guide_with")))


def cluster_run(trained) -> bool:
    """Whether a loaded run was trained on k-means cluster ids (conditioning.kind=cluster) rather than labels."""
    return ((getattr(trained, "config", None) or {}).get("conditioning") or {}).get("kind") == "cluster"


def with_run_defaults(args, trained):
    """``args`` with the run's own default for ``--class``: a cluster run samples like the data (``--class data``;
    its ids are k-means clusters, not classes a user asks for by number), other runs keep what was given."""
    import copy

    if getattr(args, "class_", None) is not None or not cluster_run(trained):
        return args
    out = copy.copy(args)
    out.class_ = "data"
    return out


def parse_interval(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts) if len(parts) == 2 else (math.nan, math.nan)
    except ValueError:
        lo = hi = math.nan
    if not (0 <= lo < hi):                  # nan fails too; hi may be inf
        raise UserError(f"--guidance-interval takes LO,HI: a band of sigma with 0 <= LO < HI (e.g. 0.3,5), "
                        f"got {text!r}")
    return lo, hi


def check_args(args) -> Plan:
    """The guidance flags checked before any loading: forms, ranges, and flags that need another one."""
    auto = getattr(args, "autoguidance", None)
    if auto not in (None, SNAPSHOT):
        try:
            auto = int(auto)
        except ValueError:
            raise UserError(f"--autoguidance takes an optional checkpoint STEP (an integer), got {auto!r}; give the "
                            "run folder before --autoguidance") from None
        if auto < 0:
            raise UserError(f"--autoguidance STEP must be >= 0, got {auto}")
    plan = Plan(classes=parse_class(getattr(args, "class_", None)),
                cfg_scale=_number(getattr(args, "guidance_scale", None), "--guidance-scale",
                                  what=f" ({CONVENTION})"),
                rescale=_number(getattr(args, "guidance_rescale", None), "--guidance-rescale", 0.0, 1.0),
                interval=parse_interval(getattr(args, "guidance_interval", None)),
                classifier=getattr(args, "classifier", None),
                classifier_scale=_number(getattr(args, "classifier_scale", None), "--classifier-scale"),
                autoguidance=auto, guide_with=getattr(args, "guide_with", None),
                autoguidance_scale=_number(getattr(args, "autoguidance_scale", None), "--autoguidance-scale"))
    if plan.classifier_scale is not None and plan.classifier is None:
        raise UserError("--classifier-scale sets classifier guidance: add --classifier CLS (a folder of "
                        "dforge train-classifier)")
    if plan.autoguidance is not None and plan.guide_with is not None:
        raise UserError("--autoguidance and --guide-with both name the weaker model: give one of them")
    if plan.autoguidance_scale is not None and plan.autoguidance is None and plan.guide_with is None:
        raise UserError("--autoguidance-scale sets autoguidance: add --autoguidance [STEP] or --guide-with RUN2")
    return plan


# ---------------------------------------------------------------------------------------------
# Classes

@dataclass
class Classes:
    """The classes requested: ``spec`` None (unconditional), "all" (sample i: class i mod K), "data" (sample i:
    a class drawn from the run's p(c) with the seed of sample i) or one id."""

    spec: str | int | None
    num_classes: int
    frequencies: list | None = None   # "data": the run's p(c)
    seed: int = 0                     # "data": sample i's label uses seed + i

    def labels(self, n: int):
        """int64 (n,): i mod K for "all", draws from p(c) for "data", the id repeated for one class; None when
        unconditional."""
        import torch

        if self.spec is None:
            return None
        if self.spec == "all":
            return torch.arange(n, dtype=torch.int64) % self.num_classes   # y_i = i mod K
        if self.spec == "data":
            from ..sampling.generate import data_class_labels

            return data_class_labels(self.frequencies, n, self.seed)          # y_i ~ p(c)
        return torch.full((n,), int(self.spec), dtype=torch.int64)

    def cond(self, n: int) -> dict | None:
        y = self.labels(n)
        return None if y is None else {"class_labels": y}

    def row_labels(self, n: int) -> list[str] | None:
        """One label per sample for a grid with a row per class (``--class all``), else None."""
        if self.spec != "all":
            return None
        return [f"class {int(y)}" for y in self.labels(n)]

    @property
    def text(self) -> str:
        if self.spec is None:
            return "unconditional"
        if self.spec == "all":
            return f"classes 0..{self.num_classes - 1} (sample i: class i mod {self.num_classes})"
        if self.spec == "data":
            return "classes drawn from the training set's shares p(c)"
        return f"class {self.spec}"


def _run_name(args) -> str:
    return str(getattr(args, "run", None) or getattr(args, "target", None) or "the run")


def has_null(trained) -> bool:
    """Whether the run has a trained null condition (label dropout > 0), which classifier-free guidance needs
    (``conditioning.dropout=0`` trains none: the loader's ``null_cond`` is then None)."""
    return getattr(trained, "null_cond", None) is not None


def recommended_scale(trained) -> float | None:
    """The run's recommended classifier-free guidance scale: what the loader resolved (``.guidance_scale``:
    sample.guidance_scale, else the recipe's for class-conditional runs), else the config's key; None: none."""
    if hasattr(trained, "guidance_scale"):
        value = trained.guidance_scale
    else:
        value = ((getattr(trained, "config", None) or {}).get("sample") or {}).get("guidance_scale")
    return None if value is None else float(value)


def _device(trained):
    try:
        return next(trained.model.parameters()).device
    except (AttributeError, StopIteration):
        return "cpu"


def _load_guide(plan: Plan, args, trained, cache: dict):
    """The weaker model of autoguidance (None without it), checked against the main one."""
    from ..io.checkpoint import load_model_from_run

    run, use_ema, device = _run_name(args), not getattr(args, "no_ema", False), _device(trained)
    key = ("guide", plan.autoguidance, plan.guide_with)
    if key not in cache:
        if plan.autoguidance == SNAPSHOT:
            from ..io.checkpoint import load_guide_snapshot

            weak, where = load_guide_snapshot(run, use_ema=use_ema, device=device), "the snapshot"
        elif plan.autoguidance is not None:
            weak, where = load_model_from_run(run, use_ema=use_ema, step=plan.autoguidance, device=device), "checkpoint"
        else:
            weak, where = load_model_from_run(plan.guide_with, use_ema=use_ema, device=device), plan.guide_with
        cache[key] = (weak, where)
    weak, where = cache[key]
    if tuple(weak.sample_shape) != tuple(trained.sample_shape):
        raise UserError(f"the guiding model ({where}) makes samples of shape {tuple(weak.sample_shape)} and {run} "
                        f"{tuple(trained.sample_shape)}: guide with a run trained on the same data")
    if int(getattr(weak, "num_classes", 0) or 0) != int(trained.num_classes or 0):
        raise UserError(f"the guiding model ({where}) knows {weak.num_classes or 'no'} classes and {run} "
                        f"{trained.num_classes or 'none'}: guide with a run of the same conditioning")
    label = (f"{where} of step {weak.step}" if plan.guide_with is None else f"{plan.guide_with} (step {weak.step})")
    return weak, label


def guided_denoiser(args, run_denoiser, cache: dict | None = None):
    """(denoiser, classes, description) for the parsed guidance flags over a loaded run.

    ``denoiser``: the run's Denoiser wrapped as the flags ask (AutoGuidance, then ClassifierFreeGuidance, then
    ClassifierGuidance); ``classes``: a :class:`Classes` (``.labels(n)``, ``.cond(n)``, ``.row_labels(n)``);
    ``description``: a JSON-ready dict of what runs (``class``, ``cfg``, ``classifier``, ``autoguidance``) with
    ``text``, one line for the printed summary. ``cache``: a dict reused across calls (viz guidance builds one
    denoiser per scale) so that the classifier and the guiding model load once. Every check that needs the
    run happens here, before any sampling."""
    from ..denoise import guidance as G

    cache = {} if cache is None else cache
    plan = check_args(args)
    trained, run = run_denoiser, _run_name(args)
    k = int(getattr(trained, "num_classes", 0) or 0)
    text = getattr(trained, "text_encoder", None) is not None   # a text run: CFG between prompt and null prompt
    classifier = None
    if plan.classifier is not None:
        from ..models.classifier import check_classifier_fits, load_classifier

        if ("classifier", plan.classifier) not in cache:
            cache[("classifier", plan.classifier)] = load_classifier(plan.classifier, device=_device(trained))
        classifier = cache[("classifier", plan.classifier)]
        check_classifier_fits(classifier, trained)
    if plan.classes is not None and text and classifier is None:
        raise UserError(f"--class needs class labels and {run} is text-conditional (conditioning.kind=text): ask "
                        "for a digit with --prompt, e.g. --prompt \"a handwritten three\"")
    if plan.classes is not None and not k and classifier is None:
        raise UserError(f"--class needs class labels and {run} is unconditional (conditioning.kind=none): train a "
                        "class-conditional run (dforge train --conditioning class), or add --classifier CLS "
                        "(dforge train-classifier --like RUN)")
    num = k or (classifier.num_classes if classifier is not None else 0)
    spec = plan.classes if plan.classes is not None else ("all" if num else None)
    if isinstance(spec, int) and spec >= num:
        raise UserError(f"--class {spec} is out of range: {run} has {num} classes; give --class 0..{num - 1} or all")
    frequencies = getattr(trained, "class_frequencies", None) if spec == "data" else None
    if spec == "data" and (not k or frequencies is None):
        why = ("is not class-conditional (the classifier does not know p(c))" if not k else
               "records no class shares (trained before runs recorded them)")
        raise UserError(f"--class data draws classes from the shares p(c) of the run's training labels, and {run} "
                        f"{why}: use --class all (balanced) or a class id")
    info: dict = {"class": spec, "num_classes": num, "autoguidance": None, "cfg": None, "classifier": None}
    parts, D = [], trained

    # 1. autoguidance: x0 = x0_weak + s (x0_main - x0_weak)
    if plan.autoguidance is not None or plan.guide_with is not None:
        weak, label = _load_guide(plan, args, trained, cache)
        s = plan.autoguidance_scale
        if s is None:                # measured: 2 on a conditional network; 1.3 on the unconditional recipe
            s = AUTOGUIDANCE_SCALE if k or text else UNCONDITIONAL_AUTOGUIDANCE_SCALE
        D = G.AutoGuidance(D, weak, s)
        info["autoguidance"] = {"guide": label, "scale": s}
        parts.append(f"autoguidance s = {s:g} (guide: {label})")

    # 2. classifier-free guidance: pred = pred_uncond + w (pred_cond - pred_uncond)
    w, source = plan.cfg_scale, ""
    if k or text:
        if w is None and spec != "data":   # --class data: p(x) = sum_c p(c) p(x | c), the unguided model
            w, source = recommended_scale(trained), " (the run's recommended scale)"
            if w is not None and not has_null(trained):
                w, source = None, ""        # no trained null condition: the conditional model
        elif w != 1 and not has_null(trained):
            raise UserError(f"--guidance-scale {w:g} needs a trained null condition, and {run} was trained with "
                            f"conditioning.dropout=0 (no label or caption was ever dropped): {DROPOUT_FIX}, or leave "
                            "--guidance-scale off (the conditional model, w = 1)")
    elif w is not None or plan.rescale is not None or plan.interval is not None:
        flag = "--guidance-scale" if w is not None else ("--guidance-rescale" if plan.rescale is not None
                                                         else "--guidance-interval")
        raise UserError(f"{flag} is classifier-free guidance, which needs a class- or text-conditional run; {run} "
                        "is unconditional: train one with dforge train --conditioning class (or text), or guide this "
                        "one with --classifier CLS --class N or --autoguidance")
    if w is not None and w != 1:
        rescale = plan.rescale or 0.0
        D = G.ClassifierFreeGuidance(D, w, rescale=rescale, interval=plan.interval)
        info["cfg"] = {"scale": w, "rescale": rescale, "interval": list(plan.interval) if plan.interval else None}
        extra = [f"rescale {rescale:g}"] if rescale else []
        if plan.interval:
            extra.append(f"sigma in [{plan.interval[0]:g}, {plan.interval[1]:g}]")
        parts.append(f"CFG w = {w:g}{source}" + (f" ({', '.join(extra)})" if extra else ""))
    elif k or text:
        info["cfg"] = {"scale": 1.0, "rescale": 0.0, "interval": None}
        parts.append("conditional model (w = 1, no guidance)")

    # 3. classifier guidance: x0 += s sigma^2 grad_x log p(y | x)
    if classifier is not None:
        s = CLASSIFIER_SCALE if plan.classifier_scale is None else plan.classifier_scale
        D = G.ClassifierGuidance(D, classifier, s)
        info["classifier"] = {"path": str(plan.classifier), "scale": s}
        parts.append(f"classifier guidance s = {s:g} ({plan.classifier})")
    classes = Classes(spec, num, frequencies, int(getattr(args, "seed", 0) or 0))
    info["text"] = "; ".join([classes.text, *parts])
    return D, classes, info


def with_scale(args, kind: str, scale: float):
    """A copy of ``args`` with one kind of guidance at ``scale`` (for `dforge viz guidance`)."""
    import copy

    flag = {"cfg": "guidance_scale", "classifier": "classifier_scale", "autoguidance": "autoguidance_scale"}[kind]
    out = copy.copy(args)
    setattr(out, flag, float(scale))
    if kind == "autoguidance" and out.autoguidance is None and out.guide_with is None:
        out.autoguidance = SNAPSHOT
    return out
