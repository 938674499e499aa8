"""`dforge datasets`: the bundled data sets, and what else `--data` accepts."""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("datasets", help="list the bundled data sets and the other data sources",
                       description="List the data sets that ship with the toolkit (all work offline), with their "
                                   "sizes, and the other forms a data argument can take.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--check", metavar="SPEC",
                   help="load SPEC (a name, a folder, hf:NAME) and print its size, shape and classes")
    p.add_argument("--image-size", type=int, default=None, help="with --check: resize to this size")
    p.add_argument("--channels", type=int, default=None, choices=(1, 3), help="with --check: convert channels")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import BUNDLED

    if args.check:
        from ..data import load_dataset

        ds = load_dataset(args.check, image_size=args.image_size, channels=args.channels)
        classes = f", {ds.num_classes} classes ({', '.join(ds.classes[:10])}{', ...' if ds.num_classes > 10 else ''})" \
            if ds.classes else ", unlabelled"
        captions = ", with captions" if ds.captions else ""
        print(f"{args.check}: {len(ds):,} items of shape {'x'.join(map(str, ds.shape))}{classes}{captions}")
        return 0

    width, size_width = max(map(len, BUNDLED)), max(len(size) for _, size in BUNDLED.values())
    print("Bundled data sets (offline):")
    for name, (description, size) in BUNDLED.items():
        print(f"  {name:<{width}}  {size:<{size_width}}  {description}")
    print("\nAlso accepted wherever a data set is asked for:\n"
          "  PATH/              a folder of images, searched recursively (png, jpg, webp, bmp, gif);\n"
          "                     first-level subfolders become class labels\n"
          "  PATH/              a folder written by Hugging Face datasets' save_to_disk\n"
          "  hf:NAME            a Hugging Face hub data set (online), or hf:PATH for datasets' imagefolder\n"
          "Check one with: dforge datasets --check SPEC")
    return 0
