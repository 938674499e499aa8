"""Data: image folders (formats, modes, corrupt files, errors), Hugging Face datasets, bundled and toy sets,
the (x, cond) protocol, and bad input (16-bit PNGs, hidden files, oversized photos)."""
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_forge.data import BUNDLED, load_dataset, list_datasets, toy_2d


MNIST_TRAIN_CLASS_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(autouse=True)
def own_cache(request, monkeypatch, tmp_path_factory):
    """Tests that make image folders keep their image caches out of the user's cache folder."""
    if "tmp_path" in request.fixturenames:
        monkeypatch.setenv("DFORGE_CACHE", str(tmp_path_factory.mktemp("cache")))


def make_folder(root):
    """8 readable images in every format and mode (+ a corrupt one, a text file, a hidden one) under root."""
    root.mkdir(parents=True, exist_ok=True)
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    red.save(root / "a_rgb.png")
    red.save(root / "b_rgb.jpg", quality=95)
    red.save(root / "c_rgb.webp", lossless=True)
    red.save(root / "d_rgb.bmp")
    Image.new("P", (30, 30), 3).save(root / "e_palette.gif")
    Image.new("L", (32, 32), 200).save(root / "f_grey.png")
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 16, 32))  # left half fully transparent: must come out white
    (root / "sub").mkdir(exist_ok=True)
    rgba.save(root / "sub" / "g_rgba.png")
    Image.new("LA", (20, 20), (50, 255)).save(root / "sub" / "h_grey_alpha.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir(exist_ok=True)
    red.save(root / ".hidden" / "skip_me.png")
    return root


def test_image_folder_formats_modes_and_one_warning_for_corrupt_files(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\)") as record:
        ds = load_dataset(str(folder), image_size=16)
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    assert len(ds) == 8
    assert ds.shape == (3, 16, 16)  # mixed grey and colour: RGB
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert all(ds[i][1] == {} for i in range(len(ds)))  # some images sit in the root: no classes
    assert ds.labels.tolist() == [-1] * 8 and not ds.has_labels and ds.num_classes is None
    names = ["a_rgb", "b_rgb", "c_rgb", "d_rgb", "e_palette", "f_grey", "g_rgba", "h_grey_alpha"]
    red_png = x[names.index("a_rgb")]
    assert torch.allclose(red_png, torch.tensor([1.0, -1.0, -1.0])[:, None, None])
    assert (x[names.index("b_rgb")] - red_png).abs().max() < 0.1  # jpeg: close to red
    assert torch.equal(x[names.index("c_rgb")], red_png) and torch.equal(x[names.index("d_rgb")], red_png)
    grey = x[names.index("f_grey")]
    assert torch.allclose(grey, torch.full_like(grey, 200 / 127.5 - 1))
    rgba = x[names.index("g_rgba")]
    assert torch.allclose(rgba[:, :, :6], torch.ones(3, 16, 6))  # transparent half on white
    assert torch.allclose(rgba[:, :, -6:], torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 16, 6))


def test_channel_choice_and_automatic_grey(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grey = load_dataset(str(folder), image_size=8, channels=1)
    assert grey.shape == (1, 8, 8)
    assert abs(grey[0][0].mean().item() - (round(0.299 * 255) / 127.5 - 1)) < 0.01  # red -> luma 76
    only_grey = tmp_path / "grey"
    only_grey.mkdir()
    for i in range(3):
        Image.new("L", (10, 10), 60 * i).save(only_grey / f"{i}.png")
    auto = load_dataset(str(only_grey))
    assert auto.shape == (1, 10, 10)  # all grey: one channel; no size given: the first image's
    assert load_dataset(str(only_grey), channels=3).shape == (3, 10, 10)


def test_resize_shorter_side_and_centre_crop(tmp_path):
    img = np.zeros((20, 60, 3), np.uint8)  # 60 wide, 20 tall: red | blue | green thirds
    img[:, :20, 0] = img[:, 20:40, 2] = img[:, 40:, 1] = 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    ds = load_dataset(str(tmp_path), image_size=10)
    x = ds[0][0]
    assert x.shape == (3, 10, 10)
    blue = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]
    assert torch.allclose(x[:, :, 1:-1], blue.expand(3, 10, 8), atol=0.02)  # the edges see the filter's reach
    assert (x[:, :, [0, -1]] - blue).abs().max() < 0.2


