"""Every sampler on TRAINED networks (issue 13): which sampler, options and grid to default to per NFE budget.

    python benchmarks/samplers_trained.py --run outputs/st/mnist-10min --run outputs/st/mnist-30min --dry-run
    python benchmarks/samplers_trained.py --run outputs/st/mnist-10min --run outputs/st/mnist-30min \\
        --out outputs/bench-samplers-trained
    python benchmarks/samplers_trained.py --run outputs/st/emoji --out outputs/bench-samplers-trained   # after those

Runs are trained beforehand by ``dforge train``. MNIST runs (1x28x28): every sampler on its default grid (the
model's sigmas, trailing spacing) at each NFE budget, at the largest step count whose NFE fits
(``SamplerSpec.steps_for``; the NFE is then counted on the network), stochastic ones at their defaults plus
euler_ancestral at eta 1.2-1.8, dpmpp_2m_sde at eta 1.4-8, the same with no noise above sigma s_tmax = 3 or 5
(the default is eta 5, s_tmax 5) and iPNDM with afs + free_last_step; the ``--top`` best at 10 NFE again on
the Karras and exponential grids. Colour runs (3 channels, e.g. emoji at 32 px): the
``--top`` best of the MNIST runs in --out's results.json or --ranking's (else the full sweep). Every run also
gets the registry's current default per budget and up to three references at ``--reference-steps`` NFE:
euler_ancestral (eta 1), the current default and the best stochastic setting at the largest budget. Same
per-sample seeds (sample i: seed i) in every row. A class-conditional run (``dforge train --conditioning class``)
is sampled as ``dforge sample RUN --class data`` samples it: sample i's class drawn from the training set's shares
p(c) by seed i (``data_class_labels``), no guidance; its current default is the rule's for such samples
(``DATA_CLASS_SAMPLERS``). A cluster-conditional run (``--conditioning cluster``) is sampled the same way, with
clusters drawn from their shares, as `dforge sample RUN` draws it.
FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) between Gaussians fitted to features: FD-Digits
against the MNIST test set, FD-EffNet against the whole colour data set; precision / recall: k = 3
nearest-neighbour manifolds against n real images. Targets: FD at 10 NFE <= 1.2 x, at 20 NFE <= 1.1 x, the best
FD of any row. ``--effnet`` (MNIST runs) scores every row a second time, in the features of an instrument that
chose nothing here: FD-EffNet against 5,000 MNIST test images (floor: the same n training images), and checks
the targets under it too. The two disagree where samples differ in what a digit classifier ignores (faint
background noise, blur): docs/samplers.md, "Ten NFE". Details: docs/samplers.md, "On trained networks".

This file: the scorers, loading a run, the measuring (Bench, the sweep, the confirmation block), the plan and
main. What a row is (variants, keys, labels, the current default, the ranking): benchmarks/sampler_rows.py; the
records turned into verdicts and tables (the targets' checks, table.md, the printout): benchmarks/sampler_tables.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import diffusion_forge as df
from diffusion_forge import evaluate
from diffusion_forge.data import load_mnist, to_uint8
from diffusion_forge.sampling.generate import data_class_labels, generate
from diffusion_forge.sampling.registry import SAMPLERS
from sampler_rows import current_default, key, label, rank, rank_budget, samples_of, sweep_variants, variant
from sampler_tables import checks, fmt_row, metrics_of, report, target_rows, top_nfe

MS_PER_IMAGE_NFE = 1.0                # the lead's machine, a 28x28 image under bf16 autocast (1.8 in fp32)
PRECISION = "auto"                    # bf16 where the CPU has it: moves FD-Digits@1k by 0.26, less than a new
                                      # draw of seeds (benchmarks/throughput.py --fd, docs/performance.md)
BATCH = 250
EFFNET_REAL = 5000                    # MNIST test images behind the second instrument (--effnet)


# Scores

class Scorer:
    """FD of sample features against ``self.ref`` (mean, covariance), precision / recall against ``self.real``."""

    def features(self, images: np.ndarray) -> torch.Tensor:
        return self.net.features(images)

    def score(self, images: np.ndarray) -> dict:
        f = self.features(images)
        precision, recall = evaluate.precision_recall(self.real, f)
        return {"fd": evaluate.frechet_distance(*evaluate.feature_stats(f), *self.ref), "precision": precision,
                "recall": recall, **self.extra(images)}

    def extra(self, images) -> dict:
        return {}


class DigitScorer(Scorer):
    """FD-Digits vs the MNIST test set; precision / recall vs n test images; the digit class share.
    Floor: n training images."""
    label = "FD-Digits"

    def __init__(self, n: int, seed: int = 0, effnet: bool = False):
        self.clf = evaluate.digit_classifier()
        self.net = self.clf
        test = load_mnist("test")[0]
        feats = self.clf.features(test)
        self.ref = evaluate.feature_stats(feats)
        rng = np.random.default_rng(seed)
        self.real = feats[torch.as_tensor(rng.permutation(len(feats))[:n])]
        train = load_mnist("train")[0]
        self.floor_images = train[np.sort(rng.choice(len(train), n, replace=False))]
        self.effnet = None
        if effnet:    # the second instrument: its own draw of test images, so the first's draws stay as they were
            self.effnet = evaluate.feature_network("effnet")
            pick = np.sort(np.random.default_rng(seed + 1).choice(len(test), min(EFFNET_REAL, len(test)), replace=False))
            self.effnet_ref = evaluate.feature_stats(self.effnet.features(test[pick]))

    def extra(self, images) -> dict:
        share = np.bincount(self.clf.predict_proba(images).argmax(1).numpy(), minlength=10) / len(images)
        out = {"class_min": float(share.min()), "class_max": float(share.max()), "shares": share.round(4).tolist()}
        if self.effnet is not None:
            f = self.effnet.features(images)
            out["fd_effnet"] = evaluate.frechet_distance(*evaluate.feature_stats(f), *self.effnet_ref)
        return out

    def floor(self) -> dict:
        return {**self.score(self.floor_images), "what": f"{len(self.floor_images)} MNIST training images"}


class ColourScorer(Scorer):
    """FD-EffNet vs the whole data set; precision / recall vs n of its images; floor: its two disjoint halves."""
    label = "FD-EffNet"

    def __init__(self, data: str, image_size, channels, n: int, seed: int = 0):
        self.net, self.data = evaluate.feature_network("effnet"), data
        feats = evaluate.reference_features(self.net, data, None, image_size=image_size, channels=channels)
        self.ref = evaluate.feature_stats(feats)
        perm = torch.as_tensor(np.random.default_rng(seed).permutation(len(feats)))
        self.real, half = feats[perm[:n]], len(feats) // 2
        self.halves = feats[perm[:half]], feats[perm[half:2 * half]]

    def floor(self) -> dict:
        a, b = self.halves
        precision, recall = evaluate.precision_recall(a, b)
        return {"fd": evaluate.frechet_distance_features(a, b), "precision": precision, "recall": recall,
                "what": f"two disjoint halves of {self.data} ({len(a)} images each)"}


# Runs

def run_info(path: str, device: str, dry: bool) -> dict:
    """The run's denoiser and kind (mnist / colour); a dry run of a folder not trained yet guesses from its name."""
    p = Path(path)
    if not (p / "config.json").exists():
        if not dry:
            raise SystemExit(f"{p} is not a run folder (no config.json): train it first with dforge train --out {p}")
        colour = "emoji" in p.name.lower()
        print(f"note: {p} is not trained yet; planning it as {'emoji 3x32x32' if colour else 'MNIST 1x28x28'}")
        return {"path": str(p), "kind": "colour" if colour else "mnist", "data": "emoji" if colour else "mnist",
                "shape": (3, 32, 32) if colour else (1, 28, 28), "D": None, "step": None, "class_frequencies": None}
    D = df.load_model_from_run(p, device=device)
    cfg, shape = D.config, tuple(D.sample_shape)
    data, kind = cfg["data"]["source"], cfg["conditioning"]["kind"]
    if getattr(D, "vae", None) is not None or kind not in ("none", "class", "cluster"):
        raise SystemExit(f"{p}: this benchmark scores pixel-space runs, unconditional, class- or cluster-conditional "
                         f"(this one is {'latent' if getattr(D, 'vae', None) is not None else kind + '-conditioned'})")
    p_c = getattr(D, "class_frequencies", None)
    if kind in ("class", "cluster") and p_c is None:
        raise SystemExit(f"{p}: a {kind}-conditional run is scored as `dforge sample --class data` samples it, with "
                         "classes drawn from the training set's shares p(c), and this run records none (trained "
                         "before runs recorded them): train it again")
    if str(data).lower() == "mnist" and shape == (1, 28, 28):
        kind = "mnist"
    elif shape[0] == 3:
        kind = "colour"
    else:
        raise SystemExit(f"{p}: data {data!r} of shape {shape}: scored are MNIST (1x28x28) and colour (3-channel) runs")
    return {"path": str(p), "kind": kind, "data": data, "shape": shape, "D": D, "step": D.step,
            "image_size": cfg["data"].get("image_size"), "channels": cfg["data"].get("channels"),
            "class_frequencies": p_c, "conditioning": cfg["conditioning"]["kind"]}


