"""What a row of benchmarks/samplers_trained.py is, shared by it and benchmarks/sampler_tables.py: a variant
(a sampler and the options that differ from its defaults), its key and label, the sweep's variants (``--samplers``),
the registry's current default per budget, and the ranking of (variant, grid) by FD / best FD over runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffusion_forge.sampling.registry import SAMPLERS, resolve_sampler  # noqa: E402

GRIDS = ("default", "karras", "exponential")


# Rows: a variant is {"sampler", "options" (those that differ from its defaults)}; a row adds grid and budget

def variant(name: str, options: dict | None = None) -> dict:
    spec = SAMPLERS[name]
    merged = {**spec.options, **(options or {})}
    return {"sampler": name, "options": {k: v for k, v in merged.items() if v != spec.options[k]}}


def key(v: dict, grid: str) -> str:
    return f"{v['sampler']}|{json.dumps(v['options'], sort_keys=True)}|{grid}"


def opts_text(v: dict) -> str:
    return ",".join(f"{k}={x}" for k, x in sorted(v["options"].items()))


def label(v: dict, grid: str | None = None) -> str:
    return v["sampler"] + (f":{opts_text(v)}" if v["options"] else "") + (f" @{grid}" if grid else "")


def parse_variant(text: str) -> dict:
    """"euler_ancestral:eta=1.8" -> a variant; option values take the kind of the sampler's default."""
    name, _, opts = text.partition(":")
    if name not in SAMPLERS:
        raise SystemExit(f"--samplers: unknown sampler {name!r}; choose from: {', '.join(SAMPLERS)}")
    spec, options = SAMPLERS[name], {}
    for item in filter(None, opts.split(",")):
        k, eq, value = item.partition("=")
        if not eq or k not in spec.options:
            raise SystemExit(f"--samplers {text}: write NAME:KEY=VALUE,...; {name} takes: "
                             f"{', '.join(spec.options) or 'no options'}")
        default = spec.options[k]
        try:
            options[k] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
        except ValueError:
            raise SystemExit(f"--samplers {text}: {k} must be a {type(default).__name__}") from None
    return variant(name, options)


def sweep_variants(selected: list[str] | None) -> list[dict]:
    """Every sampler at its defaults, plus the extra settings; ``selected`` names (all settings of a sampler)
    or NAME:OPTIONS (that one setting) restrict it."""
    extra = [("euler_ancestral", {"eta": eta}) for eta in (1.2, 1.4, 1.6, 1.8)]   # more fresh noise than DDPM's
    extra += [("dpmpp_2m_sde", {"eta": eta}) for eta in (1.4, 3.0, 5.0, 8.0)]   # eta > 1: nearly denoise + re-noise
    extra += [("dpmpp_2m_sde", {"eta": eta, "s_tmax": top}) for eta, top in ((5.0, 3.0), (5.0, 5.0), (8.0, 5.0))]
    extra += [("euler_ancestral", {"eta": 1.4, "s_tmax": 5.0})]       # deterministic above sigma s_tmax
    extra += [("ipndm", {"afs": True, "free_last_step": True})]
    pool = [variant(n) for n in SAMPLERS] + [variant(n, o) for n, o in extra]
    if selected:
        names = {parse_variant(s)["sampler"] for s in selected if ":" not in s}   # checks the names
        pool = [v for v in pool if v["sampler"] in names] + [parse_variant(s) for s in selected if ":" in s]
    unique = {}
    for v in pool:
        unique.setdefault(key(v, ""), v)
    return list(unique.values())


def current_default(budget: int, samples: str = "unconditional") -> dict:
    """What the rule runs today for a budget (registry.resolve_sampler with no sampler), default grid: for an
    unconditional run's samples, or ``samples="data"`` for a class-conditional run sampled like the data."""
    name, _, options = resolve_sampler(None, budget, samples=samples)
    return variant(name, options)


def samples_of(rec: dict) -> str:
    """What a run's rows are, for the rule: "data" for a class- or cluster-conditional run (classes or clusters
    drawn from p(c))."""
    return "data" if rec.get("info", {}).get("classes") in ("data", "clusters") else "unconditional"


def rank(records: list[dict], budget: int, grids=GRIDS) -> list[tuple[dict, str, float]]:
    """(variant, grid, mean FD / best FD at ``budget``) of the rows measured in every record, best first."""
    ratios: dict[str, list] = {}
    used = [r for r in records if any(row["budget"] == budget for row in r["rows"])]
    for rec in used:
        rows = [row for row in rec["rows"] if row["budget"] == budget and row["grid"] in grids]
        best = max(min(row["fd"] for row in rows), 1e-12) if rows else 1.0
        for row in rows:
            ratios.setdefault(key(row, row["grid"]), []).append((row["fd"] / best, row))
    out = [(variant(v[0][1]["sampler"], v[0][1]["options"]), v[0][1]["grid"], float(np.mean([r for r, _ in v])))
           for v in ratios.values() if len(v) == len(used)]
    return sorted(out, key=lambda t: t[2])

def rank_budget(budgets) -> int:
    return 10 if 10 in budgets else max(budgets)
