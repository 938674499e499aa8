"""Models: our U-Net equals diffusers' UNet2DModel weight for weight, presets, the MLP, the call contract."""
import json

import pytest
import torch

from diffusion_forge.models import (PRESETS, MLPDenoiser, UNet, build_model, count_parameters, list_presets,
                                    timestep_embedding)

import diffusers  # noqa: E402  (a core dependency: never skipped)


TWO_CONFIGS = [
    # the tiny preset on MNIST's 28 x 28 (28 -> 14), attention at 14 x 14
    dict(preset="tiny", sample_size=28),
    # 3 levels on RGB 32 x 32, 2 layers per block, attention at full and lowest resolution, no mid attention,
    # class-conditional, uneven channels, a channel change inside the up path
    dict(preset="tiny", sample_size=32, in_channels=3, block_out_channels=(16, 24, 32), layers_per_block=2,
         attention_levels=(0, 2), attention_head_dim=8, mid_attention=False, num_class_embeds=5),
]


@pytest.mark.parametrize("config", TWO_CONFIGS)
def test_unet_loads_strictly_into_diffusers_and_gives_the_same_output(config):
    torch.manual_seed(0)
    ours = build_model(config).eval()
    for p in ours.parameters():  # no zero-initialised layers may hide a mismatch
        p.data.normal_(0, 0.2)
    theirs = diffusers.UNet2DModel(**ours.to_diffusers_config()).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}

    s, c = config["sample_size"], ours.config["in_channels"]
    x, t = torch.randn(4, c, s, s), torch.tensor([0.0, 17.5, 500.0, 999.0])
    cond = {"class_labels": torch.tensor([0, 1, 4, 2])} if config.get("num_class_embeds") else {}
    with torch.no_grad():
        a, b = ours(x, t, **cond), theirs(x, t, **cond).sample
    assert a.shape == x.shape
    assert (a - b).abs().max().item() < 1e-5 * max(1.0, b.abs().max().item())


def test_diffusers_unet_type_is_the_twin_of_our_preset():
    torch.manual_seed(0)
    ours = build_model({"preset": "tiny", "sample_size": 28, "num_class_embeds": 10}).eval()
    twin = build_model({"type": "diffusers_unet", "preset": "tiny", "sample_size": 28, "num_class_embeds": 10})
    assert isinstance(twin.unet, diffusers.UNet2DModel)
    twin.unet.load_state_dict(ours.state_dict(), strict=True)
    x, t, y = torch.randn(2, 1, 28, 28), torch.tensor([3.0, 900.0]), torch.tensor([7, 1])
    with torch.no_grad():
        assert torch.allclose(ours(x, t, class_labels=y), twin.eval()(x, t, class_labels=y), atol=1e-5)


def test_diffusers_unet_from_plain_unet2d_arguments():
    model = build_model({"type": "diffusers_unet", "sample_size": 16, "in_channels": 1, "out_channels": 1,
                         "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                         "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                         "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]})
    out = model(torch.randn(3, 1, 16, 16), torch.tensor([1.0, 2.0, 3.0]))
    assert out.shape == (3, 1, 16, 16)
    assert model.build_config["block_out_channels"] == [8, 16]
    with pytest.raises(ValueError, match="num_class_embeds"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1.0]), class_labels=torch.tensor([0]))


def test_timestep_embedding_equals_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 0.5, 1.0, 17.25, 999.0])
    for dim in (16, 32, 33, 128):
        ref = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        assert torch.allclose(timestep_embedding(t, dim), ref, atol=1e-6), dim


@pytest.mark.parametrize("preset,size,channels", [("tiny", 28, 1), ("small", 28, 1), ("small", 32, 3),
                                                  ("tiny", 8, 1)])
def test_output_shape_and_timestep_forms(preset, size, channels):
    model = build_model({"preset": preset, "sample_size": size, "in_channels": channels})
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        out = model(x, torch.tensor([10.0, 20.0]))
        assert out.shape == x.shape
        # one timestep for the batch: a float, an int, a 0-d tensor all broadcast to the batch
        same = [model(x, t) for t in (10.0, 10, torch.tensor(10.0), torch.tensor([10.0, 10.0]))]
    for o in same[1:]:
        assert torch.allclose(o, same[0], atol=1e-6)


