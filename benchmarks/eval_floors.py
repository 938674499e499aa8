"""Real-vs-real floors of the metrics and the speed of the feature networks.

    python benchmarks/eval_floors.py --n 2000                # MNIST: train subset vs test subset
    python benchmarks/eval_floors.py --n 1000 --skip-effnet  # digit features only (seconds)

A generated set cannot score better than a second sample of real data does: these floors are what
"perfect" looks like at a given sample count. Prints a Markdown table (docs/evaluation.md quotes it).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffusion_forge import evaluate as ev


def throughput(net, size: int, n: int = 128) -> float:
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 1), dtype=np.uint8)
    net.features(images[:8])                              # warm-up
    start = time.perf_counter()
    net.features(images)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--skip-effnet", action="store_true")
    p.add_argument("--skip-memorization", action="store_true")
    p.add_argument("--speed", action="store_true", help="also time each feature network")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    test = ev.load_reference_images(args.data, args.n, "test")
    rows = []
    nets = (["digits"] if args.data in ev.DIGIT_DATA else []) + ([] if args.skip_effnet else ["effnet"])
    for name in nets:
        net = ev.feature_network(name)
        start = time.perf_counter()
        real = ev.reference_features(net, args.data, args.n, "train")
        other = net.features(test)
        m = ev.compare_features(net, real, other)
        m["seconds"] = time.perf_counter() - start
        rows.append((name, m))
    print(f"\n{args.data}: {args.n} train images (seed-0 subset) vs {args.n} test images (seed-0 subset)\n")
    print("| metric | real vs real |\n|---|---|")
    for name, m in rows:
        for k, v in m.items():
            if k != "seconds" and not k.endswith(" std"):
                std = m.get(f"{k} std")
                print(f"| {k} | {v:.4f}{f' +- {std:.4f}' if std is not None else ''} |")
    if not args.skip_memorization:
        full = ev.load_reference_images(args.data, None, "train")
        start = time.perf_counter()
        mem = ev.memorization(test, full, progress="nearest training images")
        print(f"| near-copies of {len(test)} test images among {len(full)} training images | "
              f"{mem['fraction']:.2%} ({time.perf_counter() - start:.0f} s) |")
        print(f"| median d1/d2 of test images | {float(mem['ratio'].median()):.3f} |")
    if args.speed:
        print("\n| feature network | input | images/s |\n|---|---|---|")
        if args.data in ev.DIGIT_DATA:
            print(f"| digit classifier | 28 | {throughput(ev.feature_network('digits'), 28, 2000):.0f} |")
        if not args.skip_effnet:
            for size in (64, 128, 224):
                print(f"| EfficientNet-Lite0 | {size} | {throughput(ev.EffNetFeatures(size=size), 28, 64):.1f} |")
        print(f"| Inception-v3 (random weights) | 299 | "
              f"{throughput(ev.InceptionFeatures(state_dict=ev.InceptionV3FID().state_dict()), 28, 16):.1f} |")


if __name__ == "__main__":
    main()