class Bench:
    """Measures rows on one run, skipping those already in its record, and saves after each."""

    def __init__(self, info: dict, rec: dict, n: int, save, effnet: bool = False, seed: int = 0):
        self.info, self.rec, self.n, self.save, self.seed = info, rec, n, save, seed
        self.scorer = (DigitScorer(n, effnet=effnet) if info["kind"] == "mnist" else
                       ColourScorer(info["data"], info["image_size"], info["channels"], n))
        if "floor" not in rec:
            rec["floor"] = self.scorer.floor()
            save()

    def cond(self, seed: int) -> dict | None:
        """A class-conditional run's labels, as ``dforge sample --class data`` draws them: y_i ~ p(c) for sample
        i from seed i alone (no guidance: one network call per step, and x_i ~ p(x | y_i) follows p(x))."""
        p_c = self.info["class_frequencies"]
        return None if p_c is None else {"class_labels": data_class_labels(p_c, self.n, seed=seed)}

    def measure(self, v: dict, grid: str, budget: int, where: str = "rows", seed: int | None = None) -> dict | None:
        """One row: n samples of seeds seed..seed + n - 1 (the sweep: --seed; the confirmation block: --seed + n)."""
        seed = self.seed if seed is None else seed
        spec = SAMPLERS[v["sampler"]]
        steps = spec.steps_for(budget, **v["options"])
        if steps == 0:
            return None
        for row in self.rec.setdefault(where, []):
            if key(row, row["grid"]) == key(v, grid) and row["budget"] == budget:
                return row
        D, t0 = self.info["D"], time.perf_counter()
        D.nfe = 0
        x = generate(D, self.n, seed=seed, sampler=v["sampler"], steps=steps, sampler_options=v["options"],
                     sigmas=grid, batch_size=BATCH, progress=True, precision=PRECISION, cond=self.cond(seed))
        nfe = D.nfe / math.ceil(self.n / BATCH)                  # network calls per sample, counted
        bad = float((~torch.isfinite(x).flatten(1).all(1)).float().mean())
        row = {**v, "grid": grid, "budget": budget, "steps": steps, "nfe": nfe, "nonfinite": bad, "seed": seed,
               **self.scorer.score(to_uint8(torch.nan_to_num(x))), "seconds": time.perf_counter() - t0}
        self.rec[where].append(row)
        print(f"  {label(v, grid):<48} {budget:>3} NFE ({steps:>3} steps, {nfe:g} counted)  {fmt_row(row)}"
              f"  ({row['seconds']:.0f} s)" + (f"  {bad:.0%} NON-FINITE" if bad else ""), flush=True)
        self.save()
        return row


