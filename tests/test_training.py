"""The trainer: config merging, determinism, EMA, resume after SIGKILL, several processes, NaN, Ctrl-C, AMP.

Most runs use the 2-D "moons" data and the tiny MLP (milliseconds per step), so the whole file stays fast;
the behaviour under test is the same for images.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion_forge import training as T
from diffusion_forge.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from diffusion_forge.training.ema import EMA, ema_decay

FIXTURES = Path(__file__).parent / "fixtures"

# One thread per process: the models here are tiny, and on a loaded 2-core machine a second OpenMP thread only
# waits for the first (10-100x slower). Subprocesses get the same through OMP_NUM_THREADS, so the
# bit-for-bit comparisons run at the same thread count.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


TINY = {"data.source": "moons", "model.type": "mlp", "model.preset": "tiny", "optim.batch_size": 32,
        "run.mixed_precision": "no", "run.log_every": 1, "run.sample_every": 0, "sample.n": 8, "sample.steps": 2,
        "optim.warmup_steps": 5}


def tiny(overrides: dict | None = None) -> T.TrainConfig:
    return T.merge_config(flags={**TINY, **(overrides or {})})


def cli_flags(overrides: dict | None = None) -> list[str]:
    return [f"--set={k}={v}" for k, v in {**TINY, **(overrides or {})}.items()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["last_loss"] for r in T.read_metrics(run_dir) if "last_loss" in r}


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diffusion_forge", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ONE_THREAD, **kw)


def wait_for_step(run_dir: Path, proc: subprocess.Popen, beyond: int, timeout: float = 90.0) -> int:
    """Wait until metrics.jsonl shows a step > beyond (or the process ends); returns the newest step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = list(losses(run_dir))
        if steps and max(steps) > beyond:
            return max(steps)
        if proc.poll() is not None:
            return max(steps, default=0)
        time.sleep(0.02)
    proc.kill()
    raise TimeoutError(f"no progress beyond step {beyond}")


# ---------------------------------------------------------------------------------------------
# Config

def test_config_merge_order_and_types(tmp_path):
    (tmp_path / "run.yaml").write_text("optim: {lr: 1.0e-3, steps: 50}\ndiffusion: {min_snr_gamma: null}\n"
                                       "model: {options: {hidden: 32}}\n")
    cfg = T.merge_config(None, tmp_path / "run.yaml", {"optim.steps": "70", "data.flip": "true", "ema.decay": "0.99"})
    assert (cfg.optim.lr, cfg.optim.steps, cfg.diffusion.min_snr_gamma, cfg.data.flip, cfg.ema.decay) == \
        (1e-3, 70, None, True, 0.99)
    assert cfg.model.options == {"hidden": 32} and cfg.optim.batch_size == T.TrainConfig().optim.batch_size
    flags = T.parse_set_flags(["optim.lr=2e-4", "diffusion.min_snr_gamma=none", "run.seed=3"])
    assert T.merge_config(flags=flags).optim.lr == 2e-4
    (tmp_path / "run.json").write_text(json.dumps({"diffusion": {"prediction": "epsilon"}}))
    assert T.merge_config(None, tmp_path / "run.json").diffusion.prediction == "epsilon"


@pytest.mark.parametrize("bad, message", [
    ({"learning_rate": "1"}, "unknown config key 'learning_rate'; did you mean lr"),
    ({"step": "1"}, "did you mean steps"),
    ({"steps": "many"}, "steps='many' is not a valid int"),
    ({"prediction": "eps"}, "prediction='eps' is not one of: epsilon, sample, v_prediction"),
    ({"batch_size": "30", "grad_accum": "4"}, "divisible by grad_accum"),
    ({"zero_terminal_snr": "yes", "prediction": "epsilon"}, "zero_terminal_snr needs"),
])
def test_config_errors_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        T.merge_config(flags=bad)


def test_unknown_key_in_config_file(tmp_path):
    (tmp_path / "run.yaml").write_text("ema: 0.99\n")
    with pytest.raises(ValueError, match="unknown config key 'ema'; did you mean"):
        T.merge_config(None, tmp_path / "run.yaml")
    with pytest.raises(ValueError, match="--set expects key=value"):
        T.parse_set_flags(["lr"])


