"""The data path: images/s and peak memory of an image folder, in memory (before) against streamed (after).

    python benchmarks/data.py                    # folders of 10,000 and 50,000 64x64 RGB PNGs
    python benchmarks/data.py --n 500            # a quick look (under a minute)

For each N a folder of N generated 64x64 RGB PNGs is written once (smooth random colour fields with noise,
so that PNG compression is realistic), then each path runs in its own fresh process, so that its memory is
its own:

- ``in memory (before)``: the pre-streaming loader, reimplemented here as it was: every image opened,
  EXIF-rotated, flattened onto white, centre-cropped, resized (bicubic), kept in a list of PIL images, then
  stacked into one uint8 tensor; batches are ``data[idx].float() / 127.5 - 1``.
- ``streamed, cold``: ``load_dataset(folder)`` with an empty cache: decodes into the on-disk uint8 cache.
- ``streamed, warm``: ``load_dataset(folder)`` again: reuses the cache.

Each then runs one epoch of ``get_batch`` over a seeded random permutation in batches of ``--batch`` (64).
Reported: load seconds and images/s, epoch images/s, time to the first batch (load + one batch), peak
RSS (VmHWM of /proc/self/status: all resident pages, file-backed ones included) and peak anonymous RSS
(RssAnon, sampled every millisecond by a thread, since the kernel keeps no high-water mark for it), both
as growth over the process after its imports (the absolute VmHWM is printed too).

The data path's share of the default recipe's step time: the median time of ``get_batch`` of 64 MNIST
images (the default data set and batch) against the median time of one training step of the default
configuration (``training.config.Config()``: the small U-Net at 1x28x28, cosine schedule, v-prediction
with min-SNR 5, AdamW, gradient clipping, EMA), forward + backward + update in float32 on the CPU, with
torch's default thread count; share = t_batch / (t_batch + t_step). The streamed folder's time per batch of
64 is shown next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SIDE = 64


# --------------------------------------------------------------------------------------------- the folder

def make_folder(folder: Path, n: int, seed: int = 0) -> Path:
    """n 64x64 RGB PNGs: a bilinear upsampling of a random 4x4 colour field plus Gaussian noise (sigma 8)."""
    from PIL import Image

    done = folder / ".complete"
    if done.exists() and int(done.read_text()) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((SIDE, SIDE),
                                                                                       Image.Resampling.BILINEAR)
        noisy = np.asarray(field, np.float32) + rng.normal(0, 8, (SIDE, SIDE, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.png")
    done.write_text(str(n))
    return folder


# --------------------------------------------------------------------------------------------- memory

def status(field: str) -> int:
    """A field of /proc/self/status in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakAnon:
    """The peak of RssAnon, sampled every millisecond by a thread."""

    def __init__(self):
        self.peak, self._stop = status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, status("RssAnon"))


# --------------------------------------------------------------------------------------------- the paths

def old_in_memory(folder: Path, image_size=None):
    """The pre-streaming loader (diffusion_forge/data.py before the restructure), for one folder of images."""
    import torch
    from PIL import Image, ImageOps

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() == ".png" and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    pictures, grey = [], []
    for f in files:
        img = Image.open(f)
        img.load()
        img = ImageOps.exif_transpose(img)
        grey.append(img.mode in ("1", "L", "LA", "I", "I;16", "F"))
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        side = min(img.size)
        size = image_size or (pictures[0].size[0] if pictures else side)
        left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
        pictures.append(img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)))
    arrays = [np.asarray(p.convert("L"))[None] if all(grey) else np.asarray(p).transpose(2, 0, 1) for p in pictures]
    data = torch.from_numpy(np.stack(arrays))
    return len(data), lambda idx: data[idx].float() / 127.5 - 1


def child(mode: str, folder: Path, batch: int) -> dict:
    """One path in this (fresh) process: load, then one epoch; memory as growth over the process after imports."""
    import torch

    from diffusion_forge.data import load_dataset

    base_hwm, base_anon = status("VmHWM"), status("RssAnon")
    meter = PeakAnon()
    start = time.perf_counter()
    if mode == "before":
        n, get = old_in_memory(folder)
    else:
        ds = load_dataset(str(folder), progress=False)
        n, get = len(ds), lambda idx: ds.get_batch(idx)[0]
    load_s = time.perf_counter() - start
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    first = None
    for idx in perm.split(batch):
        x = get(idx)
        first = first or time.perf_counter() - start
    epoch_s = time.perf_counter() - start
    peak_anon = meter.stop()
    hwm = status("VmHWM")
    return {"n": n, "load_s": load_s, "epoch_s": epoch_s, "first_batch_s": load_s + first,
            "hwm": hwm, "hwm_growth": hwm - base_hwm, "anon_growth": peak_anon - base_anon,
            "batch_ms": 1000 * epoch_s / len(perm.split(batch)), "shape": list(x.shape[1:])}


def run_child(mode: str, folder: Path, batch: int, cache: Path) -> dict:
    env = dict(os.environ, DFORGE_CACHE=str(cache))
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(folder), "--batch", str(batch)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the {mode} run failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- step share

