"""Validation: the stage's loss on a fixed subset of the validate split, the same number at every world size
and across a kill and resume.

The subset is the first `val_samples` of the split in a fixed shuffle (seed 0, so runs with other seeds are
compared on the same studies). Sample i keeps one noise seed for the whole run and the timestep at the centre
of bucket i mod 10 (a fixed stratified grid), so two validations differ only by the weights. The studies are
grouped into global batches of `global_batch` in that order whatever the world size (a contrastive loss sees
the same batches), and split over ranks and micro-batches as training splits a step (padding rows masked).
"""

from __future__ import annotations

import logging

import torch

from ..config import TrainConfig
from ..data.loader import ShardLoader, sample_seed
from ..model.diffusion import GlobalBatch
from .collectives import Collectives
from .health import BUCKETS, TRAIN_TIMESTEPS, LossBreakdown
from .settings import conditioning_shards

log = logging.getLogger(__name__)
SUBSET_SEED = 0
VALIDATION_EPOCH = 2**31 - 1  # a seed stream no training epoch reaches


def stratified_timestep(index: int) -> int:
    width = TRAIN_TIMESTEPS // BUCKETS
    return (index % BUCKETS) * width + width // 2


class Validator:
    def __init__(self, cfg: TrainConfig, rank: int, world_size: int, tokenizers):
        self.loader = ShardLoader(cfg.shards, cfg.global_batch, rank, world_size, cfg.image_size, cfg.grad_accum,
                                  cfg.seed, "validate", decoder=cfg.decoder, threads=cfg.loader_threads, prefetch=0,
                                  pin_memory=cfg.pin_memory, tokenizers=tokenizers, fixed_reads=True,
                                  conditioning=conditioning_shards(cfg))
        available = len(self.loader.samples)
        chosen = torch.randperm(available, generator=torch.Generator().manual_seed(SUBSET_SEED))
        self.indices = chosen[: min(cfg.val_samples, available)].tolist()
        if len(self.indices) < cfg.val_samples and rank == 0:
            log.warning("the validate split has %d samples, fewer than val_samples %d: validating on all of them",
                        available, cfg.val_samples)
        micro = cfg.global_batch // cfg.grad_accum
        per_rank = micro // world_size
        self.steps: list[list[list[int]]] = []  # per global batch, this rank's list positions per micro-batch
        for start in range(0, len(self.indices), cfg.global_batch):
            self.steps.append([list(range(start + m * micro + rank * per_rank, start + m * micro + (rank + 1) * per_rank))
                               for m in range(cfg.grad_accum)])
        self.shares, self.world_size = world_size * cfg.grad_accum, world_size
        self.seed = cfg.seed
        self._batches: list[list[dict]] | None = None  # decoded once, kept on the host

    @property
    def num_samples(self) -> int:
        return len(self.indices)

    def _micro(self, positions: list[int]) -> dict:
        indices = [self.indices[p] if p < len(self.indices) else None for p in positions]
        batch = self.loader.read_fixed(indices, [sample_seed(self.seed, VALIDATION_EPOCH, p) for p in positions])
        batch["timestep"] = torch.tensor([stratified_timestep(p) for p in positions])
        return batch

    def batches(self) -> list[list[dict]]:
        if self._batches is None:
            self._batches = [[self._micro(p) for p in step] for step in self.steps]
        return self._batches

    @torch.no_grad()
    def run(self, engine, collectives: Collectives, prefix: str = "val") -> dict[str, float]:
        """{prefix/loss, prefix/<stream>, prefix_by_t/...} of the current weights (a collective: all ranks)."""
        task = engine.module
        breakdown = LossBreakdown(collectives.device, self.world_size)
        weighted = torch.zeros(2, dtype=torch.float64, device=collectives.device)  # sum of loss x weight, weight
        engine.eval()
        try:
            for micros in self.batches():
                counted = collectives.sum(sum(int(task.target_weights(m).sum()) for m in micros)).item()
                task.global_batch = GlobalBatch(counted, self.shares, self.world_size, collectives.gather_rows)
                for micro in micros:
                    loss = engine(micro)
                    breakdown.add(task.parts)
                    # each micro-batch's loss is its share of the global batch's mean: weight the batch by its count
                    weighted[0] += loss.detach().double() * counted / self.shares
                weighted[1] += counted / self.world_size
        finally:
            engine.train()
        figures = breakdown.totals(collectives, prefix)
        total = collectives.sum(weighted).tolist()
        if total[1] > 0:
            figures[f"{prefix}/loss"] = total[0] / total[1]
        return figures


def validation_due(cfg: TrainConfig, step: int, end: int, checkpointing: bool) -> bool:
    """val_every > 0: every val_every steps and at the end; -1: with every checkpoint; 0: never."""
    if cfg.val_every > 0:
        return step % cfg.val_every == 0 or step == end
    return cfg.val_every == -1 and checkpointing