def test_changed_settings_on_resume_are_refused_unless_allowed(tmp_path):
    T.train(tiny({"optim.steps": 2}), tmp_path, progress=False)
    cfg, changes = T.run_config(tmp_path, None, {k: str(v) for k, v in {**TINY, "optim.steps": 2}.items()})
    assert changes == {} and cfg.optim.steps == 2
    refused = r"other settings \(optim.steps: 2 -> 4, optim.lr: 0.002 -> 0.01\).*--allow-changes"
    with pytest.raises(T.ChangedSettings, match=refused):
        T.run_config(tmp_path, None, {"optim.steps": "4", "optim.lr": "0.01"})
    cfg, changes = T.run_config(tmp_path, None, {"optim.steps": "4"}, allow_changes=True)
    assert changes == {"optim.steps": (2, 4)}
    summary = T.train(cfg, tmp_path, progress=False)
    assert (summary["start_step"], summary["step"]) == (2, 4)


def test_a_checkpoint_that_does_not_fit_a_changed_model_is_refused(tmp_path):
    from diffusion_forge.io.checkpoint import CheckpointError

    T.train(tiny({"optim.steps": 2}), tmp_path, progress=False)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(CheckpointError, match="does not fit this model"):
        T.train(tiny({"optim.steps": 4, "model.preset": "small"}), tmp_path, progress=False)
    assert (tmp_path / "config.json").read_text() == before


# ---------------------------------------------------------------------------------------------
# Determinism helpers and the learning rate

def test_batches_cover_each_epoch_once_and_are_reproducible():
    n, b = 100, 32
    seen = torch.cat([T.batch_indices(s, b, n, seed=1) for s in range(25)])  # 800 items = 8 epochs
    for epoch in range(8):
        assert sorted(seen[epoch * n:(epoch + 1) * n].tolist()) == list(range(n))
    assert torch.equal(T.batch_indices(7, b, n, 1), T.batch_indices(7, b, n, 1))
    assert not torch.equal(T.batch_indices(7, b, n, 1), T.batch_indices(7, b, n, 2))
    t1, e1, _ = T.step_noise(5, 4, (2,), 1000, 0, False)
    t2, e2, _ = T.step_noise(5, 4, (2,), 1000, 0, False)
    assert torch.equal(t1, t2) and torch.equal(e1, e2)


def test_log_normal_noise_levels_reach_the_trainers_batches(tmp_path):
    """diffusion.noise_levels=log_normal: step k's t are the log-normal sigmas of the (seed, k) generator's first
    draw, mapped to fractional t; the uniform default keeps its integer draw."""
    from diffusion_forge.training.determinism import STEP_NOISE

    cfg = tiny({"diffusion.noise_levels": "log_normal", "diffusion.log_sigma_mean": "-0.5",
                "diffusion.log_sigma_std": "0.8", "optim.steps": 20})
    tr = T.Trainer(cfg, tmp_path / "lognormal", progress=False)
    (_, _, t, _), = tr.global_batch(3)
    z = torch.randn(32, generator=T.seeded_generator(cfg.run.seed, 3, STEP_NOISE), dtype=torch.float64)
    torch.testing.assert_close(tr.schedule.sigma_at(t), (-0.5 + 0.8 * z).exp(), rtol=1e-9, atol=0)
    (_, _, t_uniform, _), = T.Trainer(tiny(), tmp_path / "uniform", progress=False).global_batch(3)
    assert torch.equal(t_uniform, T.step_noise(3, 32, (2,), 1000, cfg.run.seed, False)[0])
    assert torch.equal(t_uniform, t_uniform.round()) and not torch.equal(t, t.round())
    summary = T.train(cfg, tmp_path / "lognormal", progress=False)   # trains: finite losses to the end
    assert summary["step"] == cfg.optim.steps and all(math.isfinite(v) for v in losses(tmp_path / "lognormal").values())


