"""The attention processor XGeM's UNets use, chosen by one switch: `sdpa` | `triton` | `auto`.

- `sdpa`: diffusers' stock processor (torch scaled_dot_product_attention), the reference.
- `auto` / `triton`: our processor. Every cross-attention in XGeM has a single key (the pooled CLIP token,
  or the environment vector in the connectors): softmax over one key is exactly 1, so the output is the
  value projection broadcast over the queries. The query and key projections are skipped (their
  parameters stay, for checkpoint compatibility, and get exactly zero gradients, as with real attention).
  Other attention: `triton` runs the Triton flash-attention kernel (kernels/attention.py) and fails where
  it does not apply; `auto` measures, once per shape, forward+backward of that kernel, torch SDPA's default
  pick and each of SDPA's cuDNN/flash/efficient backends, and keeps the fastest that agrees with SDPA (so
  it is never slower than SDPA). On the CPU both use SDPA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .measured import MeasuredChoice, optional_kernel

BACKENDS = ("sdpa", "triton", "auto")
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def triton_attention():
    """(flash_attention, supports) from kernels.attention, or (None, None) where it cannot be imported."""
    return optional_kernel("kernels.attention", "flash_attention", "supports", fallback="torch SDPA")


def _sdpa_with(backend: SDPBackend) -> AttentionFn:
    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return attend


def gpu_candidates(kernel: AttentionFn | None, supports) -> MeasuredChoice:
    """`auto` on CUDA: our Triton kernel (where `supports` says it takes the shape; None: not available)
    against torch SDPA's default pick and its cuDNN, flash and efficient backends."""
    candidates: dict[str, AttentionFn] = {"sdpa": F.scaled_dot_product_attention}
    candidates.update({f"sdpa-{name}": _sdpa_with(backend) for name, backend in
                       (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                        ("efficient", SDPBackend.EFFICIENT_ATTENTION))})
    if kernel is not None:
        candidates["triton"] = kernel
    return MeasuredChoice("attention", candidates, applies=lambda name, q, k, v: name != "triton" or supports(q, k))


class XGeMAttnProcessor:
    def __init__(self, backend: str = "auto"):
        if backend not in ("triton", "auto"):
            raise ValueError(f"XGeMAttnProcessor backend must be 'triton' or 'auto', got {backend!r}")
        self.backend = backend
        self.reference = AttnProcessor2_0()
        self.kernel, self.supports = triton_attention()
        self.measured = gpu_candidates(self.kernel, self.supports) if backend == "auto" else None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v)
        if self.measured is not None:
            return self.measured(q, k, v)
        if self.kernel is None or not self.supports(q, k):
            raise RuntimeError(f"the Triton kernel does not support q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}"
                               + (" (triton is not installed)" if self.kernel is None else ""))
        return self.kernel(q, k, v)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        unusual = (attention_mask is not None or hidden_states.ndim != 3 or attn.spatial_norm is not None
                   or attn.group_norm is not None or attn.residual_connection or attn.norm_cross)
        if unusual:
            return self.reference(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, queries, _ = hidden_states.shape
        if context.shape[1] == 1:
            out = attn.to_v(context).expand(-1, queries, -1)
            # the skipped projections run on zero rows: no work, exact zero gradients, and ZeRO-3 still
            # gathers (and reduces) their parameters like everyone else's
            untouched = attn.to_q(hidden_states[:, :0]).sum() + attn.to_k(context[:, :0]).sum()
            out = out + 0.0 * untouched
        else:
            heads = attn.heads
            q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
            q, k, v = (x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v))
            out = self._attend(q, k, v).transpose(1, 2).reshape(batch, queries, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Sets the processor of every diffusers Attention in the model; returns how many were set."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    processor = AttnProcessor2_0() if backend == "sdpa" else XGeMAttnProcessor(backend)
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(processor)
            count += 1
    return count
