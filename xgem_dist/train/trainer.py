"""The training run. Launcher-agnostic: it reads rank and world size from the torch.distributed environment,
so the same Trainer runs under Ray Train, under torchrun, or as one plain process.

The Trainer holds the run's components, each with a small interface: the data stream (ShardLoader), the
DeepSpeed engine, the checkpointer (CheckpointManager), the Validator, the sharded EMA, the training samples,
and the metric sinks with the profiler. `train_step` is one optimizer step; `fit` runs the steps and what is
due after each (validation, samples, a checkpoint, a log row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import TrainConfig
from ..data.loader import ShardLoader
from ..model.diffusion import GlobalBatch
from ..model.export import config_to_dict
from ..profile.comms import CommsCounter
from ..profile.flops import micro_batch_flops
from ..profile.metrics import StepProfiler, aggregate, peak_tflops
from ..profile.report import MetricSinks
from ..profile.telemetry import TelemetrySampler
from ..profile.trace import TraceWindow
from ..storage import Store
from .checkpoint import CheckpointManager, restore_rng, rng_state
from .collectives import Collectives
from .ema import ShardedEMA, ema_decay
from .engine import build_engine, init_distributed
from .faults import Faults
from .health import LossBreakdown, check_finite
from .preemption import StopRequest
from .safe_load import data_only_loads
from .samples import TrainingSamples
from .settings import check_resumable, check_stage_settings, conditioning_shards, run_tokenizers
from .validate import Validator, validation_due
from .weights import restore_frozen

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig, use_ray: bool = False, timeout_s: int = 120):
        self.rank, self.world, self.local_rank = init_distributed(timeout_s)
        check_stage_settings(cfg, self.world)
        torch.manual_seed(cfg.seed)
        self.cfg, self.use_ray, self.run_dir = cfg, use_ray, Path(cfg.run_dir)
        self.faults = Faults.from_env()
        self.data = ShardLoader(cfg.shards, cfg.global_batch, self.rank, self.world, cfg.image_size, cfg.grad_accum,
                                cfg.seed, cfg.split, decoder=cfg.decoder, threads=cfg.loader_threads,
                                prefetch=cfg.prefetch, last_batch=cfg.last_batch, pin_memory=cfg.pin_memory,
                                conditioning=conditioning_shards(cfg))
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", self.rank, self.world, cfg.keep_checkpoints,
                                             use_ray)
        self.step, self.resumed_from, self.best, self.last_checkpoint = 0, None, None, None
        self._start()
        self.task = self.engine.module
        self.validator = self._validator()
        self.samples = (TrainingSamples(cfg, self.validator, self.run_dir)
                        if cfg.sample_every > 0 and self.validator is not None else None)
        self.sinks = MetricSinks(self.run_dir) if self.rank == 0 else None
        self.telemetry = TelemetrySampler(cfg.telemetry_interval_s).start() if self.rank == 0 else None
        self.profiler = StepProfiler(peak=peak_tflops(self.telemetry.device_name if self.telemetry else None,
                                                      cfg.peak_tflops))
        self.trace = TraceWindow(cfg.trace_steps, self.run_dir / f"trace-rank{self.rank}.json")
        self.termination = StopRequest(use_ray)
        self.breakdown = LossBreakdown(self.engine.device, self.world)
        self.comms = CommsCounter()
        self.step_comms: dict[str, int] = {}  # collectives and bytes of the last step (comms_logger)
        self.losses: list[float] = []
        self.validations: list[dict] = []
        self.grad_norm, self.images = 0.0, 0

    # ---- start: a fresh run or a resume
    def _start(self) -> None:
        cfg = self.cfg
        with self.checkpoints.latest(cfg.resume) as folder:
            state = None
            if folder is not None:
                state = CheckpointManager.read_state(folder)
                check_resumable(state["config"], cfg)
            self.data.tokenizers = self.tokenizers = run_tokenizers(cfg, self.data, folder, self.rank)
            load_from, universal = (None, False) if folder is None else self.checkpoints.prepare(folder, self.local_rank)
            # a resume takes every weight from the checkpoint: init_from is only read by a fresh run
            self.engine = build_engine(cfg if folder is None else dataclasses.replace(cfg, init_from=""),
                                       self.tokenizers, self.world, universal)
            self.collectives = Collectives(self.engine.device, self.world)
            decay = ema_decay(cfg.ema_decay, cfg.ema_half_life_steps)
            self.ema = ShardedEMA(self.engine, decay, cfg.ema_start, cfg.ema_warmup) if decay > 0 else None
            if folder is not None:
                self._resume(folder, load_from, universal, state)
            self.checkpoints.release(self.local_rank)

    def _resume(self, folder: Path, load_from: Path, universal: bool, state: dict) -> None:
        with data_only_loads():
            path, _ = self.engine.load_checkpoint(str(load_from))
        if path is None:
            raise RuntimeError(f"{load_from}: DeepSpeed found no checkpoint to load")
        if universal:  # DeepSpeed's universal load restores optimizer-owned parameters only
            restore_frozen(self.engine, folder)
        self.load_state_dict(state)
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load(folder, self.rank, self.world)
            else:
                log.warning("%s has no EMA: the EMA starts from its weights", folder)
                self.ema.reset()
        self.resumed_from, self.last_checkpoint = str(folder), folder.name
        if self.rank == 0:
            log.warning("resumed from %s at step %d (saved by %d rank(s), now %d%s)", folder, self.step,
                        state["world_size"], self.world, ", universal" if universal else "")
        self.faults.dump(self.engine, self.run_dir / f"fingerprint-load-step{self.step}-w{self.world}.pt", self.rank)

    def _validator(self) -> Validator | None:
        if self.cfg.val_every == 0:
            return None
        store = Store(self.cfg.shards)
        if not store.child("validate").exists("manifest.json"):
            log.warning("%s has no validate split: no validation (val_every=0 silences this)", store.url)
            return None
        validator = Validator(self.cfg, self.rank, self.world, self.tokenizers)
        if validator.num_samples == 0:
            log.warning("%s: the validate split is empty: no validation", store.url)
            return None
        return validator

    # ---- state beside DeepSpeed's
    def state_dict(self) -> dict:
        return {"step": self.step, "data": self.data.state_dict(),
                "samples_consumed": self.data.epoch * len(self.data.samples) + self.data.consumed,
                "rng": self.collectives.gather_objects(rng_state()), "world_size": self.world,
                "config": dataclasses.asdict(self.cfg), "model_config": config_to_dict(self.task.model.config),
                "ema": self.ema is not None, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.data.load_state_dict(state["data"])
        restore_rng(state["rng"], self.rank, self.world)
        self.step, self.best = state["step"], state.get("best")
        self.checkpoints.best = self.best["tag"] if self.best else None

    # ---- one step
    def train_step(self, step: int) -> float:
        """Optimizer step `step` (1-based) over this rank's micro-batches; returns the global batch's loss."""
        cfg, engine, task, profiler = self.cfg, self.engine, self.task, self.profiler
        task.step = step - 1
        self.comms.begin_step()
        with profiler.phase("data"):
            micros = self.data.next_step()
            counted = sum(int(task.target_weights(micro).sum()) for micro in micros)
            task.global_batch = GlobalBatch(self.collectives.sum(counted).item(), self.world * cfg.grad_accum,
                                            self.world, self.collectives.gather_rows)
        self._count_flops(micros[0])
        step_loss = torch.zeros((), device=engine.device)
        for micro in micros:
            self.images += int(micro["frontal_present"].sum() + micro["lateral_present"].sum())
            with profiler.phase("forward"):
                loss = self.faults.loss(step, self.rank, engine(micro))
            self.breakdown.add(task.parts)
            with profiler.phase("backward"):
                engine.backward(loss)
            with profiler.phase("optimizer"):
                engine.step()
            step_loss += loss.detach().float() / (self.world * cfg.grad_accum)
        self.step_comms = self.comms.end_step()  # before the loop's own collectives
        loss = self.collectives.sum(step_loss).item()  # each micro-batch returned its share of the global mean
        check_finite("loss", loss, step, self.last_checkpoint)
        self.grad_norm = float(engine.get_global_grad_norm() or 0.0)
        check_finite("gradient norm", self.grad_norm, step, self.last_checkpoint)
        if self.ema is not None:
            self.ema.update(step)
        self.step = step
        self.losses.append(loss)
        return loss

    def _count_flops(self, micro: dict) -> None:
        if not self.cfg.profile_flops or self.profiler.flops_per_step is not None:
            return
        with self.profiler.excluded():
            try:
                self.profiler.flops_per_step = self.cfg.grad_accum * micro_batch_flops(self.cfg, self.tokenizers, micro)
            except (RuntimeError, NotImplementedError) as error:  # a data-dependent op the meta device lacks
                log.warning("stage %s: FLOPs not countable on the meta device (%s); no TFLOP/s or MFU figures",
                            self.cfg.stage, str(error).splitlines()[0])
                self.profiler.flops_per_step = 0

    # ---- what is due after a step
    def validate(self) -> dict[str, float]:
        with self.profiler.phase("validate"):
            figures = self.validator.run(self.engine, self.collectives, "val")
            if self.ema is not None:
                with self.ema.applied():
                    figures |= self.validator.run(self.engine, self.collectives, "val_ema")
        self.validations.append({"step": self.step, **figures})
        return figures

    def sample(self) -> None:
        with self.profiler.phase("sample"):
            self.engine.eval()
            try:
                with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                    results = self.samples.generate(self.task.model, self.tokenizers)
            finally:
                self.engine.train()
            if self.sinks is not None:
                self.samples.write(self.step, results, self.sinks)

    def save(self, loss: float, figures: dict[str, float]) -> None:
        tag = f"checkpoint-{self.step:07d}"
        metric = "val_ema/loss" if self.ema is not None else "val/loss"
        if metric in figures and (self.best is None or figures[metric] < self.best["value"]):
            self.best = {"tag": tag, "step": self.step, "metric": metric, "value": figures[metric]}
            self.checkpoints.best = tag
        state = self.state_dict()
        self.faults.dump(self.engine, self.run_dir / f"fingerprint-save-step{self.step}-w{self.world}.pt", self.rank)
        fail = self.faults.exits_in_save(self.step, self.rank, self.world, self.run_dir)
        # Ray keeps the latest checkpoint and the keep_checkpoints best by val_score (not validated: +inf)
        metrics = {"loss": loss, "step": self.step, "val_score": figures.get(metric, float("inf"))}
        with self.profiler.phase("checkpoint"):
            self.checkpoints.save(self.engine, state, tag, metrics, self._write_extra, fail_in_save=fail)
        self.last_checkpoint = tag

    def _write_extra(self, folder: Path) -> None:
        if self.ema is not None:
            self.ema.save(folder, self.rank)
        if self.rank == 0:
            self.tokenizers.save(folder / "tokenizers")

    def _log(self, loss: float, figures: dict[str, float], end: int) -> None:
        record = self.profiler.end_step(self.step, self.cfg.global_batch // self.world, self.images)
        self.images = 0
        self.trace.after(self.step)
        if self.step % self.cfg.log_every and not figures:
            return
        spread = aggregate({f"profile/{k}": v for k, v in record.as_dict().items() if k != "step"},
                           self.collectives.gather_objects)
        health = self.breakdown.totals(self.collectives, "train")
        self.breakdown = LossBreakdown(self.engine.device, self.world)
        if self.sinks is None:
            return
        recent = [r.seconds for r in self.profiler.records[1:][-20:]] or [record.seconds]
        row = {"train/loss": loss, "train/lr": self.engine.get_lr()[0], "train/grad_norm": self.grad_norm,
               "train/samples_per_s": self.cfg.global_batch / record.seconds,
               "train/eta_s": (end - self.step) * statistics.median(recent), **health, **self.step_comms, **figures}
        for name, stats in spread.items():
            row |= {name: stats["median"], f"{name}/min": stats["min"], f"{name}/max": stats["max"]}
        self.sinks.write(self.step, row)

    # ---- the run
    def fit(self) -> dict:
        cfg, start, t0 = self.cfg, self.step, time.perf_counter()
        end = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
        bar = tqdm(total=end, initial=start, desc=f"train {cfg.stage}", disable=self.rank != 0, unit="step")
        try:
            for step in range(start + 1, end + 1):
                self.trace.before(step)
                self.profiler.begin_step()
                loss = self.train_step(step)
                bar.update()
                self.faults.exit_after(step, self.rank, self.world, self.run_dir)
                stop = self.termination.agreed(self.collectives)
                checkpointing = step % cfg.checkpoint_every == 0 or step == end or stop
                # a stop request (preemption, SIGTERM) saves at once: no validation in its notice period
                due = self.validator is not None and not stop and validation_due(cfg, step, end, checkpointing)
                figures = self.validate() if due else {}
                if self.samples is not None and (step % cfg.sample_every == 0 or step == end):
                    self.sample()
                if checkpointing:
                    self.save(loss, figures)
                self._log(loss, figures, end)
                if stop:
                    log.warning("%s: saved at step %d", self.termination.reason, step)
                    if self.termination.stops_the_run:
                        break
        finally:
            bar.close()
            self.data.close()
            self._close_outputs()
        return self._summary(start, time.perf_counter() - t0)

    def _close_outputs(self) -> None:
        if self.sinks is None:
            return
        self.sinks.close()
        with open(self.run_dir / "telemetry.jsonl", "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in self.telemetry.stop())

    def _summary(self, start: int, seconds: float) -> dict:
        steps = self.step - start
        summary = {"stage": self.cfg.stage, "model": self.cfg.model, "world_size": self.world, "start_step": start,
                   "end_step": self.step, "resumed_from": self.resumed_from,
                   "first_loss": self.losses[0] if self.losses else None,
                   "last_loss": self.losses[-1] if self.losses else None,
                   "samples_per_s": steps * self.cfg.global_batch / seconds if seconds > 0 else 0.0,
                   "skipped_views": self.data.skipped_views, "validations": self.validations, "best": self.best,
                   "ema_bytes_per_rank": self.ema.bytes_per_rank if self.ema is not None else 0,
                   "last_checkpoint": self.last_checkpoint}
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "summary.jsonl", "a") as f:
                f.write(json.dumps(summary) + "\n")
        return summary


def run(cfg: TrainConfig, use_ray: bool = False, timeout_s: int = 120) -> dict:
    """Train cfg.stage of cfg.model from cfg.shards; returns a summary (rank 0's view)."""
    return Trainer(cfg, use_ray, timeout_s).fit()
