"""Config layers: defaults < a saved run's config < a config file < ``--set`` flags, and the key names.

Every layer (a nested, flat or mixed dict) becomes a list of ``(path, value)`` settings: unknown keys are
refused with a did-you-mean, flat keys of format_version 1 are aliases that print their dotted name once,
strings are typed by the field's annotation. Torch-free.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
import typing
from pathlib import Path

from .config import (FIELDS, FLAT_ALIASES, FORMAT_VERSION, SECTIONS, _SHORT, Config, ConfigError,
                     defaults)

# Names other tools (diffusers' scripts, nanoGPT) use for our keys, for the did-you-mean hint.
FOREIGN = {"learning_rate": "lr", "train_batch_size": "batch_size", "max_train_steps": "steps", "max_steps": "steps",
           "max_iters": "steps", "gradient_accumulation_steps": "grad_accum", "lr_warmup_steps": "warmup_steps",
           "lr_scheduler": "lr_schedule", "max_grad_norm": "grad_clip", "prediction_type": "prediction",
           "beta_schedule": "schedule", "num_train_timesteps": "num_timesteps", "resolution": "image_size",
           "ema_max_decay": "ema_decay", "snr_gamma": "min_snr_gamma", "random_flip": "flip",
           "checkpointing_steps": "checkpoint_every", "checkpoints_total_limit": "keep_checkpoints",
           "dataset": "data", "dataset_name": "data", "mixed": "mixed_precision"}

ALIASES = FOREIGN  # the name of the first release

_NOTED: set[str] = set()


def note_alias(flat: str) -> None:
    """Say once per process that a flat key of format_version 1 is now a dotted one."""
    if flat not in _NOTED:
        _NOTED.add(flat)
        print(f"note: config key {flat!r} is now {FLAT_ALIASES[flat]!r} (the old name still works)", file=sys.stderr)


def _show(name: str) -> str:
    return f"{name} ({FLAT_ALIASES[name]})" if name in FLAT_ALIASES else name


def suggestions(key: str) -> list[str]:
    """The closest known names for an unknown key: foreign synonyms, then near spellings."""
    last = key.rsplit(".", 1)[-1]
    found = [FOREIGN[k] for k in (key, last) if k in FOREIGN]
    found += difflib.get_close_matches(key, [*FLAT_ALIASES, *FIELDS], n=3, cutoff=0.6)
    for name in difflib.get_close_matches(last, list(_SHORT), n=2, cutoff=0.6):
        found += _SHORT[name]
    out, targets = [], set()
    for name in found:
        target = FLAT_ALIASES.get(name, name)
        if target not in targets:
            targets.add(target)
            out.append(name)
    return out[:3]


def unknown_key(key: str, where: str = "") -> ConfigError:
    close = suggestions(key)
    if key in SECTIONS:  # a section given a plain value, e.g. `ema: 0.99`
        close = [k for k in FIELDS if k.startswith(key + ".")][:3]
        hint = f"; did you mean {' or '.join(close)}? ({key} is a section: give {key}.KEY=VALUE)"
    elif close:
        shown = [FLAT_ALIASES.get(c, c) if "." in key else _show(c) for c in close]
        hint = f"; did you mean {' or '.join(dict.fromkeys(shown))}?"
    else:
        hint = f"; the sections are {', '.join(SECTIONS)} (`dforge train --help` lists every key)"
    return ConfigError(f"{where}unknown config key {key!r}{hint}")


# ---------------------------------------------------------------------------------------------
# Strings (flags, files) to typed values

def coerce(dotted: str, value):
    """A value from a config file or a ``--set`` flag (often a string) as the field's type (the key dotted,
    or the flat name of format_version 1)."""
    dotted = FLAT_ALIASES.get(dotted, dotted)
    if dotted not in FIELDS:
        raise unknown_key(dotted)
    hint = FIELDS[dotted][0]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null", "off", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{dotted} cannot be none")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in ("1", "true", "yes", "on"):
                return True
            if word in ("0", "false", "no", "off"):
                return False
        elif base is int and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and any(c in value.lower() for c in "e."):
                number = float(value)
                if number.is_integer():
                    return int(number)
                raise ValueError
            return int(value)
        elif base is float and not isinstance(value, bool):
            return float(value)
        elif base is str and not isinstance(value, (dict, list, tuple)):
            return str(value)
        elif base is dict or typing.get_origin(base) is dict:
            parsed = (_yaml_value(value) or {}) if isinstance(value, str) else value
            if isinstance(parsed, dict):
                return copy.deepcopy(dict(parsed))
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{dotted}={value!r} is not a valid {getattr(base, '__name__', base)}")


def _yaml_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# ---------------------------------------------------------------------------------------------
# Any dict (nested, flat, mixed, dotted) -> a list of (path, value) settings

def settings(d: dict, where: str = "", notes: bool = True) -> list[tuple[tuple[str, ...], object]]:
    """Normalise one layer: paths are (section, key) or, inside a dict-valued knob, (section, key, subkey...).
    Unknown keys raise :class:`ConfigError` with a did-you-mean; a flat alias prints its dotted name once."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}a config must be a mapping of keys to values, got {type(d).__name__}")
    version = d.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        raise ConfigError(f"{where}config format_version {version!r} is not one this diffusion_forge reads "
                          f"(1..{FORMAT_VERSION}); was it written by a newer version?")
    out: list = []
    for key, value in d.items():
        key = str(key).strip()
        if key == "format_version":
            continue
        if key in SECTIONS and isinstance(value, dict):
            out += [item for sub, v in value.items() for item in _one(f"{key}.{str(sub).strip()}", v, where)]
        elif key in FLAT_ALIASES and "." not in key:
            if notes:
                note_alias(key)
            out += _one(FLAT_ALIASES[key], value, where)
        else:
            out += _one(key, value, where)
    seen: dict = {}
    for path, _ in out:
        if path in seen:
            raise ConfigError(f"{where}{'.'.join(path)} is given twice (as a flat and a dotted key?); give it once")
        seen[path] = True
    return out


