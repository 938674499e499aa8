"""Fit a run to a wall-clock budget (``optim.minutes``): plan ``optim.steps`` from the measured step rate.

A fixed step count takes 8 minutes on one machine and 20 on another, and the cosine learning rate only reaches
its end at the last step. With ``optim.minutes = M`` the trainer plans the step count so that the run ends
M minutes after it started (building the trainer, data preparation included):

    N = k + r (t_end - t_now),     t_end = t_start + SAFETY x 60 M

where k is the step just finished and r the steps per second over the last half of the steps so far (so the
slow first steps, while oneDNN builds its kernels, drop out of the estimate, and a pause of the machine early on
is corrected later). The plan is made every ``REPLAN_EVERY`` steps; the first plans fall inside the learning
rate's warm-up (100 steps by default), which does not depend on N, and a later change of N moves the cosine's
phase (k - w) / (N - w) by little because r changes slowly. The remaining 3% of the budget is for the final
checkpoint and sample grid. A plan is never below k + 1 or warmup_steps + 1. Should the machine slow down so
much that the plan overshoots, the run stops at t_start + 60 M with a checkpoint, like ``--max-minutes``.

The plan is a measurement, so two budgeted runs of one config can end at different steps; every step before
the end is what a fixed-step run of the same N would do, except for the learning rate between re-plans. A resumed
run keeps the plan it was checkpointed with (the budget applies to the call that starts the run).
"""
from __future__ import annotations

REPLAN_EVERY = 20   # steps between plans
SAFETY = 0.97       # of the budget for the steps; the final checkpoint and grid need the rest


def planned_steps(step: int, rate: float, seconds_left: float, warmup_steps: int) -> int:
    """N = k + floor(r x seconds left), at least k + 1 and at least warmup_steps + 1."""
    return max(step + 1, warmup_steps + 1, step + int(rate * max(seconds_left, 0.0)))


class StepBudget:
    """The wall-clock budget of one run: records when each step ended and plans the step count."""

    def __init__(self, minutes: float, started: float, fit_start: float):
        """``started``: time.perf_counter() when the run began (its budget counts from there);
        ``fit_start``: when step 0 began (after building the trainer)."""
        self.seconds, self.started = 60.0 * minutes, started
        self.times = [fit_start]          # times[k]: when step k ended (times[0]: when step 1 began)

    @property
    def end(self) -> float:
        """time.perf_counter() at which the steps should be done."""
        return self.started + SAFETY * self.seconds

    def record(self, step: int, now: float) -> None:
        """Step ``step`` (1-based, counted from the run's start) ended at ``now``."""
        self.times.append(now)
        assert len(self.times) == step + 1, "record every step, in order, from a fresh run"

    def due(self, step: int) -> bool:
        return step % REPLAN_EVERY == 0

    def rate(self, step: int) -> float:
        """Steps per second over steps (k/2, k]."""
        half = step // 2
        return (step - half) / max(self.times[step] - self.times[half], 1e-9)

    def plan(self, step: int, now: float, warmup_steps: int) -> int:
        return planned_steps(step, self.rate(step), self.end - now, warmup_steps)

    def out_of_time(self, now: float) -> bool:
        """The whole budget is spent (a hard stop, as --max-minutes)."""
        return now - self.started > self.seconds
