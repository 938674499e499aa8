"""optim.minutes / `dforge train --minutes`: the step count planned from the measured speed (training/budget.py).

The runs here use a fake clock (each step "takes" a set number of seconds), so the plan has a closed form.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import pytest

from diffusion_forge import training as T
from diffusion_forge.io.checkpoint import latest_checkpoint, load_checkpoint
from diffusion_forge.training import budget as B
from diffusion_forge.training import loop
from diffusion_forge.training.precision import learning_rate

from test_training import ONE_THREAD, _free_port, cli_flags, tiny

SETUP = 1.0   # fake seconds between the run's start and its first step


def test_planned_steps_closed_form():
    assert B.planned_steps(40, 5.0, 100.0, 10) == 540                 # k + r x seconds left
    assert B.planned_steps(40, 5.0, 100.19, 10) == 540                # floor of the steps still to come
    assert B.planned_steps(40, 5.0, -3.0, 10) == 41                   # out of time: at least one more step
    assert B.planned_steps(5, 0.1, 1.0, 100) == 101                   # never inside the warm-up
    b = B.StepBudget(minutes=1.0, started=0.0, fit_start=2.0)
    assert b.end == pytest.approx(0.97 * 60)
    for k in range(1, 41):                                            # 1 s a step up to 20, then 0.5 s
        b.record(k, 2.0 + min(k, 20) + 0.5 * max(k - 20, 0))
    assert b.rate(40) == pytest.approx(2.0)                           # the last half only: steps 20-40
    assert b.rate(20) == pytest.approx(1.0)
    assert b.plan(40, 32.0, 10) == 40 + int(2.0 * (0.97 * 60 - 32.0))
    assert b.plan(40, 32.0, 100) == 101                               # the warm-up still bounds it
    assert not b.out_of_time(60.0) and b.out_of_time(60.01)
    assert [b.due(k) for k in (19, 20, 21, 40)] == [False, True, False, True]


def fake_clock(monkeypatch, trainer, seconds_per_step):
    """The loop's clock starts at SETUP and advances by seconds_per_step(step) in each training step."""
    clock = {"t": SETUP}
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    step = trainer.train_step

    def timed_step(k):
        clock["t"] += seconds_per_step(k + 1)
        return step(k)

    trainer.train_step = timed_step
    return clock


def budgeted(tmp_path, minutes, overrides=None):
    cfg = tiny({"optim.minutes": minutes, "optim.warmup_steps": 10, "run.log_every": 5, **(overrides or {})})
    return T.Trainer(cfg, tmp_path, progress=False, started=0.0)


def test_a_steady_machine_gets_the_closed_form_step_count_and_a_finished_schedule(tmp_path, monkeypatch):
    trainer = budgeted(tmp_path, minutes=0.5)                         # 30 s, 0.1 s a step: 10 steps/s
    clock = fake_clock(monkeypatch, trainer, lambda k: 0.1)
    summary = trainer.fit()
    expected = math.floor(10 * (0.97 * 30 - SETUP))                   # N = r (t_end - t_start of the steps)
    assert abs(summary["step"] - expected) <= 1 and not summary.get("time_limit")
    assert SETUP + 0.1 * summary["step"] <= 0.97 * 30 + 1e-9 <= clock["t"] + 0.1 + 1e-9   # ends on time
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["optim"]["steps"] == summary["step"] and saved["optim"]["minutes"] == 0.5
    assert load_checkpoint(tmp_path).config["optim"]["steps"] == summary["step"]
    records = [r for r in T.read_metrics(tmp_path) if "loss" in r]
    assert records[-1]["planned_steps"] == summary["step"] and records[0]["planned_steps"] == 2000  # first guess
    # the cosine reached its end on time: the last step's learning rate is the schedule's last value
    cfg = T.run_config(tmp_path, None, {})[0]
    assert records[-1]["lr"] == pytest.approx(learning_rate(summary["step"] - 1, cfg))
    assert records[-1]["lr"] - cfg.optim.min_lr < 1e-3 * (cfg.optim.lr - cfg.optim.min_lr)