def test_learning_rate_warmup_then_constant_or_cosine():
    c = tiny({"optim.lr": 1.0, "optim.warmup_steps": 10, "optim.steps": 110, "optim.lr_schedule": "constant"})
    assert [T.learning_rate(s, c) for s in (0, 4, 9, 10, 109)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    c = tiny({"optim.lr": 1.0, "optim.warmup_steps": 10, "optim.steps": 110, "optim.lr_schedule": "cosine",
              "optim.min_lr": 0.1})
    assert T.learning_rate(10, c) == pytest.approx(1.0)
    assert T.learning_rate(60, c) == pytest.approx(0.55)
    assert T.learning_rate(110, c) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# EMA

def test_ema_equals_closed_form_recursion_unit():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    ema = EMA(model, decay=0.75)
    theta = [{k: v.double().clone() for k, v in model.state_dict().items()}]
    for _ in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        theta.append({k: v.double().clone() for k, v in model.state_dict().items()})
    avg = dict(theta[0])
    for k in range(1, 41):
        d = min(0.75, (1 + k) / (10 + k))
        avg = {name: d * avg[name] + (1 - d) * theta[k][name] for name in avg}
    for name, value in ema.module.state_dict().items():
        assert torch.allclose(value.double(), avg[name], atol=1e-6, rtol=0)
    assert ema_decay(1, 0.999) == pytest.approx(2 / 11) and ema_decay(10000, 0.999) == 0.999
    assert ema_decay(3, 0.9, warmup=False) == 0.9


def record_weights(trainer, initial: bool) -> list[dict]:
    """Wrap ``trainer.train_step`` so that a float64 copy of the network's weights is appended after every step
    (and, with ``initial``, first the weights it starts from); returns that list."""
    def copy() -> dict:
        return {k: v.double().clone() for k, v in trainer.unwrapped.state_dict().items()}

    snapshots, step = [copy()] if initial else [], trainer.train_step

    def recording_step(s):
        out = step(s)
        snapshots.append(copy())
        return out

    trainer.train_step = recording_step
    return snapshots


def test_trainer_ema_equals_closed_form_and_is_used_for_sampling(tmp_path):
    trainer = T.Trainer(tiny({"optim.steps": 40, "ema.decay": 0.75}), tmp_path, progress=False)
    snapshots = record_weights(trainer, initial=True)
    trainer.fit()
    avg = dict(snapshots[0])
    for k in range(1, len(snapshots)):
        d = min(0.75, (1 + k) / (10 + k))
        avg = {name: d * avg[name] + (1 - d) * snapshots[k][name] for name in avg}
    ema = trainer.ema.module.state_dict()
    assert max((ema[n].double() - avg[n]).abs().max().item() for n in avg) < 1e-6
    # the EMA moved away from both the initial and the final weights
    assert any(not torch.allclose(ema[n].double(), snapshots[0][n]) for n in avg)
    assert any(not torch.allclose(ema[n].double(), snapshots[-1][n]) for n in avg)
    # the checkpoint holds it, and load_model_from_run uses it by default
    from diffusion_forge.io.checkpoint import load_model_from_run
    trained = load_model_from_run(tmp_path)
    assert all(torch.equal(v, ema[k]) for k, v in trained.model.state_dict().items())
    raw = load_model_from_run(tmp_path, use_ema=False).model.state_dict()
    assert all(torch.equal(v, trainer.unwrapped.state_dict()[k]) for k, v in raw.items())


# ---------------------------------------------------------------------------------------------
# Run folder, resume after SIGKILL, Ctrl-C, NaN

def test_run_folder_layout(tmp_path):
    layout = {"optim.steps": 6, "run.checkpoint_every": 2, "run.keep_checkpoints": 2, "run.sample_every": 3}
    summary = T.train(tiny(layout), tmp_path, progress=False)
    assert summary["step"] == 6 and not summary["interrupted"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == tiny(layout).to_dict() and saved["format_version"] == 2 and saved["optim"]["steps"] == 6
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000004", "step-00000006"]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
    again = T.train(tiny(layout), tmp_path, progress=False)
    assert (again["start_step"], again["step"]) == (6, 6)          # a finished run is left as it is


def test_eval_every_writes_quality_metrics(tmp_path):
    T.train(tiny({"optim.steps": 4, "run.eval_every": 2, "run.eval_n": 64}), tmp_path, progress=False)
    evals = [r for r in T.read_metrics(tmp_path) if "eval_seconds" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(any(k.startswith("FD-xy@") for k in r) for r in evals)


def test_sigkill_three_times_then_resume_gives_bit_identical_losses(tmp_path):
    steps = 60
    flags = ["train", "--no-progress",
             *cli_flags({"optim.steps": steps, "run.checkpoint_every": 3, "run.keep_checkpoints": 2})]
    reference = run_cli([*flags, "--out", str(tmp_path / "ref")])
    rng = random.Random(int(os.environ.get("DFORGE_TEST_SEED", "0")))
    targets = sorted(rng.sample(range(5, steps - 5), 3))   # random moments: after these steps, plus a random delay
    run, kills, done = tmp_path / "killed", [], 0
    for target in targets:
        proc = run_cli([*flags, "--out", str(run)])
        wait_for_step(run, proc, beyond=max(done, target - 1))
        time.sleep(rng.uniform(0.0, 0.02))                 # lands in a step, a log write or a checkpoint write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(max(losses(run), default=0))
        proc.wait()
        ckpt = latest_checkpoint(run)
        done = ckpt.step if ckpt else 0
    assert len(kills) == 3, f"the run finished before it could be killed 3 times (killed at {kills})"
    final = run_cli([*flags, "--out", str(run)])
    out, _ = final.communicate(timeout=120)
    assert final.returncode == 0, out
    ref_out, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_out
    ref, got = losses(tmp_path / "ref"), losses(run)
    assert sorted(ref) == sorted(got) == list(range(1, steps + 1))
    assert got == ref, f"killed at steps {kills}: first differing step " \
                       f"{next(s for s in ref if ref[s] != got[s])}"
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(run)
    for name in ("model", "ema"):
        assert all(torch.equal(a.tensors(name)[k], b.tensors(name)[k]) for k in a.tensors(name))


def test_a_format_version_1_run_folder_resumes_with_the_old_losses(tmp_path):
    """tests/fixtures/run_v1: made by the first release (flat config.json), killed after step 9 of 12."""
    import shutil

    run = tmp_path / "run_v1"
    shutil.copytree(FIXTURES / "run_v1", run)
    old = {int(k): v for k, v in json.loads((FIXTURES / "run_v1_losses.json").read_text()).items()}
    assert "format_version" not in json.loads((run / "config.json").read_text())     # flat, version 1
    torch.set_num_threads(2)                                # as the fixture was made (conftest restores it)
    cfg, changes = T.run_config(run, None, {})
    assert changes == {} and (cfg.data.source, cfg.model.type, cfg.optim.steps) == ("moons", "mlp", 12)
    # a flat flag and its dotted name compare equal to the flat saved value: no change, nothing refused
    assert T.run_config(run, None, {"lr": "0.002", "optim.batch_size": "16"})[1] == {}
    summary = T.train(cfg, run, progress=False)
    assert (summary["start_step"], summary["step"]) == (9, 12)
    new = losses(run)
    assert sorted(new) == list(range(1, 13))
    for step in (10, 11, 12):
        assert new[step] == pytest.approx(old[step], rel=1e-6, abs=0), step
    assert all(new[s] == old[s] for s in range(1, 10))      # the old log lines are kept as they were
    saved = json.loads((run / "config.json").read_text())
    assert saved["format_version"] == 2 and saved["data"]["source"] == "moons"
    assert load_checkpoint(run).config == saved             # the new checkpoint holds the nested config
    assert T.run_config(run, None, {})[1] == {}             # and the rewritten run resumes without changes


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = run_cli(["train", "--no-progress", "--out", str(tmp_path),
                    *cli_flags({"optim.steps": 100000, "run.checkpoint_every": 1000})])
    wait_for_step(tmp_path, proc, beyond=3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "Traceback" not in out
    step = int(out.split("interrupted at step ")[1].split(":")[0])
    assert latest_checkpoint(tmp_path).step == step == max(losses(tmp_path))
    summary = T.train(tiny({"optim.steps": step + 2, "run.checkpoint_every": 1000}), tmp_path, progress=False)
    assert summary["start_step"] == step


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    T.train(tiny({"optim.steps": 4, "run.checkpoint_every": 2}), tmp_path, progress=False)
    good = load_checkpoint(tmp_path)
    before = {k: v.clone() for k, v in good.tensors("model").items()}
    explode = tiny({"optim.steps": 20, "run.checkpoint_every": 2, "optim.lr": 1e30, "optim.warmup_steps": 0})
    with pytest.raises(T.TrainingDiverged, match=r"the loss is (nan|inf) at step \d+; stopped without saving "
                                                 r"\(the last good checkpoint, .*step-00000004, is intact\)"):
        T.train(explode, tmp_path, progress=False)
    after = load_checkpoint(tmp_path)
    assert after.step == 4 and all(torch.equal(after.tensors("model")[k], v) for k, v in before.items())


# ---------------------------------------------------------------------------------------------
# Several processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process_with_the_whole_batch(tmp_path):
    """batch_size is the global batch: 2 processes x 16 must match 1 process x 32 (up to summation order),
    and both processes must hold the same weights and EMA (checked by digest at every checkpoint)."""
    cfg = {"optim.steps": 12, "run.checkpoint_every": 6, "optim.batch_size": 32}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "diffusion_forge", "train", "--no-progress", "--out", str(tmp_path / "two"),
                          *cli_flags(cfg)], capture_output=True, text=True, env=ONE_THREAD, timeout=150, check=False)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 process(es)" in two.stdout
    T.train(tiny(cfg), tmp_path / "one", progress=False)
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == list(range(1, 13))
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-4, abs=1e-6)
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "two")
    for name in ("model", "ema"):
        for k, v in a.tensors(name).items():
            assert torch.allclose(b.tensors(name)[k], v, atol=1e-4), (name, k)
    digests = b.state["extra"]["weights_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_gradient_accumulation_matches_the_whole_batch(tmp_path):
    T.train(tiny({"optim.steps": 5}), tmp_path / "one", progress=False)
    T.train(tiny({"optim.steps": 5, "optim.grad_accum": 4}), tmp_path / "acc", progress=False)
    l1, l4 = losses(tmp_path / "one"), losses(tmp_path / "acc")
    assert all(l4[s] == pytest.approx(l1[s], rel=1e-5) for s in l1)
    a, b = load_checkpoint(tmp_path / "one").tensors("model"), load_checkpoint(tmp_path / "acc").tensors("model")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


# ---------------------------------------------------------------------------------------------
# Mixed precision and the one-batch sanity check

def test_fp16_loss_scaler_path_on_cpu(tmp_path):
    fp16 = {"run.mixed_precision": "fp16", "run.checkpoint_every": 3}
    T.train(tiny({"optim.steps": 6, **fp16}), tmp_path, progress=False)
    records = T.read_metrics(tmp_path)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all("loss_scale" in r for r in records)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state["scaler"]["scale"] == records[-1]["loss_scale"]
    trainer = T.Trainer(tiny({"optim.steps": 8, **fp16}), tmp_path, progress=False)
    assert trainer.resume() and trainer.scaler.get_scale() == records[-1]["loss_scale"]
    # an overflowing gradient is skipped and the scale lowered, not applied
    before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)
    trainer.train_step(6)
    assert trainer.scaler.get_scale() < 2.0 ** 120
    assert all(torch.equal(v, trainer.unwrapped.state_dict()[k]) for k, v in before.items())


def test_bf16_autocast_trains(tmp_path):
    summary = T.train(tiny({"optim.steps": 3, "run.mixed_precision": "bf16"}), tmp_path, progress=False)
    assert summary["precision"] == "bf16" and all(r["loss"] < 10 for r in T.read_metrics(tmp_path))


def test_overfit_batch_verdicts():
    good = T.overfit_batch(tiny({"optim.lr": 3e-3}), steps=100, progress=False)
    assert good["passed"] and good["verdict"].startswith("PASS") and good["final"] < good["threshold"]
    assert f"{T.OVERFIT_RATIO:g} x initial" in good["verdict"]
    bad = T.overfit_batch(tiny({"optim.lr": 1e-7}), steps=30, progress=False)
    assert not bad["passed"] and bad["verdict"].startswith("FAIL") and "lr=1e-07" in bad["verdict"]
