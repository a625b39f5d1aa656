"""Stage presets: which parameters a training stage updates. Everything else is frozen (requires_grad
False) and never reaches the optimizer. Temporal blocks never train: they are inert on images."""

from __future__ import annotations

from torch import nn

STAGES = {
    "clip": ("clip.",),
    "optimus": ("optimus.",),
    "frontal": ("unet_frontal.unet.",),
    "lateral": ("unet_lateral.unet.",),
    "text": ("unet_text.",),
    "joint-text": ("unet_text.env_encoder.", "unet_text.down_connectors.", "unet_text.up_connectors."),
    "joint-frontal": ("unet_frontal.env_encoder.", "unet_frontal.down_connectors.", "unet_frontal.up_connectors."),
    "joint-lateral": ("unet_lateral.env_encoder.", "unet_lateral.down_connectors.", "unet_lateral.up_connectors."),
}
# the text UNet's core excludes its connectors; the other prefixes above are already exact
_EXCLUDED = {"text": ("unet_text.env_encoder.", "unet_text.down_connectors.", "unet_text.up_connectors.")}


def is_trainable(name: str, stage: str) -> bool:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {sorted(STAGES)}")
    if "temporal" in name:
        return False
    return name.startswith(STAGES[stage]) and not name.startswith(_EXCLUDED.get(stage, ()))


def apply_stage(model: nn.Module, stage: str) -> list[tuple[str, nn.Parameter]]:
    """Sets requires_grad for the stage and returns the trainable (name, parameter) pairs."""
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, stage))
        if param.requires_grad:
            trainable.append((name, param))
    return trainable
