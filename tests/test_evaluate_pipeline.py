"""The evaluation pipeline: cached reference statistics, score labels, every metric of a sample set, the
quick check during training (its sampling and its dispatch on the kind of data), and `dforge eval`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusion_forge import NoiseSchedule, evaluate as ev
from diffusion_forge.denoise import Denoiser


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class CountingNet:
    """A feature network stand-in: mean and std of each image; counts its calls."""
    name, label, dims = "effnet", "FD-EffNet", 2
    calls = 0

    def describe(self):
        return {"network": "counting"}

    def features(self, images, progress=None):
        CountingNet.calls += 1
        x = ev.as_model_images(images)
        return torch.stack([x.flatten(1).mean(1), x.flatten(1).std(1)], 1)


def test_reference_features_are_cached_by_content(tmp_cache, monkeypatch):
    net = CountingNet()
    CountingNet.calls = 0
    a = ev.reference_features(net, "digits", 100, progress=False)
    b = ev.reference_features(net, "digits", 100, progress=False)
    assert CountingNet.calls == 1 and torch.equal(a, b) and a.shape == (100, 2)
    monkeypatch.setattr(ev.features, "_REF_MEMO", {})                                 # a new process: read from disk
    assert torch.equal(ev.reference_features(net, "digits", 100, progress=False), a) and CountingNet.calls == 1
    files = list((tmp_cache / "refstats").glob("*.safetensors"))
    assert len(files) == 1 and "digits-train-100-effnet" in files[0].name
    ev.reference_features(net, "digits", 50, progress=False)                 # another subset, another entry
    assert CountingNet.calls == 2
    # the subset is fixed: the same images whatever the order of calls
    assert np.array_equal(ev.load_reference_images("digits", 30), ev.load_reference_images("digits", 30))


def test_labels_carry_the_network_and_the_count():
    net = CountingNet()
    assert ev.metric_label("FD", net, 2000) == "FD-EffNet@2k"
    assert ev.metric_label("KID", net, 500) == "KID-EffNet@500"
    assert ev.count_label(1500) == "1.5k" and ev.count_label(50_000) == "50k" and ev.count_label(1234) == "1234"


def test_evaluate_images_real_data_scores_well(tmp_cache, monkeypatch):
    monkeypatch.setattr(ev.pipeline, "feature_network", lambda name, w=None: CountingNet())
    test_u8 = ev.load_reference_images("digits", 200, split="test")
    metrics, extras = ev.evaluate_images(test_u8, "digits", networks=["effnet"], progress=False)
    assert metrics["n"] == 200 and metrics["FD-EffNet@200"] < 0.01
    assert 0.7 < metrics["precision-EffNet@200"] <= 1 and 0.7 < metrics["recall-EffNet@200"] <= 1
    assert metrics["near_copies@200"] <= 0.05
    copies = ev.load_reference_images("digits", 50, split="train")
    metrics, _ = ev.evaluate_images(copies, "digits", networks=["effnet"], progress=False)
    assert metrics["near_copies@50"] == 1.0


def test_evaluate_during_training_samples_through_generate_and_dispatches_on_the_kind(monkeypatch):
    """The samples are exactly generate's (seeds seed + i, the sampler asked for, the denoiser's own shape);
    signals are scored by the FD of their flattened values against the training signals."""
    import diffusion_forge.sampling.generate as gen_module

    calls = []

    def fake_generate(denoiser, n, seed=0, sampler=None, steps=20, sampler_options=None, cond=None, **kw):
        calls.append(dict(n=n, seed=seed, sampler=sampler, steps=steps, sampler_options=sampler_options, **kw))
        return torch.zeros(n, *kw["sample_shape"])

    class Signals:                                             # a 2-channel signal data set of 300 items
        shape, kind = (2, 16), "signal"
        data = torch.randn(300, 2, 16, generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.data)

        def get_batch(self, idx):
            return self.data[idx], {}

    monkeypatch.setattr(gen_module, "generate", fake_generate)
    monkeypatch.setattr("diffusion_forge.data.load_dataset", lambda *a, **k: Signals())
    D = Denoiser(lambda x, t: x, NoiseSchedule.from_name("cosine", 100), "sample", sample_shape=(2, 16))
    out = ev.evaluate_during_training(D, "my-signals", n=40, sampler="euler", steps=7, sampler_options={}, seed=3)
    assert calls == [dict(n=40, seed=3, sampler="euler", steps=7, sampler_options={}, sample_shape=(2, 16))]
    real = Signals.data.flatten(1).double()                    # zeros against all 300: FD = |mu|^2 + tr(cov)
    assert set(out) == {"FD-raw@40", "eval_seconds"}
    assert out["FD-raw@40"] == pytest.approx(float(real.mean(0).pow(2).sum() + real.T.cov().trace()), rel=1e-6)


def test_cli_eval_on_a_sample_file(tmp_path, tmp_cache, monkeypatch, capsys):
    from diffusion_forge.cli import main

    monkeypatch.setattr(ev.pipeline, "feature_network", lambda name, w=None: CountingNet())
    images = ev.load_reference_images("digits", 60, split="test")
    np.savez(tmp_path / "s.npz", images=images)
    rc = main(["eval", str(tmp_path / "s.npz"), "--data", "digits", "--features", "effnet",
               "--json", str(tmp_path / "e.json"), "--pairs-out", str(tmp_path / "pairs.png")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "FD-EffNet@60" in out and "not FID" in out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["metrics"]["n"] == 60 and (tmp_path / "pairs.png").stat().st_size > 1000
    assert main(["eval", str(tmp_path / "s.npz")]) == 2                      # --data is needed
