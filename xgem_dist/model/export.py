"""Save and load trained XGeM components as folders of safetensors files.

<folder>/xgem_config.json, then one folder per component: `vae` and `clip` in their libraries'
save_pretrained layout (loadable by diffusers / transformers directly), `unet_frontal`, `unet_lateral`,
`unet_text` and `optimus` as model.safetensors (their config is in xgem_config.json). Loading reads
safetensors only (no pickle).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import ModelMixin
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import PreTrainedModel

from .encoders import CLIPTowersConfig, VAEConfig
from .image_unet import ImageUNetConfig
from .optimus import OptimusConfig
from .text_unet import TextUNetConfig
from .xgem import XGeM, XGeMConfig, build_xgem

_COMPONENT_CONFIGS = {"image_unet": ImageUNetConfig, "text_unet": TextUNetConfig, "vae": VAEConfig,
                      "optimus": OptimusConfig, "clip": CLIPTowersConfig}


def config_to_dict(cfg: XGeMConfig) -> dict:
    return dataclasses.asdict(cfg)


def _checked(cls, values: dict) -> dict:
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def config_from_dict(data: dict) -> XGeMConfig:
    """Fields a file lacks take the dataclass defaults: files written before `skip_mode` and `wiring`
    existed load as "standard" and "paper", what the code that wrote them computed."""
    components = {name: cls(**_checked(cls, data[name])) for name, cls in _COMPONENT_CONFIGS.items()}
    settings = _checked(XGeMConfig, {k: v for k, v in data.items() if k not in _COMPONENT_CONFIGS})
    return XGeMConfig(**components, **settings)


def save_components(model: XGeM, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "xgem_config.json").write_text(json.dumps(config_to_dict(model.config), indent=1))
    for name, module in model.named_children():
        if isinstance(module, (ModelMixin, PreTrainedModel)):
            module.save_pretrained(folder / name, safe_serialization=True)
        else:
            (folder / name).mkdir(exist_ok=True)
            save_model(module, str(folder / name / "model.safetensors"))


def _weights_file(path: Path) -> Path:
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"{path}: expected one .safetensors file, found {[f.name for f in files]}")
    return files[0]


def load_components(folder: str | Path, device: str | torch.device = "cpu") -> XGeM:
    """Builds the saved configuration on `device` and loads every component strictly."""
    folder = Path(folder)
    cfg = config_from_dict(json.loads((folder / "xgem_config.json").read_text()))
    model = build_xgem(cfg, device=device)
    for name, module in model.named_children():
        path = _weights_file(folder / name)
        if isinstance(module, (ModelMixin, PreTrainedModel)):
            module.load_state_dict(load_file(path, device=str(device)), strict=True)
        else:
            load_model(module, path, strict=True, device=str(device))
    return model


def convert_released_checkpoint(checkpoint: str | Path, folder: str | Path,
                                preset: str | XGeMConfig = "xgem") -> dict[str, int]:
    """A released checkpoint file (torch.save of the state_dict, read with weights_only=True) -> a
    save_components folder, converted strictly, without building the model in memory. The folder's
    configuration computes as the released code (released_function), whatever `preset` says."""
    from .convert import from_released
    from .xgem import PRESETS, released_function

    cfg = released_function(PRESETS[preset] if isinstance(preset, str) else preset)
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    state = loaded.get("state_dict", loaded.get("model", loaded)) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{checkpoint}: expected a state_dict of tensors (or one under 'state_dict'/'model')")
    meta = build_xgem(cfg, device="meta")
    converted = from_released(state, cfg, {k: v.shape for k, v in meta.state_dict().items()})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "xgem_config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    counts = {}
    for name, module in meta.named_children():
        part = {k[len(name) + 1 :]: v.contiguous() for k, v in converted.items() if k.startswith(name + ".")}
        if name == "optimus":  # safetensors stores a tied tensor once; load_model re-ties it
            part.pop("decoder.lm_head.weight")
        (folder / name).mkdir(exist_ok=True)
        filename = "model.safetensors"
        if isinstance(module, ModelMixin):
            module.save_config(folder / name)
            filename = "diffusion_pytorch_model.safetensors"
        elif isinstance(module, PreTrainedModel):
            module.config.save_pretrained(folder / name)
        save_file(part, str(folder / name / filename))
        counts[name] = len(part)
    return counts
