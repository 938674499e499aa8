"""Pictures: the data behind each figure is checked, not only that a file appeared."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusion_forge as df
from diffusion_forge import NoiseSchedule, viz
from diffusion_forge.core.schedules import SCHEDULE_NAMES


def _png_ok(path, min_bytes: int = 2000) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes


def gaussian_denoiser(schedule: NoiseSchedule, std: float = 0.5):
    """E[x_0 | x_t] for x_0 ~ N(0, std^2) per dimension (exact); predicts "sample"."""
    def model(x_t, t, **cond):
        ab = schedule.alpha_bar_at(t.double()).reshape(-1, *[1] * (x_t.ndim - 1)).to(x_t)
        return ab.sqrt() * std**2 / (ab * std**2 + 1 - ab) * x_t
    return model


def test_schedule_plot_curves_are_the_schedules_values(tmp_path):
    curves = viz.plot_schedules(tmp_path / "s.png")
    assert _png_ok(tmp_path / "s.png")
    assert set(SCHEDULE_NAMES) <= set(curves) and any("zero-SNR" in k for k in curves)
    for name in SCHEDULE_NAMES:
        s = NoiseSchedule.from_name(name, 1000)
        np.testing.assert_array_equal(curves[name]["alpha_bar"], s.alphas_cumprod.numpy())
        np.testing.assert_array_equal(curves[name]["snr"], s.snr.numpy())
        np.testing.assert_array_equal(curves[name]["log_snr"], s.log_snr.numpy())
    zero = next(v for k, v in curves.items() if "zero-SNR" in k)
    assert zero["alpha_bar"][-1] == 0 and np.isneginf(zero["log_snr"][-1])
    viz.plot_schedules(tmp_path / "s.svg")
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")


def test_forward_strip_noise_rises_with_t(tmp_path):
    image = torch.linspace(-1, 1, 28 * 28).reshape(1, 28, 28)
    out = viz.plot_forward_strip(tmp_path / "f.png", image)
    assert _png_ok(tmp_path / "f.png")
    for label, d in out.items():
        std = d["noise_std"]
        assert np.all(np.diff(std) > 0), (label, std)             # strictly more noise at every later t
        assert std[0] < 0.05 and std[-1] > 0.99
        s = NoiseSchedule.from_name(label, 1000)
        ab = s.alphas_cumprod[list(d["t"])].numpy()
        np.testing.assert_allclose(std / np.sqrt(1 - ab), std[-1] / np.sqrt(1 - ab[-1]), rtol=1e-12)


def test_forward_2d_ends_as_a_standard_gaussian(tmp_path):
    from diffusion_forge.data import load_dataset

    pts = load_dataset("moons").data[:2000].numpy()
    out = viz.plot_forward_2d(tmp_path / "m.png", pts)
    assert _png_ok(tmp_path / "m.png")
    np.testing.assert_allclose(out["points"][0], pts, atol=0.05)       # t = 0: still the data
    last = out["points"][-1]
    assert np.abs(last.mean(0)).max() < 0.1 and np.abs(np.cov(last.T) - np.eye(2)).max() < 0.1
    assert np.all(np.diff(out["alpha_bar"]) < 0)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_trajectory_final_frame_is_the_samplers_output(tmp_path, sampler):
    sched = NoiseSchedule.from_name("cosine", 1000)
    model = gaussian_denoiser(sched)
    traj = viz.record_trajectory(model, sched, (2, 1, 8, 8), sampler=sampler, steps=6, prediction="sample", seed=3)
    gens = [torch.Generator().manual_seed(3 + i) for i in range(2)]
    direct = df.sample(model, sched, (2, 1, 8, 8), sampler=sampler, steps=6, prediction="sample", generator=gens)
    assert torch.equal(traj["final"], direct.float())
    shown = viz.plot_trajectory(tmp_path / "t.png", traj, frames=4)
    assert _png_ok(tmp_path / "t.png")
    assert torch.equal(shown["final"], direct[0].float())
    assert shown["steps"][0] == 0 and shown["steps"][-1] == len(traj["x_t"]) - 1
    assert all(a > b for a, b in zip(shown["t"], shown["t"][1:]))       # t falls along the run
    # x_t starts as noise (std ~1) and ends near the data's scale (std 0.5)
    assert traj["x_t"][0].std() > 0.8 and abs(float(traj["final"].std()) - 0.5) < 0.25


def test_trajectory_of_2d_points(tmp_path):
    sched = NoiseSchedule.from_name("cosine", 1000)
    traj = viz.record_trajectory(gaussian_denoiser(sched), sched, (300, 2), steps=5, prediction="sample")
    shown = viz.plot_trajectory(tmp_path / "t2.png", traj, frames=3)
    assert _png_ok(tmp_path / "t2.png") and shown["final"].shape == (300, 2)


def test_sampler_grid_uses_the_same_seeds_in_every_cell(tmp_path):
    sched = NoiseSchedule.from_name("linear", 1000)
    model = gaussian_denoiser(sched)
    grid = viz.sampler_grid(model, sched, (3, 1, 8, 8), samplers=("euler", "dpmpp_2m"), steps=(2, 8),
                            prediction="sample", seed=5)
    assert set(grid) == {("euler", 2), ("euler", 8), ("dpmpp_2m", 2), ("dpmpp_2m", 8)}
    gens = [torch.Generator().manual_seed(5 + i) for i in range(3)]
    direct = df.sample(model, sched, (3, 1, 8, 8), sampler="dpmpp_2m", steps=8, prediction="sample", generator=gens)
    assert torch.equal(grid[("dpmpp_2m", 8)], direct.float())
    # deterministic samplers from the same seeds converge to one image: more steps, closer to it
    gens = [torch.Generator().manual_seed(5 + i) for i in range(3)]
    ref = df.sample(model, sched, (3, 1, 8, 8), sampler="dpmpp_2m", steps=100, prediction="sample", generator=gens)
    for name in ("euler", "dpmpp_2m"):
        err = {n: float((grid[(name, n)] - ref).abs().max()) for n in (2, 8)}
        assert err[8] < err[2], (name, err)
    viz.plot_sampler_grid(tmp_path / "g.png", grid)
    assert _png_ok(tmp_path / "g.png")


def test_nearest_pairs_picture_shows_the_closest_first(tmp_path):
    from diffusion_forge import evaluate as ev
    from diffusion_forge.data import load_mnist

    train = load_mnist("train")[0][:2000, :, :, None]
    test = load_mnist("test")[0][:10, :, :, None]
    samples = np.concatenate([test, train[[5, 6]]])
    mem = ev.memorization(samples, train)
    out = viz.plot_nearest_pairs(tmp_path / "p.png", samples, train, mem, top=4)
    assert _png_ok(tmp_path / "p.png")
    assert sorted(out["order"][:2]) == [10, 11] and sorted(out["train_index"][:2]) == [5, 6]
    assert out["ratio"] == sorted(out["ratio"])


def test_cli_viz_schedule_and_forward(tmp_path):
    from diffusion_forge.cli import main

    assert main(["viz", "schedule", "--out", str(tmp_path / "s.png"), "--num-timesteps", "200"]) == 0
    assert main(["viz", "forward", "--data", "digits", "--out", str(tmp_path / "f.png")]) == 0
    assert main(["viz", "forward", "--data", "moons", "--out", str(tmp_path / "m.svg")]) == 0
    assert all(_png_ok(tmp_path / n) for n in ("s.png", "f.png"))
    assert (tmp_path / "m.svg").stat().st_size > 10_000
    assert main(["viz", "trajectory", str(tmp_path / "no-run"), "--out", str(tmp_path / "t.png")]) == 2


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A 2-D run trained for a few steps (seconds): enough to exercise the run commands."""
    from diffusion_forge.training import TrainConfig, train

    run = tmp_path_factory.mktemp("runs") / "moons"
    cfg = TrainConfig.from_dict({"data": {"source": "moons"}, "model": {"type": "mlp", "preset": "tiny"},
                                 "optim": {"steps": 20, "batch_size": 64}, "sample": {"n": 16},
                                 "run": {"mixed_precision": "no", "checkpoint_every": 20, "sample_every": 0,
                                         "log_every": 10}})
    train(cfg, run, progress=False)
    return run


