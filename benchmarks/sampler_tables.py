"""The records of benchmarks/samplers_trained.py turned into verdicts and tables: the rows the targets compare
(target_rows), the targets' checks (checks, on the sweep's seeds and on the confirmation block), a row's cell
(fmt_row), each run's markdown table, the pooled best per budget to paste into the registry (paste_defaults), and
the report (table.md and the printout)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffusion_forge import evaluate  # noqa: E402

from sampler_rows import current_default, key, label, opts_text, rank, rank_budget, samples_of  # noqa: E402

TARGETS = {10: 1.2, 20: 1.1}          # budget -> allowed FD / best FD at up to the reference NFE


# Verdicts

def target_rows(rec: dict, metric: str) -> dict[str, dict]:
    """The rows a target compares, by role: the best row at any NFE, and per target budget the default and the
    best row there (by ``metric``, on the sweep's seeds)."""
    rows = rec["rows"] + rec["reference"]
    out = {"best": min(rows, key=lambda r: r[metric])}
    for b in TARGETS:
        at_b = [r for r in rec["rows"] if r["budget"] == b]
        dk = key(current_default(b, samples_of(rec)), "default")
        default = next((r for r in at_b if key(r, r["grid"]) == dk), None)
        if default is not None:
            out[f"default {b}"] = default
        if at_b:
            out[f"best {b}"] = min(at_b, key=lambda r: r[metric])
    return out


def metrics_of(rec: dict) -> list[str]:
    rows = rec["rows"] + rec["reference"]
    return ["fd"] + (["fd_effnet"] if rows and all("fd_effnet" in r for r in rows) else [])


def top_nfe(args) -> int:
    """The most NFE any row of the run takes: the best row the targets compare with is chosen up to it."""
    return max(args.reference_steps, *args.budgets)


def checks(rec: dict, budgets, ref_nfe: int) -> dict:
    """The issue's targets, for the current default and for the best row of each budget; with a second
    instrument (fd_effnet in every row) the same targets under it, its best row chosen by its own FD. With a
    confirmation block (``--confirm``), each target again with the same rows' FDs on seeds n..2n-1."""
    out = {}
    again = {(key(r, r["grid"]), r["budget"]): r for r in rec.get("confirm", [])}
    for m in metrics_of(rec):
        what = "FD" if m == "fd" else "FD-EffNet"
        picked = target_rows(rec, m)
        blocks = [("", picked)]
        if again:
            blocks.append((" [seeds n..2n-1]", {k: again.get((key(r, r["grid"]), r["budget"])) for k, r in picked.items()}))
        for block, rows in blocks:
            best_any = rows["best"]
            if best_any is None:
                continue
            for b, factor in TARGETS.items():
                for who in ("default", "best"):
                    row = rows.get(f"{who} {b}")
                    if row is not None:
                        name = f"{who} {label(row, row['grid'])} at {b} NFE: {what} <= {factor} x best at <= {ref_nfe} NFE"
                        out[name + block] = {"pass": row[m] <= factor * best_any[m], "fd": row[m],
                                             "best": best_any[m], "ratio": row[m] / best_any[m]}
    return out


# Tables

def fmt_row(r: dict) -> str:
    share = f", {r['class_min']:.0%}-{r['class_max']:.0%}" if "class_min" in r else ""
    second = f"; FD-EffNet {r['fd_effnet']:.1f}" if "fd_effnet" in r else ""
    return f"FD {r['fd']:.3f} (P {r['precision']:.2f} / R {r['recall']:.2f}{share}){second}"


def markdown(path: str, rec: dict, budgets, ref_nfe: int) -> str:
    info, floor = rec["info"], rec["floor"]
    head = (f"### {path}: {info['kind']} {'x'.join(map(str, info['shape']))}, step {info['step']}, "
            f"{rec['metric']}@{evaluate.count_label(rec['n'])}"
            + {"data": ", class-conditional, classes drawn from p(c) (`--class data`, w = 1)",
               "clusters": ", cluster-conditional, clusters drawn from p(c) (as `dforge sample RUN`, w = 1)"
               }.get(info.get("classes"), "")
            + "\n\nEach cell: FD (precision / recall"
            f"{', smallest-largest digit share' if info['kind'] == 'mnist' else ''}); rows by FD at "
            f"{rank_budget(budgets)} NFE.\n\n| sampler | options | grid | " + " | ".join(f"{b} NFE" for b in budgets)
            + " |\n|---|---|---|" + "---|" * len(budgets))
    cells: dict[str, dict] = {}
    for r in rec["rows"]:
        c = cells.setdefault(key(r, r["grid"]), {"row": r, "order": math.inf})
        c[r["budget"]] = fmt_row(r).removeprefix("FD ")
        c["order"] = r["fd"] if r["budget"] == rank_budget(budgets) else c["order"]
    lines = [head]
    for c in sorted(cells.values(), key=lambda c: c["order"]):
        r = c["row"]
        lines.append(f"| {r['sampler']} | {opts_text(r) or '-'} | {r['grid']} | "
                     + " | ".join(c.get(b, "-") for b in budgets) + " |")
    second = "fd_effnet" in floor
    lines += ["", "| reference | NFE | FD | precision | recall |" + (" FD-EffNet |" if second else "") + " seconds |",
              "|---|---|---|---|---|---|" + ("---|" if second else "")]
    lines += [f"| {label(r, r['grid'])} | {r['nfe']:g} | {r['fd']:.3f} | {r['precision']:.2f} | {r['recall']:.2f} | "
              + (f"{r.get('fd_effnet', math.nan):.1f} | " if second else "") + f"{r['seconds']:.0f} |"
              for r in rec["reference"]]
    lines += [(f"| floor: {floor['what']} | - | {floor['fd']:.3f} | {floor['precision']:.2f} | "
               f"{floor['recall']:.2f} | " + (f"{floor['fd_effnet']:.1f} | " if second else "") + "- |"), ""]
    if rec.get("confirm"):
        first = {(key(r, r["grid"]), r["budget"]): r for r in rec["rows"] + rec["reference"]}
        lines += ["| confirmed on seeds n..2n-1 | NFE | FD, sweep's seeds | FD, new seeds |"
                  + (" FD-EffNet, sweep's / new |" if second else ""), "|---|---|---|---|" + ("---|" if second else "")]
        for r in rec["confirm"]:
            f = first[(key(r, r["grid"]), r["budget"])]
            lines.append(f"| {label(r, r['grid'])} | {r['nfe']:g} | {f['fd']:.3f} | {r['fd']:.3f} |"
                         + (f" {f['fd_effnet']:.1f} / {r['fd_effnet']:.1f} |" if second else ""))
        lines.append("")
    lines += [f"- {'PASS' if c['pass'] else 'FAIL'} {name} ({c['fd']:.3f} / {c['best']:.3f} = {c['ratio']:.2f} x)"
              for name, c in checks(rec, budgets, ref_nfe).items()]
    return "\n".join(lines) + "\n"


def paste_defaults(records: list[dict], budgets) -> str:
    """Per budget, the row with the lowest mean FD / best FD over the runs that measured it in every run."""
    best = {}
    for b in budgets:
        ranked = rank(records, b)
        if ranked:
            v, grid, ratio = ranked[0]
            best[b] = {"sampler": v["sampler"], "options": v["options"], "sigmas": grid, "fd_over_best": round(ratio, 3)}
    return "DEFAULT_SAMPLERS = {\n" + "".join(f"    {b}: {d!r},\n" for b, d in best.items()) + "}"


def report(out: Path, paths: list[str], results: dict, mnist: list[dict], args) -> None:
    """table.md and the printout: the tables, each run's best per budget, the pooled best to paste."""
    table = "".join(markdown(p, results["runs"][p], args.budgets, top_nfe(args)) + "\n" for p in paths)
    (out / "table.md").write_text(table)
    print("\n" + table)
    for p in paths:
        for b in args.budgets:
            r = min((r for r in results["runs"][p]["rows"] if r["budget"] == b), key=lambda r: r["fd"], default=None)
            if r:
                print(f"best at {b} NFE on {p}: {label(r, r['grid'])} ({r['steps']} steps) {fmt_row(r)}")
    records = list({**{id(r): r for r in mnist}, **{id(results["runs"][p]): results["runs"][p] for p in paths}}.values())
    print(f"\nper budget, the best over {len(records)} run(s) (mean over runs of FD / that run's best FD):\n"
          f"{paste_defaults(records, args.budgets)}")

