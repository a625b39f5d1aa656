"""Typed configuration: dataclasses filled from a YAML preset, then from CLI overrides."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


@dataclasses.dataclass
class ShardConfig:
    """How `xgem-dist shard` turns a MIMIC-CXR-JPG tree into WebDataset shards."""

    images: str = ""  # root of MIMIC-CXR-JPG: holds files/ and the CSVs
    reports: str = ""  # root of the reports: holds files/pNN/p<subject>/s<study>.txt
    out: str = ""  # any fsspec URL: a local path, s3://bucket/prefix, ...
    metadata_csv: str = ""  # default: <images>/mimic-cxr-2.0.0-metadata.csv.gz
    split_csv: str = ""  # default: <images>/mimic-cxr-2.0.0-split.csv.gz
    chexpert_csv: str = ""  # default: <images>/mimic-cxr-2.0.0-chexpert.csv.gz (optional file)
    report_section: str = "auto"  # auto | impression | findings | last_paragraph | comparison | full
    missing_report: str = "empty"  # empty | skip
    max_side: int = 0  # 0 keeps the original JPEG bytes; N resizes so the longer side is N
    jpeg_quality: int = 95
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1_000_000_000
    workers: int = 1
    progress: bool = True
    hash_inputs: bool = False  # build identity from every input file's sha256 instead of its size and mtime

    def validate(self) -> None:
        choices = ("auto", "impression", "findings", "last_paragraph", "comparison", "full")
        if self.report_section not in choices:
            raise ValueError(f"report_section must be one of {choices}, got {self.report_section!r}")
        if self.missing_report not in ("empty", "skip"):
            raise ValueError(f"missing_report must be 'empty' or 'skip', got {self.missing_report!r}")
        for name in ("images", "reports", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.max_side < 0 or self.samples_per_shard < 1 or self.max_shard_bytes < 1 or self.workers < 1:
            raise ValueError("max_side >= 0, samples_per_shard >= 1, max_shard_bytes >= 1, workers >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclasses.dataclass
class PrecomputeConfig:
    """How `xgem-dist precompute` encodes a shard set with the frozen encoders (see data/precompute.py)."""

    shards: str = ""  # the image shards: a shard-set root or one split folder (any fsspec URL)
    init_from: str = ""  # the encoders' weights (a component folder or vae=...,clip=...,optimus=...)
    out: str = ""  # any fsspec URL; gets the same split folders
    model: str = "tiny"  # preset whose VAE, CLIP and Optimus are built
    image_size: int = 64  # the training run's image_size: images are decoded at this size, as the loader does
    tokenizers: str = ""  # as TrainConfig.tokenizers
    batch_size: int = 32
    progress: bool = True

    def validate(self) -> None:
        for name in ("shards", "init_from", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.image_size < 1 or self.batch_size < 1:
            raise ValueError("image_size >= 1 and batch_size >= 1")


def _coerce(value: Any, annotation: Any) -> Any:
    if annotation is bool and isinstance(value, str):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"not a boolean: {value!r}")
        return value.lower() in ("1", "true", "yes")
    if annotation in (int, float, str) and not isinstance(value, annotation):
        return annotation(value)
    return value


def build_config(cls: type[T], preset: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """`cls` defaults <- YAML preset <- overrides (None values in overrides are ignored)."""
    values: dict[str, Any] = {}
    if preset:
        loaded = yaml.safe_load(Path(preset).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{preset}: expected a mapping at the top level")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: _coerce(v, hints[k]) for k, v in values.items()})


@dataclasses.dataclass
class TrainConfig:
    """One training run: what trains, on which shards, how, and where checkpoints and logs go."""

    model: str = "tiny"  # preset: tiny | xgem-lean | xgem
    stage: str = "frontal"  # see xgem_dist.model.stages.STAGES
    shards: str = ""  # shard-set root or split folder (any fsspec URL)
    split: str = "train"
    tokenizers: str = ""  # folder with clip/ bert/ gpt2/; empty: train small ones on the split's reports
    image_size: int = 64
    decoder: str = "auto"  # auto (DALI on GPU if installed, else PIL) | pil | dali-cpu | dali-gpu
    loader_threads: int = 0  # decode and read threads per rank; 0: the CPUs available shared by the local ranks (2-16)
    prefetch: int = 2  # steps decoded ahead by a background thread (0: none)
    last_batch: str = "drop"  # drop | pad (the last partial global batch with invalid rows masked out)
    pin_memory: bool = True
    global_batch: int = 8
    grad_accum: int = 1
    steps: int = 20  # the schedule's horizon (LR warm-up/cosine, Optimus KL cycle)
    stop_at: int = 0  # >0: end this run after this step with a checkpoint (the schedule still spans `steps`)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.2  # linear warm-up over this share of the steps, then cosine to 0
    grad_clip: float = 1.0
    deepspeed_config: str = "zero3"  # a name in xgem_dist/ds_configs/, a path to a JSON config, or auto (per stage: ZeRO-2 or zero3_tuned)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    attention: str = "auto"  # sdpa | triton | auto (exact single-key path; Triton kernel on CUDA where it applies)
    norm: str = "auto"  # torch | triton | auto (GroupNorm+SiLU fused; on CUDA the faster of Triton and torch per shape)
    wiring: str = ""  # joint stages: connectors attend to the other stream (paper) or own (released); "": the model's
    cfg_dropout: float = 0.1
    seed: int = 0
    # where the weights come from before step 1: "" (random init, seeded), a component folder (convert-released,
    # export, save_components), and/or per-component sources "vae=DIR,clip=DIR,unet_frontal=DIR" in their
    # libraries' save_pretrained layouts; a folder given first fills the components not named
    init_from: str = ""
    run_dir: str = "runs/xgem"  # checkpoints/ and tensorboard/ under it (local launchers)
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto (latest in run_dir or Ray's) | none | a checkpoint folder
    # fields a resume may change although they change the trajectory (e.g. "lr,steps"); others are refused
    allow_changes: str = ""
    log_every: int = 1
    profile_flops: bool = True  # count the step's FLOPs once (meta device) for TFLOP/s and MFU
    peak_tflops: float = 0.0  # override the device's peak (0: from the built-in table)
    trace_steps: str = ""  # "first-last" (1-based, inclusive): a torch.profiler chrome trace of those steps
    telemetry_interval_s: float = 1.0
    # validation on a fixed subset of the validate split: -1 with every checkpoint, 0 never, N every N steps
    val_every: int = -1
    val_samples: int = 64
    # an EMA of the trainable weights (ZeRO-3, each rank its partition): a decay per step, or a half-life in
    # steps (wins when > 0); 0 and 0: none. Up to ema_start it copies the weights; ema_warmup ramps the decay
    # as min(ema_decay, (1 + n) / (10 + n)) over the n steps after ema_start
    ema_decay: float = 0.0
    ema_half_life_steps: float = 0.0
    ema_start: int = 0
    ema_warmup: bool = True
    # samples while training (fixed validate studies, every rank in lockstep): every N steps, 0 never
    sample_every: int = 0
    sample_combinations: str = "T->F,F->L,F->T,T->F+L"
    sample_studies: int = 2
    sample_steps: int = 10
    sample_guidance: float = 7.5
    sample_report_tokens: int = 100  # the longest generated report
    # where the frozen encoders' outputs come from: online (run every step) | precomputed (read from
    # conditioning_shards, written by `xgem-dist precompute` with the run's init_from, tokenizers and image_size)
    conditioning: str = "online"
    conditioning_shards: str = ""
    # ZeRO-3: the UNets' resnet/transformer blocks as leaf modules (one gather per block, not per layer)
    zero3_leaf_modules: bool = True
    # ZeRO-3: frozen modules kept whole on every rank (in the training precision) instead of partitioned
    replicate_frozen: bool = True
    # DeepSpeed's comms logger: collectives and bytes per step by type in the step metrics
    comms_logger: bool = False


@dataclasses.dataclass
class LaunchConfig:
    """How `xgem-dist train` starts the loop: under Ray Train (default) or in the current process group."""

    launcher: str = "ray"  # ray | local (plain torch.distributed env: torchrun, or a single process)
    num_workers: int = 2
    min_workers: int = 0  # >0 makes the worker group elastic between min_workers and num_workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: str = ""  # Ray cluster address; empty: local / RAY_ADDRESS
    storage_path: str = ""  # Ray RunConfig storage (local path, s3://, gs://); empty: <run_dir>/ray
    name: str = "xgem"
    max_failures: int = 3
    timeout_s: int = 120  # collective timeout, so a hung rank fails the group instead of blocking it
