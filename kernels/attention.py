"""Flash attention in Triton for XGeM's shapes: non-causal, any query and key lengths (masked tails), head
dims 40/80/160 (XGeM's image UNets) and 64/128, fp16/bf16 (and fp32) inputs with fp32 accumulation.

Forward: online softmax over key blocks, O and the row log-sum-exp stored (no N^2 memory).
Backward: delta = rowsum(dO * O); one kernel per key block accumulates dK and dV over the query blocks,
one per query block accumulates dQ over the key blocks (no atomics).
Runs on the CPU under TRITON_INTERPRET=1 (for tests); on the GPU it is compiled.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

HEAD_DIMS = (40, 64, 80, 128, 160)
POISON = False  # tests: fill outputs with NaN before the kernels run, so unwritten elements show


@triton.jit
def _tile(bh, index, dims, n, head_dim):
    """Offsets and mask of rows `index` (< n) of batch-head bh's [n, head_dim] matrix."""
    offsets = bh * n * head_dim + index[:, None] * head_dim + dims[None, :]
    return offsets, (index < n)[:, None] & (dims < head_dim)[None, :]


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, row_ok, col_ok, scale):
    """One tile's recomputed probabilities P and dS = P * (dO V^T - delta)."""
    probs = tl.exp(tl.dot(q, tl.trans(k)) * scale - lse[:, None])
    probs = tl.where(row_ok[:, None] & col_ok[None, :], probs, 0.0)
    return probs, probs * (tl.dot(do, tl.trans(v)) - delta[:, None])


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, scale, n_q, n_k, head_dim,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_offsets, q_mask = _tile(bh, rows, dims, n_q, head_dim)
    q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_offsets, kv_mask = _tile(bh, cols, dims, n_k, head_dim)
        k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
        scores = tl.where((cols < n_k)[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.exp(scores - new_max[:, None])
        correction = tl.exp(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probs, 1)
        acc = acc * correction[:, None] + tl.dot(probs.to(v.dtype), v)
        running_max = new_max
    tl.store(O + q_offsets, (acc / running_sum[:, None]).to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * n_q + rows, running_max + tl.log(running_sum), mask=rows < n_q)


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale, n_q, n_k, head_dim,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    kv_offsets, kv_mask = _tile(bh, cols, dims, n_k, head_dim)
    k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, n_q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_offsets, q_mask = _tile(bh, rows, dims, n_q, head_dim)
        q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
        do = tl.load(DO + q_offsets, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * n_q + rows, mask=rows < n_q, other=0.0)
        delta = tl.load(DELTA + bh * n_q + rows, mask=rows < n_q, other=0.0)
        probs, dscores = _probs_and_dscores(q, k, v, do, lse, delta, rows < n_q, cols < n_k, scale)
        dv += tl.dot(tl.trans(probs.to(do.dtype)), do)
        dk += tl.dot(tl.trans(dscores.to(q.dtype)), q)
    tl.store(DK + kv_offsets, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale, n_q, n_k, head_dim,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_offsets, q_mask = _tile(bh, rows, dims, n_q, head_dim)
    q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
    do = tl.load(DO + q_offsets, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * n_q + rows, mask=rows < n_q, other=0.0)
    delta = tl.load(DELTA + bh * n_q + rows, mask=rows < n_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_offsets, kv_mask = _tile(bh, cols, dims, n_k, head_dim)
        k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
        _, dscores = _probs_and_dscores(q, k, v, do, lse, delta, rows < n_q, cols < n_k, scale)
        dq += tl.dot(dscores.to(k.dtype), k)
    tl.store(DQ + q_offsets, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _blocks(head_dim: int, interpreting: bool) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpreting:
        return 16, 16, block_d
    return (64, 64, block_d) if block_d <= 128 else (32, 32, block_d)


def _new(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan")) if POISON else torch.empty_like(like)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, n_q, head_dim = q.shape
        n_k = k.shape[2]
        interpreting = not q.is_cuda
        block_m, block_n, block_d = _blocks(head_dim, interpreting)
        out = _new(q)
        lse = _new(torch.empty(batch * heads, n_q, device=q.device, dtype=torch.float32))
        grid = (triton.cdiv(n_q, block_m), batch * heads)
        _forward_kernel[grid](q, k, v, out, lse, scale, n_q, n_k, head_dim,
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.blocks = scale, (block_m, block_n, block_d)
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        d_out = d_out.contiguous()
        batch, heads, n_q, head_dim = q.shape
        n_k = k.shape[2]
        block_m, block_n, block_d = ctx.blocks
        delta = (d_out.float() * out.float()).sum(-1).reshape(batch * heads, n_q).contiguous()
        dq, dk, dv = _new(q), _new(k), _new(v)
        _backward_dkdv_kernel[(triton.cdiv(n_k, block_n), batch * heads)](
            q, k, v, d_out, lse, delta, dk, dv, ctx.scale, n_q, n_k, head_dim,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
        _backward_dq_kernel[(triton.cdiv(n_q, block_m), batch * heads)](
            q, k, v, d_out, lse, delta, dq, ctx.scale, n_q, n_k, head_dim,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [B, H, Nq, D], k and v [B, H, Nk, D]; scale defaults to 1/sqrt(D)."""
    return _FlashAttention.apply(q, k, v, scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the compiled kernel takes these tensors (CUDA, a supported head dim and dtype)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in HEAD_DIMS
            and k.shape[-1] == q.shape[-1] and q.dim() == 4)
