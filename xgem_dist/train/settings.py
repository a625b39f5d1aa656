"""Checks on a run's settings before it starts: the stage against the world size, and a resume against the
settings its checkpoint was trained with."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.loader import ShardLoader
from ..model.tokenizers import Tokenizers, load_tokenizers, train_small_tokenizers
from .collectives import Collectives
from .engine import check_world_sizes

log = logging.getLogger(__name__)
# fields that may change between a run and its resumption without changing its trajectory: where and how
# often it writes, what it measures and shows, how it reads and computes the same numbers
RESUMABLE_CHANGES = ("run_dir", "resume", "allow_changes", "stop_at", "checkpoint_every", "keep_checkpoints",
                     "log_every", "profile_flops", "peak_tflops", "trace_steps", "telemetry_interval_s", "shards",
                     "decoder", "loader_threads", "prefetch", "pin_memory", "attention", "norm",
                     "activation_checkpointing", "deepspeed_config", "val_every", "val_samples", "ema_decay",
                     "ema_half_life_steps", "ema_start", "ema_warmup", "sample_every", "sample_combinations",
                     "sample_studies", "sample_steps", "sample_guidance", "sample_report_tokens", "conditioning",
                     "conditioning_shards", "zero3_leaf_modules", "replicate_frozen", "comms_logger")
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


def conditioning_shards(cfg: TrainConfig) -> str:
    """The precomputed conditioning's URL, or "" when the run encodes online."""
    return cfg.conditioning_shards if cfg.conditioning == "precomputed" else ""


def run_tokenizers(cfg: TrainConfig, reader: ShardLoader, checkpoint: Path | None, rank: int) -> Tokenizers:
    """The tokenizers folder given; else those a resumed checkpoint saved; else (tiny model only) small ones
    trained on the split's reports by rank 0 and handed to every rank (their ids depend on the process that
    trains them)."""
    if cfg.tokenizers:
        return load_tokenizers(cfg.tokenizers)
    if checkpoint is not None and (checkpoint / "tokenizers").is_dir():
        return load_tokenizers(checkpoint / "tokenizers")
    if cfg.model != "tiny":
        raise ValueError(f"model {cfg.model!r} needs its real tokenizers: set tokenizers to a folder with clip/, "
                         "bert/ and gpt2/ (save_pretrained layout)")
    trained = None
    if rank == 0:
        reports = reader.read_members([(ref, "report.txt") for ref in reader.samples])
        texts = [bytes(r).decode() for r in reports if r]
        trained = train_small_tokenizers([t for t in texts if t.strip()] or ["empty"])
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return trained
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return Collectives(device).gather_objects(trained)[0]
