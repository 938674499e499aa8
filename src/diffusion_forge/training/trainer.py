"""The trainer: a diffusion model from a data set to a run folder of checkpoints and samples.

    config ─► Trainer(cfg, run_dir).fit():
        for step in range(start, optim.steps):
            x0, cond, t, eps = drawn from generators seeded by (seed, step)     # resumable bit for bit
            cond             = labels, a fraction conditioning.dropout of them replaced by the null id
                               (text: the captions' token states, a fraction replaced by the empty prompt's)
            loss             = diffusion_loss(Denoiser(network, schedule, prediction), x0, t, eps, cond)
            AdamW step       (warm-up then constant / cosine lr, gradient clipping, accumulation, AMP)
            EMA update       (the same on every process: no communication needed)
            every N steps    log to metrics.jsonl, write a sample grid, evaluate, write a checkpoint
            at step run.guide_snapshot_step   keep checkpoints/guide-<step>/ (autoguidance; never pruned)

A run folder holds ``config.json``, ``checkpoints/``, ``samples/``, ``metrics.jsonl`` and ``loss.png``;
training into an existing run folder resumes it from its newest ``step-*`` checkpoint. The sample grids of
a class-conditional run give sample i the class i mod K (a row per class) and use classifier-free guidance
at the run's recommended scale (``training.config.recommended_guidance_scale``). Several processes or GPUs go
through ``accelerate`` (``accelerate launch`` or ``torchrun``): ``optim.batch_size`` is the global batch of
one optimiser step, split over processes and accumulation steps. Only the main process writes files.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from ..core.losses import diffusion_loss, sample_timesteps
from ..io.checkpoint import latest_checkpoint, save_checkpoint
from ..io.files import atomic_write_text
from .build import TrainingData, build_network, build_schedule, null_class, weights_digest
from .config import SAMPLES_OF_KIND, Config, recommended_guidance_scale
from .determinism import batch_indices, dropout_mask, seed_global_rng, step_noise
from .ema import EMA
from .loop import run_loop
from .precision import (autocast, clip_gradients, learning_rate, make_accelerator, make_optimizer,
                        resolve_precision)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving the broken state."""


