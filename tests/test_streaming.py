"""Streaming: image folders are decoded once into the on-disk uint8 cache and read per batch.

- anonymous memory (RssAnon of /proc/self/status: page cache and file-backed pages do not count) grows by a
  multiple of the batch, not of the data set, while the cache is built and over one epoch of batches
  (measured in a subprocess, so that other tests do not pollute it; the old in-memory way is measured the same
  way as a control, to show that the meter sees a data set's worth of memory when it is there);
- a second load reuses the cache (nothing is decoded, the cache file is untouched);
- an image changed on disk invalidates it; a killed build leaves nothing that is used.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_forge.data import load_dataset
from diffusion_forge.data import images as images_module

N, SIDE, BATCH = 4000, 48, 64
ITEM_BYTES = 3 * SIDE * SIDE            # one image in the cache (uint8)
BATCH_BYTES = BATCH * ITEM_BYTES * 4    # one batch as the model sees it (float32)
DATASET_BYTES = N * ITEM_BYTES          # the whole data set as uint8 (what the old loader held, at least)


def make_images(folder: Path, n: int, side: int = SIDE, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png",
                                                                                   compress_level=1)
    return folder


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("many") / "imgs", N)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("DFORGE_CACHE", str(path))
    return path


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images decoded (every decode goes through images.decode_image)."""
    calls = []
    real = images_module.decode_image

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(images_module, "decode_image", counting)
    return calls


CHILD = r"""
import gc, json, sys, threading, time
import numpy as np, torch
from pathlib import Path
from PIL import Image
torch.set_num_threads(1)
from diffusion_forge.data import load_dataset

def rss_anon(field="RssAnon:"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

folder, warm, mode, batch = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ds = load_dataset(str(warm), progress=False)          # warm up: imports, PIL plugins, threads, allocator
for _ in range(3):  # batches of the real size, so that the allocator reaches its steady state here
    ds.get_batch(torch.zeros(batch, dtype=torch.long))
del ds
gc.collect()
peak, stop = [0], threading.Event()
def sample():  # the peak between the measurements below
    while not stop.is_set():
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.0005)
base = rss_anon()
peak[0] = base
threading.Thread(target=sample, daemon=True).start()
if mode == "streamed":
    ds = load_dataset(str(folder), progress=False)
    built, loaded_file = max(peak[0], rss_anon()), rss_anon("RssFile:")
    for idx in torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).split(batch):
        x, cond = ds.get_batch(idx)
        assert x.dtype == torch.float32 and x.shape[0] == len(idx)
    n, file_epoch = len(ds), rss_anon("RssFile:") - loaded_file  # file pages mapped in over the epoch
else:  # the pre-streaming loader: every image decoded into a list, then stacked in memory
    pictures = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
    data = torch.from_numpy(np.stack([np.asarray(p).transpose(2, 0, 1) for p in pictures]))
    built = max(peak[0], rss_anon())
    n, file_epoch = len(data), 0
stop.set()
time.sleep(0.01)
print(json.dumps({"base": base, "built": built - base, "peak": max(peak[0], rss_anon()) - base, "n": n,
                  "file_epoch": file_epoch}))
"""


def measure(folder: Path, warm: Path, mode: str, env) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(warm), mode, str(BATCH)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status (Linux)")
def test_anonymous_memory_is_bounded_by_the_batch_not_the_data_set(big_folder, tmp_path):
    warm = make_images(tmp_path / "warm", 8)
    # glibc's fixed mmap threshold returns every freed buffer of 128 KiB or more to the system at once, so RssAnon
    # follows the memory that is live (its default, adaptive threshold keeps up to 2 freed batches cached)
    env = dict(os.environ, DFORGE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               MALLOC_MMAP_THRESHOLD_="131072")
    # two batches alive at once (the last one and the new one), the batch's uint8 read, a chunk being decoded,
    # the list of file names: a few batches of float32
    bound = 5 * BATCH_BYTES
    assert bound < DATASET_BYTES / 3  # the bound is meaningful: far below the data set even as uint8

    control = measure(big_folder, warm, "in-memory", env)  # the meter sees a data set held in memory
    assert control["n"] == N and control["built"] > DATASET_BYTES

    cold = measure(big_folder, warm, "streamed", env)      # builds the cache, then one epoch
    assert cold["n"] == N
    assert cold["built"] < bound, (cold, bound, DATASET_BYTES)
    assert cold["peak"] < bound, (cold, bound, DATASET_BYTES)
    warm_run = measure(big_folder, warm, "streamed", env)  # reuses the cache, then one epoch
    assert warm_run["peak"] < bound, (warm_run, bound, DATASET_BYTES)
    # batches are read with positional reads: the cache file is not mapped in, so total RSS stays flat too
    assert cold["file_epoch"] < bound and warm_run["file_epoch"] < bound, (cold, warm_run)


