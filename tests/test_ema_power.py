"""The power-function EMA (Karras et al. 2024) against its closed-form weights and the width of its profile."""
import numpy as np
import pytest
import torch

from diffusion_forge.training.ema import EMA, ema_decay, gamma_for_sigma_rel, sigma_rel_for_gamma


@pytest.mark.parametrize("sigma_rel", [0.05, 0.09, 0.2])
def test_gamma_for_sigma_rel_inverts_the_width(sigma_rel):
    gamma = gamma_for_sigma_rel(sigma_rel)
    assert gamma > 0 and sigma_rel_for_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-10)


def test_power_ema_weights_are_the_closed_form_profile():
    """After t updates of weights e_1..e_t (one-hot vectors), the average holds weight
    (k^(g+1) - (k-1)^(g+1)) / t^(g+1) on e_k; those weights sum to 1, and the standard deviation of k/t under
    them is sigma_rel (up to O(1/t))."""
    t, sigma_rel = 400, 0.09
    gamma = gamma_for_sigma_rel(sigma_rel)
    model = torch.nn.Linear(t, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, sigma_rel=sigma_rel)
    for k in range(1, t + 1):
        with torch.no_grad():
            model.weight.zero_()
            model.weight[0, k - 1] = 1.0
        ema.update(model)
    got = ema.module.weight.detach().double()[0].numpy()
    k = np.arange(1, t + 1, dtype=np.float64)
    want = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    assert got.sum() == pytest.approx(1.0, abs=1e-4)
    mean = (got * k / t).sum()
    std = np.sqrt((got * (k / t - mean) ** 2).sum())
    assert std == pytest.approx(sigma_rel, rel=0.02)


def test_the_recipe_warm_up_is_nearly_the_power_ema_of_width_0_09():
    """1 - d_k: 9 / (10 + k) against 1 - (1 - 1/k)^9, within 1% of each other from k = 1,000 on (the module
    docstring), and 5% apart at k = 100."""
    gamma = 8.0
    for k, tol in ((100, 0.06), (1000, 0.01), (5000, 0.002)):
        warm, power = 1 - ema_decay(k, 0.9999), 1 - (1 - 1 / k) ** (gamma + 1)
        assert abs(warm / power - 1) < tol
    assert sigma_rel_for_gamma(gamma) == pytest.approx(0.0905, abs=1e-4)


def test_power_ema_meta_round_trips_and_rejects_bad_widths():
    model = torch.nn.Linear(2, 2)
    a = EMA(model, sigma_rel=0.1)
    a.update(model)
    b = EMA(model)
    b.load(a.state_dict(), a.meta())
    assert b.sigma_rel == 0.1 and b.num_updates == 1
    assert ema_decay(2, 0.999, sigma_rel=0.1) == pytest.approx(0.5 ** (gamma_for_sigma_rel(0.1) + 1))
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel"):
            EMA(model, sigma_rel=bad)


def test_trainer_runs_the_power_ema_from_the_config(tmp_path):
    """ema.sigma_rel=S: the trainer's average after 12 steps is the closed-form power-function average of the
    weights it went through (not the warm-up EMA's), and the checkpoint records the width."""
    from diffusion_forge.training import Trainer
    from diffusion_forge.training.config import ConfigError
    from test_training import record_weights, tiny

    trainer = Trainer(tiny({"optim.steps": 12, "ema.sigma_rel": 0.15}), tmp_path, progress=False)
    snapshots = record_weights(trainer, initial=False)
    trainer.fit()
    t, gamma = len(snapshots), gamma_for_sigma_rel(0.15)
    weights = [(k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t ** (gamma + 1) for k in range(1, t + 1)]
    ema = trainer.ema.module.state_dict()
    for name in ema:
        if ema[name].is_floating_point():
            want = sum(w * s[name] for w, s in zip(weights, snapshots))
            assert torch.allclose(ema[name].double(), want, atol=1e-6, rtol=0)
    warm = [min(0.999, (1 + k) / (10 + k)) for k in range(1, t + 1)]
    assert abs(warm[-1] - ema_decay(t, 0.999, sigma_rel=0.15)) > 0.05     # the two averages differ here
    assert trainer.ema.meta()["sigma_rel"] == 0.15
    with pytest.raises(ConfigError, match="ema.sigma_rel"):
        tiny({"ema.sigma_rel": 0.5})
