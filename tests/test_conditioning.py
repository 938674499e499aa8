"""Conditioning travels with the batch: labels reach the network, dropout puts the null class in their place."""
from __future__ import annotations

import math

import pytest
import torch

from diffusion_forge import training as T
from diffusion_forge.training.determinism import batch_indices, dropout_mask

MOONS = {"data.source": "moons", "model.type": "mlp", "model.preset": "tiny", "optim.batch_size": 64,
         "run.mixed_precision": "no", "run.log_every": 1, "run.sample_every": 0, "sample.n": 4, "sample.steps": 2,
         "optim.warmup_steps": 2}
CLASS = {**MOONS, "conditioning.kind": "class"}


def config(overrides: dict) -> T.TrainConfig:
    return T.merge_config(flags=overrides)


def spy(trainer) -> list[dict]:
    """Record the keyword arguments of every forward call of the trained network."""
    calls: list[dict] = []
    trainer.unwrapped.register_forward_pre_hook(lambda module, args, kwargs: calls.append(dict(kwargs)),
                                                with_kwargs=True)
    return calls


def data_labels(trainer, step: int) -> torch.Tensor:
    """The data set's labels of the global batch of ``step`` (before dropout)."""
    cfg = trainer.cfg
    idx = batch_indices(step, cfg.optim.batch_size, trainer.data.n, cfg.run.seed)
    return torch.as_tensor(trainer.data.dataset.labels)[idx].long()


def test_the_network_receives_the_labels_of_its_batch(tmp_path):
    """With the default dropout (0.1): each label as the data gives it, or the null id 2 where the (seed, step)
    mask drops it."""
    trainer = T.Trainer(config({**CLASS, "optim.steps": 3, "optim.grad_accum": 2}), tmp_path, progress=False)
    assert trainer.num_classes == 2 and trainer.unwrapped.class_embedding.num_embeddings == 3   # K + 1
    calls = spy(trainer)
    trainer.fit()
    assert len(calls) == 6                                            # 3 steps x 2 micro-batches
    kept = []
    for step in range(3):
        got = torch.cat([calls[2 * step]["class_labels"], calls[2 * step + 1]["class_labels"]])
        mask = dropout_mask(step, 64, 0.1, trainer.cfg.run.seed)
        expected = torch.where(mask, torch.full_like(got, 2), data_labels(trainer, step))
        assert got.dtype == torch.int64 and torch.equal(got, expected)
        kept.append(got[~mask])
    assert set(torch.cat(kept).tolist()) == {0, 1}


def test_dropout_0_trains_no_null_class_and_passes_every_label(tmp_path):
    trainer = T.Trainer(config({**CLASS, "optim.steps": 3, "conditioning.dropout": 0}), tmp_path, progress=False)
    assert trainer.null_id is None and trainer.guidance_scale is None
    assert trainer.unwrapped.class_embedding.num_embeddings == 2                      # K: no null id
    assert trainer.unwrapped.diffusion_config["null_cond"] is None
    calls = spy(trainer)
    trainer.fit()
    for step, call in enumerate(calls):
        assert torch.equal(call["class_labels"], data_labels(trainer, step))
    assert set(torch.cat([c["class_labels"] for c in calls]).tolist()) == {0, 1}
    from diffusion_forge.denoise.guidance import ClassifierFreeGuidance
    from diffusion_forge.io.checkpoint import load_model_from_run

    D = load_model_from_run(tmp_path)
    assert D.null_cond is None and D.guidance_scale is None and D.num_classes == 2
    with pytest.raises(ValueError, match="dropout"):                                 # CFG refused by name
        ClassifierFreeGuidance(D, 2.0)


def test_a_class_run_drops_labels_to_the_null_id_at_the_default_rate_0_1(tmp_path):
    """conditioning.dropout defaults to 0.1 on a class-conditional run: over 50 global batches of 64 (n = 3200)
    the null id replaces N labels, N ~ Binomial(n, 0.1): mean 320, sd 17; the bound |N - 320| < 5 sd = 85
    fails by chance with probability < 1e-6, and fails for a rate of 0 (N = 0) or 0.2 (N ~ 640)."""
    cfg = config(CLASS)
    assert cfg.conditioning.dropout == 0.1 == T.TrainConfig().conditioning.dropout
    trainer = T.Trainer(cfg, tmp_path, progress=False)
    assert trainer.null_id == 2
    steps, b, null = 50, cfg.optim.batch_size, 0
    for step in range(steps):
        (_, cond, _, _), = trainer.global_batch(step)
        labels, data = cond["class_labels"], data_labels(trainer, step)
        assert torch.equal(labels[labels != 2], data[labels != 2])                 # the others are the data's own
        null += int((labels == 2).sum())
    n, p = steps * b, 0.1
    assert abs(null - n * p) < 5 * math.sqrt(n * p * (1 - p)), (null, n)


