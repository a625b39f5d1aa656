"""The one place DeepSpeed is configured: distributed init, the config, zero.Init, the optimizer and
LR schedule, deepspeed.initialize."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import torch

from ..config import TrainConfig
from ..model.attention import set_attention_backend
from ..model.norm import set_norm_backend
from ..model.stages import apply_stage
from ..model.tokenizers import Tokenizers
from ..model.xgem import build_xgem
from ..profile.comms import enable_comms_logger
from .task import TrainingTask
from .weights import load_init_weights

log = logging.getLogger(__name__)
DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"  # package data, found from a wheel too


def init_distributed(timeout_s: int = 120) -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torch.distributed environment (torchrun, Ray Train, or none:
    a single process on loopback). Reuses a process group that already exists."""
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ and not torch.distributed.is_initialized():
        _init_loopback_process_group(backend, timedelta(seconds=timeout_s))
    if not torch.cuda.is_available():
        # DeepSpeed JIT-compiles a shared-memory op for CPU inference collectives at init (1-2 minutes of
        # g++); training collectives go through gloo, so skip it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def _init_loopback_process_group(backend: str, timeout: timedelta) -> None:
    """A world of one process whose listeners are all on loopback. torch's TCPStore server listens on every
    interface whatever host it is given, unless it is handed a listening socket: bind that to 127.0.0.1.
    gloo and NCCL pick an interface of their own (the host name's address, the first non-loopback one)."""
    import socket

    import psutil

    listener = socket.create_server(("127.0.0.1", int(os.environ.get("MASTER_PORT", 0))))
    port = listener.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    loopback = [name for name, addresses in psutil.net_if_addrs().items()
                if any(a.address == "127.0.0.1" for a in addresses)]
    if loopback:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback[0])
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback[0])
    # the store owns the socket from here on (detach: Python must not close it too)
    store = torch.distributed.TCPStore("127.0.0.1", port, 1, True, timeout, master_listen_fd=listener.detach())
    torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)


def _allow_scalar_parameters() -> None:
    """DeepSpeed 0.19 broadcasts parameters through a uint8 view, which a 0-dim tensor (CLIP's logit_scale)
    cannot give ("self.dim() cannot be 0 to view"): in zero.Init (ZeRO-3) for each new parameter, and in the
    engine's initial broadcast (ZeRO-0/1/2). Both see such parameters as a 1-element view of the same storage."""
    from deepspeed import comm as dist
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    if getattr(Init, "_xgem_scalars", False):
        return
    original = Init._zero_init_param

    def zero_init_param(self, param):
        if param.dim() != 0:
            return original(self, param)
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        source = 0 if dist.get_world_group() == group else dist.get_global_rank(group, 0)
        dist.broadcast(param.data.reshape(1).view(torch.uint8), source, group)
        param.partition()

    broadcast_model = DeepSpeedEngine._broadcast_model

    def broadcast_model_with_scalars(self):
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for param in scalars:
            param.data = param.data.reshape(1)
        try:
            broadcast_model(self)
        finally:
            for param in scalars:
                param.data = param.data.reshape(())

    Init._zero_init_param = zero_init_param
    DeepSpeedEngine._broadcast_model = broadcast_model_with_scalars
    Init._xgem_scalars = True


def check_world_sizes(cfg: TrainConfig, sizes: Sequence[int]) -> None:
    """Refuses world sizes over which global_batch does not split into equal micro-batches (an elastic
    Ray group may run with any count in [min_workers, num_workers], so the launcher checks all of them)."""
    bad = [w for w in sizes if cfg.global_batch % (w * cfg.grad_accum)]
    if not bad:
        return
    message = (f"global_batch {cfg.global_batch} with grad_accum {cfg.grad_accum} does not split into equal "
               f"micro-batches over {', '.join(map(str, bad))} worker(s): it must be a multiple of workers x grad_accum")
    if len(sizes) > 1:
        fits = [w for w in sizes if w not in bad]
        message += (f". An elastic group may run with any count from {sizes[0]} to {sizes[-1]} (--min-workers to "
                    f"--num-workers) and only {fits or 'none'} of them fit: pick a range whose every count divides "
                    f"it, a fixed --num-workers, or another global_batch")
    raise ValueError(message)