def test_base_preset_matches_ddpm_cifar_shape():
    with torch.device("meta"):
        model = build_model({"preset": "base", "sample_size": 32, "in_channels": 3})
    assert 30e6 < count_parameters(model) < 40e6  # DDPM's CIFAR-10 network has 35.7M
    assert model.to_diffusers_config()["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                               "DownBlock2D"]  # attention at 16 x 16


def test_presets_table_and_build_config_round_trip():
    rows = {(r["type"], r["preset"]): r for r in list_presets(in_channels=1)}
    assert set(rows) == {(k, p) for k in ("unet", "mlp") for p in ("tiny", "small", "base")}
    for kind in ("unet", "mlp"):
        assert rows[kind, "tiny"]["params"] < rows[kind, "small"]["params"] < rows[kind, "base"]["params"]
    model = build_model({"preset": "tiny", "sample_size": 28, "in_channels": 1})
    assert rows["unet", "tiny"]["params"] == count_parameters(model)
    assert [rows["unet", p]["size_multiple"] for p in ("tiny", "small", "base")] == [2, 4, 8]

    for config in ({"preset": "small", "sample_size": 28}, {"type": "mlp", "preset": "tiny", "dim": 3},
                   {"type": "diffusers_unet", "preset": "tiny", "sample_size": 16}):
        model = build_model(config)
        again = build_model(json.loads(json.dumps(model.build_config)))  # JSON-ready and complete
        assert type(again) is type(model)
        assert {k: v.shape for k, v in again.state_dict().items()} == \
            {k: v.shape for k, v in model.state_dict().items()}


def test_convenience_options_channel_mult_and_attention_resolutions():
    model = build_model({"preset": "small", "sample_size": 32, "base_channels": 16, "channel_mult": (1, 2, 4),
                         "attention_resolutions": (16,)})
    assert model.config["block_out_channels"] == (16, 32, 64)
    assert model.config["attention_levels"] == (1,)
    with pytest.raises(ValueError, match="not among"):
        build_model({"preset": "small", "sample_size": 32, "attention_resolutions": (7,)})


def test_clear_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model({"preset": "small", "sample_size": 30})
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model({"preset": "small"})(torch.randn(1, 1, 30, 30), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="unknown preset"):
        build_model({"preset": "huge"})
    with pytest.raises(ValueError, match="unknown model type"):
        build_model({"type": "transformer"})
    with pytest.raises(ValueError, match="unknown U-Net option"):
        build_model({"preset": "tiny", "channels": 3})
    with pytest.raises(ValueError, match="attention_head_dim"):
        build_model({"preset": "tiny", "attention_head_dim": 12})
    model = build_model({"preset": "tiny"})
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([5.0])
    with pytest.raises(ValueError, match="num_class_embeds"):  # never silently ignore conditioning
        model(x, t, class_labels=torch.tensor([1]))
    with pytest.raises(TypeError, match="encoder_hidden_states"):
        model(x, t, encoder_hidden_states=torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="pass class_labels"):
        build_model({"preset": "tiny", "num_class_embeds": 3})(x, t)


def test_class_labels_change_the_prediction():
    torch.manual_seed(0)
    model = build_model({"preset": "tiny", "sample_size": 16, "num_class_embeds": 10})
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    x, t = torch.randn(1, 1, 16, 16).expand(2, -1, -1, -1), torch.tensor([50.0, 50.0])
    with torch.no_grad():
        out = model(x, t, class_labels=torch.tensor([3, 4]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def optimal_epsilon(x_t, abar_t, centres, std):
    """The Bayes-optimal E[eps | x_t] for a mixture of equal isotropic Gaussians (exact, by Bayes' rule)."""
    a = abar_t[:, None, None]
    var = a * std**2 + 1 - a                                  # x_t | component k ~ N(sqrt(a) mu_k, var I)
    diff = x_t[:, None, :] - a.sqrt() * centres[None]          # (n, K, d)
    weights = (-(diff**2).sum(-1, keepdim=True) / (2 * var)).softmax(1)
    x0 = (weights * (centres[None] + a.sqrt() * std**2 / var * diff)).sum(1)
    return (x_t - abar_t[:, None].sqrt() * x0) / (1 - abar_t[:, None]).sqrt()


def test_mlp_learns_the_optimal_denoiser_of_8_gaussians():
    """Epsilon-prediction on 8 Gaussians, compared with the exact optimal predictor of that mixture."""
    import math

    from diffusion_forge.data import toy_2d

    torch.manual_seed(0)
    data = torch.from_numpy(toy_2d("8gaussians", 4096, seed=0)[0])
    angles = torch.arange(8) * (math.pi / 4)
    centres = 0.8 * torch.stack([angles.cos(), angles.sin()], 1)  # as toy_2d draws them, std 0.06
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float()
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (4096,), generator=g)
    noise = torch.randn(4096, 2, generator=g)
    x_t = abar[t][:, None].sqrt() * data[torch.randint(0, 4096, (4096,), generator=g)] + \
        (1 - abar[t][:, None]).sqrt() * noise
    best = optimal_epsilon(x_t, abar[t], centres, 0.06)
    best_loss = (best - noise).pow(2).mean().item()

    model = build_model({"type": "mlp", "preset": "tiny", "dim": 2})
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(400):
        tb, nb = torch.randint(0, 1000, (256,)), torch.randn(256, 2)
        a = abar[tb][:, None]
        loss = (model(a.sqrt() * data[torch.randint(0, 4096, (256,))] + (1 - a).sqrt() * nb, tb.float()) - nb)
        opt.zero_grad()
        loss.pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        pred = model(x_t, t.float())
    assert 0.1 < best_loss < 0.2  # the mixture's irreducible loss
    assert (pred - noise).pow(2).mean().item() < best_loss + 0.08
    assert (pred - best).pow(2).mean().item() < 0.08  # the zero predictor is at 0.85


def test_mlp_takes_any_shape_and_checks_its_size():
    model = build_model({"type": "mlp", "preset": "tiny", "dim": 64})
    assert isinstance(model, MLPDenoiser)
    x = torch.randn(5, 1, 8, 8)
    assert model(x, torch.full((5,), 3.0)).shape == x.shape
    with pytest.raises(ValueError, match="64 numbers per sample"):
        model(torch.randn(5, 2), torch.full((5,), 3.0))


def test_presets_cover_every_type():
    assert set(PRESETS) == {"unet", "mlp", "diffusers_unet", "diffusers_cond_unet"}
    assert isinstance(build_model({"preset": "tiny"}), UNet)


def test_a_size_that_does_not_fit_speaks_of_image_size_and_suggests_one():
    """The user's key is data.image_size: the error names it and the sizes that fit."""
    with pytest.raises(ValueError, match=r"image_size 1 \(the U-Net's sample_size\) must be divisible by 2 for its "
                                         r"2 levels; use data.image_size=2 or more"):
        build_model({"preset": "tiny", "sample_size": 1})
    with pytest.raises(ValueError, match=r"image_size 30 .* divisible by 4 .* data.image_size=28 or 32"):
        build_model({"preset": "small", "sample_size": 30})


@pytest.mark.parametrize("config", [{"preset": "tiny", "sample_size": 8}, {"type": "mlp", "preset": "tiny", "dim": 4}])
def test_the_null_class_is_one_more_embedding(config):
    """A class-conditional network for K classes has K + 1 embeddings; id K (the null class) is accepted."""
    model = build_model({**config, "num_class_embeds": 3 + 1})
    assert model.class_embedding.num_embeddings == 4
    x = torch.randn(2, 1, 8, 8) if "sample_size" in config else torch.randn(2, 4)
    with torch.no_grad():
        out = model(x, torch.tensor([5.0, 5.0]), class_labels=torch.tensor([0, 3]))
    assert out.shape == x.shape


@pytest.mark.parametrize("tokens", [49, 64, 100])
def test_attention_equals_torch_sdpa_on_both_paths(tokens):
    """models.unet.attention: two matmuls up to EXPLICIT_ATTENTION_TOKENS, torch's fused kernel above; the
    same values and gradients as F.scaled_dot_product_attention either way."""
    import torch.nn.functional as F

    from diffusion_forge.models.unet import attention

    g = torch.Generator().manual_seed(tokens)
    q, k, v = (torch.randn(3, 2, tokens, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ours, theirs = attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (ours, theirs)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