def test_subfolders_are_classes(tmp_path):
    for cls, value in (("cats", 10), ("dogs", 240)):
        (tmp_path / cls).mkdir()
        for i in range(2 + (cls == "dogs")):
            Image.new("L", (8, 8), value).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path))
    assert ds.classes == ["cats", "dogs"] and ds.num_classes == 2
    assert sorted(int(ds[i][1]["class_labels"]) for i in range(len(ds))) == [0, 0, 1, 1, 1]
    for i in range(len(ds)):
        x, cond = ds[i]
        label = cond["class_labels"]
        assert label.dtype == torch.int64 and label.ndim == 0
        assert (x.mean().item() > 0) == (label == 1)
    xb, cond = ds.get_batch([0, 4])
    assert cond["class_labels"].tolist() == [0, 1] and ds.has_labels and ds.kind == "image"


def test_clear_errors_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_dataset(str(tmp_path / "no_such_folder"))
    with pytest.raises(FileNotFoundError, match="mnist, digits"):  # lists the bundled names
        load_dataset("minst")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=f"no images found in {empty}"):
        load_dataset(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(ValueError, match="no readable images"):
        load_dataset(str(broken))
    with pytest.raises(ValueError, match="2-D points"):
        load_dataset("moons", image_size=32)
    with pytest.raises(ValueError, match="flip needs images"):
        load_dataset("moons", flip=True)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_dataset("mnist", channels=4)
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="validation")


def test_flip_is_random_per_item_and_off_by_default(tmp_path):
    img = np.zeros((8, 8), np.uint8)
    img[:, :4] = 255  # white left half
    Image.fromarray(img).save(tmp_path / "half.png")
    torch.manual_seed(0)
    plain = load_dataset(str(tmp_path))
    flipped = load_dataset(str(tmp_path), flip=True)
    left_white = [flipped[0][0][0, 0, 0].item() > 0 for _ in range(200)]
    assert 60 < sum(left_white) < 140  # about half the draws flipped
    assert all(plain[0][0][0, 0, 0].item() > 0 for _ in range(20))
    xb, cond = flipped.get_batch(torch.zeros(200, dtype=torch.long))
    assert xb.shape == (200, 1, 8, 8) and cond == {} and flipped.labels.tolist() == [-1]
    assert 60 < (xb[:, 0, 0, 0] > 0).sum().item() < 140
    assert torch.equal(xb[:, :, :, :4].flip(-1), xb[:, :, :, 4:].neg())  # every item is the image or its mirror


def test_mnist_full_and_fast():
    load_dataset("mnist")  # the first call may fill the cache
    start = time.perf_counter()
    ds = load_dataset("mnist")
    seconds = time.perf_counter() - start
    assert seconds < 2.0, seconds
    assert len(ds) == 60000 and ds.shape == (1, 28, 28)
    assert torch.bincount(ds.labels).tolist() == MNIST_TRAIN_CLASS_COUNTS
    x, cond = ds[0]
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1 and cond["class_labels"] == 5
    xb, cond = ds.get_batch(torch.arange(128))
    assert xb.shape == (128, 1, 28, 28) and torch.equal(cond["class_labels"], ds.labels[:128])
    assert ds.kind == "image" and ds.num_classes == 10 and ds.has_labels and ds.has_captions   # digit templates
    test = load_dataset("mnist", split="test")
    assert len(test) == 10000
    rgb32 = load_dataset("mnist", split="test", image_size=32, channels=3)
    assert rgb32.shape == (3, 32, 32)
    assert torch.equal(rgb32[0][0][0], rgb32[0][0][2])


def test_digits_and_emoji():
    digits = load_dataset("digits")
    assert len(digits) == 1437 and len(load_dataset("digits", split="test")) == 360
    assert digits.shape == (1, 8, 8) and digits.num_classes == 10
    emoji = load_dataset("emoji")
    assert len(emoji) == 1889 and emoji.shape == (3, 32, 32)
    assert len(emoji.captions) == len(emoji) and "dog face" in emoji.captions
    assert "Animals & Nature" in emoji.classes
    dog = emoji.captions.index("dog face")
    assert emoji.classes[emoji[dog][1]["class_labels"]] == "Animals & Nature"
    corners = emoji.data[:, :, 0, 0].float()
    assert (corners == 255).all(dim=1).float().mean() > 0.9  # composited on white


