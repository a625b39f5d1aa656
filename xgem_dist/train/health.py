"""Whether a run is learning and still sane: losses by stream and by timestep bucket, and the stop on a
non-finite loss or gradient (raised before the step's checkpoint, so none at or after it is registered)."""

from __future__ import annotations

import math

import torch

from ..model.diffusion import LossParts
from .collectives import Collectives

BUCKETS = 10
TRAIN_TIMESTEPS = 1000


class NonFiniteError(RuntimeError):
    pass


def check_finite(name: str, value: float, step: int, last_checkpoint: str | None) -> None:
    """Raises NonFiniteError naming the step and what to do; value must be the same on every rank."""
    if math.isfinite(value):
        return
    since = f"the newest checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    raise NonFiniteError(f"step {step}: the {name} is {value} (not finite); the run stopped before saving it ({since}, "
                         "nothing at or after this step). Lower lr, raise warmup_ratio or grad_clip, or check the "
                         "data of this step, then resume from the newest checkpoint")


class LossBreakdown:
    """Weighted sums of per-sample losses by stream and by timestep bucket over some micro-batches (a step's,
    or a validation pass's), reduced over the ranks in one collective. Global terms (a contrastive loss over
    the whole global batch) are averaged over the micro-batches they were computed for."""

    def __init__(self, device: torch.device | str, world_size: int):
        self.device, self.world_size = torch.device(device), world_size
        self.streams: dict[str, torch.Tensor] = {}  # name -> [weighted sum, weight]
        self.buckets = torch.zeros(BUCKETS, 2, dtype=torch.float64, device=self.device)

    def _slot(self, name: str) -> torch.Tensor:
        return self.streams.setdefault(name, torch.zeros(2, dtype=torch.float64, device=self.device))

    def add(self, parts: LossParts) -> None:
        for name, (per_sample, weights, t) in parts.streams.items():
            w = torch.ones_like(per_sample) if weights is None else weights.to(per_sample)
            weighted = (per_sample * w).double()
            slot = self._slot(name)
            slot[0] += weighted.sum()
            slot[1] += w.double().sum()
            if t is not None:
                bucket = (t.long() * BUCKETS // TRAIN_TIMESTEPS).clamp(0, BUCKETS - 1).to(self.device)
                self.buckets[:, 0].index_add_(0, bucket, weighted)
                self.buckets[:, 1].index_add_(0, bucket, w.double())
        for name, value in parts.globals.items():  # the same value on every rank: each adds its share
            slot = self._slot(name)
            slot[0] += value.double() / self.world_size
            slot[1] += 1.0 / self.world_size

    def totals(self, collectives: Collectives, prefix: str) -> dict[str, float]:
        """{prefix/<stream>: mean, prefix/t<lo>-<hi>: mean} over every rank (a collective: all ranks call)."""
        names = sorted(self.streams)
        stacked = torch.cat([*(self.streams[n] for n in names), self.buckets.flatten()])
        total = collectives.sum(stacked).tolist()
        out = {}
        for i, name in enumerate(names):
            if total[2 * i + 1] > 0:
                out[f"{prefix}/{name}"] = total[2 * i] / total[2 * i + 1]
        offset = 2 * len(names)
        width = TRAIN_TIMESTEPS // BUCKETS
        for b in range(BUCKETS):
            value, weight = total[offset + 2 * b], total[offset + 2 * b + 1]
            if weight > 0:
                out[f"{prefix}_by_t/t{b * width:03d}-{(b + 1) * width - 1:03d}"] = value / weight
        return out
