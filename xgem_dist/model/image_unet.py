"""XGeM's image UNet: the SD-1.5 UNet (diffusers) plus the joint-generation connectors.

Connectors (XGeM / CoDi): an environment encoder maps the stream's noisy latent x_t to one
L2-normalised vector; connector cross-attention blocks after every resnet+attention layer of the
three attention levels (6 on the way down, 9 on the way up, after the upsample where a level ends
with one) attend to an environment vector. Single-stream denoising passes no vector and skips them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from .norm import GroupNorm
from .temporal import SpatioTemporalBlock


@dataclass(frozen=True)
class ImageUNetConfig:
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: int = 3  # levels 0..n-1 have attention and connectors; the last level has neither
    layers_per_block: int = 2
    num_heads: int = 8
    context_dim: int = 768  # CLIP projection: one conditioning token
    connector_dim: int = 1280  # environment vector size
    norm_num_groups: int = 32
    env_base_channels: int = 160  # environment encoder's first conv
    temporal: bool = False  # the released layout's temporal blocks after every resnet (identity on images)
    skip_mode: str = "standard"  # or "released": see SKIP_MODES


SKIP_MODES = {
    "standard": "each decoder block concatenates the skip of its mirror encoder block",
    "released": "as the released UNetMedCoDi_M.forward computes (and its weights were trained): the first decoder "
                "block concatenates the middle block's output with itself; the last encoder block's skip is unused",
}


def check_skip_mode(mode: str) -> str:
    if mode not in SKIP_MODES:
        raise ValueError(f"skip_mode must be one of {sorted(SKIP_MODES)}, got {mode!r}")
    return mode


def decoder_skips(skips: list, middle_output, mode: str) -> list:
    """The skips the decoder pops, last first."""
    return skips[:-1] + [middle_output] if mode == "released" else skips


def run_block(checkpointing: bool, module: nn.Module, *args, **kwargs):
    """module(*args, **kwargs), recomputed in the backward pass when activation checkpointing is on."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(functools.partial(module, **kwargs), *args, use_reentrant=False)
    return module(*args, **kwargs)


def connector_block(channels: int, cfg: ImageUNetConfig) -> Transformer2DModel:
    return Transformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=channels // cfg.num_heads,
                              in_channels=channels, cross_attention_dim=cfg.connector_dim,
                              norm_num_groups=cfg.norm_num_groups)


def temporal_blocks(channels, cfg: ImageUNetConfig) -> nn.ModuleList | None:
    if not cfg.temporal:
        return None
    return nn.ModuleList(SpatioTemporalBlock(c, cfg.num_heads, groups=cfg.norm_num_groups) for c in channels)


