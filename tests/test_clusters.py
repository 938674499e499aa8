"""conditioning.kind=cluster: k-means ids of the training items stand in for labels, and the run samples like the
data (clusters drawn from their shares p(c))."""
from __future__ import annotations

import pytest
import torch

from diffusion_forge import training as T
from diffusion_forge.data import load_dataset
from diffusion_forge.data.clusters import assign, cluster_ids, feature_pool, item_features, kmeans
from diffusion_forge.training.determinism import batch_indices, dropout_mask

DIGITS = {"data.source": "digits", "model.preset": "tiny", "optim.batch_size": 16, "run.sample_every": 0,
          "sample.n": 4, "sample.steps": 2, "run.mixed_precision": "no", "run.log_every": 1,
          "conditioning.kind": "cluster", "conditioning.clusters": 6}


def blobs(k: int = 5, per: int = 200, spread: float = 10.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, 3, generator=g, dtype=torch.float64) * spread
    return torch.cat([c + torch.randn(per, 3, generator=g, dtype=torch.float64) for c in centres]), per


def test_kmeans_recovers_separated_blobs_as_sklearn_does():
    from sklearn.cluster import KMeans

    x, per = blobs()
    ours = assign(x, kmeans(x, 5, seed=3))
    theirs = torch.as_tensor(KMeans(5, n_init=10, random_state=0).fit_predict(x.numpy()))
    truth = torch.arange(5).repeat_interleave(per)
    for labels in (ours, theirs):   # each blob is one cluster, and no two blobs share one
        assert all(len(torch.unique(labels[truth == j])) == 1 for j in range(5))
        assert len(torch.unique(labels)) == 5


def test_kmeans_ends_at_a_lloyd_fixed_point_with_sklearns_inertia():
    """On overlapping blobs: every item sits with its nearest centre, each centre is the mean of its items, and
    the within-cluster sum of squares is within 2% of scikit-learn's best of 10 starts."""
    from sklearn.cluster import KMeans

    x, _ = blobs(k=8, per=150, spread=2.0, seed=1)
    centres = kmeans(x, 8, seed=0, iters=300)
    a = assign(x, centres)
    assert torch.equal(a, torch.cdist(x, centres).argmin(1))
    for j in range(8):
        torch.testing.assert_close(centres[j], x[a == j].mean(0))
    inertia = float(((x - centres[a]) ** 2).sum())
    theirs = KMeans(8, n_init=10, random_state=0).fit(x.numpy()).inertia_
    assert inertia <= 1.02 * theirs


def test_kmeans_refuses_more_clusters_than_items_and_keeps_k_centres():
    x, _ = blobs(k=2, per=3)
    with pytest.raises(ValueError, match="1 <= k <= the number of items"):
        kmeans(x, 7)
    dup = torch.zeros(10, 2, dtype=torch.float64)
    dup[5:] = 1.0                                      # two distinct points, asked for three clusters
    assert kmeans(dup, 3).shape == (3, 2)


def test_features_pool_images_to_at_most_16_pixels_a_side():
    assert feature_pool((1, 28, 28)) == 2 and feature_pool((3, 64, 64)) == 4 and feature_pool((2,)) == 1
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(item_features(x, 2), torch.tensor([[2.5, 4.5, 10.5, 12.5]], dtype=torch.float64))


def test_cluster_ids_are_drawn_by_the_seed_and_cover_every_item():
    ds = load_dataset("digits")
    a, b, c = cluster_ids(ds, 6, seed=0), cluster_ids(ds, 6, seed=0), cluster_ids(ds, 6, seed=1)
    assert a.shape == (len(ds),) and a.dtype == torch.int64 and torch.equal(a, b)
    assert set(a.tolist()) == set(range(6))
    assert not torch.equal(a, c)   # another seed: another k-means++ start (ids at least permuted)


