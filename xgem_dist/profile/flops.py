"""FLOPs of a training step as the run computes it, counted once on a meta-device copy of the model."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..model.tokenizers import Tokenizers
from .metrics import count_flops


def micro_batch_flops(cfg: TrainConfig, tokenizers: Tokenizers, micro: dict) -> int:
    """FLOPs of one micro-batch's forward and backward of cfg's stage (skipped attention work not counted)."""
    from ..model.attention import set_attention_backend
    from ..model.stages import apply_stage
    from ..model.xgem import build_xgem
    from ..train.engine import build_task

    model = build_xgem(cfg.model, device="meta")
    set_attention_backend(model, cfg.attention)
    apply_stage(model, cfg.stage)
    task = build_task(cfg, model, tokenizers)
    task.step = cfg.steps  # the Optimus KL term on
    meta_batch = {k: v.to("meta") if torch.is_tensor(v) and v.is_floating_point() else v for k, v in micro.items()}
    return count_flops(lambda: task(meta_batch).backward())
