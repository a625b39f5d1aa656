"""Where each step's time goes: a phase timer, FLOPs of the actual model configuration, MFU, memory, and
the min/median/max of every figure over the ranks."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

PHASES = ("data", "forward", "backward", "optimizer", "checkpoint", "validate", "sample")
# dense bf16 tensor-core peaks, TFLOP/s (no sparsity); override with peak_tflops
PEAK_TFLOPS = {"A100": 312.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}


def peak_tflops(device_name: str | None, override: float = 0.0) -> float | None:
    if override > 0:
        return override
    if not device_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in device_name.lower():
            return PEAK_TFLOPS[key]
    return None


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of everything fn runs (forward and any backward it calls), by torch's FLOP counter; works on
    meta tensors, so the full-size model can be counted without memory."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


@dataclass
class StepRecord:
    step: int
    seconds: float
    phases: dict[str, float]
    samples: int
    images: int
    tflops: float | None = None
    mfu: float | None = None
    memory_gb: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"step": self.step, "step_s": self.seconds, "samples_per_s": self.samples / self.seconds,
               "images_per_s": self.images / self.seconds, **{f"{k}_s": v for k, v in self.phases.items()}}
        if self.tflops is not None:
            out["tflops"] = self.tflops
        if self.mfu is not None:
            out["mfu"] = self.mfu
        out.update({f"memory_{k}_gb": v for k, v in self.memory_gb.items()})
        return out


def memory_gb() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"allocated": torch.cuda.memory_allocated() / 2**30, "reserved": torch.cuda.memory_reserved() / 2**30,
                "peak": torch.cuda.max_memory_allocated() / 2**30}
    with open(f"/proc/{os.getpid()}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {"host_rss": int(fields["VmRSS"].split()[0]) / 2**20, "host_peak": int(fields["VmHWM"].split()[0]) / 2**20}


class StepProfiler:
    """Times the phases of each step; the rest of the step is 'other'. On GPUs it synchronises at phase
    boundaries (sync=True) so that asynchronous kernels are charged to the phase that launched them."""

    def __init__(self, flops_per_step: int | None = None, peak: float | None = None, sync: bool = True):
        self.flops_per_step, self.peak = flops_per_step, peak
        self.sync = sync and torch.cuda.is_available()
        self.records: list[StepRecord] = []
        self._phases: dict[str, float] = {}
        self._excluded = 0.0
        self._start = None

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin_step(self) -> None:
        self._phases = dict.fromkeys(PHASES, 0.0)
        self._excluded = 0.0
        self._start = self._now()

    @contextmanager
    def excluded(self):
        """Work inside the step that is not part of it (e.g. counting FLOPs): taken out of the step time."""
        t0 = self._now()
        try:
            yield
        finally:
            self._excluded += self._now() - t0

    @contextmanager
    def phase(self, name: str):
        t0 = self._now()
        try:
            yield
        finally:
            self._phases[name] = self._phases.get(name, 0.0) + self._now() - t0

    def end_step(self, step: int, samples: int, images: int) -> StepRecord:
        seconds = self._now() - self._start - self._excluded
        phases = dict(self._phases)
        phases["other"] = max(0.0, seconds - sum(phases.values()))
        tflops = self.flops_per_step / seconds / 1e12 if self.flops_per_step else None
        mfu = tflops / self.peak if tflops is not None and self.peak else None
        record = StepRecord(step, seconds, phases, samples, images, tflops, mfu, memory_gb())
        self.records.append(record)
        return record


def aggregate(values: dict[str, float], gather=lambda v: [v]) -> dict[str, dict[str, float]]:
    """{name: {min, median, max}} of each figure over the ranks that have it (some figures, e.g. MFU, only
    rank 0 knows). gather: every rank's dict (a collective: every rank calls it)."""
    gathered = gather(values)
    names = sorted({name for g in gathered for name in g})
    out = {}
    for name in names:
        present = [g[name] for g in gathered if name in g]
        out[name] = {"min": min(present), "median": statistics.median(present), "max": max(present)}
    return out