def test_a_cluster_run_trains_on_its_cluster_ids_and_records_their_shares(tmp_path):
    trainer = T.Trainer(T.merge_config(flags={**DIGITS, "optim.steps": 2}), tmp_path, progress=False)
    ds = trainer.data.dataset
    ids = cluster_ids(load_dataset("digits"), 6, seed=trainer.cfg.run.seed)   # a second computation
    assert trainer.num_classes == 6 and trainer.unwrapped.class_embedding.num_embeddings == 7   # K + null
    assert trainer.data.class_frequencies == pytest.approx((torch.bincount(ids, minlength=6) / len(ds)).tolist())
    assert trainer.guidance_scale is None                   # like the data: no CFG by default
    calls: list[dict] = []
    trainer.unwrapped.register_forward_pre_hook(lambda m, a, kw: calls.append(dict(kw)), with_kwargs=True)
    trainer.fit()
    for step in range(2):
        idx = batch_indices(step, 16, len(ds), trainer.cfg.run.seed)
        mask = dropout_mask(step, 16, 0.1, trainer.cfg.run.seed)
        assert torch.equal(calls[step]["class_labels"], torch.where(mask, torch.full((16,), 6), ids[idx]))
    from diffusion_forge.io.checkpoint import load_model_from_run

    D = load_model_from_run(tmp_path)
    assert D.class_frequencies == pytest.approx(trainer.data.class_frequencies) and D.guidance_scale is None


def test_a_cluster_runs_grids_draw_clusters_from_their_shares(tmp_path):
    from diffusion_forge.sampling.generate import data_class_labels
    from diffusion_forge.sampling.registry import resolve_sampler

    trainer = T.Trainer(T.merge_config(flags={**DIGITS, "optim.steps": 1, "sample.steps": 20}), tmp_path,
                        progress=False)
    labels = trainer.sample_cond(64)["class_labels"]
    assert torch.equal(labels, data_class_labels(trainer.data.class_frequencies, 64, seed=0))
    assert trainer.sampler == resolve_sampler(None, 20, {}, samples="data")


def test_a_cluster_runs_grid_says_it_was_drawn_like_the_data(tmp_path, monkeypatch):
    import diffusion_forge.viz as viz

    seen = {}
    monkeypatch.setattr(viz, "save_samples", lambda x, path, title=None, row_labels=None: seen.update(
        title=title, rows=row_labels, n=len(x)))
    trainer = T.Trainer(T.merge_config(flags={**DIGITS, "optim.steps": 1, "sample.n": 8, "sample.steps": 2}),
                        tmp_path, progress=False)
    trainer.write_samples()
    assert seen["n"] == 8 and seen["rows"] is None
    assert seen["title"].endswith("clusters drawn from their shares, like the data)") and "CFG" not in seen["title"]