@pytest.mark.parametrize("name", ["swiss_roll", "moons", "8gaussians", "checkerboard"])
def test_toy_sets_are_deterministic_2d_points(name):
    ds = load_dataset(name)
    again = load_dataset(name)
    assert len(ds) == 10000 and ds.shape == (2,)
    assert torch.equal(ds.data, again.data)
    assert not torch.equal(load_dataset(name, split="test").data[:100], ds.data[:100])
    assert ds.data.abs().max() < 1.5 and ds.data.std() > 0.2
    x, cond = ds[3]
    assert x.shape == (2,) and x.dtype == torch.float32 and isinstance(cond, dict) and ds.kind == "vector"
    if name in ("moons", "8gaussians"):  # labels = which moon / which Gaussian
        assert cond["class_labels"].dtype == torch.int64 and int(cond["class_labels"]) == int(ds.labels[3])
        assert ds.num_classes == {"moons": 2, "8gaussians": 8}[name]
    else:
        assert cond == {} and ds.labels.tolist() == [-1] * len(ds)


def test_toy_shapes_are_right():
    x, labels = toy_2d("checkerboard", 4000, seed=3)
    cells = np.floor((x + 1) * 2).astype(int)  # 4 x 4 board over [-1, 1]^2
    assert ((cells.sum(1) % 2) == 0).all()     # only the dark squares
    x, labels = toy_2d("8gaussians", 4000, seed=3)
    assert set(labels.tolist()) == set(range(8))
    angle = np.arctan2(x[:, 1], x[:, 0]) % (2 * np.pi)
    assert np.abs((angle - labels * np.pi / 4 + np.pi) % (2 * np.pi) - np.pi).max() < 0.5
    assert abs(np.linalg.norm(x, axis=1).mean() - 0.8) < 0.01


def test_hugging_face_load_from_disk_and_imagefolder(tmp_path):
    import datasets  # a dev dependency (make test installs it): never skipped
    images = [Image.new("RGB", (12, 12), (40 * i, 0, 0)) for i in range(5)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"]),
                                  "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 0, 1, 1],
                                     "text": [f"red {i}" for i in range(5)]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    for spec in (str(tmp_path / "saved"), f"hf:{tmp_path / 'saved'}"):
        loaded = load_dataset(spec, image_size=8)
        assert len(loaded) == 5 and loaded.shape == (3, 8, 8)
        assert loaded.labels.tolist() == [0, 1, 0, 1, 1] and loaded.classes == ["a", "b"]
        assert loaded.captions == [f"red {i}" for i in range(5)]
        assert abs(loaded[2][0][0].mean().item() - (80 / 127.5 - 1)) < 1e-6

    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_dataset(str(tmp_path / "dict"), split="test")) == 2
    with pytest.raises(ValueError, match="splits"):
        load_dataset(str(tmp_path / "dict"), split="validation")

    for cls in ("x", "y"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (9, 9), 100).save(tmp_path / "folder" / cls / f"{i}.png")
    via_hf = load_dataset(f"hf:{tmp_path / 'folder'}")
    assert len(via_hf) == 6 and via_hf.shape == (1, 9, 9)
    assert via_hf.classes == ["x", "y"] and sorted(via_hf.labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_list_datasets_and_cli(capsys):
    assert set(list_datasets()) == set(BUNDLED) == {"mnist", "digits", "emoji", "swiss_roll", "moons",
                                                    "8gaussians", "checkerboard"}
    from diffusion_forge.cli import main

    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in BUNDLED) and "60,000" in out
    assert main(["datasets", "--check", "digits"]) == 0
    assert "1,437 items of shape 1x8x8, 10 classes" in capsys.readouterr().out
    assert main(["datasets", "--check", "no/such/place"]) == 2
    assert "no data set named" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the protocol

