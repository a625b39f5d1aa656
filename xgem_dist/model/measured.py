"""Per-shape choice of the fastest implementation of an op (attention, GroupNorm), measured the first time a
shape is seen, like cudnn.benchmark; a candidate whose output disagrees with the reference is never chosen."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)
# max |candidate - reference| / max |reference| a candidate may show on the first call of a shape, by the
# less precise of the two outputs' dtypes (under autocast torch's GroupNorm returns fp32, ours bf16)
AGREEMENT = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def optional_kernel(module: str, *names: str, fallback: str) -> tuple:
    """The named functions of one of our Triton kernel modules, or Nones where it cannot be imported (no
    triton, or one whose API differs): the model still runs, on `fallback`."""
    try:
        kernel = importlib.import_module(module)
        return tuple(getattr(kernel, name) for name in names)
    except Exception as e:  # noqa: BLE001 - whatever the import raises, the op still runs on the fallback
        log.log(logging.WARNING if torch.cuda.is_available() else logging.DEBUG,
                "%s is unavailable (%s: %s); using %s", module, type(e).__name__, e, fallback)
        return (None,) * len(names)


def forward_backward_seconds(fn: Callable, *args, repeats: int = 5) -> float:
    """Median seconds of fn's forward + backward on fresh random tensors shaped like args' floating-point
    tensors (other arguments as given), after 2 warm-ups.

    It runs inside the model's forward, possibly inside an activation-checkpointed block: identity
    saved-tensor hooks keep the checkpoint's hooks from taking this separate graph's tensors as its own."""
    fresh = [torch.randn_like(a).requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
             for a in args]
    cuda = next(a for a in fresh if torch.is_tensor(a)).is_cuda
    times, grad = [], None
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        for i in range(repeats + 2):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*fresh)
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
            if cuda:
                torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _key(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.dtype, str(a.device)) if torch.is_tensor(a) else a for a in args)


class MeasuredChoice:
    """Calls, for each input signature (shapes, dtypes, device, other arguments), the fastest of the
    candidates that apply to it (`applies`), measured by `timer` the first time the signature is seen.
    Before timing, each candidate's output on random inputs is compared with the first candidate's (the
    reference); one that disagrees beyond AGREEMENT, or raises RuntimeError, is left out."""

    def __init__(self, what: str, candidates: dict[str, Callable],
                 applies: Callable[..., bool] = lambda name, *args: True,
                 timer: Callable[..., float] = forward_backward_seconds):
        self.what, self.candidates, self.applies, self.timer = what, candidates, applies, timer
        self.choices: dict[tuple, tuple[str, dict[str, float]]] = {}  # signature -> (choice, seconds per candidate)

    def __call__(self, *args) -> torch.Tensor:
        key = _key(args)
        if key not in self.choices:
            self.choices[key] = self._measure(args, key)
        return self.candidates[self.choices[key][0]](*args)

    def _agrees(self, name: str, out: torch.Tensor, reference: torch.Tensor) -> bool:
        error = float((out.float() - reference.float()).abs().max() / reference.float().abs().max().clamp(min=1e-6))
        if error <= max(AGREEMENT.get(t.dtype, AGREEMENT[torch.float32]) for t in (out, reference)):
            return True
        log.warning("%s candidate %s left out: its output differs from %s's by %.2e (relative)",
                    self.what, name, next(iter(self.candidates)), error)
        return False

    def _measure(self, args: tuple, key: tuple) -> tuple[str, dict[str, float]]:
        probe = [a.detach().clone().normal_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        reference, seconds = None, {}
        for name, fn in self.candidates.items():
            if not self.applies(name, *args):
                continue
            try:
                with torch.no_grad():
                    out = fn(*probe)
                if reference is None:
                    reference = out
                elif not self._agrees(name, out, reference):
                    continue
                seconds[name] = self.timer(fn, *args)
            except RuntimeError as e:  # e.g. an SDPA backend that does not take this shape
                log.debug("%s candidate %s skipped for %s: %s", self.what, name, key, e)
        if not seconds:
            raise RuntimeError(f"no {self.what} implementation runs {key}")
        choice = min(seconds, key=seconds.get)
        log.info("%s %s: %s -> %s", self.what, key, ", ".join(f"{n} {s * 1e3:.3f} ms" for n, s in seconds.items()),
                 choice)
        return choice, seconds
