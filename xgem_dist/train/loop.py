"""The training loop. Launcher-agnostic: it reads rank and world size from the torch.distributed
environment, so the same function runs under Ray Train, under torchrun, or as one plain process."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import TrainConfig
from ..data.loader import ShardLoader
from ..model.diffusion import GlobalBatch
from ..model.export import config_to_dict
from ..model.tokenizers import Tokenizers, load_tokenizers, train_small_tokenizers
from ..profile.metrics import StepProfiler, aggregate, count_flops, peak_tflops
from ..profile.report import MetricSinks
from ..profile.telemetry import TelemetrySampler
from .checkpoint import CheckpointManager, fingerprint, restore_rng, rng_state
from .collectives import Collectives
from .engine import build_engine, check_world_sizes, init_distributed
from .preemption import StopRequest
from .safe_load import data_only_loads
from .weights import restore_frozen

log = logging.getLogger(__name__)
# fields that may change between a run and its resumption without changing its trajectory: where and how
# often it writes, what it measures, how it reads and computes the same numbers
RESUMABLE_CHANGES = ("run_dir", "resume", "allow_changes", "stop_at", "checkpoint_every", "keep_checkpoints",
                     "log_every", "profile_flops", "peak_tflops", "trace_steps", "telemetry_interval_s",
                     "fail_at_step", "fail_in_save_at_step", "fingerprints", "shards", "decoder", "loader_threads",
                     "prefetch", "pin_memory", "attention", "norm", "activation_checkpointing", "deepspeed_config")
CONTRASTIVE_STAGES = ("clip", "joint-text", "joint-frontal", "joint-lateral")


def check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """Refuses a resume whose settings would change the trajectory the checkpoint is on (steps, lr, batch,
    stage, seed, init_from, ...), unless `allow_changes` names every such field."""
    now = dataclasses.asdict(cfg)
    allowed = {name.strip() for name in cfg.allow_changes.split(",") if name.strip()}
    changed = [name for name in now if name not in RESUMABLE_CHANGES and name in saved and saved[name] != now[name]]
    refused = [name for name in changed if name not in allowed]
    if refused:
        details = ", ".join(f"{name}: {saved[name]!r} -> {now[name]!r}" for name in refused)
        raise ValueError(f"the checkpoint was trained with other settings ({details}); resuming would change its "
                         f"trajectory. Use the saved values, or accept the change with "
                         f"--set allow_changes={','.join(refused)}")
    if changed:
        log.warning("resuming with changed settings (allowed): %s", ", ".join(changed))


def check_stage_settings(cfg: TrainConfig, world: int) -> None:
    check_world_sizes(cfg, [world])
    if cfg.stage in CONTRASTIVE_STAGES and cfg.grad_accum != 1:
        raise ValueError(f"stage {cfg.stage!r} has a contrastive loss over the whole global batch, which needs "
                         f"grad_accum 1 (got {cfg.grad_accum}); raise the number of ranks or lower global_batch")


def _tokenizers(cfg: TrainConfig, reader: ShardLoader) -> Tokenizers:
    if cfg.tokenizers:
        return load_tokenizers(cfg.tokenizers)
    if cfg.model != "tiny":
        raise ValueError(f"model {cfg.model!r} needs its real tokenizers: set tokenizers to a folder with clip/, "
                         "bert/ and gpt2/ (save_pretrained layout)")
    reports = reader.read_members([(ref, "report.txt") for ref in reader.samples])
    texts = [bytes(r).decode() for r in reports if r]
    return train_small_tokenizers([t for t in texts if t.strip()] or ["empty"])


def _once(run_dir: str, name: str) -> bool:
    """True the first time it is asked for this run_dir (a marker file), for fault injection."""
    marker = Path(run_dir) / f".{name}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("1")
    return True


def run(cfg: TrainConfig, use_ray: bool = False, timeout_s: int = 120) -> dict:
    """Train cfg.stage of cfg.model from cfg.shards; returns a summary (rank 0's view)."""
    rank, world, local_rank = init_distributed(timeout_s)
    check_stage_settings(cfg, world)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    reader = ShardLoader(cfg.shards, cfg.global_batch, rank, world, cfg.image_size, cfg.grad_accum, cfg.seed,
                         cfg.split, decoder=cfg.decoder, threads=cfg.loader_threads, prefetch=cfg.prefetch,
                         last_batch=cfg.last_batch, pin_memory=cfg.pin_memory,
                         conditioning=cfg.conditioning_shards if cfg.conditioning == "precomputed" else "")
    reader.tokenizers = tokenizers = _tokenizers(cfg, reader)
    checkpoints = CheckpointManager(run_dir / "checkpoints", rank, world, cfg.keep_checkpoints, use_ray)
    start, resumed_from = 0, None
    with checkpoints.latest(cfg.resume) as folder:
        if folder is not None:
            state = CheckpointManager.read_state(folder)
            check_resumable(state["config"], cfg)
        load_from, universal = (None, False) if folder is None else checkpoints.prepare(folder, local_rank)
        # a resume takes every weight from the checkpoint: init_from is only read by a fresh run
        engine = build_engine(cfg if folder is None else dataclasses.replace(cfg, init_from=""), tokenizers, world,
                              universal)
        collectives = Collectives(engine.device, world)
        if folder is not None:
            with data_only_loads():
                path, _ = engine.load_checkpoint(str(load_from))
            if path is None:
                raise RuntimeError(f"{load_from}: DeepSpeed found no checkpoint to load")
            if universal:  # DeepSpeed's universal load restores optimizer-owned parameters only
                restore_frozen(engine, folder)
            reader.load_state_dict(state["data"])
            restore_rng(state["rng"], rank, world)
            start, resumed_from = state["step"], str(folder)
            if rank == 0:
                log.warning("resumed from %s at step %d (saved by %d rank(s), now %d%s)", folder, start,
                            state["world_size"], world, ", universal" if universal else "")
            if cfg.fingerprints:
                _dump(engine, run_dir / f"fingerprint-load-step{start}-w{world}.pt", rank)
        checkpoints.release(local_rank)

    sinks = MetricSinks(run_dir) if rank == 0 else None
    telemetry = TelemetrySampler(cfg.telemetry_interval_s).start() if rank == 0 else None
    profiler = StepProfiler(peak=peak_tflops(telemetry.device_name if telemetry else None, cfg.peak_tflops))
    trace = _TraceWindow(cfg.trace_steps, run_dir / f"trace-rank{rank}.json")
    termination = StopRequest(use_ray)
    task = engine.module
    losses, samples, t0 = [], 0, time.perf_counter()
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
    bar = tqdm(total=end, initial=start, desc=f"train {cfg.stage}", disable=rank != 0, unit="step")
    step = start
    for step in range(start, end):
        trace.before(step + 1)
        profiler.begin_step()
        task.step = step
        step_loss = torch.zeros((), device=engine.device)
        with profiler.phase("data"):
            micros = reader.next_step()
            counted = sum(int(task.target_weights(micro).sum()) for micro in micros)
            task.global_batch = GlobalBatch(collectives.sum(counted).item(), world * cfg.grad_accum, world,
                                            collectives.gather_rows)
        if cfg.profile_flops and profiler.flops_per_step is None:
            with profiler.excluded():
                try:
                    profiler.flops_per_step = cfg.grad_accum * _micro_flops(cfg, tokenizers, micros[0])
                except (RuntimeError, NotImplementedError) as error:  # a data-dependent op the meta device lacks
                    log.warning("stage %s: FLOPs not countable on the meta device (%s); no TFLOP/s or MFU figures",
                                cfg.stage, str(error).splitlines()[0])
                    profiler.flops_per_step = 0
        images = 0
        for micro in micros:
            images += int(micro["frontal_present"].sum() + micro["lateral_present"].sum())
            with profiler.phase("forward"):
                loss = engine(micro)
            with profiler.phase("backward"):
                engine.backward(loss)
            with profiler.phase("optimizer"):
                engine.step()
            step_loss += loss.detach().float() / (world * cfg.grad_accum)
        step_loss = collectives.sum(step_loss)  # each micro-batch returned its share of the global mean
        losses.append(step_loss.item())
        samples += cfg.global_batch
        bar.update()
        if step + 1 == cfg.fail_at_step and rank == world - 1 and _once(cfg.run_dir, "failed_at_step"):
            os._exit(1)
        stop = termination.agreed(collectives)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end or stop:
            state = {"step": step + 1, "samples_consumed": reader.epoch * len(reader.samples) + reader.consumed,
                     "data": reader.state_dict(), "rng": collectives.gather_objects(rng_state()), "world_size": world,
                     "config": dataclasses.asdict(cfg), "model_config": config_to_dict(task.model.config)}
            if cfg.fingerprints:
                _dump(engine, run_dir / f"fingerprint-save-step{step + 1}-w{world}.pt", rank)
            fail = step + 1 == cfg.fail_in_save_at_step and rank == world - 1 and _once(cfg.run_dir, "failed_in_save")
            with profiler.phase("checkpoint"):
                checkpoints.save(engine, state, f"checkpoint-{step + 1:07d}",
                                 {"loss": step_loss.item(), "step": step + 1}, fail_in_save=fail)
        record = profiler.end_step(step + 1, cfg.global_batch // world, images)
        trace.after(step + 1)
        if (step + 1) % cfg.log_every == 0:
            figures = {f"profile/{k}": v for k, v in record.as_dict().items() if k != "step"}
            spread = aggregate(figures, collectives.gather_objects)
            if sinks is not None:
                row = {"train/loss": step_loss.item(), "train/lr": engine.get_lr()[0]}
                for name, stats in spread.items():
                    row |= {name: stats["median"], f"{name}/min": stats["min"], f"{name}/max": stats["max"]}
                sinks.write(step + 1, row)
        if stop:
            log.warning("%s: saved at step %d", termination.reason, step + 1)
            if termination.stops_the_run:
                break
    bar.close()
    reader.close()
    if sinks is not None:
        sinks.close()
        samples_taken = telemetry.stop()
        with open(run_dir / "telemetry.jsonl", "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in samples_taken)
    seconds = time.perf_counter() - t0
    summary = {"stage": cfg.stage, "model": cfg.model, "world_size": world, "start_step": start,
               "end_step": step + 1 if end > start else start, "resumed_from": resumed_from,
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "samples_per_s": samples / seconds if seconds > 0 else 0.0,
               "skipped_views": reader.skipped_views}
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "summary.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
    return summary


def _micro_flops(cfg: TrainConfig, tokenizers: Tokenizers, micro: dict) -> int:
    """FLOPs of one micro-batch's forward and backward, counted on a meta-device copy of the model."""
    from ..model.attention import set_attention_backend
    from ..model.stages import apply_stage
    from ..model.xgem import build_xgem
    from .engine import build_task

    model = build_xgem(cfg.model, device="meta")
    set_attention_backend(model, cfg.attention)  # skipped work is not counted
    apply_stage(model, cfg.stage)
    task = build_task(cfg, model, tokenizers)
    task.step = cfg.steps  # the Optimus KL term on
    meta_batch = {k: v.to("meta") if torch.is_tensor(v) and v.is_floating_point() else v for k, v in micro.items()}
    return count_flops(lambda: task(meta_batch).backward())


class _TraceWindow:
    """A torch.profiler chrome trace of the steps 'first-last' (1-based, inclusive)."""

    def __init__(self, spec: str, path: Path):
        self.first, self.last = (int(x) for x in spec.split("-")) if spec else (0, -1)
        self.path, self.profile = path, None

    def before(self, step: int) -> None:
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profile.__enter__()

    def after(self, step: int) -> None:
        if self.profile is not None and step == self.last:
            self.profile.__exit__(None, None, None)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.profile.export_chrome_trace(str(self.path))
            self.profile = None


def _dump(engine, path: Path, rank: int) -> None:
    data = fingerprint(engine) | {"__global_steps__": engine.global_steps, "__lr__": engine.get_lr()[0]}
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
