"""GroupNorm, optionally fused with the SiLU that follows it in every XGeM ResBlock, in Triton: forward and
backward, for contiguous (N, C, *) inputs in fp32/fp16/bf16 with fp32 statistics and accumulation.

Stock PyTorch runs GroupNorm+SiLU as separate passes over the activation (statistics, normalise, SiLU;
and in the backward SiLU's gradient, then GroupNorm's two passes), and autograd keeps the normalised
tensor for SiLU's backward. Here one program owns one (sample, group): the forward reads the group twice
(statistics, then normalise+affine+SiLU) and writes it once; the backward recomputes the normalised values
from the input and the saved mean/rstd instead of keeping them. The group's statistics combine per-tile
mean and squared deviations (Chan et al.), not a raw sum of squares, so a large mean does not cancel.
Per-channel weight and bias gradients are written per sample and summed by torch (no atomics:
deterministic). The output has the input's dtype (under autocast, the conv that follows casts to it anyway).
Runs on the CPU under TRITON_INTERPRET=1 (for tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .outputs import new_output

TILE = 2048  # elements of one (channels x positions) tile: 8 per thread at up to 8 warps


@triton.jit
def _tile(c0, s0, channels, positions, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets (32-bit, from the group's start), mask and channel indices of the tile at (c0, s0) of a group
    stored as [channels, positions]."""
    c = c0 + tl.arange(0, BLOCK_C)
    s = s0 + tl.arange(0, BLOCK_S)
    mask = (c < channels)[:, None] & (s < positions)[None, :]
    return c[:, None] * positions + s[None, :], mask, c


@triton.jit
def _sigmoid(z):
    return tl.fdiv(1.0, 1.0 + tl.exp(-z))  # approximate division: no IEEE slow-path call (a stack frame)