class Trainer:
    """Train ``cfg`` into ``run_dir`` (resuming it when it holds checkpoints). See :meth:`fit`."""

    def __init__(self, cfg: Config, run_dir: str | os.PathLike, progress: bool = True,
                 accelerator=None, max_seconds: float | None = None, started: float | None = None):
        """``started``: time.perf_counter() when the run's clock started (default: now), from which the budget of
        optim.minutes counts; ``max_seconds``: stop (with a checkpoint) after this much time in fit()."""
        self.started = time.perf_counter() if started is None else started
        from ..denoise.denoiser import Denoiser
        from ..sampling.registry import resolve_sampler

        cfg.validate()
        self.cfg, self.run_dir, self.progress, self.max_seconds = cfg, Path(run_dir), progress, max_seconds
        # the grids' sampler, checked now rather than after the last step
        self.sampler = resolve_sampler(cfg.sample.sampler, cfg.sample.steps, cfg.sample.options,
                                       samples=SAMPLES_OF_KIND[cfg.conditioning.kind])
        self.acc = accelerator or make_accelerator(cfg.run.device)
        self.device = self.acc.device
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        self.micro = self._micro_batch_size()
        self.precision = resolve_precision(cfg.run.mixed_precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu" and self.acc.is_main_process:
            print("warning: fp16 on the CPU is slow and only useful to test the loss-scaler path; use bf16 or no")

        self.schedule = build_schedule(cfg)
        self.data = TrainingData(cfg)
        if self.data.vae is not None and self.acc.is_main_process:  # a latent run keeps its VAE: RUN/vae/
            from ..models.vae import keep_run_vae

            keep_run_vae(self.run_dir, self.data.vae)
        self.sample_shape, self.num_classes = self.data.sample_shape, self.data.num_classes
        # the CFG scale of the grids and the run's recommendation (recorded in each checkpoint); None: no CFG
        self.guidance_scale = recommended_guidance_scale(cfg) if null_class(cfg, self.num_classes) is not None else None
        self.text_encoder = self.data.text_encoder          # kind=text: the frozen prompt encoder, else None
        if self.text_encoder is not None:
            from ..data.captions import sample_prompts
            from ..models.text import text_guidance_scale

            self.guidance_scale = text_guidance_scale(cfg)
            self.prompts = sample_prompts(cfg.data.source, self.data.captions)   # the grids' fixed prompts
        model, self.model_config = build_network(cfg, self.sample_shape, self.schedule, self.num_classes,
                                                 text_encoder=self.text_encoder)
        self.ema = EMA(model, cfg.ema.decay, cfg.ema.warmup, cfg.ema.sigma_rel)  # a copy: carries the diffusion_config too
        self.ema.module.to(self.device)
        self.model = self.acc.prepare(model)               # moved to the device; DDP-wrapped when several
        self.denoiser = Denoiser(self.model, self.schedule, cfg.diffusion.prediction, sample_shape=self.sample_shape)
        self.optimizer = make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step = 0
        self._stop_signal: int | None = None

    def _micro_batch_size(self) -> int:
        """Samples per process per micro-batch: batch_size / (grad_accum x processes)."""
        o = self.cfg.optim
        per_process = o.batch_size // o.grad_accum
        if per_process % self.world:
            raise ValueError(f"optim.batch_size={o.batch_size} must be divisible by grad_accum x processes "
                             f"= {o.grad_accum} x {self.world}")
        return per_process // self.world

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    @property
    def null_id(self) -> int | None:
        """The null class: id K of the K + 1 class embeddings (None: conditioning.dropout=0 trains none)."""
        return null_class(self.cfg, self.num_classes)

    @property
    def guide_step(self) -> int | None:
        """The step whose weights are kept as the autoguidance snapshot (None: run.guide_snapshot_step is 0 or
        not below optim.steps, where the snapshot would be the final model itself)."""
        n = self.cfg.run.guide_snapshot_step
        return n if 0 < n < self.cfg.optim.steps else None

    # -- one step -------------------------------------------------------------------------------
    def global_batch(self, step: int) -> list[tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]]:
        """This process's share of the global batch of ``step`` as micro-batches (x0, cond, t, noise)."""
        cfg = self.cfg
        b = cfg.optim.batch_size
        idx = batch_indices(step, b, self.data.n, cfg.run.seed)
        d = cfg.diffusion
        draw_t = None if d.noise_levels == "uniform" else (   # uniform keeps its original draw, bit for bit
            lambda n, g: sample_timesteps(n, self.schedule, g, d.noise_levels, d.log_sigma_mean, d.log_sigma_std))
        t, noise, flips = step_noise(step, b, self.sample_shape, d.num_timesteps, cfg.run.seed, cfg.data.flip, draw_t)
        x0, cond = self.data.batch(idx)
        if flips is not None:
            x0 = torch.where(flips.reshape(-1, *[1] * (x0.ndim - 1)), x0.flip(-1), x0)
        drop = dropout_mask(step, b, cfg.conditioning.dropout, cfg.run.seed) if cond else None
        if drop is not None and self.text_encoder is not None:  # caption dropout: h_i <- h("") where u_i < p
            h = cond["encoder_hidden_states"]
            cond = {"encoder_hidden_states": torch.where(drop[:, None, None], self.text_encoder.null_embedding(), h)}
        elif drop is not None:  # condition dropout: y_i <- null id where u_i < p
            cond = {"class_labels": torch.where(drop, torch.full_like(cond["class_labels"], self.null_id),
                                                cond["class_labels"])}
        per_process = b // self.world
        lo = self.rank * per_process
        return [(x0[i:i + self.micro], {k: v[i:i + self.micro] for k, v in cond.items()},
                 t[i:i + self.micro], noise[i:i + self.micro])
                for i in range(lo, lo + per_process, self.micro)]

    def loss(self, x0: torch.Tensor, cond: dict, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The training loss of one micro-batch, through the same Denoiser the samplers use."""
        dev = self.device
        with autocast(self.precision, dev):
            return diffusion_loss(self.denoiser, x0.to(dev), min_snr_gamma=self.cfg.diffusion.min_snr_gamma, t=t,
                                  noise=noise.to(dev), cond={k: v.to(dev) for k, v in cond.items()})

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns (mean loss over the global batch, gradient norm)."""
        seed_global_rng(self.cfg.run.seed, step, self.rank)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.cfg)
        self.model.train()
        micro_batches = self.global_batch(step)
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                loss = self.loss(*batch)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach() / len(micro_batches)
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients([p for p in self.model.parameters() if p.grad is not None],
                                   self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)   # skipped (and the scale lowered) on inf/NaN gradients under fp16
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.unwrapped)
        return total, grad_norm

    # -- the run folder -------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, kind: str = "step") -> Path | None:
        """Checkpoint the current step (main process writes; all processes wait for it). ``kind="guide"``:
        the autoguidance snapshot ``checkpoints/guide-<step>/`` (weights and EMA, no optimiser; never pruned)."""
        digests = self._gather_digests()
        path = None
        if self.acc.is_main_process:
            diffusion = dict(self.unwrapped.diffusion_config)
            if self.text_encoder is not None:  # the empty prompt's states are recomputed at load (models/text.py)
                from ..models.text import saved_null_cond

                diffusion["null_cond"] = saved_null_cond(diffusion["null_cond"], self.text_encoder)
            extra = {"model_config": self.model_config, "schedule": self.schedule.to_dict(),
                     "diffusion_config": diffusion, "sample_shape": list(self.sample_shape),
                     "num_classes": self.num_classes, "guidance_scale": self.guidance_scale,
                     "class_frequencies": self.data.class_frequencies,
                     "num_threads": torch.get_num_threads(), "num_processes": self.world, "precision": self.precision,
                     "weights_digests": digests}
            if self.text_encoder is not None:
                extra["prompts"] = list(self.prompts)
            full = kind == "step"
            path = save_checkpoint(self.checkpoint_dir, self.step, self.unwrapped, self.ema,
                                   self.optimizer if full else None, self.scaler if full else None,
                                   config=self.cfg.to_dict(), extra=extra, keep=self.cfg.run.keep_checkpoints,
                                   save_rng=full, kind=kind)
        self.acc.wait_for_everyone()
        return path

    def _gather_digests(self) -> list[dict]:
        """The model and EMA digests of every process; they must agree (checked at every checkpoint)."""
        mine = {"model": weights_digest(self.unwrapped), "ema": weights_digest(self.ema.module)}
        if self.world == 1:
            return [mine]
        from accelerate.utils import gather_object

        digests = gather_object([mine])
        if any(d != digests[0] for d in digests):
            raise RuntimeError(f"the processes' weights have drifted apart (digests {digests}); "
                               "this is a bug: please report it")
        return digests

    def resume(self) -> bool:
        """Load the newest checkpoint of the run folder (format_version 1 or 2), if any; returns whether it did."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        ckpt.restore(self.unwrapped, self.ema, self.optimizer, self.scaler, rng=True)
        self.step = ckpt.step
        # settings changed with --allow-changes win over the saved ones (unchanged settings are equal anyway):
        # the optimiser's betas and weight decay (only the first group decays), the EMA's decay and warm-up
        o = self.cfg.optim
        for i, group in enumerate(self.optimizer.param_groups):
            group.update(betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay if i == 0 else 0.0)
        e = self.cfg.ema
        self.ema.decay, self.ema.warmup, self.ema.sigma_rel = float(e.decay), bool(e.warmup), e.sigma_rel
        threads = ckpt.state.get("extra", {}).get("num_threads")
        if threads is not None and threads != torch.get_num_threads() and self.acc.is_main_process:
            print(f"note: the run was checkpointed with {threads} threads and now runs with "
                  f"{torch.get_num_threads()}: losses will not match an uninterrupted run bit for bit")
        return True

    def _log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    # -- samples and evaluation of the EMA weights ------------------------------------------------
    def ema_denoiser(self):
        """The EMA network as a Denoiser (it carries its schedule, prediction and null condition)."""
        from ..denoise.denoiser import Denoiser

        D = Denoiser(self.ema.module, sample_shape=self.sample_shape)
        object.__setattr__(D, "vae", self.data.vae)  # latent runs: generate() decodes (not a submodule)
        D.text_encoder = self.text_encoder           # text runs: prompts -> cond (models.text.prompt_cond)
        return D

    def sample_cond(self, n: int) -> dict | None:
        """Class labels 0, 1, ..., K-1, 0, 1, ... for n samples of a class-conditional run (a cluster run: clusters
        drawn from p(c) by seed, as `dforge sample --class data`); a text run: the token states of its fixed
        prompts, sample i prompt i mod P (None otherwise)."""
        if self.text_encoder is not None:
            return {"encoder_hidden_states": self.text_encoder.encode(self.sample_prompts(n))}
        if self.cfg.conditioning.kind == "cluster":   # like the data: cluster c ~ p(c), sample i from seed i
            from ..sampling.generate import data_class_labels

            return {"class_labels": data_class_labels(self.data.class_frequencies, n, seed=0)}
        return {"class_labels": torch.arange(n) % self.num_classes} if self.num_classes else None

    def sample_prompts(self, n: int) -> list[str]:
        """A text run's grid prompts: sample i gets prompt i mod P (P = len(self.prompts))."""
        return [self.prompts[i % len(self.prompts)] for i in range(n)]

    def guidance(self) -> dict:
        """generate's classifier-free guidance arguments for the grids: {} for no guidance."""
        return {} if self.guidance_scale is None else {"guidance_scale": self.guidance_scale}

    def class_names(self) -> list[str]:
        """Row labels of the grids: "class c", with the data set's name of class c where it has one."""
        names = getattr(self.data.dataset, "classes", None) or []
        return [f"class {c}" + (f" ({names[c]})" if c < len(names) and str(names[c]) != str(c) else "")
                for c in range(self.num_classes)]

    def write_samples(self) -> Path:
        """A grid of sample.n EMA samples (fixed seeds, so grids of successive steps compare). On a
        class-conditional run sample i has class i mod K, the grid has one row per class, labelled, and the
        samples use classifier-free guidance at the run's scale."""
        from ..sampling.generate import generate
        from ..viz import save_samples

        name, steps, options = self.sampler
        n = self.cfg.sample.n
        cond = self.sample_cond(n)
        x = generate(self.ema_denoiser(), n, seed=0, sampler=name, steps=steps, sampler_options=options,
                     cond=cond, device=self.device, progress=self.progress, **self.guidance())
        how = f", CFG w = {self.guidance_scale:g}" if self.guidance_scale is not None else ""
        if self.cfg.conditioning.kind == "cluster":   # as `dforge sample RUN`: clusters c ~ p(c), unguided
            how = ", clusters drawn from their shares, like the data"
        if self.text_encoder is not None:   # one row per prompt, labelled with it
            rows = [repr(p) for p in self.sample_prompts(n)]
        else:
            rows = None if cond is None or self.cfg.conditioning.kind == "cluster" else \
                [self.class_names()[int(c)] for c in cond["class_labels"]]
        return save_samples(x, self.run_dir / "samples" / f"step-{self.step:08d}.png",
                            title=f"{self.run_dir.name}, step {self.step} ({name}, {steps} steps{how})",
                            row_labels=rows)

    def evaluate(self) -> dict:
        """evaluate's quick check on run.eval_n EMA samples (fixed seeds, the run's sampler; on a conditional
        run, classes i mod K and classifier-free guidance at the run's scale, as the grids)."""
        from ..evaluate import evaluate_during_training

        cfg, (name, steps, options) = self.cfg, self.sampler
        D = self.ema_denoiser()
        if self.guidance_scale is not None:
            from ..denoise.guidance import ClassifierFreeGuidance

            D = ClassifierFreeGuidance(D, self.guidance_scale)
        return evaluate_during_training(D, cfg.data.source, n=cfg.run.eval_n,
                                        image_size=cfg.data.image_size, channels=cfg.data.channels, sampler=name,
                                        steps=steps, sampler_options=options, cond=self.sample_cond(cfg.run.eval_n))

    # -- the loop ---------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def diverged(self, loss_value: float) -> TrainingDiverged:
        last = latest_checkpoint(self.run_dir, verify=False)
        where = f"the last good checkpoint, {last.path}, is intact" if last else "no checkpoint was written yet"
        return TrainingDiverged(
            f"the loss is {loss_value} at step {self.step + 1}; stopped without saving ({where}). Try a lower "
            f"optim.lr (now {self.cfg.optim.lr}), optim.grad_clip=1, run.mixed_precision=no or bf16 instead of "
            "fp16, and check that the data lies in [-1, 1] (`dforge train --overfit-batch` checks the pipeline).")

    def fit(self) -> dict:
        """Train to optim.steps. Returns a summary dict; raises :class:`TrainingDiverged` on NaN/inf.

        Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, return with
        ``summary["interrupted"] = True``; a second Ctrl-C stops at once. The same happens when
        ``max_seconds`` of training have passed (resume later to go on)."""
        return run_loop(self)


def train(cfg: Config, run_dir, progress: bool = True, max_seconds: float | None = None,
          started: float | None = None) -> dict:
    """Train (or resume) a run; the library entry point behind ``dforge train``."""
    return Trainer(cfg, run_dir, progress=progress, max_seconds=max_seconds, started=started).fit()