def test_an_unconditional_run_is_unaffected_by_the_dropout_default(tmp_path):
    """The default conditioning.dropout (0.1) applies to conditional runs only: an unconditional run with it
    trains bit for bit as one with dropout 0 (nothing is drawn for it)."""
    assert config(MOONS).conditioning.dropout == 0.1
    a = T.train(config({**MOONS, "optim.steps": 3}), tmp_path / "a", progress=False)
    b = T.train(config({**MOONS, "optim.steps": 3, "conditioning.dropout": 0}), tmp_path / "b", progress=False)
    assert a["step"] == b["step"] == 3

    def losses(run):
        return [r["last_loss"] for r in T.read_metrics(run) if "last_loss" in r]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 3
    from diffusion_forge.io.checkpoint import load_checkpoint

    ea, eb = load_checkpoint(tmp_path / "a").tensors("ema"), load_checkpoint(tmp_path / "b").tensors("ema")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_condition_dropout_replaces_the_drawn_fraction_with_the_null_class(tmp_path):
    p, steps = 0.3, 12
    trainer = T.Trainer(config({**CLASS, "optim.steps": steps, "conditioning.dropout": p}), tmp_path, progress=False)
    calls = spy(trainer)
    trainer.fit()
    null, b, dropped = trainer.null_id, trainer.cfg.optim.batch_size, 0
    assert null == 2
    for step, call in enumerate(calls):
        got, labels = call["class_labels"], data_labels(trainer, step)
        mask = dropout_mask(step, b, p, trainer.cfg.run.seed)       # drawn from (seed, step): resumable
        assert torch.equal(got[mask], torch.full((int(mask.sum()),), null))
        assert torch.equal(got[~mask], labels[~mask])
        dropped += int(mask.sum())
    n = steps * b
    assert abs(dropped - n * p) < 5 * math.sqrt(n * p * (1 - p)), (dropped, n)


