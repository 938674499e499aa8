"""Every knob of a training run, with its default, in one place (torch-free: `dforge --help` stays fast).

    defaults (below)  <  a saved run's config.json  <  --config FILE (YAML/JSON)  <  --set section.key=value

Eight sections: ``data, diffusion, model, conditioning, optim, ema, run, sample``. Read a value as
``cfg.optim.lr``; name it as ``optim.lr`` in files and flags. Every flat key of the first release
(``lr``, ``sample_steps``, ...) still works as an alias of its dotted name and says so once on stderr.
``cfg.to_dict()`` is the nested form with ``"format_version": 2``; :meth:`Config.from_dict` also reads
the flat dicts of format_version 1 run folders, and mixtures of both.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field

FORMAT_VERSION = 2

# The classifier-free guidance recipe that benchmarks/guidance.py measured for the default class-conditional
# recipe (pred = pred_uncond + w (pred_cond - pred_uncond)) with the default sampler of conditional samples,
# dpmpp_2m_sde at eta 5, 20 steps (sampling.registry.CONDITIONAL_SAMPLERS): the lowest FD-Digits among the scales
# giving >= 99% of the requested digit is w = 1.25 (99.1%, FD 9.3, recall 0.78; w = 1: 96.6%, FD 7.1). With
# euler_ancestral at eta 1.4, the default before, it was also w = 1.25 (99.4%, FD 15.1, recall 0.70); with the
# unconditional default (s_tmax 5) it would be 1.5 (99.1%, FD 11.8). README "Conditioning and guidance". The scale
# is what a conditional run samples with when sample.guidance_scale is none. Unconditional runs sample without
# classifier-free guidance.
RECOMMENDED_GUIDANCE_SCALE = 1.25
# Text runs (conditioning.kind=text): the scale at which a tiny text model on digit captions follows held-out
# phrasings (tests/test_text.py; benchmarks/text.py measures it on MNIST, docs/text.md).
RECOMMENDED_TEXT_GUIDANCE_SCALE = 3.0


def knob(default, help: str, flat: str | None = None):
    """A config field: its default, its help text and (for keys of format_version 1) its old flat name."""
    meta = {"help": help, "flat": flat}
    if isinstance(default, dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# The knobs

@dataclass
class DataConfig:
    source: str = knob("mnist", "bundled name (see `dforge datasets`), image folder, or hf:NAME", "data")
    image_size: int | None = knob(None, "resize images to this size (none: the data's own)", "image_size")
    channels: int | None = knob(None, "1 or 3 (none: the data's own)", "channels")
    flip: bool = knob(False, "random horizontal flips of images, drawn from (seed, step)", "flip")
    latent: str | None = knob(None, "train in the latent space of this VAE: a folder from `dforge train-vae`, a "
                                    "diffusers AutoencoderKL folder or hub name (none: pixel space)")
    text_column: str | None = knob(None, "Hugging Face data sets: the caption column (none: 'text', else 'caption')")


@dataclass
class DiffusionConfig:
    schedule: str = knob("cosine", "linear | scaled_linear | cosine | sigmoid", "schedule")
    num_timesteps: int = knob(1000, "training timesteps T", "num_timesteps")
    beta_start: float | None = knob(None, "first beta of linear/scaled_linear/sigmoid (none: 1e-4; "
                                          "Stable Diffusion: scaled_linear 0.00085)")
    beta_end: float | None = knob(None, "last beta (none: 0.02; Stable Diffusion: 0.012)")
    zero_terminal_snr: bool = knob(False, "rescale to SNR 0 at T - 1 (needs v_prediction or sample)",
                                   "zero_terminal_snr")
    prediction: str = knob("v_prediction", "epsilon | sample | v_prediction", "prediction")
    min_snr_gamma: float | None = knob(5.0, "min-SNR-gamma loss weighting (none: off)", "min_snr_gamma")
    noise_levels: str = knob("uniform", "training noise levels: uniform (t ~ U{0..T-1}) | log_normal (ln sigma ~ "
                                        "N(log_sigma_mean, log_sigma_std^2), EDM's P_mean / P_std)")
    log_sigma_mean: float = knob(-1.2, "mean of ln sigma under noise_levels=log_normal (EDM: -1.2)")
    log_sigma_std: float = knob(1.2, "std of ln sigma under noise_levels=log_normal (EDM: 1.2)")


@dataclass
class ModelConfig:
    type: str = knob("auto", "auto (unet for images, mlp for vectors such as the 2-D sets, diffusers_cond_unet for "
                             "text) | unet | mlp | diffusers_unet | diffusers_cond_unet", "model")
    preset: str = knob("small", "tiny | small | base", "preset")
    options: dict = knob({}, "overrides of the preset, e.g. {dropout: 0.1}", "model_options")
    init_from: str | None = knob(None, "fine-tune: start from this diffusers pipeline / UNet folder or hub id "
                                       "(its schedule and prediction type unless set here)")


@dataclass
class ConditioningConfig:
    kind: str = knob("none", "none | class (class labels of the data) | cluster (ids of conditioning.clusters "
                             "k-means clusters of the training images: no labels needed; samples draw the cluster "
                             "from its share, like `--class data`) | text (captions of the data)")
    dropout: float = knob(0.1, "probability that a sample's condition is replaced by the null class (class) or the "
                               "empty prompt (text) during training (used when kind != none; 0: no null "
                               "condition, so no classifier-free guidance)")
    num_classes: int | None = knob(None, "number of classes (none: from the data)")
    clusters: int = knob(100, "kind=cluster: K, the number of k-means clusters (data/clusters.py; chosen on MNIST "
                                "among 10, 50, 100 and 200: docs/training.md, \"Cluster conditioning\")")
    text_encoder: str = knob("all-MiniLM-L6-v2", "frozen text encoder of kind=text: all-MiniLM-L6-v2 (bundled, "
                                                 "offline) or a Hugging Face model name or folder")
    max_length: int = knob(32, "prompt tokens fed to cross-attention (padded / truncated to this)")


@dataclass
class OptimConfig:
    steps: int = knob(2000, "optimiser steps in the whole run", "steps")
    minutes: float | None = knob(None, "fit the run to this many minutes of wall clock: optim.steps is planned from "
                                       "the measured step rate, so the learning rate decays to its end on time "
                                       "(training/budget.py; none: a fixed optim.steps)")
    batch_size: int = knob(64, "global batch per optimiser step (all processes x accumulation)", "batch_size")
    grad_accum: int = knob(1, "micro-batches per optimiser step", "grad_accum")
    lr: float = knob(2e-3, "peak learning rate of AdamW", "lr")
    lr_schedule: str = knob("cosine", "constant | cosine (after the warm-up)", "lr_schedule")
    warmup_steps: int = knob(100, "linear warm-up from lr / warmup_steps to lr", "warmup_steps")
    min_lr: float = knob(2e-4, "where the cosine schedule ends", "min_lr")
    weight_decay: float = knob(0.0, "AdamW decoupled weight decay (matrices and kernels only)", "weight_decay")
    adam_beta1: float = knob(0.9, "AdamW beta1", "adam_beta1")
    adam_beta2: float = knob(0.999, "AdamW beta2", "adam_beta2")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this (0: off)", "grad_clip")


@dataclass
class EMAConfig:
    decay: float = knob(0.999, "EMA decay (the most it reaches, see ema.warmup)", "ema_decay")
    warmup: bool = knob(True, "decay_k = min(decay, (1 + k) / (10 + k))", "ema_warmup")
    sigma_rel: float | None = knob(None, "a power-function EMA of this relative width instead (Karras et al. "
                                         "2024: decay_k = (1 - 1/k)^(gamma + 1); decay and warmup unused; none: off)")


@dataclass
class RunConfig:
    mixed_precision: str = knob("auto", "auto | no | bf16 | fp16 (auto: bf16 where the hardware has it)",
                                "mixed_precision")
    seed: int = knob(0, "initial weights, data order, t, noise, dropout: all derive from it", "seed")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N | mps")
    log_every: int = knob(10, "metrics.jsonl line and progress-bar update every N steps", "log_every")
    checkpoint_every: int = knob(500, "also at the end and on Ctrl-C", "checkpoint_every")
    keep_checkpoints: int = knob(3, "keep the newest K checkpoints", "keep_checkpoints")
    guide_snapshot_step: int = knob(500, "keep this step's weights as checkpoints/guide-<step>/, the autoguidance "
                                         "snapshot (`dforge sample --autoguidance`), never pruned; 0 or a step "
                                         ">= optim.steps: none")
    sample_every: int = knob(1000, "sample grid into samples/ every N steps (0: only at the end)", "sample_every")
    eval_every: int = knob(0, "FD of eval_n EMA samples every N steps into metrics.jsonl (0: off)", "eval_every")
    eval_n: int = knob(256, "samples per evaluation (small n: FD@256, not comparable to 10k FID)", "eval_n")


@dataclass
class SampleConfig:
    n: int = knob(64, "samples in each grid", "sample_n")
    sampler: str | None = knob(None, "sampler of the grids, the demo and `dforge sample` (none: the default for the "
                                     "NFE budget sample.steps, sampling.registry.DEFAULT_SAMPLERS, chosen on trained "
                                     "networks)", "sampler")
    steps: int = knob(20, "its steps", "sample_steps")
    options: dict = knob({}, "its options, over the sampler's defaults (and the default sampler's, e.g. {eta: 5}; "
                             "eta > 1: more fresh noise)", "sampler_options")
    guidance_scale: float | None = knob(None, "classifier-free guidance scale w of the grids and of `dforge sample` "
                                              "when none is given: pred = pred_uncond + w (pred_cond - pred_uncond), "
                                              "w = 1 conditional, 0 unconditional (none: the recipe's, "
                                              f"{RECOMMENDED_GUIDANCE_SCALE:g} for class-conditional runs, "
                                              "no guidance for unconditional ones)")


SECTIONS = {"data": DataConfig, "diffusion": DiffusionConfig, "model": ModelConfig,
            "conditioning": ConditioningConfig, "optim": OptimConfig, "ema": EMAConfig, "run": RunConfig,
            "sample": SampleConfig}

# Allowed values, checked by name (tests/test_config.py checks they equal the torch-side lists).
SCHEDULE_NAMES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
NOISE_LEVELS = ("uniform", "log_normal")   # core.losses.sample_timesteps
PRECISIONS = ("auto", "no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
MODEL_TYPES = ("unet", "mlp", "diffusers_unet", "diffusers_cond_unet")
CONDITIONING_KINDS = ("none", "class", "cluster", "text")
# What a run's own samples (grids, the demo, `dforge sample` with no --class) are, per conditioning.kind: the key of
# sampling.registry.resolve_sampler's tables. A cluster run samples like the data (clusters drawn from p(c)).
SAMPLES_OF_KIND = {"none": "unconditional", "class": "conditional", "cluster": "data", "text": "conditional"}


class ConfigError(ValueError):
    """A config key or value that is unknown, mistyped, out of range, or does not fit the other sections."""


# ---------------------------------------------------------------------------------------------
# The schema, derived once from the dataclasses above

def _schema() -> tuple[dict, dict, dict]:
    """({dotted: (type hint, field)}, {flat alias: dotted}, {short name: [dotted]})."""
    fields_, flat, short = {}, {}, {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{f.name}"
            fields_[dotted] = (hints[f.name], f)
            if f.metadata.get("flat"):
                flat[f.metadata["flat"]] = dotted
            short.setdefault(f.name, []).append(dotted)
    return fields_, flat, short


FIELDS, FLAT_ALIASES, _SHORT = _schema()
# ---------------------------------------------------------------------------------------------
# The config object

@dataclass
class Config:
    """A whole run's configuration; see the section classes above for every key and its default."""

    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name} must be a {cls.__name__}; build configs with "
                                  "Config.from_dict or merge_config (flat keys work there)")
        self.validate()

    def validate(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        """The nested form, with ``"format_version": 2`` (what config.json and checkpoints hold)."""
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def flat(self) -> dict:
        """{dotted key: value} for every key (what resume compares)."""
        return {dotted: copy.deepcopy(self.get(dotted)) for dotted in FIELDS}

    def get(self, dotted: str):
        if dotted not in FIELDS:
            from .layers import unknown_key

            raise unknown_key(dotted)
        section, key = dotted.split(".")
        return getattr(getattr(self, section), key)

    @classmethod
    def from_dict(cls, d: dict, notes: bool = False) -> Config:
        """From a nested (format_version 2), flat (format_version 1) or mixed dict; missing keys get defaults."""
        from .layers import apply, settings

        return cls.from_nested(apply(defaults(), settings(d, notes=notes)))

    @classmethod
    def from_nested(cls, nested: dict) -> Config:
        return cls(**{name: SECTIONS[name](**nested[name]) for name in SECTIONS})


TrainConfig = Config


def validate(cfg: Config) -> None:
    """Every value in range and the sections consistent; a :class:`ConfigError` naming the key otherwise."""
    def choice(dotted, allowed):
        if cfg.get(dotted) not in allowed:
            raise ConfigError(f"{dotted}={cfg.get(dotted)!r} is not one of: {', '.join(allowed)}")

    def at_least(dotted, low, strict=False):
        value = cfg.get(dotted)
        if value < low or (strict and value == low):
            raise ConfigError(f"{dotted} must be {'>' if strict else '>='} {low}, got {value}")

    d, o, c = cfg.diffusion, cfg.optim, cfg.conditioning
    choice("diffusion.schedule", SCHEDULE_NAMES)
    choice("diffusion.prediction", PREDICTIONS)
    choice("diffusion.noise_levels", NOISE_LEVELS)
    choice("run.mixed_precision", PRECISIONS)
    choice("optim.lr_schedule", LR_SCHEDULES)
    choice("model.type", ("auto", *MODEL_TYPES))
    choice("conditioning.kind", CONDITIONING_KINDS)
    for dotted in ("optim.steps", "optim.batch_size", "optim.grad_accum", "diffusion.num_timesteps", "run.log_every",
                   "sample.n", "sample.steps", "run.checkpoint_every", "run.keep_checkpoints", "run.eval_n"):
        at_least(dotted, 1)
    for dotted in ("optim.warmup_steps", "run.sample_every", "optim.weight_decay", "optim.grad_clip", "optim.min_lr",
                   "run.eval_every", "run.guide_snapshot_step"):
        at_least(dotted, 0)
    at_least("optim.lr", 0, strict=True)
    if o.minutes is not None and not o.minutes > 0:
        raise ConfigError(f"optim.minutes must be > 0 (or none for a fixed optim.steps), got {o.minutes}")
    for dotted in ("ema.decay", "optim.adam_beta1", "optim.adam_beta2", "conditioning.dropout"):
        if not 0 <= cfg.get(dotted) < 1:
            raise ConfigError(f"{dotted} must lie in [0, 1), got {cfg.get(dotted)}")
    if cfg.ema.sigma_rel is not None and not 0 < cfg.ema.sigma_rel < 12 ** -0.5:   # sqrt(1/12): gamma = 0
        raise ConfigError(f"ema.sigma_rel must lie in (0, 0.2887) or be none, got {cfg.ema.sigma_rel} (Karras et "
                          "al. 2024 use 0.05-0.15; the recipe's warm-up EMA is nearly 0.09)")
    if d.log_sigma_std <= 0:
        raise ConfigError(f"diffusion.log_sigma_std must be > 0, got {d.log_sigma_std}")
    if d.min_snr_gamma is not None and d.min_snr_gamma <= 0:
        raise ConfigError(f"diffusion.min_snr_gamma must be > 0 or none, got {d.min_snr_gamma}")
    if o.batch_size % o.grad_accum:
        raise ConfigError(f"batch_size={o.batch_size} must be divisible by grad_accum={o.grad_accum} "
                          "(optim.batch_size, optim.grad_accum)")
    if d.zero_terminal_snr and d.prediction == "epsilon":
        raise ConfigError("diffusion.zero_terminal_snr needs prediction=v_prediction or sample "
                          "(epsilon is undefined at SNR 0)")
    _check_betas(d)
    _check_guidance(cfg)
    if c.clusters < 2:
        raise ConfigError(f"conditioning.clusters must be >= 2, got {c.clusters}")
    if c.kind == "cluster" and c.num_classes is not None:
        raise ConfigError("conditioning.num_classes does not apply to conditioning.kind=cluster: set the number of "
                          "clusters with conditioning.clusters")
    if c.num_classes is not None and c.num_classes < 1:
        raise ConfigError(f"conditioning.num_classes must be >= 1 or none, got {c.num_classes}")
    if cfg.data.image_size is not None and cfg.data.image_size < 1:
        raise ConfigError(f"data.image_size must be >= 1 or none, got {cfg.data.image_size}")
    if cfg.data.channels not in (None, 1, 3):
        raise ConfigError(f"data.channels must be 1, 3 or none, got {cfg.data.channels}")


def _check_guidance(cfg: Config) -> None:
    """sample.guidance_scale needs a class-conditional run that has a null class (conditioning.dropout > 0).
    (conditioning.dropout itself is refused on an unconditional run only where the user sets it: see
    layers.merge_config; its default applies to conditional runs only.)"""
    w, c = cfg.sample.guidance_scale, cfg.conditioning
    if w is None:
        return
    if w < 0:
        raise ConfigError(f"sample.guidance_scale must be >= 0 or none, got {w} (1: the conditional model, "
                          "0: the unconditional one)")
    if c.kind == "none":
        raise ConfigError(f"sample.guidance_scale={w:g} needs a class-conditional run: set conditioning.kind=class "
                          "(or text, with captions; an unconditional model has no condition to guide towards), or drop the key")
    if c.dropout == 0:
        raise ConfigError(f"sample.guidance_scale={w:g} needs a null class, and conditioning.dropout=0 trains none: "
                          "set conditioning.dropout > 0 (the default is 0.1), or drop the key")


def recommended_guidance_scale(config) -> float | None:
    """The classifier-free guidance scale w a run samples with when none is given, from its config (a
    :class:`Config` or a nested / flat dict, e.g. ``load_model_from_run(RUN).config``): ``sample.guidance_scale``
    when set; else :data:`RECOMMENDED_GUIDANCE_SCALE` for a class-conditional run with a null class
    (``conditioning.dropout > 0``); else None (no classifier-free guidance; a cluster run samples like the data)."""
    cfg = config if isinstance(config, Config) else Config.from_dict(config)
    if cfg.sample.guidance_scale is not None:
        return float(cfg.sample.guidance_scale)
    if cfg.conditioning.kind in ("class", "text") and cfg.conditioning.dropout > 0:   # cluster runs follow the data
        return float(RECOMMENDED_TEXT_GUIDANCE_SCALE if cfg.conditioning.kind == "text" else RECOMMENDED_GUIDANCE_SCALE)
    return None


def _check_betas(d: DiffusionConfig) -> None:
    given = [k for k in ("beta_start", "beta_end") if getattr(d, k) is not None]
    if not given:
        return
    if d.schedule == "cosine":
        raise ConfigError(f"diffusion.{given[0]} does not apply to the cosine schedule (it has no betas to set); "
                          "use diffusion.schedule=linear, scaled_linear or sigmoid")
    start = 1e-4 if d.beta_start is None else d.beta_start  # diffusers' DDPMScheduler defaults
    end = 0.02 if d.beta_end is None else d.beta_end
    if not 0 < start < end < 1:
        raise ConfigError(f"diffusion.beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1, "
                          f"got {start} and {end}")


def defaults() -> dict:
    """The default values as a nested dict (no format_version)."""
    return {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
