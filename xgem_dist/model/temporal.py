"""The temporal ("video") blocks of the released XGeM layout, kept for checkpoint compatibility.

XGeM inherits them from CoDi's 8-frame video diffuser (make-a-video style): after every UNet resnet,
in the image VAE decoder and in every CLIP vision layer. On images (4-D tensors) they are the
identity and get no gradient; on video latents [B, C, T, H, W] they mix information across frames:
temporal self-attention with a continuous relative-position bias and learned frame embeddings, a
1x1x1-conv GEGLU feed-forward with a one-frame token shift, and a frame-shift residual block. CLIP's
block has only the attention (no frame embeddings) and the feed-forward (no shift), as released;
transformers' CLIP layers never call it (xgem_dist encodes images, not video, with CLIP).
The `xgem-lean` preset leaves them out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_FRAMES = 30
DEFAULT_FRAME_RATE = 4


def _channel_standardise(x: torch.Tensor) -> torch.Tensor:
    eps = 1e-5 if x.dtype == torch.float32 else 1e-3
    var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
    return (x - mean) * var.clamp(min=eps).rsqrt()


class ChannelNorm(nn.Module):
    """Standardise over dim 1 and scale; `shape` is the scale's shape (channels on dim 0 or 1)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.g = nn.Parameter(torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channel_standardise(x) * self.g


class TemporalAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm = ChannelNorm((dim,))  # on [N, T, C] this standardises over frames, as released
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        nn.init.zeros_(self.to_out.weight)  # a new block starts as the identity
        self.pos_embeds = nn.Parameter(torch.randn(1, MAX_FRAMES, dim))
        self.frame_rate_embeds = nn.Parameter(torch.randn(1, MAX_FRAMES, dim))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, frame_rate: int | None) -> torch.Tensor:
        """x: [N, T, C] (one sequence of T frames per spatial position); the frame position and frame-rate
        embeddings are added when frame_rate is given."""
        n, t, _ = x.shape
        if frame_rate is not None:
            x = x + self.pos_embeds[:, :t] + self.frame_rate_embeds[:, frame_rate - 1 : frame_rate]
        x = self.norm(x)
        q = self.to_q(x)
        k, v = self.to_kv(x).chunk(2, dim=-1)
        q, k, v = (y.view(n, t, self.heads, -1).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.to_out(out.transpose(1, 2).reshape(n, t, -1))


class ContinuousPositionBias(nn.Module):
    """An MLP from the signed log distance between frames to one bias per head."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.net = nn.ModuleList([nn.Sequential(nn.Linear(1, dim), nn.SiLU()),
                                  nn.Sequential(nn.Linear(dim, dim), nn.SiLU()), nn.Linear(dim, heads)])

    def forward(self, frames: int) -> torch.Tensor:
        pos = torch.arange(frames, device=self.net[-1].weight.device, dtype=self.net[-1].weight.dtype)
        rel = pos[:, None] - pos[None, :]
        h = (torch.sign(rel) * torch.log1p(rel.abs())).unsqueeze(-1)
        for layer in self.net:
            h = layer(h)
        return h.permute(2, 0, 1)  # [heads, T, T]


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=1)
        return x * F.gelu(gate)


class TemporalFeedForward(nn.Module):
    """Pointwise GEGLU MLP over channels; with frame_dim, the second half of the hidden channels is shifted
    one frame along it."""

    def __init__(self, dim: int, conv: type[nn.Module], mult: int = 4):
        super().__init__()
        inner = int(dim * mult * 2 / 3)
        norm_shape = (inner, 1, 1, 1) if conv is nn.Conv3d else (1, inner, 1)
        self.proj_in = nn.Sequential(conv(dim, 2 * inner, 1, bias=False), GEGLU())
        self.proj_out = nn.Sequential(ChannelNorm(norm_shape), conv(inner, dim, 1, bias=False))

    def forward(self, x: torch.Tensor, frame_dim: int | None = None) -> torch.Tensor:
        h = self.proj_in(x)
        if frame_dim is None:
            return self.proj_out(h)
        keep, shift = h.chunk(2, dim=1)
        shift = torch.roll(shift, 1, dims=frame_dim).index_fill(
            frame_dim, torch.tensor([0], device=h.device), 0.0)
        return self.proj_out(torch.cat([keep, shift], dim=1))


class FrameShiftBlock(nn.Module):
    """Residual GroupNorm-SiLU-conv whose output channel groups are delayed by 0..7 frames."""

    def __init__(self, channels: int, groups: int = 32, shifts: int = 8):
        super().__init__()
        self.shifts = shifts
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                        nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[2].weight)
        nn.init.zeros_(self.out_layers[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, hh, ww = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, hh, ww)
        h = self.out_layers(frames).view(b, t, c, hh, ww).transpose(1, 2)
        parts = []
        for i, part in enumerate(h.chunk(self.shifts, dim=1)):
            parts.append(F.pad(part, (0, 0, 0, 0, i, 0))[:, :, :t] if i else part)
        return x + torch.cat(parts, dim=1)


class SpatioTemporalBlock(nn.Module):
    """The block after each UNet resnet (and, frame-shift only, in the VAE decoder). Identity on 4-D input."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, attention: bool = True,
                 groups: int = 32):
        super().__init__()
        self.frameshiftblock = FrameShiftBlock(dim, groups)
        self.attention = attention
        if attention:
            self.temporal_attn = TemporalAttention(dim, heads, dim_head or dim // 4)
            self.temporal_rel_pos_bias = ContinuousPositionBias(dim // 2, heads)
            self.ff = TemporalFeedForward(dim, nn.Conv3d)

    def forward(self, x: torch.Tensor, frame_rate: int = DEFAULT_FRAME_RATE) -> torch.Tensor:
        if x.ndim != 5:
            return x
        if self.attention:
            b, c, t, h, w = x.shape
            tokens = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
            tokens = tokens + self.temporal_attn(tokens, self.temporal_rel_pos_bias(t), frame_rate)
            x = tokens.view(b, h, w, t, c).permute(0, 4, 3, 1, 2)
            x = x + self.ff(x, frame_dim=2)
        return self.frameshiftblock(x)


class CLIPTemporalBlock(nn.Module):
    """The block in each CLIP vision layer (between self-attention and MLP): attention across frames per
    token, then a feed-forward; as released, without the frame embeddings and the frame shift of the UNet's
    block. Identity without num_frames."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.temporal_attn = TemporalAttention(dim, heads, dim // heads)
        self.temporal_rel_pos_bias = ContinuousPositionBias(dim // 2, heads)
        self.ff = TemporalFeedForward(dim, nn.Conv1d)

    def forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """x: [(B*T), N, C] hidden states of T frames."""
        if num_frames is None:
            return x
        bt, n, c = x.shape
        b = bt // num_frames
        tokens = x.view(b, num_frames, n, c).transpose(1, 2).reshape(b * n, num_frames, c)
        attended = self.temporal_attn(tokens, self.temporal_rel_pos_bias(num_frames), frame_rate=None)
        tokens = tokens + torch.nan_to_num(attended)
        seq = tokens.transpose(1, 2)  # [B*N, C, T]
        seq = seq + self.ff(seq)
        return seq.transpose(1, 2).reshape(b, n, num_frames, c).transpose(1, 2).reshape(bt, n, c)