def test_the_dropout_mask_has_the_stated_fraction_and_depends_on_seed_and_step():
    p, n = 0.3, 20000
    mask = dropout_mask(7, n, p, seed=0)
    assert abs(int(mask.sum()) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(mask, dropout_mask(7, n, p, seed=0))
    assert not torch.equal(mask, dropout_mask(8, n, p, seed=0)) and not torch.equal(mask, dropout_mask(7, n, p, 1))
    assert dropout_mask(7, n, 0.0, seed=0) is None


def test_an_unconditional_run_passes_no_labels(tmp_path):
    trainer = T.Trainer(config({**MOONS, "optim.steps": 2}), tmp_path, progress=False)   # moons has labels
    calls = spy(trainer)
    trainer.fit()
    assert len(calls) == 2 and all(call == {} for call in calls)
    assert trainer.unwrapped.class_embedding is None
    assert trainer.unwrapped.diffusion_config["null_cond"] is None


def test_the_null_condition_travels_with_the_network_into_the_run_folder(tmp_path):
    from diffusion_forge.io.checkpoint import load_checkpoint, load_model_from_run

    trainer = T.Trainer(config({**CLASS, "optim.steps": 2, "conditioning.dropout": 0.5}), tmp_path, progress=False)
    for net in (trainer.unwrapped, trainer.ema.module):
        assert net.diffusion_config["null_cond"] == {"class_labels": 2}
        assert net.diffusion_config["prediction"] == "v_prediction"
    trainer.fit()
    extra = load_checkpoint(tmp_path).state["extra"]
    assert extra["num_classes"] == 2 and extra["model_config"]["num_class_embeds"] == 3
    D = load_model_from_run(tmp_path)
    assert D.null_cond == {"class_labels": 2} and D.num_classes == 2
    assert (tmp_path / "samples" / "step-00000002.png").is_file()   # the final grid, sampled with labels 0, 1, 0, 1


def test_a_class_conditional_image_run_trains_and_samples(tmp_path):
    cfg = config({"data.source": "digits", "model.preset": "tiny", "optim.batch_size": 16, "optim.steps": 2,
                  "run.sample_every": 0, "sample.n": 4, "sample.steps": 2, "run.mixed_precision": "no",
                  "conditioning.kind": "class", "conditioning.dropout": 0.2})
    summary = T.train(cfg, tmp_path, progress=False)
    assert summary["step"] == 2 and (tmp_path / "samples" / "step-00000002.png").is_file()


def test_dropout_is_resumable_bit_for_bit(tmp_path):
    flags = {**CLASS, "conditioning.dropout": 0.3, "run.checkpoint_every": 2}
    T.train(config({**flags, "optim.steps": 4}), tmp_path / "whole", progress=False)
    T.train(config({**flags, "optim.steps": 2}), tmp_path / "parts", progress=False)
    cfg, _ = T.run_config(tmp_path / "parts", None, {"optim.steps": "4"}, allow_changes=True)
    T.train(cfg, tmp_path / "parts", progress=False)

    def losses(run):
        return {r["step"]: r["last_loss"] for r in T.read_metrics(run) if "last_loss" in r}

    assert losses(tmp_path / "whole") == losses(tmp_path / "parts") and len(losses(tmp_path / "whole")) == 4


@pytest.mark.parametrize("overrides, message", [
    ({"data.source": "swiss_roll"}, r"conditioning.kind=class needs class labels, and data set 'swiss_roll' has none"),
    ({"conditioning.num_classes": 1}, r"conditioning.num_classes=1 is below the 2 classes of 'moons'"),
    ({"model.type": "unet"}, r"model.type=unet is an image network.*use model.type=mlp"),
])
def test_sections_that_do_not_fit_the_data_are_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        T.Trainer(config({**CLASS, **overrides}), tmp_path, progress=False)
    assert not (tmp_path / "config.json").exists()


def test_the_default_network_type_fits_the_data(tmp_path, capsys):
    """model.type=auto (the default): `dforge train --data moons` trains the MLP on the 2-D points, an image set the
    U-Net; an explicit model.type=unet on vectors is still refused (above)."""
    from diffusion_forge.cli import main
    from diffusion_forge.io.checkpoint import load_model_from_run
    from diffusion_forge.training.build import model_config

    assert T.merge_config(flags={}).model.type == "auto"
    assert model_config(config({}), (2,))["type"] == "mlp" and model_config(config({}), (2,))["dim"] == 2
    assert model_config(config({}), (1, 8, 8))["type"] == "unet"
    assert model_config(config({"model.type": "mlp"}), (1, 8, 8))["dim"] == 64
    run = tmp_path / "moons"
    assert main(["train", "--data", "moons", "--no-progress", "--out", str(run),
                 "--set", "optim.steps=3", "--set", "run.sample_every=0", "--set", "run.mixed_precision=no"]) == 0
    assert "training mlp/small" in capsys.readouterr().out
    trained = load_model_from_run(run)
    assert tuple(trained.sample_shape) == (2,) and type(trained.model).__name__ == "MLPDenoiser"


def test_flip_needs_images(tmp_path):
    with pytest.raises(ValueError, match=r"data.flip=true needs images, and 'moons' holds vectors"):
        T.Trainer(config({**MOONS, "data.flip": "true"}), tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------
# The recommended guidance scale and the trainer's grids

def test_the_recommended_guidance_scale_resolves_by_recipe(monkeypatch):
    from diffusion_forge.training import config as C

    assert C.RECOMMENDED_GUIDANCE_SCALE == 1.25                                          # benchmarks/guidance.py
    assert C.recommended_guidance_scale(config(CLASS)) == 1.25
    assert C.recommended_guidance_scale(config(MOONS)) is None                          # unconditional: no CFG
    assert C.recommended_guidance_scale(config({**CLASS, "conditioning.dropout": 0})) is None   # no null class
    assert C.recommended_guidance_scale(config({**CLASS, "sample.guidance_scale": 3.5})) == 3.5
    saved = config(CLASS).to_dict()
    assert saved["sample"]["guidance_scale"] is None                                     # "the recipe's"
    assert C.recommended_guidance_scale(saved) == 1.25                                   # a nested dict works too
    assert C.recommended_guidance_scale({"lr": 1e-3}) is None                           # a flat version-1 one too
    monkeypatch.setattr(C, "RECOMMENDED_GUIDANCE_SCALE", 4.0)                            # a re-measured recipe
    assert C.recommended_guidance_scale(saved) == 4.0


@pytest.mark.parametrize("bad, message", [
    ({**MOONS, "sample.guidance_scale": "3"}, ("sample.guidance_scale=3 needs a class-conditional run: set "
                                               "conditioning.kind=class")),
    ({**CLASS, "conditioning.dropout": "0", "sample.guidance_scale": "3"},
     "sample.guidance_scale=3 needs a null class, and conditioning.dropout=0 trains none"),
    ({**CLASS, "sample.guidance_scale": "-1"}, "sample.guidance_scale must be >= 0 or none"),
    ({**CLASS, "run.guide_snapshot_step": "-1"}, "run.guide_snapshot_step must be >= 0"),
])
def test_guidance_keys_are_validated_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        config(bad)


def test_class_conditional_grids_use_cfg_at_the_recommended_scale_and_a_row_per_class(tmp_path, monkeypatch):
    """Sample i of the grid has class i mod K and is drawn with CFG at the run's scale (here the module constant,
    changed to 3.5, as a re-measured benchmark would); the picture gets one labelled row per class; the scale
    is recorded in the checkpoint, so the loaded run keeps it when the constant changes again."""
    import diffusion_forge.sampling.generate as G
    from diffusion_forge import viz
    from diffusion_forge.io.checkpoint import load_checkpoint, load_model_from_run
    from diffusion_forge.training import config as C

    monkeypatch.setattr(C, "RECOMMENDED_GUIDANCE_SCALE", 3.5)
    calls, pictures = [], []
    real_generate, real_save = G.generate, viz.save_samples
    monkeypatch.setattr(G, "generate", lambda *a, **kw: calls.append(kw) or real_generate(*a, **kw))
    monkeypatch.setattr(viz, "save_samples", lambda *a, **kw: pictures.append(kw) or real_save(*a, **kw))
    T.train(config({**CLASS, "optim.steps": 2, "sample.n": 5}), tmp_path, progress=False)
    (kw,), (picture,) = calls, pictures
    assert kw["guidance_scale"] == 3.5 and torch.equal(kw["cond"]["class_labels"], torch.tensor([0, 1, 0, 1, 0]))
    up, low = "class 0 (upper)", "class 1 (lower)"                  # moons names its classes
    assert picture["row_labels"] == [up, low, up, low, up]
    assert "CFG w = 3.5" in picture["title"] and (tmp_path / "samples" / "step-00000002.png").is_file()
    assert load_checkpoint(tmp_path).state["extra"]["guidance_scale"] == 3.5
    monkeypatch.setattr(C, "RECOMMENDED_GUIDANCE_SCALE", 2.0)
    assert load_model_from_run(tmp_path).guidance_scale == 3.5                 # what the run recorded

    calls.clear(), pictures.clear()
    T.train(config({**MOONS, "optim.steps": 2, "sample.n": 5}), tmp_path / "uncond", progress=False)
    assert "guidance_scale" not in calls[0] and calls[0]["cond"] is None and pictures[0]["row_labels"] is None
    assert load_model_from_run(tmp_path / "uncond").guidance_scale is None


def test_evaluation_during_a_class_conditional_run_scores_guided_samples(tmp_path, monkeypatch):
    import diffusion_forge.evaluate as ev
    from diffusion_forge.denoise.guidance import ClassifierFreeGuidance

    seen = []
    real = ev.evaluate_during_training
    monkeypatch.setattr(ev, "evaluate_during_training", lambda D, *a, **kw: seen.append((D, kw)) or real(D, *a, **kw))
    T.train(config({**CLASS, "optim.steps": 2, "run.eval_every": 2, "run.eval_n": 64}), tmp_path, progress=False)
    (D, kw), = seen
    assert isinstance(D, ClassifierFreeGuidance) and D.scale == 1.25 and D.null_cond == {"class_labels": 2}
    assert torch.equal(kw["cond"]["class_labels"], torch.arange(64) % 2)
    assert any(k.startswith("FD-xy@") for r in T.read_metrics(tmp_path) if "eval_seconds" in r for k in r)


def test_the_trainers_grids_use_the_default_for_their_conditioning(tmp_path):
    """A run that names no sampler draws its grids with CONDITIONAL_SAMPLERS when it is conditional and with
    DEFAULT_SAMPLERS otherwise (the unconditional default's s_tmax is finite, the conditional one's is not)."""
    from diffusion_forge.sampling.registry import SAMPLERS, default_sampler

    for overrides, conditional in ((CLASS, True), (MOONS, False)):
        trainer = T.Trainer(config({**overrides, "optim.steps": 1, "sample.steps": 20}),
                            tmp_path / str(conditional), progress=False)
        name, options = default_sampler(20, "conditional" if conditional else "unconditional")
        assert trainer.sampler == (name, 20, {**SAMPLERS[name].options, **options})
        assert (trainer.sampler[2]["s_tmax"] == math.inf) == conditional