def bench_run(bench: Bench, args, variants: list[dict], ranking) -> None:
    """The sweep (or the given ranking's top), the current defaults, then the references."""
    rec, budgets, top = bench.rec, args.budgets, args.top
    if ranking is None:
        for v in variants:
            for b in budgets:
                bench.measure(v, "default", b)
        for v, _, _ in rank([rec], rank_budget(budgets), grids=("default",))[:top]:
            for grid in ("karras", "exponential"):
                for b in budgets:
                    bench.measure(v, grid, b)
    else:
        for v, grid, _ in ranking[:top]:
            for b in budgets:
                bench.measure(v, grid, b)
    samples = samples_of(rec)                          # the rule's table: "data" for a class-conditional run
    for b in budgets:
        bench.measure(current_default(b, samples), "default", b)
    if not args.reference_steps:                       # --reference-steps 0: a screen without the long rows
        return
    stochastic = [r for r in rec["rows"] if SAMPLERS[r["sampler"]].stochastic and r["budget"] == max(budgets)]
    refs = [(variant("euler_ancestral"), "default"), (current_default(max(budgets), samples), "default")]
    if stochastic:
        best = min(stochastic, key=lambda r: r["fd"])
        refs.append((variant(best["sampler"], best["options"]), best["grid"]))
    for v, grid in {key(v, grid): (v, grid) for v, grid in refs}.values():   # each once
        bench.measure(v, grid, args.reference_steps, where="reference")