def step_share(batch: int, steps: int) -> dict:
    """Median seconds of get_batch(batch) on MNIST and of one default training step (see the module docstring)."""
    import torch

    from diffusion_forge.core.losses import diffusion_loss
    from diffusion_forge.core.schedules import NoiseSchedule
    from diffusion_forge.data import load_dataset
    from diffusion_forge.models import build_model
    from diffusion_forge.training.config import Config

    cfg = Config()
    ds = load_dataset(cfg.data.source)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(50):
        idx = torch.randint(0, len(ds), (batch,), generator=g)
        t0 = time.perf_counter()
        ds.get_batch(idx)
        times.append(time.perf_counter() - t0)
    t_batch = float(np.median(times))

    model = build_model({"type": cfg.model.type, "preset": cfg.model.preset, "sample_size": ds.shape[-1],
                         "in_channels": ds.shape[0], **cfg.model.options})
    ema = [p.detach().clone() for p in model.parameters()]
    sched = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
                            weight_decay=cfg.optim.weight_decay)
    x0, _ = ds.get_batch(torch.arange(batch))
    times = []
    for k in range(steps + 2):  # the first two warm up
        t0 = time.perf_counter()
        loss = diffusion_loss(model, x0, sched, cfg.diffusion.prediction, min_snr_gamma=cfg.diffusion.min_snr_gamma,
                              generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        with torch.no_grad():  # EMA: e <- d e + (1 - d) p
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p, 1 - cfg.ema.decay)
        if k >= 2:
            times.append(time.perf_counter() - t0)
    t_step = float(np.median(times))
    return {"t_batch": t_batch, "t_step": t_step, "share": t_batch / (t_batch + t_step),
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------- report

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000], help="images per folder")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="training steps timed for the step share")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the folders and caches go (default: a temporary folder, removed at the end)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), args.batch)))
        return 0
    if not Path("/proc/self/status").exists():
        raise SystemExit("this benchmark reads /proc/self/status (Linux)")

    with tempfile.TemporaryDirectory(prefix="dforge-bench-data-") as tmp:
        work = args.workdir or Path(tmp)
        rows = {}
        for n in args.n:
            t0 = time.perf_counter()
            folder = make_folder(work / f"png64-{n}", n)
            print(f"folder of {n:,} PNGs ready ({time.perf_counter() - t0:.1f} s): {folder}", file=sys.stderr)
            cache = work / f"cache-{n}"
            if cache.exists():
                import shutil

                shutil.rmtree(cache)
            for label, mode in (("in memory (before)", "before"), ("streamed, cold", "after"),
                                ("streamed, warm", "after")):
                rows[(n, label)] = run_child(mode, folder, args.batch, cache)
                print(f"  {label}: done", file=sys.stderr)
        share = step_share(args.batch, args.steps)

    mb = 1 / 2 ** 20
    print(f"\n### Data path: {SIDE}x{SIDE} RGB PNG folders, one epoch in batches of {args.batch}\n")
    print("| images | path | load s | load img/s | epoch img/s | ms / batch | first batch s | peak RSS growth MB "
          "(VmHWM) | peak anon growth MB (RssAnon) | VmHWM MB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (n, label), r in rows.items():
        print(f"| {n:,} | {label} | {r['load_s']:.2f} | {r['n'] / r['load_s']:,.0f} | "
              f"{r['n'] / r['epoch_s']:,.0f} | {r['batch_ms']:.2f} | {r['first_batch_s']:.2f} | "
              f"{r['hwm_growth'] * mb:.1f} | {r['anon_growth'] * mb:.1f} | {r['hwm'] * mb:.0f} |")
    if len(args.n) >= 2:
        lo, hi = min(args.n), max(args.n)
        for label in ("in memory (before)", "streamed, cold", "streamed, warm"):
            a, b = rows[(lo, label)], rows[(hi, label)]
            print(f"\n{label}: peak RSS (VmHWM) at {hi:,} images / at {lo:,} = {b['hwm'] / a['hwm']:.2f}x "
                  f"(target for streamed: <= 1.2x); peak anon growth {b['anon_growth'] * mb:.1f} MB vs "
                  f"{a['anon_growth'] * mb:.1f} MB", end="")
        print()
    print(f"\n### The data path's share of the default recipe's step ({share['threads']} torch threads)\n")
    print("| what | ms |")
    print("|---|---:|")
    print(f"| get_batch of {args.batch} MNIST images (median of 50) | {share['t_batch'] * 1000:.2f} |")
    print(f"| one training step of the default U-Net, batch {args.batch} (median of {args.steps}) | "
          f"{share['t_step'] * 1000:.1f} |")
    streamed = [r for (n, label), r in rows.items() if label == "streamed, warm"]
    if streamed:
        print(f"| get_batch of {args.batch} images from the streamed {SIDE}x{SIDE} RGB folder "
              f"({max(args.n):,} images) | {streamed[-1]['batch_ms']:.2f} |")
    print(f"\nShare of the step spent fetching data (MNIST): {share['share']:.2%} "
          "(t_batch / (t_batch + t_step)); data loading is the bottleneck only if this nears 50%.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