def test_kinds_conditioning_and_the_uint8_conversion(tmp_path):
    from diffusion_forge.data import ArrayDataset, model_to_uint8, to_model_range, to_uint8, uint8_to_model

    signals = ArrayDataset(torch.randn(4, 2, 16), torch.tensor([0, 1, 0, 1]))
    assert signals.kind == "signal" and signals.shape == (2, 16) and signals.num_classes == 2
    xb, cond = signals.get_batch([1, 2])
    assert xb.shape == (2, 2, 16) and cond["class_labels"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="flip needs images"):
        ArrayDataset(torch.randn(4, 2, 16), flip=True)
    assert load_dataset("digits", conditioning="none").get_batch([0])[1] == {}
    assert load_dataset("digits", conditioning="class").get_batch([0, 1])[1]["class_labels"].tolist() == [0, 1]
    Image.new("L", (8, 8), 7).save(tmp_path / "one.png")
    with pytest.raises(ValueError, match="conditioning 'class' needs class labels"):
        load_dataset(str(tmp_path), conditioning="class")
    with pytest.raises(ValueError, match="conditioning 'text' needs captions"):   # a folder without metadata.jsonl
        load_dataset(str(tmp_path), conditioning="text")
    emoji = load_dataset("emoji", conditioning="text")          # captioned: cond holds caption ids, no labels
    cond = emoji.get_batch([3, 5])[1]
    assert cond.keys() == {"caption_ids"} and cond["caption_ids"].tolist() == [3, 5]
    with pytest.raises(ValueError, match="unknown conditioning"):
        load_dataset("digits", conditioning="classes")
    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(uint8_to_model(u), u.float() / 127.5 - 1)           # x = u / 127.5 - 1
    assert torch.equal(model_to_uint8(uint8_to_model(u)), u)               # and back, exactly
    assert model_to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # clamped
    already_float = torch.full((3,), 255.0)
    assert uint8_to_model(already_float).tolist() == [1.0] * 3 and already_float.tolist() == [255.0] * 3  # no mutation
    nhwc = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    assert to_model_range(nhwc).shape == (2, 3, 5, 6) and np.array_equal(to_uint8(to_model_range(nhwc)), nhwc)


# --------------------------------------------------------------------------------------------- bad input

def sixteen_bit_gradient():
    """16 x 16 16-bit grey values spanning 0 .. 65535 (every 257th value and some in between)."""
    return np.round(np.linspace(0, 65535, 256)).astype(np.uint16).reshape(16, 16)


def test_16_bit_greyscale_png_is_scaled_not_saturated(tmp_path, capsys):
    values = sixteen_bit_gradient()
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    ds = load_dataset(str(tmp_path))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)  # u = round(v * 255 / 65535)
    assert ds.shape == (1, 16, 16)
    assert np.array_equal(ds.data[0, 0].numpy(), expected)
    assert (ds.data == 255).float().mean() < 0.01  # the old loader saturated 96-99.6% of the pixels
    assert any("16-bit" in note and "deep.png" in note for note in ds.notes)

    from diffusion_forge.cli import main

    assert main(["datasets", "--check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 image(s) with 16-bit greyscale pixels scaled to 8 bits" in out and "deep.png" in out
    assert "0.4% at 255" in out  # 1 pixel of 256


def test_high_bit_modes_i_and_f():
    from diffusion_forge.data.cache import UnsupportedImage
    from diffusion_forge.data.images import decode_image

    values = sixteen_bit_gradient()
    as_i = Image.fromarray(values.astype(np.int32))  # mode I: 16-bit values in a 32-bit container
    assert as_i.mode == "I"
    decoded = decode_image(as_i, None, 1)
    assert decoded.high_bit and np.array_equal(decoded.pixels[0], np.round(values * (255 / 65535)).astype(np.uint8))
    with pytest.raises(UnsupportedImage, match="more than 16 bits"):
        decode_image(Image.fromarray(np.full((4, 4), 70000, np.int32)), None, 1)
    with pytest.raises(UnsupportedImage, match="mode F"):
        decode_image(Image.fromarray(np.zeros((4, 4), np.float32)), None, 1)


def test_corrupt_image_warning_names_the_file(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "damaged.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\).*damaged\.jpg"):
        ds = load_dataset(str(tmp_path))
    assert len(ds) == 3
    with pytest.warns(UserWarning, match="damaged.jpg"):  # said again when the cache is reused
        assert len(load_dataset(str(tmp_path))) == 3


def test_only_hidden_files_says_they_are_skipped(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / ".a.png")
    (tmp_path / ".thumbs").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / ".thumbs" / "b.png")
    with pytest.raises(ValueError, match=r"skipped 2 hidden file\(s\) or folder\(s\).*\.a\.png.*\.thumbs/"):
        load_dataset(str(tmp_path))


def test_large_photo_without_image_size_warns_and_suggests_one(tmp_path):
    Image.new("RGB", (3000, 2000), (30, 90, 200)).save(tmp_path / "holiday.png")
    with pytest.warns(UserWarning, match=r"holiday\.png: images are 3000x2000.*--set data\.image_size=64"):
        ds = load_dataset(str(tmp_path), progress=False)
    assert ds.shape == (3, 2000, 2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with a size: no warning
        assert load_dataset(str(tmp_path), image_size=64, progress=False).shape == (3, 64, 64)
