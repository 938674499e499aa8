"""Guidance wrappers (issue 10): classifier-free guidance, classifier guidance and autoguidance over a toy
class-conditional model whose E[x_0 | x_t, class] is exact (Gaussian classes), under every sampler.

"Exactly" below means torch.equal: the combinations use torch.lerp, which returns its start at w = 0 and its
end at w = 1 (and the start when both are equal), and the toy network is row-wise (a row's output does not
depend on the other rows of the batch), so doubling the batch changes no bit of a row."""
from __future__ import annotations

import ast
import importlib.util
import math

import pytest
import torch

import diffusion_forge as df
from diffusion_forge.core.process import from_x0_eps
from diffusion_forge.sampling.registry import SAMPLERS

torch.set_num_threads(1)
K, SHAPE, F64 = 3, (2, 4), torch.float64
COSINE = df.NoiseSchedule.from_name("cosine", 100)
ZSNR = df.NoiseSchedule.from_name("linear", 100, beta_end=0.2, zero_terminal_snr=True)


class ToyNet(torch.nn.Module):
    """K Gaussian classes x_0 | k ~ N(mu_k, tau^2 I); class K is the null class (the mixture with equal weights).
    Returns the exact v-prediction of E[x_0 | x_t, k]; ``calls`` records each call's batch and labels."""

    def __init__(self, schedule=COSINE, tau=0.3, shift=0.0, prediction="v_prediction", null=True):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.mu = torch.randn(K, *SHAPE, generator=g, dtype=F64) + shift
        self.schedule, self.tau, self.prediction, self.calls = schedule, tau, prediction, []
        self.diffusion_config = {"schedule": schedule.to_dict(), "prediction": prediction, "sample_shape": SHAPE,
                                 "null_cond": {"class_labels": K} if null else None}

    def x0(self, x_t, ab, labels):
        ab = ab.reshape(-1, *[1] * len(SHAPE)).unsqueeze(1)             # (n, 1, ...) against (n, K, ...)
        var = ab * self.tau ** 2 + 1 - ab                                 # Var[x_t | k]
        mean_k = self.mu + self.tau ** 2 * ab.sqrt() / var * (x_t.unsqueeze(1) - ab.sqrt() * self.mu)
        logp = -((x_t.unsqueeze(1) - ab.sqrt() * self.mu) ** 2 / (2 * var)).flatten(2).sum(-1)   # (n, K)
        onehot = torch.nn.functional.one_hot(labels.clamp(max=K - 1), K).to(F64)
        w = torch.where((labels == K)[:, None], logp.softmax(-1), onehot)  # null class: posterior over k
        return (w.reshape(*w.shape, *[1] * len(SHAPE)) * mean_k).sum(1)

    def forward(self, x_t, t, class_labels=None):
        self.calls.append({"batch": len(x_t), "class_labels": class_labels})
        labels = class_labels if class_labels is not None else torch.full((len(x_t),), K)
        ab = self.schedule.alpha_bar_at(t.double())
        x0 = self.x0(x_t.double(), ab, labels.long())
        eps = (x_t.double() - ab.sqrt().reshape(-1, 1, 1) * x0) / (1 - ab).sqrt().reshape(-1, 1, 1)
        return from_x0_eps(x0, eps, self.prediction, ab).to(x_t.dtype)


class UncondNet(ToyNet):
    """The same data without labels: its forward takes none (labels given to it would be a TypeError)."""

    def __init__(self, schedule=COSINE):
        super().__init__(schedule, null=False)

    def forward(self, x_t, t):
        return super().forward(x_t, t, None)