@triton.jit
def _group_norm_forward(X, W, B, Y, MEAN, RSTD, groups, channels, positions, eps,
                        SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # = sample * groups + group; the group's elements are contiguous
    base = pid.to(tl.int64) * channels * positions
    X += base
    Y += base
    first_channel = (pid % groups) * channels
    # one flat loop over the tiles (nested loops made ptxas save a register on the stack on sm_80)
    s_tiles = tl.cdiv(positions, BLOCK_S)
    tiles = tl.cdiv(channels, BLOCK_C) * s_tiles
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for t in range(0, tiles):
        offsets, mask, _ = _tile((t // s_tiles) * BLOCK_C, (t % s_tiles) * BLOCK_S, channels, positions,
                                 BLOCK_C, BLOCK_S)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        n = tl.sum(mask.to(tl.float32))
        tile_mean = tl.fdiv(tl.sum(x), n)
        tile_m2 = tl.sum(tl.where(mask, (x - tile_mean) * (x - tile_mean), 0.0))
        total = count + n
        delta = tile_mean - mean
        share = tl.fdiv(n, total)
        mean += delta * share
        m2 += tile_m2 + delta * delta * count * share
        count = total
    rstd = tl.math.rsqrt(tl.fdiv(m2, count) + eps)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)
    for t in range(0, tiles):
        offsets, mask, c = _tile((t // s_tiles) * BLOCK_C, (t % s_tiles) * BLOCK_S, channels, positions,
                                 BLOCK_C, BLOCK_S)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + first_channel + c, mask=c < channels, other=0.0).to(tl.float32)
        b = tl.load(B + first_channel + c, mask=c < channels, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w[:, None] + b[:, None]
        if SILU:
            y = y * _sigmoid(y)
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gradients(X, W, B, DY, offsets, mask, c, first_channel, channels, mean, rstd, SILU: tl.constexpr):
    """(x_hat, dL/dz, dL/dx_hat) of a tile, with x_hat = (x - mean) * rstd and z = x_hat * w + b (the output
    before the SiLU): x_hat is recomputed from x rather than saved."""
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + first_channel + c, mask=c < channels, other=0.0).to(tl.float32)
    x_hat = (x - mean) * rstd
    if SILU:
        b = tl.load(B + first_channel + c, mask=c < channels, other=0.0).to(tl.float32)
        z = x_hat * w[:, None] + b[:, None]
        sig = _sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return x_hat, dz, dz * w[:, None]


@triton.jit
def _group_norm_backward(X, W, B, DY, MEAN, RSTD, DX, DW, DB, groups, channels, positions, inv_count,
                         SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * channels * positions
    X += base
    DY += base
    DX += base
    first_channel = (pid % groups) * channels
    sample_channels = (pid // groups) * groups * channels + first_channel  # DW, DB: [samples, all channels]
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    sum_dxhat = 0.0
    sum_dxhat_xhat = 0.0
    for c0 in range(0, channels, BLOCK_C):
        dw = tl.zeros([BLOCK_C], tl.float32)
        db = tl.zeros([BLOCK_C], tl.float32)
        for s0 in range(0, positions, BLOCK_S):
            offsets, mask, c = _tile(c0, s0, channels, positions, BLOCK_C, BLOCK_S)
            x_hat, dz, dx_hat = _gradients(X, W, B, DY, offsets, mask, c, first_channel, channels, mean, rstd, SILU)
            dw += tl.sum(dz * x_hat, 1)
            db += tl.sum(dz, 1)
            sum_dxhat += tl.sum(dx_hat)
            sum_dxhat_xhat += tl.sum(dx_hat * x_hat)
        c = c0 + tl.arange(0, BLOCK_C)
        tl.store(DW + sample_channels + c, dw, mask=c < channels)
        tl.store(DB + sample_channels + c, db, mask=c < channels)
    mean_dxhat = sum_dxhat * inv_count
    mean_dxhat_xhat = sum_dxhat_xhat * inv_count
    for c0 in range(0, channels, BLOCK_C):
        for s0 in range(0, positions, BLOCK_S):
            offsets, mask, c = _tile(c0, s0, channels, positions, BLOCK_C, BLOCK_S)
            x_hat, _, dx_hat = _gradients(X, W, B, DY, offsets, mask, c, first_channel, channels, mean, rstd, SILU)
            dx = rstd * (dx_hat - mean_dxhat - x_hat * mean_dxhat_xhat)
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


KERNELS = {"forward": _group_norm_forward, "backward": _group_norm_backward}


def blocks(channels: int, positions: int) -> dict:
    """Tile shape and warps for a group of `channels` x `positions` elements: whole rows of positions where
    they fit, so loads are contiguous, and up to TILE elements per tile."""
    block_s = min(triton.next_power_of_2(positions), TILE)
    block_c = min(triton.next_power_of_2(channels), max(1, TILE // block_s))
    size = block_c * block_s
    return {"BLOCK_C": block_c, "BLOCK_S": block_s, "num_warps": max(1, min(8, size // 256))}


def _geometry(x: torch.Tensor, groups: int) -> tuple[int, int, int]:
    samples, channels = x.shape[0], x.shape[1]
    return samples, channels // groups, x.numel() // max(1, samples * channels)


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, silu):
        x = x.contiguous()
        samples, channels, positions = _geometry(x, groups)
        y = new_output(x)
        mean = new_output(x, (samples * groups,), torch.float32)
        rstd = new_output(x, (samples * groups,), torch.float32)
        _group_norm_forward[(samples * groups,)](x, weight, bias, y, mean, rstd, groups, channels, positions,
                                                 eps, SILU=silu, **blocks(channels, positions))
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.groups, ctx.silu = groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        samples, channels, positions = _geometry(x, ctx.groups)
        dx = new_output(x)
        dw = new_output(x, (samples, weight.numel()), torch.float32)
        db = new_output(x, (samples, weight.numel()), torch.float32)
        _group_norm_backward[(samples * ctx.groups,)](x, weight, bias, dy.contiguous(), mean, rstd, dx, dw, db,
                                                      ctx.groups, channels, positions, 1.0 / (channels * positions),
                                                      SILU=ctx.silu, **blocks(channels, positions))
        return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype), None, None, None


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5,
               silu: bool = False) -> torch.Tensor:
    """F.group_norm(x, groups, weight, bias, eps), then F.silu when `silu`; output in x's dtype."""
    return _GroupNorm.apply(x, weight, bias, groups, eps, silu)


def supports(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """Whether group_norm takes this call: an affine GroupNorm of a contiguous (N, C, *) float tensor."""
    return (weight is not None and bias is not None and x.ndim >= 2 and x.is_contiguous()
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and x.shape[1] % groups == 0
            and x.numel() > 0)