class ImageEnvironmentEncoder(nn.Module):
    """conv -> [resnet (-> downsample)] per attention level -> GroupNorm, SiLU, conv -> spatial mean."""

    def __init__(self, cfg: ImageUNetConfig, temb_dim: int):
        super().__init__()
        channels = cfg.block_out_channels[: cfg.attention_levels]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cfg.env_base_channels, 3, padding=1)
        self.resnets, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        previous = cfg.env_base_channels
        for i, c in enumerate(channels):
            self.resnets.append(ResnetBlock2D(in_channels=previous, out_channels=c, temb_channels=temb_dim,
                                              groups=cfg.norm_num_groups, eps=1e-5))  # as released
            if i < len(channels) - 1:
                self.downsamplers.append(Downsample2D(c, use_conv=True, padding=1, name="op"))
            previous = c
        self.norm_out = GroupNorm(cfg.norm_num_groups, previous, silu=True)
        self.conv_out = nn.Conv2d(previous, cfg.connector_dim, 3, padding=1)
        self.temporal = temporal_blocks(channels, cfg)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.temporal is not None:
                h = self.temporal[i](h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        h = self.conv_out(self.norm_out(h))
        return F.normalize(h.mean(dim=(2, 3)), dim=-1).unsqueeze(1)  # [B, 1, connector_dim]


class ImageUNet(nn.Module):
    def __init__(self, cfg: ImageUNetConfig = ImageUNetConfig()):
        super().__init__()
        check_skip_mode(cfg.skip_mode)
        self.config = cfg
        self.gradient_checkpointing = False
        n_attn, levels = cfg.attention_levels, len(cfg.block_out_channels)
        self.unet = UNet2DConditionModel(
            in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            down_block_types=("CrossAttnDownBlock2D",) * n_attn + ("DownBlock2D",) * (levels - n_attn),
            up_block_types=("UpBlock2D",) * (levels - n_attn) + ("CrossAttnUpBlock2D",) * n_attn,
            cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads, norm_num_groups=cfg.norm_num_groups,
        )
        temb_dim = cfg.block_out_channels[0] * 4
        self.env_encoder = ImageEnvironmentEncoder(cfg, temb_dim)
        attn_channels = cfg.block_out_channels[:n_attn]
        self.down_connectors = nn.ModuleList(
            connector_block(c, cfg) for c in attn_channels for _ in range(cfg.layers_per_block))
        self.up_connectors = nn.ModuleList(
            connector_block(c, cfg) for c in reversed(attn_channels) for _ in range(cfg.layers_per_block + 1))
        chans = cfg.block_out_channels
        self.temporal_down = temporal_blocks([c for c in chans for _ in range(cfg.layers_per_block)], cfg)
        self.temporal_mid = temporal_blocks([chans[-1]] * 2, cfg)
        self.temporal_up = temporal_blocks([c for c in reversed(chans) for _ in range(cfg.layers_per_block + 1)], cfg)

    def time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.unet.time_embedding(self.unet.time_proj(t).to(dtype))

    def environment(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The stream's environment vector from its noisy latent: [B, 1, connector_dim], unit norm."""
        return self.env_encoder(x, self.time_embedding(t, x.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                env: torch.Tensor | None = None) -> torch.Tensor:
        """eps prediction for latent x [B,4,h,w] at timesteps t [B], context [B,1,768]; connectors attend to env."""
        unet = self.unet
        temb = self.time_embedding(t, x.dtype)
        down, up = iter(self.down_connectors), iter(self.up_connectors)
        temporal = iter(
            [*self.temporal_down, *self.temporal_mid, *self.temporal_up] if self.config.temporal else [])

        ckpt = self.gradient_checkpointing

        def resnet_step(resnet, h: torch.Tensor) -> torch.Tensor:
            h = run_block(ckpt, resnet, h, temb)
            return next(temporal)(h) if self.config.temporal else h

        def attend(attention, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
            return run_block(ckpt, attention, h, encoder_hidden_states=ctx, return_dict=False)[0]

        def connect(h: torch.Tensor, has_connector: bool, connectors) -> torch.Tensor:
            if env is None or not has_connector:
                return h
            return attend(next(connectors), h, env)

        h = unet.conv_in(x)
        skips = [h]
        for level, block in enumerate(unet.down_blocks):
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = resnet_step(resnet, h)
                if attentions is not None:
                    h = attend(attentions[j], h, context)
                h = connect(h, attentions is not None, down)
                skips.append(h)
            if block.downsamplers is not None:
                h = block.downsamplers[0](h)
                skips.append(h)
        mid = unet.mid_block
        h = resnet_step(mid.resnets[0], h)
        h = attend(mid.attentions[0], h, context)
        h = resnet_step(mid.resnets[1], h)
        skips = decoder_skips(skips, h, self.config.skip_mode)
        for block in unet.up_blocks:
            attentions = getattr(block, "attentions", None)
            last = len(block.resnets) - 1
            for j, resnet in enumerate(block.resnets):
                h = resnet_step(resnet, torch.cat([h, skips.pop()], dim=1))
                if attentions is not None:
                    h = attend(attentions[j], h, context)
                if j < last:
                    h = connect(h, attentions is not None, up)
            if block.upsamplers is not None:
                h = block.upsamplers[0](h)
            h = connect(h, attentions is not None, up)
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
