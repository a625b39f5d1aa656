"""XGeM's text UNet: the SD-1.5 UNet layout over a 768-d report latent seen as 4 tokens.

Features are [B, C, 4, 1] ("4 tokens" of C channels). A resnet block is a time-conditioned MLP over
the flattened 4C features; "down"/"up" are 4C -> 4C linears (no resolution change); the attention
layers are diffusers Transformer2DModels on the 4 tokens. Connectors as in the image UNet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from .image_unet import check_skip_mode, decoder_skips, run_block
from .norm import GroupNorm

TOKENS = 4


@dataclass(frozen=True)
class TextUNetConfig:
    latent_dim: int = 768
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: int = 3
    layers_per_block: int = 2
    num_heads: int = 8
    context_dim: int = 768
    connector_dim: int = 1280
    norm_num_groups: int = 32
    env_base_channels: int = 160
    skip_mode: str = "standard"  # or "released": see image_unet.SKIP_MODES


class FCResBlock(nn.Module):
    """GroupNorm-SiLU-Linear, plus the time embedding, GroupNorm-SiLU-Linear, residual; over 4C features."""

    def __init__(self, c_in: int, c_out: int, temb_dim: int, groups: int):
        super().__init__()
        self.c_out = c_out
        self.norm1 = GroupNorm(groups, TOKENS * c_in, silu=True)
        self.linear1 = nn.Linear(TOKENS * c_in, TOKENS * c_out)
        self.time_emb_proj = nn.Linear(temb_dim, TOKENS * c_out)
        self.norm2 = GroupNorm(groups, TOKENS * c_out, silu=True)
        self.linear2 = nn.Linear(TOKENS * c_out, TOKENS * c_out)
        self.shortcut = nn.Linear(TOKENS * c_in, TOKENS * c_out) if c_in != c_out else nn.Identity()

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = h.flatten(1)
        y = self.linear1(self.norm1(x)) + self.time_emb_proj(F.silu(temb))
        y = self.linear2(self.norm2(y))
        return (self.shortcut(x) + y).view(h.shape[0], self.c_out, TOKENS, 1)


def _tokens_linear(c: int) -> nn.Linear:
    return nn.Linear(TOKENS * c, TOKENS * c)


def _apply(linear: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    return linear(h.flatten(1)).view_as(h)


class TextEnvironmentEncoder(nn.Module):
    def __init__(self, cfg: TextUNetConfig, temb_dim: int):
        super().__init__()
        channels = cfg.block_out_channels[: cfg.attention_levels]
        self.base = cfg.env_base_channels
        self.linear_in = nn.Linear(cfg.latent_dim, TOKENS * cfg.env_base_channels)
        self.resnets, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        previous = cfg.env_base_channels
        for i, c in enumerate(channels):
            self.resnets.append(FCResBlock(previous, c, temb_dim, cfg.norm_num_groups))
            if i < len(channels) - 1:
                self.downsamplers.append(_tokens_linear(c))
            previous = c
        self.norm_out = GroupNorm(cfg.norm_num_groups, previous, silu=True)
        self.linear_out = nn.Linear(TOKENS * previous, cfg.connector_dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.linear_in(x).view(x.shape[0], self.base, TOKENS, 1)
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if i < len(self.downsamplers):
                h = _apply(self.downsamplers[i], h)
        h = self.linear_out(self.norm_out(h).flatten(1))
        return F.normalize(h, dim=-1).unsqueeze(1)


class TextUNet(nn.Module):
    def __init__(self, cfg: TextUNetConfig = TextUNetConfig()):
        super().__init__()
        check_skip_mode(cfg.skip_mode)
        self.config = cfg
        self.gradient_checkpointing = False
        chans, groups, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
        temb_dim = chans[0] * 4
        self.time_proj = Timesteps(chans[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim)
        self.linear_in = nn.Linear(cfg.latent_dim, TOKENS * chans[0])

        def attention(c: int, context_dim: int) -> Transformer2DModel:
            return Transformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=c // cfg.num_heads,
                                      in_channels=c, cross_attention_dim=context_dim, norm_num_groups=groups)

        self.down_resnets, self.down_attentions, self.downsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        skip_channels, previous = [chans[0]], chans[0]
        for level, c in enumerate(chans):
            for _ in range(n):
                self.down_resnets.append(FCResBlock(previous, c, temb_dim, groups))
                if level < cfg.attention_levels:
                    self.down_attentions.append(attention(c, cfg.context_dim))
                skip_channels.append(c)
                previous = c
            if level < len(chans) - 1:
                self.downsamplers.append(_tokens_linear(c))
                skip_channels.append(c)
        self.mid_resnets = nn.ModuleList(FCResBlock(previous, previous, temb_dim, groups) for _ in range(2))
        self.mid_attention = attention(previous, cfg.context_dim)
        self.up_resnets, self.up_attentions, self.upsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(chans))):
            c = chans[level]
            for _ in range(n + 1):
                self.up_resnets.append(FCResBlock(previous + skip_channels.pop(), c, temb_dim, groups))
                if level < cfg.attention_levels:
                    self.up_attentions.append(attention(c, cfg.context_dim))
                previous = c
            if level > 0:
                self.upsamplers.append(_tokens_linear(c))
        self.norm_out = GroupNorm(groups, chans[0], silu=True)
        self.linear_out = nn.Linear(TOKENS * chans[0], cfg.latent_dim)

        self.env_encoder = TextEnvironmentEncoder(cfg, temb_dim)
        attn_channels = chans[: cfg.attention_levels]
        self.down_connectors = nn.ModuleList(attention(c, cfg.connector_dim) for c in attn_channels for _ in range(n))
        self.up_connectors = nn.ModuleList(
            attention(c, cfg.connector_dim) for c in reversed(attn_channels) for _ in range(n + 1))

    def time_embed(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.time_embedding(self.time_proj(t).to(dtype))

    def environment(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.env_encoder(x, self.time_embed(t, x.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                env: torch.Tensor | None = None) -> torch.Tensor:
        """eps prediction for latent x [B, 768] at timesteps t [B], context [B,1,768]."""
        cfg, n = self.config, self.config.layers_per_block
        temb = self.time_embed(t, x.dtype)
        resnets, attentions = iter(self.down_resnets), iter(self.down_attentions)
        connectors = iter(self.down_connectors)

        ckpt = self.gradient_checkpointing

        def resnet_step(resnet, h):
            return run_block(ckpt, resnet, h, temb)

        def attend(h, has_attention, module=None, ctx=None):
            if not has_attention:
                return h
            module = module if module is not None else next(attentions)
            return run_block(ckpt, module, h, encoder_hidden_states=context if ctx is None else ctx,
                             return_dict=False)[0]

        def connect(h, has_connector):
            if env is None or not has_connector:
                return h
            return attend(h, True, next(connectors), env)

        h = self.linear_in(x).view(x.shape[0], cfg.block_out_channels[0], TOKENS, 1)
        skips = [h]
        levels = len(cfg.block_out_channels)
        for level in range(levels):
            with_attention = level < cfg.attention_levels
            for _ in range(n):
                h = connect(attend(resnet_step(next(resnets), h), with_attention), with_attention)
                skips.append(h)
            if level < levels - 1:
                h = _apply(self.downsamplers[level], h)
                skips.append(h)
        h = resnet_step(self.mid_resnets[0], h)
        h = attend(h, True, self.mid_attention)
        h = resnet_step(self.mid_resnets[1], h)
        skips = decoder_skips(skips, h, cfg.skip_mode)
        resnets, attentions, connectors = iter(self.up_resnets), iter(self.up_attentions), iter(self.up_connectors)
        for i, level in enumerate(reversed(range(levels))):
            with_attention = level < cfg.attention_levels
            for j in range(n + 1):
                h = attend(resnet_step(next(resnets), torch.cat([h, skips.pop()], dim=1)), with_attention)
                if j < n:
                    h = connect(h, with_attention)
            if level > 0:
                h = _apply(self.upsamplers[i], h)
            h = connect(h, with_attention)
        return self.linear_out(self.norm_out(h).flatten(1))
