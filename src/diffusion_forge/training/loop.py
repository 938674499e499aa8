"""One call of ``Trainer.fit``: prepare the run folder, step to optim.steps, log, stop cleanly, finish.

The state of one call (progress bar, timing window, why it stops) lives in :class:`Fit`; the trainer
keeps what outlives it (weights, optimiser, step). Each method does one job.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time

import torch

from ..io.checkpoint import latest_checkpoint
from ..io.files import write_json
from ..io.runs import plot_loss
from .budget import StepBudget
from .precision import learning_rate


class Fit:
    def __init__(self, trainer):
        self.tr, self.cfg = trainer, trainer.cfg
        self.main = trainer.acc.is_main_process
        self.bar = None
        self.t0 = self.window_start = time.perf_counter()
        self.window_loss, self.window_n = 0.0, 0
        self.start = 0
        self.budget: StepBudget | None = None   # optim.minutes on a fresh run: the step count is planned
        self.summary: dict = {}

    # -- before the first step ------------------------------------------------------------------
    def prepare(self) -> None:
        """Resume first (a checkpoint that does not fit the config leaves config.json alone), then write
        the nested config and drop log lines newer than the checkpoint."""
        tr = self.tr
        resumed = tr.resume()
        if self.main:
            tr.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(tr.run_dir / "config.json", self.cfg.to_dict())
            tr._truncate_metrics(tr.step)
            if resumed:
                print(f"resuming {tr.run_dir} from step {tr.step}")
            if resumed and self.cfg.optim.minutes is not None:
                print(f"optim.minutes={self.cfg.optim.minutes:g} applies to the call that starts a run: this one "
                      f"finishes the plan it was checkpointed with, optim.steps={self.cfg.optim.steps}")
        self.start = tr.step
        self.summary = {"run_dir": str(tr.run_dir), "start_step": self.start, "interrupted": False,
                        "precision": tr.precision}

    def announce(self) -> None:
        tr, cfg = self.tr, self.cfg
        if not (self.main and self.start == 0):
            return
        n_params = sum(p.numel() for p in tr.unwrapped.parameters())
        cond = f", {tr.num_classes} classes (dropout {cfg.conditioning.dropout:g})" if tr.num_classes else ""
        length = (f"{cfg.optim.steps} steps" if cfg.optim.minutes is None else
                  f"{cfg.optim.minutes:g} minute{'' if cfg.optim.minutes == 1 else 's'} (steps planned from the measured speed)")
        print(f"training {tr.model_config.get('type', cfg.model.type)}/{cfg.model.preset} ({n_params / 1e6:.2f}M parameters) on "
              f"{cfg.data.source} ({tr.data.n} items of shape {tr.sample_shape}{cond}) for {length} "
              f"of batch {cfg.optim.batch_size}; {tr.world} process(es) on {tr.device}, "
              f"precision {tr.precision}")

    @contextlib.contextmanager
    def signals_and_bar(self):
        """SIGINT / SIGTERM ask the loop to stop after the current step; a progress bar on the main process."""
        handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread: no handlers
                handlers[sig] = signal.signal(sig, self.tr._on_signal)
        if self.main and self.tr.progress and self.start < self.cfg.optim.steps:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.cfg.optim.steps, initial=self.start, unit="step", dynamic_ncols=True,
                            smoothing=0.1)
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    # -- each step ------------------------------------------------------------------------------
    def one_step(self) -> bool:
        """Train one step, check the loss, log; returns whether to stop (a signal or the time limit)."""
        tr = self.tr
        loss, grad_norm = tr.train_step(tr.step)
        plan = self.plan_steps(tr.step + 1)
        loss_value, stopping, plan = self.reduce(loss, plan)
        if not math.isfinite(loss_value):
            raise tr.diverged(loss_value)
        tr.step += 1
        if plan:
            self.replan(plan)
        self.window_loss, self.window_n = self.window_loss + loss_value, self.window_n + 1
        if tr.step % self.cfg.run.log_every == 0 or tr.step == self.cfg.optim.steps or stopping:
            self.log(loss_value, grad_norm)
        return stopping

    def plan_steps(self, step: int) -> int:
        """optim.minutes: record when step ``step`` ended; on a planning step, this process's plan of optim.steps
        (training/budget.py). 0: no plan this step."""
        if self.budget is None:
            return 0
        now = time.perf_counter()
        self.budget.record(step, now)
        return self.budget.plan(step, now, self.cfg.optim.warmup_steps) if self.budget.due(step) else 0

    def replan(self, steps: int) -> None:
        """Adopt a new optim.steps: config.json and the progress bar follow (checkpoints carry the config)."""
        if steps == self.cfg.optim.steps:
            return
        self.cfg.optim.steps = steps
        if self.main:
            write_json(self.tr.run_dir / "config.json", self.cfg.to_dict())
        if self.bar is not None:
            self.bar.total = steps
            self.bar.refresh()

    def reduce(self, loss: torch.Tensor, plan: int = 0) -> tuple[float, bool, int]:
        """The mean loss over processes, whether any process was asked to stop (or ran out of time), and the
        processes' mean plan of optim.steps (every process plans on the same steps, so all adopt one number)."""
        tr, now = self.tr, time.perf_counter()
        out_of_time = (tr.max_seconds is not None and now - self.t0 > tr.max_seconds) or \
            (self.budget is not None and self.budget.out_of_time(now))
        stop = torch.tensor([loss.item(), float(tr._stop_signal is not None or out_of_time), float(plan)])
        if tr.world > 1:
            stop = tr.acc.reduce(stop.to(tr.device), reduction="sum").cpu()
            stop[0] /= tr.world
            stop[2] /= tr.world
        return float(stop[0]), bool(stop[1] > 0), round(float(stop[2]))

    def log(self, loss_value: float, grad_norm) -> None:
        """One metrics.jsonl record for the window of steps since the last one."""
        tr, now = self.tr, time.perf_counter()
        record = {"step": tr.step, "loss": self.window_loss / self.window_n, "last_loss": loss_value,
                  "lr": learning_rate(tr.step - 1, self.cfg), "grad_norm": float(grad_norm),
                  "images_per_s": self.window_n * self.cfg.optim.batch_size / max(now - self.window_start, 1e-9),
                  "time": now - self.t0}
        if self.budget is not None:
            record["planned_steps"] = self.cfg.optim.steps
        if tr.precision == "fp16":
            record["loss_scale"] = tr.scaler.get_scale()
        if self.main:
            tr._log(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            self.bar.update(self.window_n)
        self.window_loss, self.window_n, self.window_start = 0.0, 0, now

    def keep_guide_snapshot(self) -> None:
        """At run.guide_snapshot_step: checkpoints/guide-<step>/, the autoguidance snapshot. Written right after
        the step and before its checkpoint (even when a stop was asked at that step), so a run that holds a
        step-N checkpoint (N >= the snapshot's step) also holds the snapshot: a kill in between resumes from an
        older checkpoint and writes it again."""
        if self.tr.step == self.tr.guide_step:
            self.tr.save(kind="guide")

    def periodic(self) -> None:
        """Checkpoints, sample grids and evaluations that fall on this step (the end has its own)."""
        tr, r, steps = self.tr, self.cfg.run, self.cfg.optim.steps
        if tr.step % r.checkpoint_every == 0 and tr.step < steps:
            tr.save()
        if r.sample_every and tr.step % r.sample_every == 0 and tr.step < steps and self.main:
            tr.write_samples()
        if r.eval_every and (tr.step % r.eval_every == 0 or tr.step == steps) and self.main:
            tr._log({"step": tr.step, **tr.evaluate()})

    # -- after the last step --------------------------------------------------------------------
    def finish(self, stopping: bool) -> None:
        """Save, draw the loss curve and the final grid, and say why the run stopped."""
        tr, s = self.tr, self.summary
        s["train_seconds"] = time.perf_counter() - self.t0
        if self.bar is not None:
            self.bar.close()
        if tr.step > self.start or latest_checkpoint(tr.run_dir, verify=False) is None:
            tr.save()
        if self.main and tr.step > self.start:
            plot_loss(tr.run_dir)
            if tr.step >= self.cfg.optim.steps:
                s["samples"] = str(tr.write_samples())
        if stopping and tr._stop_signal is None:
            s["time_limit"] = True
            self.say(f"stopped at the time limit, step {tr.step}: checkpoint saved in {tr.checkpoint_dir}; "
                     "run the same command again to go on")
        elif stopping:
            s["interrupted"] = True
            self.say(f"\ninterrupted at step {tr.step}: checkpoint saved in {tr.checkpoint_dir}; "
                     "run the same command again to resume")

    def say(self, message: str) -> None:
        if self.main:
            print(message)


def run_loop(trainer) -> dict:
    """Trainer.fit: prepare, step until done or stopped, finish; returns the summary."""
    fit = Fit(trainer)
    fit.prepare()
    fit.announce()
    stopping = False
    with fit.signals_and_bar():
        fit.t0 = fit.window_start = time.perf_counter()
        if fit.cfg.optim.minutes is not None and fit.start == 0:
            fit.budget = StepBudget(fit.cfg.optim.minutes, trainer.started, fit.t0)
        while trainer.step < fit.cfg.optim.steps:
            stopping = fit.one_step()
            fit.keep_guide_snapshot()
            if stopping:
                break
            fit.periodic()
        fit.finish(stopping)
    fit.summary.update(step=trainer.step, seconds=time.perf_counter() - fit.t0)
    return fit.summary
