"""Flash attention in Triton for XGeM's shapes: non-causal, any query and key lengths (masked tails), head
dims 40/80/160 (XGeM's image UNets) and 64/128, fp16/bf16 (and fp32) inputs with fp32 accumulation.

Forward: online softmax (base 2) over key blocks, O and the row log-sum-exp stored (no N^2 memory).
Backward: delta = rowsum(dO * O); one kernel per key block accumulates dK and dV over the query blocks,
one per query block accumulates dQ over the key blocks (no atomics: deterministic gradients).

Head dims that are not a power of two are split into two power-of-two column chunks (40 = 32 + 16 with
8 masked, 80 = 64 + 16, 160 = 128 + 32) instead of being padded to 64/128/256, so the matrix units do
48/80/160 columns of work rather than 64/128/256. On the GPU each kernel is autotuned per (n_q, n_k,
head_dim, dtype) from per-architecture candidates; `python -m kernels.compile_check` compiles every
candidate for sm_90/sm_80 on any machine.
Runs on the CPU under TRITON_INTERPRET=1 (for tests) with small fixed blocks.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .outputs import new_output

HEAD_DIMS = (40, 64, 80, 128, 160)
LOG2_E = 1.4426950408889634


def head_split(head_dim: int) -> tuple[int, int]:
    """(D_LO, D_HI): power-of-two column chunks covering head_dim; D_HI == 0 when one chunk is exact."""
    lo = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - lo
    return lo, (max(16, triton.next_power_of_2(rest)) if rest > 0 else 0)


@triton.jit
def _offsets(bh, index, n, head_dim, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    """Offsets and mask of columns [FIRST, FIRST + WIDTH) of rows `index` (< n) of bh's [n, head_dim]."""
    dims = FIRST + tl.arange(0, WIDTH)
    offsets = bh * n * head_dim + index[:, None] * head_dim + dims[None, :]
    return offsets, (index < n)[:, None] & (dims < head_dim)[None, :]