def check_keys(d: dict) -> None:
    """Refuse unknown keys (nested, dotted or flat), with a did-you-mean."""
    settings(d, notes=False)


def _one(key: str, value, where: str) -> list:
    parts = tuple(key.split("."))
    dotted = ".".join(parts[:2])
    if dotted not in FIELDS or len(parts) < 2:
        raise unknown_key(key, where)
    if len(parts) == 2:
        return [(parts, coerce(dotted, value))]
    if not (_has_factory(dotted) and isinstance(FIELDS[dotted][1].default_factory(), dict)):
        raise unknown_key(key, where)
    return [(parts, _yaml_value(value) if isinstance(value, str) else value)]  # e.g. sample.options.eta=1.6


def _has_factory(dotted: str) -> bool:
    return FIELDS[dotted][1].default_factory is not dataclasses.MISSING


def apply(nested: dict, items: list) -> dict:
    """Set each (path, value) of :func:`settings` into a nested dict of plain values."""
    for path, value in items:
        target = nested[path[0]]
        if len(path) == 2:
            target[path[1]] = copy.deepcopy(value)
            continue
        target = target.setdefault(path[1], {})
        for part in path[2:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return nested


# ---------------------------------------------------------------------------------------------
# Layers: defaults < saved < file < flags

def parse_set_flags(items: list[str]) -> dict:
    """``["optim.lr=1e-3", "steps=500"]`` -> ``{"optim.lr": "1e-3", "steps": "500"}`` (typed by :func:`coerce`)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. optim.lr=1e-3), got {item!r}")
        out[key.strip()] = value
    settings(out, notes=False)  # unknown keys fail here, before anything else
    return out


def merge_config(base: dict | None = None, file: str | Path | None = None, flags: dict | None = None) -> Config:
    """defaults < ``base`` (a saved run's config, silent) < config ``file`` < ``flags``; unknown keys are errors."""
    from ..io.runs import read_config_file

    nested = defaults()
    apply(nested, settings(base or {}, notes=False))
    given = settings(read_config_file(file), where=f"{file}: ") if file else []
    given += settings(flags or {})
    cfg = Config.from_nested(apply(nested, given))
    _check_given_dropout(cfg, given)
    return cfg


def _check_given_dropout(cfg: Config, given: list) -> None:
    """conditioning.dropout given by the user (a file or a flag, not a saved run's config) on an unconditional
    run: refused, since there is no condition to drop (its default, 0.1, applies to conditional runs only)."""
    c = cfg.conditioning
    if c.kind == "none" and c.dropout > 0 and any(path == ("conditioning", "dropout") for path, _ in given):
        raise ConfigError(f"conditioning.dropout={c.dropout} needs a condition to drop: set conditioning.kind=class")


def config_changes(old: Config, new: Config) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every key whose value differs."""
    a, b = old.flat(), new.flat()
    return {k: (a[k], v) for k, v in b.items() if a[k] != v}


class ChangedSettings(ConfigError):
    """Resuming a run with settings other than those it was started with, without saying so."""


def run_config(run_dir, file=None, flags: dict | None = None, allow_changes: bool = False,
               require_data: bool = False) -> tuple[Config, dict]:
    """The config for training into ``run_dir``. A new run merges defaults < file < flags (and, with
    ``require_data``, must name its data); an existing run (its config.json, flat format_version 1 or nested 2)
    merges saved < file < flags and refuses any change unless ``allow_changes``. Both sides are normalised
    to the nested config before they are compared. Returns (config, {dotted key: (old, new)})."""
    from ..io.runs import read_run_config

    saved = read_run_config(run_dir)
    if saved is None:
        if require_data and not names_data(file, flags):
            raise ConfigError(f"{run_dir} holds no run yet, so this would start a new one, and a new run needs its "
                              "data named: add --data mnist for the default recipe (or --data FOLDER, "
                              "--set data.source=NAME); to resume a run, check the folder name")
        return merge_config(None, file, flags), {}
    saved_cfg = merge_config(saved)  # the saved values, checked; keys new in this version get their defaults
    cfg = merge_config(saved, file, flags)
    changes = config_changes(saved_cfg, cfg)
    if changes and not allow_changes:
        import json

        listed = ", ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())
        raise ChangedSettings(
            f"{run_dir} already holds a run with other settings ({listed}). Resume it with its own settings "
            "(drop those options), pass --allow-changes to resume with the new values, or choose another --out.")
    return cfg, changes


def names_data(file: str | Path | None, flags: dict | None) -> bool:
    """Whether the user's layers set data.source (a new run must name its data)."""
    from ..io.runs import read_config_file

    layers = [read_config_file(file) if file else {}, flags or {}]
    return any(path[:2] == ("data", "source") for layer in layers for path, _ in settings(layer, notes=False))


def help_rows() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every key, from the field metadata (for `dforge train --help`); the
    help names the flat key of format_version 1 where it is not the key's own name (lr is optim.lr)."""
    rows = []
    for dotted, (_, f) in FIELDS.items():
        default = f.default_factory() if _has_factory(dotted) else f.default
        flat = f.metadata.get("flat")
        help_text = f.metadata["help"] + (f" [was: {flat}]" if flat and flat != f.name else "")
        rows.append((dotted, format_value(default), help_text))
    return rows


def format_value(value) -> str:
    """A value as it would be written in --set: none, true, 0.002, {eta: 1.8}."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)