def device_memory_bytes() -> int:
    """This rank's accelerator memory, or on CPU the host's memory shared by the node's ranks."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    import psutil

    return psutil.virtual_memory().total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def choose_zero(cfg: TrainConfig, world_size: int, memory: int | None = None) -> tuple[str, str]:
    """`deepspeed_config: auto`: (config name, why). ZeRO-2 (no per-module gathers: the faster engine) when its
    per-rank model state fits in half the device memory, leaving the rest to activations; else tuned ZeRO-3.
    Model state per rank, from the parameter counts of the stage (meta device): every weight in the training
    precision, plus per trainable parameter its gradient (ZeRO-2 partitions it) and fp32 master weight and Adam
    moments (12 bytes) over the ranks."""
    model = build_xgem(cfg.model, device="meta")
    trainable = sum(p.numel() for _, p in apply_stage(model, cfg.stage))
    total = sum(p.numel() for p in model.parameters())
    width = 2 if cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available()) else 4
    zero2 = total * width + trainable * (width + 12) / world_size
    memory = device_memory_bytes() if memory is None else memory
    gb = 1024**3
    figures = (f"stage {cfg.stage}: {trainable / 1e6:.1f}M trainable of {total / 1e6:.1f}M parameters, ZeRO-2 model "
               f"state {zero2 / gb:.1f} GiB per rank at W={world_size}, device memory {memory / gb:.1f} GiB")
    if cfg.ema_decay > 0 or cfg.ema_half_life_steps > 0:
        return "zero3_tuned", f"{figures}: tuned ZeRO-3, whose partitions the EMA averages rank by rank"
    if zero2 <= memory / 2:
        return "zero2", f"{figures}: fits in half, ZeRO-2 (no per-module gathers)"
    return "zero3_tuned", f"{figures}: over half, tuned ZeRO-3 (leaf blocks, frozen weights replicated)"


def deepspeed_config(cfg: TrainConfig, world_size: int, load_universal: bool = False) -> dict:
    check_world_sizes(cfg, [world_size])
    name = cfg.deepspeed_config
    if name == "auto":
        name, why = choose_zero(cfg, world_size)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            log.warning("deepspeed_config auto: %s", why)
    path = Path(name)
    if not path.suffix:
        path = DS_CONFIGS / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"deepspeed_config {cfg.deepspeed_config!r}: no file {path}; give a path to a JSON config "
                         f"or one of {sorted(p.stem for p in DS_CONFIGS.glob('*.json'))}")
    ds = json.loads(path.read_text())
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())
    filled = {
        "train_micro_batch_size_per_gpu": cfg.global_batch // (world_size * cfg.grad_accum),
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = bf16
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        params["lr"] = cfg.lr if params.get("lr", "auto") == "auto" else params["lr"]
        params["weight_decay"] = cfg.weight_decay if params.get("weight_decay", "auto") == "auto" else params[
            "weight_decay"]
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    if cfg.comms_logger:
        ds = enable_comms_logger(ds)
    return ds


def leaf_module_classes() -> list[type]:
    """The blocks ZeRO-3 gathers whole (one gather per block instead of one per layer inside it): the UNets' and
    the VAE's resnet blocks, the UNets' transformer blocks and the text UNet's residual blocks."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    from ..model.text_unet import FCResBlock

    return [ResnetBlock2D, Transformer2DModel, FCResBlock]


def build_task(cfg: TrainConfig, model, tokenizers: Tokenizers) -> TrainingTask:
    """The stage's loss over `model` (also a meta-device copy, for counting FLOPs), with its conditioning."""
    from ..data.precompute import load_empty

    empty = load_empty(cfg.conditioning_shards, cfg.split) if cfg.conditioning == "precomputed" else None
    return TrainingTask(model, cfg.stage, tokenizers, cfg.steps, cfg.wiring, cfg.cfg_dropout, cfg.conditioning, empty)


def unused_encoders(cfg: TrainConfig) -> tuple[str, ...]:
    """The frozen encoders a run never runs, so never builds: with precomputed conditioning and no samples during
    training (which encode prompts, decode images and write reports), the VAE, Optimus and CLIP. `export` takes
    them from the run's init_from, which the precomputed shards were computed with."""
    return ("vae", "optimus", "clip") if cfg.conditioning == "precomputed" and cfg.sample_every == 0 else ()


