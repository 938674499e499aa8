"""Cluster conditioning against the unconditional recipe and the digit labels, at a fixed step count (issue 13).

    python benchmarks/cluster_conditioning.py --steps 2400 --seed 1 --out outputs/clusters-s1 \\
        --variant none --variant cluster:100
    python benchmarks/cluster_conditioning.py --steps 2400 --seed 0 --out outputs/clusters-s0 \\
        --variant none --variant class --variant cluster:50 --variant cluster:100 --variant cluster:200

Each variant is the default MNIST recipe trained from scratch for ``--steps`` steps with ``--seed``:
``none`` (unconditional, the default), ``class`` (the digit labels, ``conditioning.kind=class``) or ``cluster:K``
(``conditioning.kind=cluster``, ``conditioning.clusters=K``: k-means ids of the images, no labels). Every run is
sampled as its own `dforge sample RUN` would draw it from the data's distribution: unconditional; or each image's
class / cluster drawn from the run's recorded shares p(c), unguided (``--class data``; a cluster run's default).
Scored with time_to_quality's scorer on ``--blocks`` blocks of 1,000 seeds at 10 and 20 NFE: FD-Digits@1k
against the MNIST test set, recall, the digit shares; the floor is 1,000 training images drawn by ``--seed``.
Every cell also shows FD-LeNet@1k (a second, independent MNIST classifier's features; since session 23), and
``--effnet`` adds FD-EffNet@1k, the instrument of recipe_levers.py (EfficientNet-Lite0 features against 5,000
test images): K was chosen on FD-Digits, so a confirmation should not rest on FD-Digits alone. The purity of a cluster run (the share of training images whose digit is their cluster's most common one) is
printed for reading only: no label reaches a cluster run. A trained run and a scored variant are reused.
Training runs one at a time; fixed step counts make the rows independent of the machine's speed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_quality import Scorer, draw  # noqa: E402

from diffusion_forge.io.files import write_json  # noqa: E402
from diffusion_forge.sampling.generate import data_class_labels  # noqa: E402
from diffusion_forge.sampling.registry import resolve_sampler  # noqa: E402
from diffusion_forge.training import Trainer, merge_config  # noqa: E402

NFE = (10, 20)


def variant_flags(name: str) -> dict:
    """The --set keys of a variant: none, class or cluster:K."""
    kind, _, k = name.partition(":")
    if kind in ("none", "class") and not k:
        return {"conditioning.kind": kind}
    if kind == "cluster" and k.isdigit():
        return {"conditioning.kind": "cluster", "conditioning.clusters": int(k)}
    raise SystemExit(f"--variant {name!r}: write none, class or cluster:K (K an integer >= 2)")


def train(run: Path, name: str, steps: int, seed: int) -> Trainer:
    cfg = merge_config(flags={"data.source": "mnist", "run.seed": seed, "run.sample_every": 0, "optim.steps": steps,
                              **variant_flags(name)})
    trainer = Trainer(cfg, run, progress=True)   # resumes a run folder that exists
    if trainer.step < steps:
        trainer.fit()
    return trainer


def purity(trainer: Trainer) -> float | None:
    ids = trainer.data.cluster_ids
    if ids is None:
        return None
    labels = torch.as_tensor(trainer.data.dataset.labels)
    return sum(int(torch.bincount(labels[ids == j], minlength=10).max()) for j in range(trainer.num_classes)) / len(ids)


def score_variant(trainer: Trainer, score: Scorer, blocks: list[int], effnet=None) -> list[dict]:
    D, p_c, s = trainer.ema_denoiser().eval(), trainer.data.class_frequencies, trainer.cfg.sample
    rows = []
    for block in blocks:
        seed = 1000 * block
        cond = None if p_c is None else {"class_labels": data_class_labels(p_c, score.n, seed=seed)}
        for nfe in NFE:
            name, steps, options = resolve_sampler(s.sampler, nfe, dict(s.options),
                                                   samples="unconditional" if p_c is None else "data")
            images = draw(D, score.n, name, steps, options, cond, seed=seed)
            extra = {} if effnet is None else {"fd_effnet": effnet.extra(images)["fd_effnet"]}
            rows.append({"block": block, "nfe": nfe, **score(images), **extra})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="none, class or cluster:K (repeatable)")
    p.add_argument("--steps", type=int, default=2400, help="optimiser steps of every run")
    p.add_argument("--seed", type=int, default=0, help="training seed (and the floor's draw)")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 1], help="blocks of 1,000 sample seeds")
    p.add_argument("--out", type=Path, default=Path("outputs/cluster-conditioning"))
    p.add_argument("--effnet", action="store_true", help="also FD-EffNet@1k (a second instrument)")
    args = p.parse_args()
    for name in args.variant:
        variant_flags(name)                      # every variant checked before any training
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    score = Scorer(1000, seed=args.seed)
    effnet = None
    if args.effnet:
        from samplers_trained import DigitScorer

        effnet = DigitScorer(1000, seed=args.seed, effnet=True)
    for name in args.variant:
        first = results[name]["rows"][0] if name in results else {}
        if "fd_lenet" in first and (not args.effnet or "fd_effnet" in first):
            continue
        trainer = train(args.out / name.replace(":", "-"), name, args.steps, args.seed)
        results[name] = {"purity": purity(trainer), "rows": score_variant(trainer, score, args.blocks, effnet)}
        write_json(results_path, {**results, "floor": score.floor})
    floor = score.floor
    if effnet is not None:
        floor_effnet = effnet.extra(effnet.floor_images)["fd_effnet"]
        print(f"FD-EffNet floor (1,000 training images): {floor_effnet:.1f}")
    print(f"\n{args.steps} steps, training seed {args.seed}; floor FD-Digits {floor['fd']:.2f}, recall "
          f"{floor['recall']:.3f}; FD-LeNet floor {floor['fd_lenet']:.2f}; cells: FD-Digits / recall / digit shares / "
          f"FD-LeNet [/ FD-EffNet]\n")
    cells = [(b, n) for b in args.blocks for n in NFE]
    print("| variant | purity | " + " | ".join(f"block {b}, {n} NFE" for b, n in cells) + " | mean FD | mean FD-LeNet |")
    print("|---|---:|" + "---|" * len(cells) + "---:|---:|")
    for name in args.variant:
        r = results[name]
        rows = {(x["block"], x["nfe"]): x for x in r["rows"]}
        text = [f"{rows[c]['fd']:.2f} / {rows[c]['recall']:.3f} / {rows[c]['min_share']:.1%}-{rows[c]['max_share']:.1%}"
                f" / {rows[c]['fd_lenet']:.2f}" + (f" / {rows[c]['fd_effnet']:.1f}" if "fd_effnet" in rows[c] else "")
                for c in cells]
        mean = sum(rows[c]["fd"] for c in cells) / len(cells)
        mean_lenet = sum(rows[c]["fd_lenet"] for c in cells) / len(cells)
        pur = "-" if r["purity"] is None else f"{r['purity']:.2f}"
        print(f"| {name} | {pur} | " + " | ".join(text) + f" | {mean:.2f} | {mean_lenet:.2f} |")


if __name__ == "__main__":
    main()
