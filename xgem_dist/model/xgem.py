"""The XGeM components assembled, and the presets. Knows nothing of DeepSpeed or Ray.

Presets: `xgem` is the released model (6,675,152,326 parameters): its layout, including the temporal
("video") blocks that are the identity on images, and its function (`skip_mode="released"`,
`wiring="released"`), so converted released weights compute what they were trained to compute.
`xgem-lean` leaves the temporal blocks out (5,112,897,456) and is the design for training from scratch
(the standard U-Net skips, the paper's wiring); `tiny` is that design in under 5M parameters for CPU tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .encoders import CLIPTowersConfig, VAEConfig, build_clip, build_vae
from .image_unet import ImageUNet, ImageUNetConfig
from .optimus import Optimus, OptimusConfig
from .text_unet import TextUNet, TextUNetConfig

WIRINGS = ("paper", "released")


def check_wiring(wiring: str) -> str:
    if wiring not in WIRINGS:
        raise ValueError(f"wiring must be one of {WIRINGS}, got {wiring!r}")
    return wiring


@dataclass(frozen=True)
class XGeMConfig:
    image_unet: ImageUNetConfig = field(default_factory=ImageUNetConfig)
    text_unet: TextUNetConfig = field(default_factory=TextUNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    optimus: OptimusConfig = field(default_factory=OptimusConfig)
    clip: CLIPTowersConfig = field(default_factory=CLIPTowersConfig)
    # joint generation: each stream's connectors attend to the other stream's environment vector ("paper")
    # or to their own ("released", how the released connectors were trained)
    wiring: str = "paper"

    def __post_init__(self):
        check_wiring(self.wiring)


def released_function(cfg: XGeMConfig) -> XGeMConfig:
    """cfg computing what the released code computes: its UNet skips and its wiring."""
    return dataclasses.replace(cfg, image_unet=dataclasses.replace(cfg.image_unet, skip_mode="released"),
                               text_unet=dataclasses.replace(cfg.text_unet, skip_mode="released"), wiring="released")


_TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
PRESETS: dict[str, XGeMConfig] = {
    "xgem": released_function(XGeMConfig(image_unet=ImageUNetConfig(temporal=True), vae=VAEConfig(temporal=True),
                                         clip=CLIPTowersConfig(temporal=True))),
    "xgem-lean": XGeMConfig(),
    "tiny": XGeMConfig(
        image_unet=ImageUNetConfig(block_out_channels=(16, 32, 32, 32), num_heads=2, context_dim=32,
                                   connector_dim=48, norm_num_groups=8, env_base_channels=8),
        text_unet=TextUNetConfig(latent_dim=32, block_out_channels=(16, 16, 32, 32), num_heads=2, context_dim=32,
                                 connector_dim=48, norm_num_groups=8, env_base_channels=8),
        vae=VAEConfig(block_out_channels=(16, 32, 32), norm_num_groups=8, sample_size=64),
        optimus=OptimusConfig(
            latent_dim=32,
            bert=_TINY_TEXT | {"vocab_size": 512, "max_position_embeddings": 128},
            gpt2={"vocab_size": 515, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128,
                  "pad_token_id": 512, "bos_token_id": 513, "eos_token_id": 514}),
        clip=CLIPTowersConfig(
            text=_TINY_TEXT | {"vocab_size": 512, "max_position_embeddings": 77, "bos_token_id": 510,
                               "eos_token_id": 511},
            vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "image_size": 64, "patch_size": 8},
            projection_dim=32),
    ),
}


InitContext = Callable[[], contextlib.AbstractContextManager]


class XGeM(nn.Module):
    """frontal and lateral image UNets, the text UNet, the image VAE, Optimus and CLIP.

    init_context makes a fresh context (e.g. `lambda: deepspeed.zero.Init(...)`) that wraps the
    construction of our and diffusers' modules; transformers' BERT and GPT-2 are built through
    `_from_config`, which partitions them itself (and initialises them correctly) when ZeRO-3 is
    configured for transformers (HfDeepSpeedConfig); CLIP: see build_clip."""

    def __init__(self, cfg: XGeMConfig, init_context: InitContext | None = None, without: tuple[str, ...] = ()):
        super().__init__()
        self.config = cfg
        unknown = set(without) - {"vae", "optimus", "clip"}
        if unknown:
            raise ValueError(f"only the encoders (vae, optimus, clip) can be left out, not {sorted(unknown)}")
        with init_context() if init_context else contextlib.nullcontext():
            self.unet_frontal = ImageUNet(cfg.image_unet)
            self.unet_lateral = ImageUNet(cfg.image_unet)
            self.unet_text = TextUNet(cfg.text_unet)
            self.vae = None if "vae" in without else build_vae(cfg.vae)
        self.optimus = None if "optimus" in without else Optimus(cfg.optimus, init_context)
        self.clip = None if "clip" in without else build_clip(cfg.clip, init_context)


def build_xgem(preset: str | XGeMConfig, device: str | torch.device | None = None,
               init_context: InitContext | None = None, without: tuple[str, ...] = ()) -> XGeM:
    """Builds a preset. device="meta" allocates nothing; init_context: see XGeM; without: encoders not built
    (a run whose conditioning is precomputed never runs them)."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    with torch.device(device) if device else contextlib.nullcontext():
        return XGeM(cfg, init_context, without)


def computes_differently(a: XGeMConfig, b: XGeMConfig) -> list[str]:
    """The settings in which two configurations of the same weights compute different functions (for a
    resume or an initialisation that must not switch them)."""
    pairs = {"image_unet.skip_mode": (a.image_unet.skip_mode, b.image_unet.skip_mode),
             "text_unet.skip_mode": (a.text_unet.skip_mode, b.text_unet.skip_mode), "wiring": (a.wiring, b.wiring)}
    return [f"{name}: {x!r} vs {y!r}" for name, (x, y) in pairs.items() if x != y]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Unique parameters per top-level component, and the total (tied weights counted once)."""
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts
