"""Fault injection and state dumps for tests and the quickstart's demonstration, installed by the environment
variable XGEM_FAULTS (JSON), never by the training config:

  exit_at_step          the last rank exits hard after this step (once per run_dir)
  exit_in_save_at_step  the last rank exits hard while saving this step's checkpoint (once per run_dir)
  nan_loss_at_step      rank 0's loss of this step becomes NaN (every time the step runs)
  fingerprints          rank 0 writes every parameter and Adam moment at each save and load (run_dir)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch

ENV = "XGEM_FAULTS"


@dataclass(frozen=True)
class Faults:
    exit_at_step: int = -1
    exit_in_save_at_step: int = -1
    nan_loss_at_step: int = -1
    fingerprints: bool = False

    @classmethod
    def from_env(cls) -> Faults:
        spec = json.loads(os.environ.get(ENV) or "{}")
        unknown = set(spec) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{ENV}: unknown key(s) {sorted(unknown)}")
        return cls(**spec)

    def exit_after(self, step: int, rank: int, world_size: int, run_dir: str | Path) -> None:
        if step == self.exit_at_step and rank == world_size - 1 and _once(run_dir, "exited_at_step"):
            os._exit(1)

    def exits_in_save(self, step: int, rank: int, world_size: int, run_dir: str | Path) -> bool:
        return step == self.exit_in_save_at_step and rank == world_size - 1 and _once(run_dir, "exited_in_save")

    def loss(self, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step == self.nan_loss_at_step and rank == 0 else loss

    def dump(self, engine, path: Path, rank: int) -> None:
        """Every parameter and Adam moment (a collective when on: all ranks call)."""
        if not self.fingerprints:
            return
        from .checkpoint import fingerprint

        data = fingerprint(engine) | {"__global_steps__": engine.global_steps, "__lr__": engine.get_lr()[0]}
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(data, path)


def _once(run_dir: str | Path, name: str) -> bool:
    """True the first time it is asked for this run_dir (a marker file)."""
    marker = Path(run_dir) / f".{name}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("1")
    return True
