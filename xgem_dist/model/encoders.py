"""The frozen-or-pretrained encoders: SD's kl-f8 AutoencoderKL (diffusers) and CLIP ViT-L/14 (transformers).

XGeM conditions on one token: the pooled, projected, L2-normalised CLIP embedding of a report or of
a view (1-channel images are repeated to 3 channels; one vision tower serves both views).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPConfig, CLIPModel

from .temporal import CLIPTemporalBlock, SpatioTemporalBlock

IMAGE_LATENT_SCALE = 0.18215


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 256
    temporal: bool = False  # the released decoder's frame-shift blocks (inert on images)


def build_vae(cfg: VAEConfig = VAEConfig()) -> AutoencoderKL:
    """SD's kl-f8 autoencoder. With cfg.temporal, decoder.temporal_blocks holds the released layout's
    frame-shift blocks, in its order: the mid block's, then 3 per level from the lowest resolution up
    (none at the highest); diffusers' decoder never calls them."""
    levels = len(cfg.block_out_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=cfg.block_out_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=2,
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                         sample_size=cfg.sample_size, scaling_factor=IMAGE_LATENT_SCALE)
    if cfg.temporal:
        channels = [cfg.block_out_channels[-1]] + [c for c in reversed(cfg.block_out_channels[1:]) for _ in range(3)]
        vae.decoder.temporal_blocks = nn.ModuleList(
            SpatioTemporalBlock(c, attention=False, groups=cfg.norm_num_groups) for c in channels)
    return vae


@dataclass(frozen=True)
class CLIPTowersConfig:
    text: dict | None = None  # CLIPTextConfig fields; None = ViT-L/14's text tower
    vision: dict | None = None  # CLIPVisionConfig fields; None = ViT-L/14
    projection_dim: int = 768
    temporal: bool = False  # the released vision tower's temporal blocks (inert on images)

    def to_transformers(self) -> CLIPConfig:
        text = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": self.projection_dim}
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "image_size": 224, "patch_size": 14, "projection_dim": self.projection_dim}
        return CLIPConfig(text_config=text | (self.text or {}), vision_config=vision | (self.vision or {}),
                          projection_dim=self.projection_dim)


def build_clip(cfg: CLIPTowersConfig = CLIPTowersConfig(), init_context=None) -> CLIPModel:
    """transformers' CLIPModel. With cfg.temporal every vision layer also holds `temporal_self_attn`,
    as in the released model; transformers' forward never calls it.

    CLIP is built whole even under ZeRO-3 (DeepSpeed then partitions it when the engine starts):
    DeepSpeed 0.19's zero.Init cannot gather a 0-dim parameter such as CLIP's logit_scale."""
    clip = CLIPModel(cfg.to_transformers())
    if cfg.temporal:
        vision = clip.config.vision_config
        with init_context() if init_context else contextlib.nullcontext():
            for layer in clip.vision_model.encoder.layers:
                layer.temporal_self_attn = CLIPTemporalBlock(vision.hidden_size, vision.num_attention_heads)
    return clip


def clip_text_token(clip: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """[B, 1, projection_dim], unit norm."""
    features = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    features = getattr(features, "pooler_output", features)
    return F.normalize(features, dim=-1).unsqueeze(1)


def clip_image_token(clip: CLIPModel, pixel_values: torch.Tensor):
    """pixel_values [B, 1 or 3, H, W], already CLIP-normalised; returns [B, 1, projection_dim], unit norm."""
    if pixel_values.shape[1] == 1:
        pixel_values = pixel_values.expand(-1, 3, -1, -1)
    features = clip.get_image_features(pixel_values=pixel_values)
    features = getattr(features, "pooler_output", features)
    return F.normalize(features, dim=-1).unsqueeze(1)