def check_precomputed(cfg: TrainConfig, tokenizers: Tokenizers) -> None:
    """With conditioning precomputed: refuses conditioning_shards computed with other tokenizers or (a fresh run's
    init_from; a resume's weights come from its checkpoint) other encoder weights than this run's."""
    from ..data.precompute import conditioning_build, encoders_sha256, tokenizers_sha256

    if cfg.conditioning != "precomputed":
        return
    if not cfg.conditioning_shards:
        raise ValueError("conditioning precomputed needs conditioning_shards (the `xgem-dist precompute` output)")
    build = conditioning_build(cfg.conditioning_shards, cfg.split)
    if tokenizers_sha256(tokenizers) != build["tokenizers_sha256"]:
        raise ValueError(f"{cfg.conditioning_shards} was computed with other tokenizers than this run's: set "
                         "tokenizers to those it was computed with (precompute saves the small ones it trains in "
                         f"{cfg.conditioning_shards}/tokenizers)")
    if cfg.init_from and encoders_sha256(cfg.init_from) != build["encoders_sha256"]:
        raise ValueError(f"{cfg.conditioning_shards} was computed with other VAE/CLIP/Optimus weights than "
                         f"init_from {cfg.init_from}; precompute again with --init-from {cfg.init_from}")


def lr_lambda(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_engine(cfg: TrainConfig, tokenizers: Tokenizers, world_size: int, load_universal: bool = False):
    """The model built partitioned (zero.Init under ZeRO-3), the stage's trainable parameters in the
    optimizer and nothing else, warm-up + cosine LR; returns the DeepSpeed engine."""
    import deepspeed

    from transformers.integrations import HfDeepSpeedConfig

    ds = deepspeed_config(cfg, world_size, load_universal)
    zero3 = ds.get("zero_optimization", {}).get("stage", 0) == 3
    _allow_scalar_parameters()
    # transformers partitions (and initialises) its models itself while this object is alive
    hf_zero3 = HfDeepSpeedConfig(copy.deepcopy(ds)) if zero3 else None  # noqa: F841
    init = (lambda: deepspeed.zero.Init(config_dict_or_path=copy.deepcopy(ds))) if zero3 else None
    model = build_xgem(cfg.model, init_context=init, without=unused_encoders(cfg))
    if cfg.init_from:
        load_init_weights(model, cfg.init_from, torch.distributed.get_rank(), world_size)
    set_attention_backend(model, cfg.attention)
    set_norm_backend(model, cfg.norm)
    if cfg.activation_checkpointing:
        for unet in (model.unet_frontal, model.unet_lateral, model.unet_text):
            unet.gradient_checkpointing = True
    trainable = [p for _, p in apply_stage(model, cfg.stage)]
    if zero3 and cfg.zero3_leaf_modules:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, leaf_module_classes())
    check_precomputed(cfg, tokenizers)
    task = build_task(cfg, model, tokenizers)
    schedule = lr_lambda(cfg.steps, cfg.warmup_ratio)
    if "optimizer" in ds:
        optimizer = None
    else:
        optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-8)
    if not zero3:  # ZeRO-1/2 save the layout their universal conversion (a resume on another world size) needs
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        setattr(task, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    engine, *_ = deepspeed.initialize(
        model=task, optimizer=optimizer, model_parameters=trainable if optimizer is None else None, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    if zero3 and cfg.replicate_frozen:
        replicate_frozen_at_first_forward(task)
    return engine


def replicate_frozen_at_first_forward(task: torch.nn.Module) -> None:
    """ZeRO-3 keeps every parameter partitioned and all-gathers it each time its module runs. Frozen parameters
    never change, so at the first forward (after every checkpoint load and restore_frozen, on every rank at once)
    they are gathered once and flagged persistent: the fetch skips them (available) and the release keeps them, in
    the training precision. They stay out of the optimizer's own persistent list, so the step does not re-gather
    them either, and their partitions stay in place: checkpoints, restore_frozen and export see them as before.
    (Anything that repartitions one, e.g. GatheredParameters, only costs one more gather at its next use.)"""

    def replicate(module: torch.nn.Module, _inputs) -> None:
        handle.remove()
        frozen = [p for p in module.parameters() if not p.requires_grad and hasattr(p, "ds_id")]
        for param in frozen:
            param.ds_persist = True
        if frozen:
            frozen[0].all_gather(param_list=frozen)

    handle = task.register_forward_pre_hook(replicate)
