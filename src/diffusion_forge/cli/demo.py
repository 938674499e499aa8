"""`dforge demo`: the main job on bundled data, written under one output folder."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the demo on bundled MNIST and write its pictures",
                       description="Plot the noise schedules and a bundled MNIST digit turning into noise.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="folder for the demo's files")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..data import load_mnist, to_model_range
    from ..viz import plot_forward_strip, plot_schedules

    out = Path(args.out)
    images, _ = load_mnist("test")
    plot_schedules(out / "schedules.png")
    plot_forward_strip(out / "forward.png", to_model_range(images[:1])[0])
    print(f"wrote {out / 'schedules.png'} and {out / 'forward.png'}")
    return 0