@pytest.mark.parametrize("overrides, message", [
    ({"conditioning.clusters": 1}, r"conditioning.clusters must be >= 2, got 1"),
    ({"conditioning.num_classes": 10}, r"conditioning.num_classes does not apply to conditioning.kind=cluster"),
    ({"conditioning.clusters": 100_000}, r"conditioning.clusters=100000 is more than the \d+ items of 'digits'"),
])
def test_bad_cluster_settings_are_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        T.Trainer(T.merge_config(flags={**DIGITS, **overrides}), tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()


def test_a_cluster_run_resumes_bit_for_bit(tmp_path):
    flags = {**DIGITS, "run.checkpoint_every": 2}
    T.train(T.merge_config(flags={**flags, "optim.steps": 4}), tmp_path / "whole", progress=False)
    T.train(T.merge_config(flags={**flags, "optim.steps": 2}), tmp_path / "parts", progress=False)
    cfg, _ = T.run_config(tmp_path / "parts", None, {"optim.steps": "4"}, allow_changes=True)
    T.train(cfg, tmp_path / "parts", progress=False)

    def losses(run):
        return {r["step"]: r["last_loss"] for r in T.read_metrics(run) if "last_loss" in r}

    assert losses(tmp_path / "whole") == losses(tmp_path / "parts") and len(losses(tmp_path / "whole")) == 4


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    """A tiny cluster-conditional U-Net on the bundled 8x8 digits: 5 clusters, label dropout 0.1."""
    from diffusion_forge.cli import main

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("cluster") / "run"
    assert main(["train", "--out", str(run), "--data", "digits", "--conditioning", "cluster", "--set",
                 "conditioning.clusters=5", "--set", "preset=tiny", "--set", "batch_size=16", "--set", "steps=3",
                 "--set", "sample_every=0", "--set", "run.mixed_precision=no", "--no-progress"]) == 0
    return run


def test_dforge_sample_and_eval_of_a_cluster_run_follow_the_data_by_default(cluster_run, tmp_path, capsys):
    """No --class on a cluster run means --class data (clusters drawn from p(c), w = 1): the same images and
    labels; --class all gives a grid by cluster instead."""
    import json

    import numpy as np

    from diffusion_forge.cli import main

    def sample(name, *flags):
        assert main(["sample", str(cluster_run), "--out", str(tmp_path / name), "--n", "12", "--steps", "2",
                     "--seed", "4", "--no-progress", *flags]) == 0
        with np.load(tmp_path / name) as f:
            return {k: f[k] for k in f.files}

    plain = sample("plain.npz")
    assert "classes drawn from the training set's shares p(c); conditional model (w = 1" in capsys.readouterr().out
    data, every = sample("data.npz", "--class", "data"), sample("all.npz", "--class", "all")
    assert (plain["images"] == data["images"]).all() and (plain["labels"] == data["labels"]).all()
    assert (every["labels"] == np.arange(12) % 5).all() and (every["images"] != plain["images"]).any()
    assert main(["eval", str(cluster_run), "--n", "10", "--steps", "2", "--seed", "3", "--no-kid", "--json",
                 str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["guidance"]["class"] == "data" and report["nll"]["given"].startswith("the null cluster")


def test_an_exported_cluster_run_carries_its_shares_and_says_what_its_ids_are(cluster_run, tmp_path):
    import json

    from diffusion_forge.cli import main
    from diffusion_forge.interop.pipelines import load_pipeline
    from diffusion_forge.io.checkpoint import load_model_from_run

    out = tmp_path / "exported"
    assert main(["export", str(cluster_run), "--out", str(out)]) == 0
    shares = load_model_from_run(cluster_run).class_frequencies
    meta = json.loads((out / "dforge.json").read_text())
    assert meta["conditioning"] == "cluster" and meta["class_frequencies"] == pytest.approx(shares)
    card = (out / "README.md").read_text()
    assert "k-means clusters of the training images" in card and "clusters drawn from their shares" in card
    # its sample grid is drawn with the rule `dforge sample RUN` applies to it, and the card names that sampler
    from diffusion_forge.sampling.registry import resolve_sampler

    name, steps, options = resolve_sampler(None, 20, samples="data")
    assert f"Samples: {name} {options}, {steps} steps" in card and "Samples: None" not in card
    assert load_pipeline(out).class_frequencies == pytest.approx(shares)


def test_the_web_page_samples_a_cluster_run_like_the_data_unless_a_cluster_is_picked(cluster_run):
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.sampling.generate import data_class_labels
    from diffusion_forge.web import generation as gen

    D = load_model_from_run(cluster_run)
    assert gen.model_facts(D)["clusters"] and not gen.model_facts(load_model_from_run(cluster_run)).get("text")
    req = gen.check_request(D, None, 2, 7, 9, None, None, "", "")
    assert torch.equal(req.labels, data_class_labels(D.class_frequencies, 9, 7)) and req.classes == "data"
    assert req.guidance is None
    one = gen.check_request(D, None, 2, 7, 9, "3", None, "", "")
    assert torch.equal(one.labels, torch.full((9,), 3)) and one.classes is None