class LinearClassifier(torch.nn.Module):
    """log p(y | x_t) = log_softmax(W x_t + c t / T)_y in float64; records its inputs."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.W = torch.nn.Parameter(torch.randn(K, math.prod(SHAPE), generator=g, dtype=F64))
        self.c = torch.nn.Parameter(torch.randn(K, generator=g, dtype=F64))
        self.seen = []

    def forward(self, x_t, t):
        self.seen.append((x_t.detach().clone(), t.clone()))
        return x_t.flatten(1) @ self.W.T + self.c * (t.double()[:, None] / 100)


def den(net=None, **kw):
    return df.Denoiser(net if net is not None else ToyNet(**kw), model_dtype=F64)


def batch(n=4, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)


LABELS = torch.tensor([0, 1, 2, 1])
SIGMA = torch.tensor([0.05, 0.7, 3.0, 40.0], dtype=F64)


def rescale_noise_cfg_of_diffusers():
    """diffusers' own rescale_noise_cfg, the function's source taken from the Stable Diffusion pipeline file
    and run as it is (importing that module needs transformers)."""
    spec = importlib.util.find_spec("diffusers")  # a core dependency: always there
    path = spec.submodule_search_locations[0] + "/pipelines/stable_diffusion/pipeline_stable_diffusion.py"
    tree = ast.parse(open(path).read())
    fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "rescale_noise_cfg")
    space = {"torch": torch}
    exec(compile(ast.Module([fn], []), path, "exec"), space)
    return space["rescale_noise_cfg"]


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance

def test_cfg_scale_one_is_the_conditional_and_zero_the_unconditional_prediction_exactly():
    D, x = den(), batch()
    cond = D(x, SIGMA, class_labels=LABELS)
    uncond = D(x, SIGMA, class_labels=torch.full((4,), K))
    assert not torch.allclose(cond, uncond)
    assert torch.equal(df.ClassifierFreeGuidance(D, 1.0)(x, SIGMA, class_labels=LABELS), cond)
    assert torch.equal(df.ClassifierFreeGuidance(D, 0.0)(x, SIGMA, class_labels=LABELS), uncond)
    # scale 3 on the network's own (v) prediction; in x0 it is the same affine combination (to rounding)
    x_t = x / (1 + SIGMA ** 2).sqrt().reshape(-1, 1, 1)
    v_c, v_u = D.predict_raw(x_t, SIGMA, class_labels=LABELS), D.predict_raw(x_t, SIGMA, class_labels=torch.full((4,), K))
    want = D.x0_from_prediction(v_u + 3 * (v_c - v_u), x_t, SIGMA)
    got = df.ClassifierFreeGuidance(D, 3.0)(x, SIGMA, class_labels=LABELS)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, uncond + 3 * (cond - uncond), rtol=1e-10, atol=1e-10)


def test_one_network_call_per_cfg_evaluation_with_the_batch_doubled():
    net = ToyNet()
    G = df.ClassifierFreeGuidance(den(net), 2.5)
    net.calls.clear()
    G(batch(), SIGMA, class_labels=LABELS)
    assert len(net.calls) == 1 and net.calls[0]["batch"] == 8 and G.nfe == 1
    assert torch.equal(net.calls[0]["class_labels"], torch.tensor([0, 1, 2, 1, K, K, K, K]))


def test_rescale_zero_is_plain_cfg_and_rescale_matches_diffusers_rescale_noise_cfg():
    D, x = den(), batch()
    plain = df.ClassifierFreeGuidance(D, 4.0)(x, SIGMA, class_labels=LABELS)
    assert torch.equal(df.ClassifierFreeGuidance(D, 4.0, rescale=0.0)(x, SIGMA, class_labels=LABELS), plain)
    rescale_noise_cfg = rescale_noise_cfg_of_diffusers()
    x_t = x / (1 + SIGMA ** 2).sqrt().reshape(-1, 1, 1)
    v_c, v_u = D.predict_raw(x_t, SIGMA, class_labels=LABELS), D.predict_raw(x_t, SIGMA, class_labels=torch.full((4,), K))
    for r in (1.0, 0.7):
        want = D.x0_from_prediction(rescale_noise_cfg(v_u + 4 * (v_c - v_u), v_c, guidance_rescale=r), x_t, SIGMA)
        got = df.ClassifierFreeGuidance(D, 4.0, rescale=r).predict_x0(x_t, SIGMA, class_labels=LABELS)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got, plain, atol=1e-3)  # the rescale did something


def test_outside_the_guidance_interval_the_conditional_prediction_in_one_undoubled_call():
    net = ToyNet()
    D, x = den(net), batch()
    G = df.ClassifierFreeGuidance(D, 3.0, interval=(0.5, 3.0))
    for s in (0.05, 0.5, 3.5, 40.0):  # sigma_lo itself is outside: the interval is (lo, hi]
        net.calls.clear()
        out = G(x, s, class_labels=LABELS)
        assert [c["batch"] for c in net.calls] == [4]
        assert torch.equal(out, D(x, s, class_labels=LABELS))
    full = df.ClassifierFreeGuidance(D, 3.0)
    assert torch.equal(G(x, 3.0, class_labels=LABELS), full(x, 3.0, class_labels=LABELS))  # sigma_hi: inside
    mixed = G(x, SIGMA, class_labels=LABELS)  # per-sample sigma (0.05, 0.7, 3, 40): rows 1 and 2 are guided
    cond, guided = D(x, SIGMA, class_labels=LABELS), full(x, SIGMA, class_labels=LABELS)
    assert torch.equal(mixed[[0, 3]], cond[[0, 3]]) and torch.equal(mixed[[1, 2]], guided[[1, 2]])
    assert not torch.allclose(mixed[[1, 2]], cond[[1, 2]])


def test_cfg_over_a_wrapper_combines_its_predictions():
    D, x = den(), batch()
    over = df.ClassifierFreeGuidance(df.ClipX0(D, 100.0), 3.0, rescale=0.5)(x, SIGMA, class_labels=LABELS)
    torch.testing.assert_close(over, df.ClassifierFreeGuidance(D, 3.0, rescale=0.5)(x, SIGMA, class_labels=LABELS),
                               rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Classifier guidance

def test_classifier_gradient_matches_central_finite_differences_in_float64():
    clf, x_t = LinearClassifier(), batch()
    G = df.ClassifierGuidance(den(), clf, 2.0)

    def log_p(z):  # log p(y_i | x_t_i) per row: a row depends on its own x_t only
        return torch.log_softmax(clf(z, COSINE.t_for_sigma(SIGMA).float()), 1).gather(1, LABELS[:, None])[:, 0]

    with torch.no_grad():  # as under sampling
        grad = G.grad_log_prob(x_t, SIGMA, LABELS)
        fd, h = torch.zeros(4, math.prod(SHAPE), dtype=F64), 1e-6
        for idx in range(fd.shape[1]):  # central differences along each coordinate, all rows at once
            e = torch.zeros(math.prod(SHAPE), dtype=F64)
            e[idx] = h
            e = e.reshape(SHAPE)
            fd[:, idx] = (log_p(x_t + e) - log_p(x_t - e)) / (2 * h)
        fd = fd.reshape_as(x_t)
    assert grad.dtype == F64 and grad.abs().max() > 0.1
    torch.testing.assert_close(grad, fd, rtol=1e-7, atol=1e-9)


def test_classifier_guidance_adds_scale_sigma2_over_root_to_x0_and_sees_x_t_and_t():
    clf, x = LinearClassifier(), batch()
    D = den()
    G = df.ClassifierGuidance(D, clf, 2.0)
    root = (1 + SIGMA * SIGMA).sqrt().reshape(-1, 1, 1)
    out = G(x, SIGMA, class_labels=LABELS)
    seen_x, seen_t = clf.seen[-1]
    assert torch.equal(seen_x, x / root) and torch.equal(seen_t, COSINE.t_for_sigma(SIGMA).float())
    grad = G.grad_log_prob(x / root, SIGMA, LABELS)
    want = D(x, SIGMA, class_labels=LABELS) + 2.0 * SIGMA.reshape(-1, 1, 1) ** 2 / root * grad
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(df.ClassifierGuidance(D, clf, 0.0)(x, SIGMA, class_labels=LABELS),
                       D(x, SIGMA, class_labels=LABELS))


def test_classifier_guidance_on_an_unconditional_model_keeps_the_labels_from_it():
    U = den(UncondNet())  # its forward takes no class_labels: passing them would raise TypeError
    G = df.ClassifierGuidance(U, LinearClassifier(), 1.5)
    out = G(batch(), SIGMA, class_labels=LABELS)
    assert torch.isfinite(out).all() and not torch.allclose(out, U(batch(), SIGMA))


# ---------------------------------------------------------------------------------------------
# Autoguidance

def test_autoguidance_with_the_weaker_model_equal_to_the_main_one_is_the_identity():
    D, x = den(), batch()
    assert torch.equal(df.AutoGuidance(D, D, 3.0)(x, SIGMA, class_labels=LABELS), D(x, SIGMA, class_labels=LABELS))
    W = den(tau=0.6, shift=0.2)
    main, weak = D(x, SIGMA, class_labels=LABELS), W(x, SIGMA, class_labels=LABELS)
    torch.testing.assert_close(df.AutoGuidance(D, W, 2.0)(x, SIGMA, class_labels=LABELS), weak + 2 * (main - weak),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(df.AutoGuidance(D, W, 1.0)(x, SIGMA, class_labels=LABELS), main)
    # composed with CFG: guiding CFG(D) with CFG(D) is CFG(D)
    C = df.ClassifierFreeGuidance(D, 2.0)
    assert torch.equal(df.AutoGuidance(C, df.ClassifierFreeGuidance(D, 2.0), 2.5)(x, SIGMA, class_labels=LABELS),
                       C(x, SIGMA, class_labels=LABELS))


# ---------------------------------------------------------------------------------------------
# Every sampler under every wrapper, the sigma = inf start, df.sample / generate

WRAPPERS = {
    "cfg": lambda D: df.ClassifierFreeGuidance(D, 3.0),
    "cfg_rescale_interval": lambda D: df.ClassifierFreeGuidance(D, 3.0, rescale=0.7, interval=(0.2, 5.0)),
    "classifier": lambda D: df.ClassifierGuidance(D, LinearClassifier(), 2.0),
    "auto": lambda D: df.AutoGuidance(D, den(schedule=D.schedule, tau=0.6), 2.0),
    "clip_auto_cfg": lambda D: df.ClipX0(df.AutoGuidance(df.ClassifierFreeGuidance(D, 2.0),
                                                         df.ClassifierFreeGuidance(den(schedule=D.schedule, tau=0.6), 2.0), 1.5), 3.0),
}


@pytest.mark.parametrize("schedule", [COSINE, ZSNR], ids=["cosine", "zero_snr"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_under_every_guidance_wrapper(sampler, wrapper, schedule):
    D = den(schedule=schedule)
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    x = df.sample(WRAPPERS[wrapper](D), shape=(4, *SHAPE), sampler=sampler, steps=3, generator=gens,
                  cond={"class_labels": LABELS})
    assert x.shape == (4, *SHAPE) and torch.isfinite(x).all()


@pytest.mark.parametrize("schedule", [COSINE, ZSNR], ids=["cosine", "zero_snr"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_cfg_at_scale_one_gives_the_samples_of_the_conditional_model(sampler, schedule):
    D = den(schedule=schedule)
    run = lambda d: df.sample(d, shape=(4, *SHAPE), sampler=sampler, steps=3, cond={"class_labels": LABELS},  # noqa: E731
                              generator=[torch.Generator().manual_seed(s) for s in range(4)])
    plain, guided = run(D), run(df.ClassifierFreeGuidance(D, 1.0))
    assert torch.equal(guided, plain)
    assert not torch.allclose(run(df.ClassifierFreeGuidance(D, 3.0)), plain)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_the_sigma_inf_start_of_a_zero_terminal_snr_schedule_works_under_each_wrapper(wrapper):
    D = den(schedule=ZSNR)
    assert math.isinf(float(ZSNR.sigma_grid(3, "default", "trailing")[0]))
    z = batch()
    out = WRAPPERS[wrapper](D)(z, math.inf, class_labels=LABELS)  # at sigma = inf, x is x_t itself
    assert torch.isfinite(out).all()
    if wrapper == "classifier":  # the guidance term vanishes at SNR 0, where x_t holds no information on x_0
        assert torch.equal(out, D(z, math.inf, class_labels=LABELS))
    if wrapper == "cfg":
        cond, uncond = D(z, math.inf, class_labels=LABELS), D(z, math.inf, class_labels=torch.full((4,), K))
        torch.testing.assert_close(out, uncond + 3 * (cond - uncond), rtol=1e-10, atol=1e-10)


def test_sample_and_generate_options_equal_the_wrapper():
    D = den()
    kw = dict(shape=(4, *SHAPE), sampler="dpmpp_2m", steps=4, cond={"class_labels": LABELS})
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(4)]  # noqa: E731
    wrapped = df.sample(df.ClipX0(df.ClassifierFreeGuidance(D, 3.0, rescale=0.5, interval=(0.1, 10.0))),
                        generator=gens(), **kw)
    assert torch.equal(df.sample(D, generator=gens(), guidance_scale=3.0, guidance_rescale=0.5,
                                 guidance_interval=(0.1, 10.0), clip_x0=True, **kw), wrapped)
    g = df.generate(D, 4, seed=0, sampler="euler", steps=3, cond={"class_labels": LABELS}, batch_size=3,
                    guidance_scale=2.0, guidance_interval=(0.1, 10.0))
    assert torch.equal(g, df.generate(df.ClassifierFreeGuidance(D, 2.0, interval=(0.1, 10.0)), 4, seed=0,
                                      sampler="euler", steps=3, cond={"class_labels": LABELS}, batch_size=3))
    assert not torch.equal(g, df.generate(D, 4, seed=0, sampler="euler", steps=3, cond={"class_labels": LABELS}))


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the fix

def test_bad_guidance_input_is_a_value_error_naming_the_fix():
    D, x = den(), batch()
    with pytest.raises(ValueError, match=r"without a null condition.*conditioning\.dropout > 0"):
        df.ClassifierFreeGuidance(den(UncondNet()), 3.0)
    with pytest.raises(ValueError, match=r"without a null condition.*conditioning\.dropout > 0"):
        df.sample(den(UncondNet()), shape=(4, *SHAPE), steps=2, guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"class id 3 is out of range: .* classes 0\.\.2"):
        df.ClassifierFreeGuidance(D, 3.0)(x, SIGMA, class_labels=torch.tensor([0, 1, 3, 1]))
    with pytest.raises(ValueError, match=r"class id -1 is out of range"):
        df.sample(D, shape=(4, *SHAPE), steps=2, cond={"class_labels": torch.tensor([0, -1, 2, 1])})
    with pytest.raises(ValueError, match=r"class id 4 is out of range.*3 is the null class"):
        df.sample(D, shape=(4, *SHAPE), steps=2, cond={"class_labels": torch.tensor([0, 4, 2, 1])})
    with pytest.raises(ValueError, match=r"pass cond with 'class_labels'"):
        df.ClassifierFreeGuidance(D, 3.0)(x, SIGMA)
    with pytest.raises(ValueError, match=r"classifier guidance needs .*class_labels"):
        df.ClassifierGuidance(D, LinearClassifier(), 1.0)(x, SIGMA)
    with pytest.raises(ValueError, match=r"class id 5 is out of range: the classifier knows classes 0\.\.2"):
        df.ClassifierGuidance(den(UncondNet()), LinearClassifier(), 1.0)(x, SIGMA, class_labels=torch.tensor([0, 5, 1, 1]))
    for bad in (float("nan"), -1.0, True, "3"):
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            df.ClassifierFreeGuidance(D, bad)
    with pytest.raises(ValueError, match=r"rescale must be a number in \[0, 1\]"):
        df.ClassifierFreeGuidance(D, 3.0, rescale=1.5)
    with pytest.raises(ValueError, match="needs 0 <= sigma_lo < sigma_hi"):
        df.ClassifierFreeGuidance(D, 3.0, interval=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"pair \(sigma_lo, sigma_hi\)"):
        df.ClassifierFreeGuidance(D, 3.0, interval=0.5)
    with pytest.raises(ValueError, match="pass guidance_scale= too"):
        df.sample(D, shape=(4, *SHAPE), steps=2, cond={"class_labels": LABELS}, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="pass sampler= instead of scheduler="):
        df.sample(D, shape=(4, *SHAPE), steps=2, guidance_scale=3.0, scheduler=object())
    with pytest.raises(ValueError, match="the weaker model must be a Denoiser"):
        df.AutoGuidance(D, ToyNet(), 2.0)
    with pytest.raises(ValueError, match="noise-aware classifier"):
        df.ClassifierGuidance(D, "classifier.safetensors", 2.0)
