"""Training: a diffusion model from a data set to a run folder (see ``trainer.py``).

    config.py       every knob with its default (nested sections, torch-free)
    layers.py       defaults < saved run < config file < --set flags; key names, aliases, did-you-mean
    determinism.py  every random draw of step k from generators seeded by (seed, k, purpose)
    precision.py    device, mixed precision, the optimiser and its learning rate
    build.py        the schedule, the data as (x, cond) batches, the network (with its class embedding)
    trainer.py      the Trainer (one step, checkpoints, resume, samples); loop.py: one call of fit()
    diagnostics.py  the one-batch overfit check
    ema.py          the exponential moving average of the weights

Importing this package (or its config) imports no torch; the torch-side names load on first use.
"""
from __future__ import annotations

import importlib

from .config import (FORMAT_VERSION, Config, ConfigError, TrainConfig, defaults)
from .layers import (ALIASES, ChangedSettings, check_keys, coerce, config_changes, help_rows, merge_config,
                     parse_set_flags, run_config, settings)

# name -> module of this package (or an absolute one), imported on first use
_LAZY = {
    "Trainer": "trainer", "train": "trainer", "TrainingDiverged": "trainer",
    "overfit_batch": "diagnostics", "OVERFIT_RATIO": "diagnostics", "train_classifier": "classifier",
    "seeded_generator": "determinism", "batch_indices": "determinism", "step_noise": "determinism",
    "epoch_permutation": "determinism", "dropout_mask": "determinism",
    "learning_rate": "precision", "resolve_precision": "precision", "autocast": "precision",
    "make_optimizer": "precision", "cpu_has_fast_bf16": "precision",
    "TrainingData": "build", "model_config": "build", "build_network": "build", "weights_digest": "build",
    "EMA": "ema", "ema_decay": "ema",
    "read_metrics": "diffusion_forge.io.runs", "plot_loss": "diffusion_forge.io.runs",
    "load_config_file": "diffusion_forge.io.runs",
    "generate": "diffusion_forge.sampling.generate", "save_samples": "diffusion_forge.viz",
}
_RENAMED = {"load_config_file": "read_config_file"}

__all__ = ["FORMAT_VERSION", "Config", "ConfigError", "TrainConfig", "defaults", "ALIASES", "ChangedSettings",
           "check_keys", "coerce", "config_changes", "help_rows", "merge_config", "parse_set_flags", "run_config",
           "settings", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        where = _LAZY[name]
        module = importlib.import_module(where if "." in where else f"{__name__}.{where}")
        return getattr(module, _RENAMED.get(name, name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