@triton.jit
def _load(ptr, bh, index, n, head_dim, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    offsets, mask = _offsets(bh, index, n, head_dim, FIRST, WIDTH)
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _store(ptr, value, bh, index, n, head_dim, FIRST: tl.constexpr, WIDTH: tl.constexpr):
    offsets, mask = _offsets(bh, index, n, head_dim, FIRST, WIDTH)
    tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_t(a_lo, a_hi, b_lo, b_hi, SPLIT: tl.constexpr):
    """a b^T over both column chunks (fp32)."""
    out = tl.dot(a_lo, tl.trans(b_lo))
    if SPLIT:
        out = tl.dot(a_hi, tl.trans(b_hi), out)
    return out


@triton.jit
def _forward_kernel(Q, K, V, O, LSE2, qk_scale, n_q, n_k, head_dim,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                    SPLIT: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_lo = _load(Q, bh, rows, n_q, head_dim, 0, D_LO)
    q_hi = _load(Q, bh, rows, n_q, head_dim, D_LO, D_HI)
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, D_HI], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_lo = _load(K, bh, cols, n_k, head_dim, 0, D_LO)
        k_hi = _load(K, bh, cols, n_k, head_dim, D_LO, D_HI)
        scores = _dot_t(q_lo, q_hi, k_lo, k_hi, SPLIT) * qk_scale  # log2 domain
        scores = tl.where((cols < n_k)[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.math.exp2(scores - new_max[:, None])
        correction = tl.math.exp2(running_max - new_max)
        running_sum = running_sum * correction + tl.sum(probs, 1)
        probs = probs.to(V.dtype.element_ty)
        acc_lo = tl.dot(probs, _load(V, bh, cols, n_k, head_dim, 0, D_LO), acc_lo * correction[:, None])
        if SPLIT:
            acc_hi = tl.dot(probs, _load(V, bh, cols, n_k, head_dim, D_LO, D_HI), acc_hi * correction[:, None])
        running_max = new_max
    _store(O, acc_lo / running_sum[:, None], bh, rows, n_q, head_dim, 0, D_LO)
    if SPLIT:
        _store(O, acc_hi / running_sum[:, None], bh, rows, n_q, head_dim, D_LO, D_HI)
    tl.store(LSE2 + bh * n_q + rows, running_max + tl.math.log2(running_sum), mask=rows < n_q)


@triton.jit
def _probs_and_dscores(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, do_lo, do_hi, lse2, delta, row_ok, col_ok, qk_scale,
                       SPLIT: tl.constexpr):
    """One tile's recomputed probabilities P and dS = P * (dO V^T - delta), both fp32."""
    probs = tl.math.exp2(_dot_t(q_lo, q_hi, k_lo, k_hi, SPLIT) * qk_scale - lse2[:, None])
    probs = tl.where(row_ok[:, None] & col_ok[None, :], probs, 0.0)
    return probs, probs * (_dot_t(do_lo, do_hi, v_lo, v_hi, SPLIT) - delta[:, None])


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, scale, qk_scale, n_q, n_k, head_dim,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                          SPLIT: tl.constexpr):
    bh = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = _load(K, bh, cols, n_k, head_dim, 0, D_LO)
    k_hi = _load(K, bh, cols, n_k, head_dim, D_LO, D_HI)
    v_lo = _load(V, bh, cols, n_k, head_dim, 0, D_LO)
    v_hi = _load(V, bh, cols, n_k, head_dim, D_LO, D_HI)
    dk_lo = tl.zeros([BLOCK_N, D_LO], tl.float32)
    dk_hi = tl.zeros([BLOCK_N, D_HI], tl.float32)
    dv_lo = tl.zeros([BLOCK_N, D_LO], tl.float32)
    dv_hi = tl.zeros([BLOCK_N, D_HI], tl.float32)
    for start in range(0, n_q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_lo = _load(Q, bh, rows, n_q, head_dim, 0, D_LO)
        q_hi = _load(Q, bh, rows, n_q, head_dim, D_LO, D_HI)
        do_lo = _load(DO, bh, rows, n_q, head_dim, 0, D_LO)
        do_hi = _load(DO, bh, rows, n_q, head_dim, D_LO, D_HI)
        lse2 = tl.load(LSE2 + bh * n_q + rows, mask=rows < n_q, other=0.0)
        delta = tl.load(DELTA + bh * n_q + rows, mask=rows < n_q, other=0.0)
        probs, dscores = _probs_and_dscores(q_lo, q_hi, k_lo, k_hi, v_lo, v_hi, do_lo, do_hi, lse2, delta,
                                            rows < n_q, cols < n_k, qk_scale, SPLIT)
        probs_t = tl.trans(probs.to(DO.dtype.element_ty))
        dscores_t = tl.trans(dscores.to(Q.dtype.element_ty))
        dv_lo = tl.dot(probs_t, do_lo, dv_lo)
        dk_lo = tl.dot(dscores_t, q_lo, dk_lo)
        if SPLIT:
            dv_hi = tl.dot(probs_t, do_hi, dv_hi)
            dk_hi = tl.dot(dscores_t, q_hi, dk_hi)
    _store(DK, dk_lo * scale, bh, cols, n_k, head_dim, 0, D_LO)
    _store(DV, dv_lo, bh, cols, n_k, head_dim, 0, D_LO)
    if SPLIT:
        _store(DK, dk_hi * scale, bh, cols, n_k, head_dim, D_LO, D_HI)
        _store(DV, dv_hi, bh, cols, n_k, head_dim, D_LO, D_HI)


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, scale, qk_scale, n_q, n_k, head_dim,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                        SPLIT: tl.constexpr):
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_lo = _load(Q, bh, rows, n_q, head_dim, 0, D_LO)
    q_hi = _load(Q, bh, rows, n_q, head_dim, D_LO, D_HI)
    do_lo = _load(DO, bh, rows, n_q, head_dim, 0, D_LO)
    do_hi = _load(DO, bh, rows, n_q, head_dim, D_LO, D_HI)
    lse2 = tl.load(LSE2 + bh * n_q + rows, mask=rows < n_q, other=0.0)
    delta = tl.load(DELTA + bh * n_q + rows, mask=rows < n_q, other=0.0)
    dq_lo = tl.zeros([BLOCK_M, D_LO], tl.float32)
    dq_hi = tl.zeros([BLOCK_M, D_HI], tl.float32)
    for start in range(0, n_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_lo = _load(K, bh, cols, n_k, head_dim, 0, D_LO)
        k_hi = _load(K, bh, cols, n_k, head_dim, D_LO, D_HI)
        _, dscores = _probs_and_dscores(q_lo, q_hi, k_lo, k_hi, _load(V, bh, cols, n_k, head_dim, 0, D_LO),
                                        _load(V, bh, cols, n_k, head_dim, D_LO, D_HI), do_lo, do_hi, lse2, delta,
                                        rows < n_q, cols < n_k, qk_scale, SPLIT)
        dscores = dscores.to(K.dtype.element_ty)
        dq_lo = tl.dot(dscores, k_lo, dq_lo)
        if SPLIT:
            dq_hi = tl.dot(dscores, k_hi, dq_hi)
    _store(DQ, dq_lo * scale, bh, rows, n_q, head_dim, 0, D_LO)
    if SPLIT:
        _store(DQ, dq_hi * scale, bh, rows, n_q, head_dim, D_LO, D_HI)


def _config(head_dims: tuple[int, ...], block_m: int, block_n: int, warps: int, stages: int):
    return head_dims, triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


ALL, UP_TO_128, UP_TO_80 = HEAD_DIMS, (40, 64, 80, 128), (40, 64, 80)
# Candidates for the GPU autotuner per architecture (90: Hopper and newer, 80: Ampere), each with the head
# dims it is used for: at those it compiles without spilling registers (on Hopper with wgmma) with Triton
# 3.6 and 3.9, as `python -m kernels.compile_check` shows (CI runs it). No config of Ampere's runs D=160
# without spills, so the kernel does not take D=160 there (`auto` uses SDPA).
CONFIGS = {
    90: {
        "forward": [_config(ALL, 128, 64, 8, 3), _config(ALL, 64, 64, 8, 3), _config(ALL, 64, 32, 8, 3),
                    _config(UP_TO_80, 128, 128, 8, 3), _config(UP_TO_80, 64, 64, 4, 3), _config((40,), 128, 64, 4, 3)],
        "dkdv": [_config(ALL, 32, 64, 8, 2), _config(UP_TO_80, 64, 64, 8, 2), _config(UP_TO_80, 32, 128, 8, 2),
                 _config(UP_TO_80, 32, 64, 4, 3), _config((40,), 128, 64, 8, 2)],
        "dq": [_config((160,), 64, 16, 8, 3), _config((160,), 128, 16, 8, 3), _config(UP_TO_128, 64, 32, 8, 3),
               _config(UP_TO_128, 128, 32, 8, 3), _config(UP_TO_80, 64, 64, 8, 3), _config(UP_TO_80, 128, 64, 8, 3),
               _config(UP_TO_80, 64, 128, 8, 2), _config(UP_TO_80, 64, 64, 4, 3)],
    },
    80: {
        "forward": [_config(UP_TO_128, 64, 64, 8, 3), _config(UP_TO_128, 64, 32, 8, 3),
                    _config(UP_TO_128, 32, 64, 8, 3), _config(UP_TO_80, 128, 32, 8, 3), _config(UP_TO_80, 64, 32, 4, 3),
                    _config((40,), 64, 64, 4, 3)],
        "dkdv": [_config(UP_TO_128, 32, 64, 8, 2), _config(UP_TO_128, 64, 64, 8, 2), _config((40, 64, 128), 64, 32, 8, 2),
                 _config((40,), 64, 64, 4, 2), _config((40,), 32, 64, 4, 2)],
        "dq": [_config(UP_TO_128, 64, 32, 8, 3), _config((40, 64, 128), 64, 64, 8, 3),
               _config((40, 64, 128), 32, 64, 8, 3), _config(UP_TO_80, 128, 32, 8, 3), _config(UP_TO_80, 64, 32, 4, 3),
               _config((40,), 64, 64, 4, 3)],
    },
}
KERNELS = {"forward": _forward_kernel, "dkdv": _backward_dkdv_kernel, "dq": _backward_dq_kernel}
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def configs_for(arch: int, kernel: str, head_dim: int) -> list[triton.Config]:
    return [config for dims, config in CONFIGS[arch][kernel] if head_dim in dims]


@functools.cache
def head_dims(arch: int) -> tuple[int, ...]:
    """The head dims every kernel has a config for on this architecture."""
    return tuple(d for d in HEAD_DIMS if all(configs_for(arch, kernel, d) for kernel in KERNELS))


def gpu_arch(device: torch.device) -> int | None:
    """The CONFIGS table for a CUDA device (90 for compute capability 9 and up, 80 for 8.x), None if older."""
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80 if major == 8 else None


def _bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def _tuned(arch: int, name: str):
    def prune(configs, named_args, **_):
        return configs_for(arch, name, named_args["head_dim"])

    return triton.autotune([config for _, config in CONFIGS[arch][name]], key=["n_q", "n_k", "head_dim"],
                           prune_configs_by={"early_config_prune": prune}, do_bench=_bench)(KERNELS[name])


_TUNED = {(arch, name): _tuned(arch, name) for arch in CONFIGS for name in KERNELS}


def _launch(name: str, rows_per_program: str, n: int, programs: int, *args, arch: int | None, **chunks) -> None:
    """Runs kernel `name` over a grid of (ceil(n / the block's rows), programs); arch None: the interpreter."""
    if arch is None:
        grid = (triton.cdiv(n, INTERPRETER_BLOCKS[rows_per_program]), programs)
        KERNELS[name][grid](*args, **chunks, **INTERPRETER_BLOCKS)
    else:
        _TUNED[arch, name][lambda meta: (triton.cdiv(n, meta[rows_per_program]), programs)](*args, **chunks)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, n_q, head_dim = q.shape
        n_k = k.shape[2]
        d_lo, d_hi = head_split(head_dim)
        chunks = {"D_LO": d_lo, "D_HI": max(d_hi, 16), "SPLIT": d_hi > 0}
        arch = gpu_arch(q.device) if q.is_cuda else None
        out = new_output(q)
        lse2 = new_output(q, (batch * heads, n_q), torch.float32)
        _launch("forward", "BLOCK_M", n_q, batch * heads, q, k, v, out, lse2, scale * LOG2_E, n_q, n_k, head_dim,
                arch=arch, **chunks)
        ctx.save_for_backward(q, k, v, out, lse2)
        ctx.scale, ctx.chunks, ctx.arch = scale, chunks, arch
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse2 = ctx.saved_tensors
        d_out = d_out.contiguous()
        batch, heads, n_q, head_dim = q.shape
        n_k = k.shape[2]
        delta = (d_out.float() * out.float()).sum(-1).reshape(batch * heads, n_q).contiguous()
        dq, dk, dv = new_output(q), new_output(k), new_output(v)
        common = (ctx.scale, ctx.scale * LOG2_E, n_q, n_k, head_dim)
        _launch("dkdv", "BLOCK_N", n_k, batch * heads, q, k, v, d_out, lse2, delta, dk, dv, *common,
                arch=ctx.arch, **ctx.chunks)
        _launch("dq", "BLOCK_M", n_q, batch * heads, q, k, v, d_out, lse2, delta, dq, *common,
                arch=ctx.arch, **ctx.chunks)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q [B, H, Nq, D], k and v [B, H, Nk, D]; scale defaults to 1/sqrt(D)."""
    return _FlashAttention.apply(q, k, v, scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the compiled kernel takes these tensors (CUDA sm_80+, a head dim with configs there, fp16/bf16)."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.dim() == 4 and k.shape[-1] == q.shape[-1]):
        return False
    arch = gpu_arch(q.device)
    return arch is not None and q.shape[-1] in head_dims(arch)
