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
    p.add_argument("--no-progress", action="store_true",
                   help="with --check: no progress bar while an image folder's cache is built (first load only)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import BUNDLED

    if args.check:
        from ..data import load_dataset

        ds = load_dataset(args.check, image_size=args.image_size, channels=args.channels,
                          progress=not args.no_progress)
        print(describe(args.check, ds))
        return 0

    width, size_width = max(map(len, BUNDLED)), max(len(size) for _, size in BUNDLED.values())
    print("Bundled data sets (offline):")
    for name, (description, size) in BUNDLED.items():
        print(f"  {name:<{width}}  {size:<{size_width}}  {description}")
    print("\nAlso accepted wherever a data set is asked for:\n"
          "  PATH/              a folder of images, searched recursively (png, jpg, webp, bmp, gif);\n"
          "                     one first-level subfolder per class gives class labels; decoded once into\n"
          "                     the cache ($DFORGE_CACHE, default ~/.cache/diffusion_forge), read per batch\n"
          "  PATH/              a folder written by Hugging Face datasets' save_to_disk\n"
          "  hf:NAME            a Hugging Face hub data set (online), or hf:PATH for datasets' imagefolder\n"
          "Check one with: dforge datasets --check SPEC")
    return 0


def describe(spec: str, ds) -> str:
    """What --check prints: size, shape, kind, classes, captions, the pixel statistics of up to 1,000 items
    (so that saturated or blank images show), and the loader's notes (skipped files, 16-bit scaling, sizes)."""
    import torch

    if ds.has_labels:
        names = ds.classes or [str(k) for k in range(ds.num_classes)]
        more = ", ..." if len(names) > 10 else ""
        classes = f", {ds.num_classes} classes ({', '.join(names[:10])}{more})"
    else:
        classes = ", unlabelled"
    captions = ", with captions" if ds.captions else ""
    lines = [f"{spec}: {len(ds):,} items of shape {'x'.join(map(str, ds.shape))}{classes}{captions} ({ds.kind}s)"]
    idx = torch.linspace(0, len(ds) - 1, min(len(ds), 1000)).round().long()
    sample = ds.data[idx]
    if sample.dtype == torch.uint8:
        v = sample.float()
        lines.append(f"  pixel values (uint8, {len(idx):,} items): mean {v.mean():.1f}, "
                     f"{(v == 0).float().mean():.1%} at 0, {(v == 255).float().mean():.1%} at 255")
    else:
        lines.append(f"  values ({len(idx):,} items): min {sample.min():.3g}, max {sample.max():.3g}, "
                     f"mean {sample.float().mean():.3g}")
    lines += [f"  note: {note}" for note in ds.notes]
    return "\n".join(lines)