def test_cli_viz_and_eval_on_a_run(tmp_path, toy_run, capsys):
    from diffusion_forge.cli import main

    assert main(["viz", "trajectory", str(toy_run), "--out", str(tmp_path / "t.png"), "--steps", "4"]) == 0
    assert main(["viz", "samplers", str(toy_run), "--out", str(tmp_path / "g.png"), "--samplers", "euler,heun",
                 "--step-counts", "2,4"]) == 0
    assert _png_ok(tmp_path / "t.png") and _png_ok(tmp_path / "g.png")
    assert main(["viz", "samplers", str(toy_run), "--out", str(tmp_path / "x.png"), "--samplers", "nope"]) == 2
    assert main(["eval", str(toy_run), "--n", "200", "--steps", "4", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "FD-xy@200" in out and "precision-xy@200" in out


# ---------------------------------------------------------------------------------------------
# Samples as pictures, by the kind of data; the one rule for picture files

def test_record_trajectory_and_sampler_grid_take_a_denoiser(tmp_path, monkeypatch):
    """A Denoiser (what a run loads as) gives the same pictures' data as the network with its schedule; a bad
    sampler name fails before any sampling."""
    from diffusion_forge.denoise import Denoiser
    import diffusion_forge.sampling.generate as gen_module

    sched = NoiseSchedule.from_name("cosine", 1000)
    model = gaussian_denoiser(sched)
    D = Denoiser(model, sched, "sample", sample_shape=(1, 8, 8))
    old = viz.record_trajectory(model, sched, (2, 1, 8, 8), sampler="euler", steps=4, prediction="sample", seed=1)
    new = viz.record_trajectory(D, sampler="euler", steps=4, seed=1, n=2)
    assert torch.equal(old["final"], new["final"]) and len(new["x_t"]) == len(old["x_t"]) == 4
    assert all(torch.equal(a, b) for a, b in zip(old["x0"], new["x0"]))
    grid = viz.sampler_grid(D, samplers=("euler",), steps=(4,), seed=1, n=2)
    assert torch.equal(grid[("euler", 4)], new["final"]) and grid[("euler", 4)].shape == (2, 1, 8, 8)
    auto = viz.record_trajectory(D, steps=5, n=1)                     # sampler None: the rule picks one
    from diffusion_forge.sampling.registry import resolve_sampler
    assert (auto["sampler"], auto["steps"]) == resolve_sampler(None, 5)[:2]
    calls = []
    monkeypatch.setattr(gen_module, "generate", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        viz.sampler_grid(D, samplers=("euler", "nope"), steps=(2,), n=1)
    assert calls == []


def test_save_samples_of_images_is_a_titled_enlarged_grid_or_the_raw_one(tmp_path):
    from PIL import Image

    from diffusion_forge.data import to_uint8

    x = torch.linspace(-1, 1, 16 * 28 * 28).reshape(16, 1, 28, 28)
    raw = viz.save_samples(x, tmp_path / "raw.png", raw=True)
    plain = viz.save_image_grid(to_uint8(x), tmp_path / "plain.png")
    assert raw.read_bytes() == plain.read_bytes()                     # raw=True: today's plain tile grid
    assert Image.open(raw).size == (4 * 30 + 2, 4 * 30 + 2)           # 4 x 4 tiles of 28 px, 2 px apart
    titled = viz.save_samples(x, tmp_path / "t.png", title="moons, step 1000")
    width, height = Image.open(titled).size
    assert width >= 4 * 64 and height >= 4 * 64                       # tiles enlarged to >= 64 px each
    assert height > width * 0.95                                      # and a band above them for the title
    jpg = viz.save_samples(x, tmp_path / "t.jpg", title="a title")
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff"                    # a real JPEG, not a PNG named .jpg
    assert viz.save_image_grid(to_uint8(x), tmp_path / "r.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    with pytest.raises(ValueError, match=r"\.png, \.jpg"):
        viz.save_samples(x, tmp_path / "t.svg")                       # grids: .png and .jpg only
    assert viz.sample_suffixes((1, 28, 28)) == (".png", ".jpg", ".jpeg")
    assert ".svg" in viz.sample_suffixes((2,)) and ".svg" in viz.sample_suffixes((2, 64))
    assert not (tmp_path / "t.svg").exists()


def test_save_samples_of_vectors_and_signals_are_plots(tmp_path):
    pts = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert _png_ok(viz.save_samples(pts, tmp_path / "p.png", title="moons"))
    np.testing.assert_array_equal(viz.plot_points(tmp_path / "p2.png", pts)["points"], pts.numpy())
    assert viz.save_samples(pts, tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")
    sig = torch.sin(torch.linspace(0, 6, 50))[None, None] * torch.linspace(0.2, 1, 5)[:, None, None]
    sig = torch.cat([sig, -sig], 1)                                   # 5 signals, 2 channels, length 50
    assert _png_ok(viz.save_samples(sig, tmp_path / "s.png", title="signals, step 10"))
    drawn = viz.plot_signals(tmp_path / "s2.png", sig, max_panels=3)
    assert drawn["shown"] == [0, 1, 2] and np.array_equal(drawn["lines"], sig[:3].numpy())
    with pytest.raises(ValueError, match="raw=True"):
        viz.save_samples(sig, tmp_path / "r.png", raw=True)
    with pytest.raises(ValueError, match=r"\.svg"):
        viz.save_samples(pts, tmp_path / "p.gif")                     # plots: .png, .jpg, .svg
    with pytest.raises(ValueError, match="vectors"):
        viz.save_samples(torch.zeros(2, 1, 1, 4, 4), tmp_path / "x.png")


def test_forward_strip_and_trajectory_of_a_signal(tmp_path):
    signal = torch.sin(torch.linspace(0, 6, 64)).reshape(1, 64)
    out = viz.plot_forward_strip(tmp_path / "f.png", signal)
    assert _png_ok(tmp_path / "f.png")
    assert all(np.all(np.diff(d["noise_std"]) > 0) for d in out.values())
    sched = NoiseSchedule.from_name("cosine", 1000)
    traj = viz.record_trajectory(gaussian_denoiser(sched), sched, (2, 1, 64), steps=4, prediction="sample")
    shown = viz.plot_trajectory(tmp_path / "t.png", traj, frames=3)
    assert _png_ok(tmp_path / "t.png") and shown["final"].shape == (1, 64)
    grid = viz.sampler_grid(gaussian_denoiser(sched), sched, (3, 1, 64), samplers=("euler",), steps=(2, 3),
                            prediction="sample")
    viz.plot_sampler_grid(tmp_path / "g.png", grid)
    assert _png_ok(tmp_path / "g.png")


def test_row_labels_give_one_row_per_label_in_the_order_of_first_appearance(tmp_path):
    from PIL import Image

    from diffusion_forge.data import to_uint8

    x = torch.linspace(-1, 1, 7 * 4 * 4).reshape(7, 1, 4, 4)
    labels = [f"class {i % 3}" for i in range(7)]                     # classes i mod 3: rows 0, 1, 2
    assert viz.group_rows(labels) == [("class 0", [0, 3, 6]), ("class 1", [1, 4]), ("class 2", [2, 5])]
    raw = viz.save_samples(x, tmp_path / "raw.png", raw=True, row_labels=labels)
    grid = np.asarray(Image.open(raw))
    assert grid.shape == (2 + 3 * (4 + 2), 2 + 3 * (4 + 2))           # 3 rows, as long as the longest (3 tiles)
    images = to_uint8(x)[..., 0]
    assert (grid[2 + 6:2 + 6 + 4, 2 + 6:2 + 6 + 4] == images[4]).all()  # row 1 ("class 1"), column 1: sample 4
    assert (grid[2 + 6:2 + 6 + 4, 2 + 12:2 + 12 + 4] == 255).all()     # row 1 has 2 samples: the third is blank
    titled = viz.save_samples(x, tmp_path / "t.png", title="classes", row_labels=labels)
    width, height = Image.open(titled).size
    plain = Image.open(viz.save_samples(x[:6], tmp_path / "p.png", title="classes")).size
    assert abs(height - plain[1] - (4 + 2) * 16) <= 2                  # 3 rows of 16x enlarged tiles, not 2
    assert width >= plain[0] + 40                                      # and a band at the left for the labels
    pts = torch.randn(40, 2, generator=torch.Generator().manual_seed(0))
    assert _png_ok(viz.save_samples(pts, tmp_path / "v.png", row_labels=[f"class {i % 2}" for i in range(40)]))
    sig = torch.zeros(3, 1, 16)
    assert _png_ok(viz.save_samples(sig, tmp_path / "s.png", row_labels=["a", "b", "c"]), min_bytes=1000)
    with pytest.raises(ValueError, match="one label per sample"):
        viz.save_samples(x, tmp_path / "bad.png", row_labels=labels[:3])