def confirm(bench: "Bench", metrics) -> None:
    """The target rows again on a fresh block of seeds (n..2n-1). The best of about 100 rows on one block is
    the luckiest draw as much as the best sampler (a spread of about 1 FD at n = 1,000), so it is biased low;
    the same row on seeds it was not chosen on is not. The block: seeds seed + n .. seed + 2n - 1."""
    picked = {}
    for m in metrics:
        for r in target_rows(bench.rec, m).values():
            picked.setdefault((key(r, r["grid"]), r["budget"]), r)
    for r in picked.values():
        bench.measure(variant(r["sampler"], r["options"]), r["grid"], r["budget"], where="confirm",
                      seed=bench.seed + bench.n)


# Plan and main

def save_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def plan(info: dict, args, variants: list[dict], ranked: bool) -> float:
    """Print the planned rows (NFE, samples) and return the estimated sampling seconds."""
    lines, nfe_total = [], 0
    if not ranked:
        for v in variants:
            nfes = [SAMPLERS[v["sampler"]].nfe(s, **v["options"]) if s else 0
                    for s in (SAMPLERS[v["sampler"]].steps_for(b, **v["options"]) for b in args.budgets)]
            lines.append(f"    {label(v, 'default'):<48} NFE {'/'.join(map(str, nfes))}")
            nfe_total += sum(nfes)
        extra = args.top * 2 * sum(args.budgets)
        lines.append(f"    top {args.top} at {rank_budget(args.budgets)} NFE @karras and @exponential: <= {extra} NFE")
    else:
        extra = (args.top + 1) * sum(args.budgets)
        lines.append(f"    top {args.top} (sampler, grid) of the MNIST ranking + the current default: <= {extra} NFE")
    nfe_total += extra + 3 * args.reference_steps
    lines.append(f"    references: euler_ancestral, the default and the best stochastic setting at "
                 f"{args.reference_steps} NFE")
    seconds = MS_PER_IMAGE_NFE / 1000 * info["shape"][1] * info["shape"][2] / 784 * args.n * nfe_total
    print(f"{info['path']} ({info['kind']} {'x'.join(map(str, info['shape']))}): {args.n} samples per row, "
          f"<= {nfe_total} NFE per sample in all, ~{seconds / 60:.0f} min of sampling", *lines, sep="\n")
    return seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="a dforge train run folder (repeatable)")
    p.add_argument("--samplers", nargs="+", help="restrict the sweep: names, or NAME:KEY=VALUE,... settings")
    p.add_argument("--budgets", nargs="+", type=int, default=[5, 10, 20], help="NFE budgets")
    p.add_argument("--n", type=int, default=1000, help="samples per row (and real images for precision / recall)")
    p.add_argument("--reference-steps", type=int, default=250,
                   help="NFE of the long reference rows (0: none, for a screen of a few settings)")
    p.add_argument("--top", type=int, default=5, help="best rows at 10 NFE that also run on karras / exponential")
    p.add_argument("--ranking", nargs="+", default=[], help="results.json files whose MNIST runs rank the colour rows")
    p.add_argument("--out", default="outputs/bench-samplers-trained", help="folder for results.json and table.md")
    p.add_argument("--effnet", action="store_true",
                   help="MNIST runs: also FD-EffNet against 5,000 test images on every row, a second instrument "
                        "(about 10 s more per row)")
    p.add_argument("--confirm", action="store_true",
                   help="measure the rows the targets compare (the best at any NFE, the default and the best at "
                        "10 and 20 NFE) again on seeds n..2n-1 and check the targets there too: the best of ~100 "
                        "rows on one block of seeds is biased low")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed of the sweep's block (seeds seed..seed+n-1); a new --out for another block")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; sample nothing")
    args = p.parse_args(argv)
    if args.n < 4 or min(args.budgets) < 1 or args.top < 0 or args.reference_steps < 0:
        raise SystemExit("--n must be >= 4 (precision / recall), budgets >= 1, --reference-steps >= 0, --top >= 0")
    args.budgets = sorted(set(args.budgets))
    variants = sweep_variants(args.samplers)
    infos = sorted((run_info(r, args.device, args.dry_run) for r in args.run), key=lambda i: i["kind"] != "mnist")
    out = Path(args.out)
    settings = {"n": args.n, "reference_steps": args.reference_steps, "seed": args.seed, "batch": BATCH}
    if args.effnet:                                    # rows scored without it are not reused
        settings["effnet"] = True
    old = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    results = old if old.get("settings") == settings else {"settings": settings, "runs": {}}
    pool = {}                                          # the MNIST records that rank a colour run's rows
    for f in args.ranking:
        if not Path(f).is_file():
            raise SystemExit(f"--ranking {f}: no such results.json")
        pool.update(json.loads(Path(f).read_text())["runs"])
    mnist = lambda: [r for r in {**pool, **results["runs"]}.values() if r["info"]["kind"] == "mnist"]
    if args.dry_run:
        has_mnist = bool(mnist()) or infos[0]["kind"] == "mnist"
        total = sum(plan(i, args, variants, i["kind"] == "colour" and has_mnist) for i in infos)
        print(f"estimated sampling time: {total / 60:.0f} min at {MS_PER_IMAGE_NFE} ms per 28x28 image per NFE "
              f"(scaled by pixels; feature extraction comes on top)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    save = lambda: save_json(out / "results.json", results)
    start = time.perf_counter()
    for info in infos:
        print(f"\n{info['path']}: {info['kind']} {info['shape']}, step {info['step']}", flush=True)
        rec = results["runs"].setdefault(info["path"], {"rows": [], "reference": []})
        rec.update(info={k: info[k] for k in ("kind", "data", "shape", "step")}, n=args.n)
        if info["class_frequencies"] is not None:       # a class- or cluster-conditional run, sampled like the data
            rec["info"]["classes"] = "clusters" if info["conditioning"] == "cluster" else "data"
        bench = Bench(info, rec, args.n, save, effnet=args.effnet, seed=args.seed)
        rec["metric"] = bench.scorer.label
        ranking = rank(mnist(), rank_budget(args.budgets)) if info["kind"] == "colour" and mnist() else None
        bench_run(bench, args, variants, ranking)
        if args.confirm:
            confirm(bench, metrics_of(rec))
        rec["checks"] = checks(rec, args.budgets, top_nfe(args))
        save()
    report(out, [i["path"] for i in infos], results, mnist(), args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; results: {out / 'results.json'}, table: {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
