"""A torch.profiler chrome trace of a window of training steps."""

from __future__ import annotations

from pathlib import Path

import torch


class TraceWindow:
    """The steps 'first-last' (1-based, inclusive) of `spec`; an empty spec traces nothing."""

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
