"""Where along the sampling path an unconditional MNIST model's digit shares drift (issue 13's share target).

    python benchmarks/digit_drift.py --run outputs/demo --run outputs/bench-ttq-s16/ours-10min

For each run, n samples (seeds 0..n-1) with each sampler, on the default grid. At every step the project's
digit classifier labels the x0 prediction D(x, sigma) of every sample, and the table gives per step: each
digit's share of those labels, and how many samples carry a label other than the one their final image gets.
The default (dpmpp_2m_sde at eta 5 with s_tmax 5) and the same solver at eta 0 (its ODE, dpmpp_2m) share
every step that starts above s_tmax, bit for bit; below it only the default draws fresh noise. So the two
tables, side by side, show how much of the final proportions the top of the path fixes, and what the fresh
noise below s_tmax moves. The x0 prediction at high noise is a blur; its label is the classifier's best guess
of which digit the blur is heading to, not a sample of the data.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe import parse_sampler  # noqa: E402
from samplers_trained import run_info  # noqa: E402  (loads a run; a clear message for what it cannot score)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from diffusion_forge import evaluate  # noqa: E402
from diffusion_forge.data import load_mnist, to_uint8  # noqa: E402
from diffusion_forge.sampling.generate import generate  # noqa: E402
from diffusion_forge.sampling.registry import resolve_sampler  # noqa: E402

SAMPLERS = ["dpmpp_2m_sde:eta=5,s_tmax=5", "dpmpp_2m_sde:eta=0"]


def labels_along_the_path(D, clf, n: int, sampler: str, options: dict, steps: int) -> tuple[list, np.ndarray]:
    """(the sigma of each step, labels[step, sample] of the x0 predictions), the final image's labels last."""
    sigmas: dict[int, float] = {}
    labels = np.zeros((steps + 1, n), dtype=np.int64)

    def record(info):
        lo, hi = info["batch"]
        sigmas[info["step"]] = float(info["sigma"])
        labels[info["step"], lo:hi] = clf.predict_proba(to_uint8(info["x0"].float())).argmax(1).numpy()

    with torch.no_grad():
        final = generate(D, n, seed=0, sampler=sampler, steps=steps, sampler_options=options, batch_size=250,
                         callback=record, progress=True, precision="auto")
    labels[steps] = clf.predict_proba(to_uint8(final)).argmax(1).numpy()
    return [sigmas[i] for i in range(steps)] + [0.0], labels


def table(sigmas: list, labels: np.ndarray) -> str:
    """One row per step: sigma, each digit's share (%), the samples whose label differs from the final one (%)."""
    n = labels.shape[1]
    lines = ["| step | sigma | " + " | ".join(str(d) for d in range(10)) + " | label != final |",
             "|---:|---:|" + "---:|" * 11]
    for i, (s, row) in enumerate(zip(sigmas, labels)):
        share = np.bincount(row, minlength=10) / n
        changed = float((row != labels[-1]).mean())
        name = "final" if i == len(sigmas) - 1 else str(i)
        cells = [f"{100 * v:.1f}" for v in share] + [f"{100 * changed:.1f}"]
        lines.append(f"| {name} | {s:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="an unconditional MNIST run folder (repeatable)")
    p.add_argument("--samplers", nargs="+", default=SAMPLERS, help="name:option=value,... each")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        raise SystemExit("--n and --steps must be >= 1")
    for spec in args.samplers:
        try:
            name, options = parse_sampler(spec)
            resolve_sampler(name, args.steps, options)
        except ValueError as e:
            raise SystemExit(f"--samplers {spec}: {e}") from None
    runs = [run_info(run, "cpu", dry=False) for run in args.run]
    for info in runs:
        if info["kind"] != "mnist":
            raise SystemExit(f"{info['path']}: digit labels need an MNIST run (1x28x28); this one is {info['kind']}")
    clf = evaluate.digit_classifier()
    _, test_labels = load_mnist("test")
    data = np.bincount(test_labels, minlength=10) / len(test_labels)
    print("MNIST test set, digit shares (%): " + ", ".join(f"{d}: {100 * v:.1f}" for d, v in enumerate(data)))
    for info in runs:
        for spec in args.samplers:
            name, options = parse_sampler(spec)
            sigmas, labels = labels_along_the_path(info["D"], clf, args.n, name, options, args.steps)
            print(f"\n#### {info['path']} (step {info['step']}): {spec}, {args.steps} steps, seeds 0-{args.n - 1}\n")
            print(table(sigmas, labels), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
