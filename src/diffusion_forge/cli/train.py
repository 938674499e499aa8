"""`dforge train`: train a diffusion model into a run folder, or resume it."""
from __future__ import annotations

import argparse

EXAMPLES = """examples:
  dforge train --data mnist --out runs/mnist                    the default recipe (minutes on 2 cores)
  dforge train --data photos/ --out runs/photos --set image_size=32 --set preset=base
  dforge train --out runs/mnist                                 resume (also after a crash or Ctrl-C)
  dforge train --out runs/mnist --set steps=6000 --allow-changes
  dforge train --data mnist --overfit-batch                     does the pipeline learn at all?
  torchrun --nproc_per_node 2 -m diffusion_forge train --out runs/mnist     2 CPU processes (gloo)
  accelerate launch --num_processes 4 -m diffusion_forge train --out runs/mnist   4 GPUs

config keys (--set KEY=VALUE or a YAML/JSON file; defaults < file < --set; see docs/training.md):
"""


def register(sub) -> None:
    p = sub.add_parser("train", help="train a diffusion model (or resume a run folder)",
                       description="Train a diffusion model on your images or a bundled data set. The run folder "
                                   "gets config.json, checkpoints/, samples/, metrics.jsonl and loss.png; running "
                                   "the command again on it resumes from the newest checkpoint.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    p.add_argument("--data", help="data set: a bundled name (mnist, digits, emoji, moons, ...), a folder of "
                                  "images, or hf:NAME (same as --set data=...)")
    p.add_argument("--out", help="the run folder (created, or resumed when it exists)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of config keys")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one config key (repeatable); wins over --config")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume an existing run even though some settings differ from those it started with")
    p.add_argument("--overfit-batch", action="store_true",
                   help="sanity check: train on one fixed batch and print whether the loss falls below "
                        "0.1 x its initial value (no run folder is written)")
    p.add_argument("--overfit-steps", type=int, default=300, help="steps of the --overfit-batch check")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much training time, with a checkpoint (run again to go on)")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(func=run)


def config_table() -> list[tuple[str, str, str]]:
    """(key, default, comment) for each field of TrainConfig, read from training.py's source text, so that
    `dforge --help` does not import torch."""
    import importlib.util
    import re

    with open(importlib.util.find_spec("diffusion_forge.training").origin) as f:
        source = f.read()
    body = source.split("class TrainConfig:", 1)[1].split("def __post_init__", 1)[0]
    field = re.compile(r"^    (\w+): [^=]+= (.+?)(?:\s+# (.*))?$")
    rows = []
    for line in body.splitlines():
        m = field.match(line)
        if m:
            default = re.sub(r"field\(default_factory=(?:lambda: )?(.*)\)$", r"\1", m.group(2)).replace("dict", "{}")
            rows.append((m.group(1), default, m.group(3) or ""))
    return rows


def _epilog() -> str:
    rows = config_table()
    width = max(len(k) for k, _, _ in rows)
    return EXAMPLES + "\n".join(f"  {k:<{width}}  {d:<15} {c}" for k, d, c in rows)


def run(args) -> int:
    import json

    from ..training import TrainingDiverged, overfit_batch, parse_set_flags, run_config, train
    from . import UserError

    flags = parse_set_flags(args.overrides)
    if args.data is not None:
        flags["data"] = args.data
    if args.overfit_batch:
        from ..training import merge_config

        cfg = merge_config(None, args.config, flags)
        result = overfit_batch(cfg, steps=args.overfit_steps, progress=not args.no_progress)
        print(result["verdict"])
        return 0 if result["passed"] else 1
    if not args.out:
        raise UserError("--out RUN_FOLDER is required (it is created, or resumed when it exists)")
    cfg, changes = run_config(args.out, args.config, flags, allow_changes=args.allow_changes)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    if changes:
        print("resuming with changed settings: " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
    try:
        summary = train(cfg, args.out, progress=not args.no_progress,
                        max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    except TrainingDiverged as e:
        print(f"dforge train: error: {e}")
        return 1
    if summary["interrupted"]:
        return 130
    if summary["step"] > summary["start_step"]:
        print(f"trained {args.out} to step {summary['step']} in {summary['seconds']:.0f} s; samples: "
              f"{summary.get('samples', '-')}; loss curve: {args.out}/loss.png")
    else:
        print(f"{args.out} is already trained to step {summary['step']} (raise it with --set steps=N --allow-changes)")
    return 0