def test_a_machine_that_slows_down_is_replanned_and_still_ends_on_time(tmp_path, monkeypatch):
    trainer = budgeted(tmp_path, minutes=0.5)
    clock = fake_clock(monkeypatch, trainer, lambda k: 0.1 if k <= 60 else 0.2)   # half the speed after step 60
    summary = trainer.fit()
    assert not summary.get("time_limit")
    assert clock["t"] <= 0.97 * 30 + 1e-9                              # the last step ended inside the budget
    steady = math.floor(10 * (0.97 * 30 - SETUP))
    slowed = 60 + math.floor(5 * (0.97 * 30 - SETUP - 6.0))           # 6 s for the first 60 steps, then 5 steps/s
    assert slowed <= summary["step"] < steady
    plans = [r["planned_steps"] for r in T.read_metrics(tmp_path) if "planned_steps" in r]
    assert max(plans[1:]) > summary["step"]                           # it planned for more before the slowdown


def test_the_budget_stops_a_run_that_cannot_keep_its_plan_and_a_resume_keeps_the_plan(tmp_path, monkeypatch,
                                                                                        capsys):
    trainer = budgeted(tmp_path, minutes=0.5)
    fake_clock(monkeypatch, trainer, lambda k: 0.1 if k < 200 else 5.0)   # a stall near the end
    summary = trainer.fit()
    assert summary["time_limit"] and "stopped at the time limit" in capsys.readouterr().out
    plan = json.loads((tmp_path / "config.json").read_text())["optim"]["steps"]
    stopped = summary["step"]
    assert stopped < plan and latest_checkpoint(tmp_path).step == stopped
    cfg, changes = T.run_config(tmp_path, None, {"optim.minutes": 0.5})   # the same command again
    assert changes == {} and cfg.optim.steps == plan
    monkeypatch.undo()
    resumed = T.train(cfg, tmp_path, progress=False)
    assert (resumed["start_step"], resumed["step"]) == (stopped, plan)    # finishes its plan, no new budget
    assert "finishes the plan it was checkpointed with, optim.steps=" + str(plan) in capsys.readouterr().out
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["steps"] == plan


def test_minutes_on_the_command_line_and_bad_values(tmp_path):
    run = subprocess.run([sys.executable, "-m", "diffusion_forge", "train", "--no-progress", "--minutes", "0.15",
                          "--out", str(tmp_path / "r"), *cli_flags()], capture_output=True, text=True,
                         env=ONE_THREAD, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "for 0.15 minutes (steps planned from the measured speed)" in run.stdout
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["optim"]["minutes"] == 0.15 and latest_checkpoint(tmp_path / "r").step == saved["optim"]["steps"]
    records = T.read_metrics(tmp_path / "r")
    assert records[-1]["time"] <= 0.97 * 9.0                           # the steps fit in 9 s (from the command)
    bad = subprocess.run([sys.executable, "-m", "diffusion_forge", "train", "--minutes", "0", "--out",
                          str(tmp_path / "bad"), *cli_flags()], capture_output=True, text=True, env=ONE_THREAD,
                         timeout=60)
    assert bad.returncode == 2 and "optim.minutes must be > 0" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad" / "config.json").exists()


def test_two_processes_adopt_one_plan(tmp_path):
    """Each process measures its own speed; the loop takes their mean, so both stop at the same step (a
    disagreement would hang the collective calls) and hold the same weights."""
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                          "-m", "diffusion_forge", "train", "--no-progress", "--minutes", "0.2", "--out",
                          str(tmp_path), *cli_flags({"run.checkpoint_every": 50})],
                         capture_output=True, text=True, env=ONE_THREAD, timeout=150, check=False)
    assert two.returncode == 0, two.stdout + two.stderr
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == json.loads((tmp_path / "config.json").read_text())["optim"]["steps"] > 20
    digests = ckpt.state["extra"]["weights_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