def test_second_load_reuses_the_cache_and_a_changed_image_invalidates_it(tmp_path, cache, decodes):
    folder = make_images(tmp_path / "imgs", 300, side=16)
    first = load_dataset(str(folder), progress=False)
    assert len(decodes) == 300 and len(first) == 300 and first.shape == (3, 16, 16)
    pixels = first.cache_path / "images.u8"
    stamp = pixels.stat().st_mtime_ns
    reference = first.data.clone()

    decodes.clear()
    again = load_dataset(str(folder), progress=False)
    assert decodes == [] and again.cache_path == first.cache_path  # nothing decoded
    assert pixels.stat().st_mtime_ns == stamp and torch.equal(again.data, reference)

    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "00007.png")  # same name and size, new content
    changed = load_dataset(str(folder), progress=False)
    assert len(decodes) == 300 and changed.cache_path != first.cache_path
    assert torch.equal(changed.data[7], torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None].expand(3, 16, 16))
    assert torch.equal(changed.data[:7], reference[:7]) and torch.equal(changed.data[8:], reference[8:])
    assert not first.cache_path.exists()  # the stale entry is removed

    decodes.clear()
    (folder / "00299.png").unlink()  # a removed image invalidates it too
    assert len(load_dataset(str(folder), progress=False)) == 299 and len(decodes) == 299
    decodes.clear()
    other = load_dataset(str(folder), image_size=8, progress=False)  # options are part of the key
    assert other.shape == (3, 8, 8) and len(decodes) == 299


def test_progress_bar_on_the_first_build_only(tmp_path, cache, capfd):
    folder = make_images(tmp_path / "imgs", 20, side=8)
    load_dataset(str(folder))
    assert "caching" in capfd.readouterr().err
    load_dataset(str(folder))
    assert "caching" not in capfd.readouterr().err
    load_dataset(str(folder), image_size=4, progress=False)
    assert "caching" not in capfd.readouterr().err


KILLED = r"""
import sys, time
from diffusion_forge.data import images, load_dataset
real = images.decode_image
def slow(*args, **kw):
    time.sleep(0.02)
    return real(*args, **kw)
images.decode_image = slow
load_dataset(sys.argv[1], progress=False)
"""


def test_a_killed_build_leaves_no_cache_that_is_used(tmp_path, cache, decodes):
    folder = make_images(tmp_path / "imgs", 200, side=8)
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(folder)], env=dict(os.environ))
    deadline = time.time() + 60
    while not list((cache / "images").glob(".*.tmp-*/*.u8")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # part of the images written
    child.send_signal(signal.SIGKILL)
    child.wait()
    temps = list((cache / "images").glob(".*.tmp-*"))
    assert temps and not [p for p in (cache / "images").iterdir() if not p.name.startswith(".")]

    ds = load_dataset(str(folder), progress=False)  # builds a complete entry; the dead build's folder is swept
    assert len(decodes) == 200 and len(ds) == 200
    assert not any(p.exists() for p in temps)
    expected = np.asarray(Image.open(folder / "00199.png")).transpose(2, 0, 1)
    assert np.array_equal(ds.data[199].numpy(), expected)


def test_an_interrupted_build_is_cleaned_up(tmp_path, cache, monkeypatch):
    folder = make_images(tmp_path / "imgs", 100, side=8)
    real, count = images_module.decode_image, []

    def interrupted(*args, **kw):
        count.append(1)
        if len(count) == 50:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(images_module, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(str(folder), progress=False)
    assert list((cache / "images").iterdir()) == []  # neither an entry nor a temporary folder
    monkeypatch.setattr(images_module, "decode_image", real)
    assert len(load_dataset(str(folder), progress=False)) == 100


def test_unwritable_cache_falls_back_to_a_temporary_file(tmp_path, monkeypatch):
    folder = make_images(tmp_path / "imgs", 10, side=8)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("DFORGE_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not write the image cache.*DFORGE_CACHE"):
        ds = load_dataset(str(folder), progress=False)
    assert len(ds) == 10 and ds.cache_path is None
    assert np.array_equal(ds.data[3].numpy(), np.asarray(Image.open(folder / "00003.png")).transpose(2, 0, 1))


def test_grey_folder_is_one_channel_and_pickles_as_a_path(tmp_path, cache):
    import pickle

    folder = tmp_path / "grey"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (64, 64), 40 * i + (100 if cls == "b" else 0)).save(folder / cls / f"{i}.png")
    ds = load_dataset(str(folder), progress=False)
    assert ds.shape == (1, 64, 64) and ds.classes == ["a", "b"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.data[:, 0, 0, 0].tolist() == [0, 40, 80, 100, 140, 180]
    blob = pickle.dumps(ds)
    assert len(blob) < ds.data.numel() / 4  # the path, not the pixels
    back = pickle.loads(blob)
    assert torch.equal(back.data, ds.data) and torch.equal(back.get_batch([4])[1]["class_labels"], torch.tensor([1]))
