"""Weights into a training run (`init_from`, before deepspeed.initialize), frozen parameters back after a
world-size-changing resume, and weights out of a run (`xgem-dist export`).

Everything moves one tensor at a time (safetensors `safe_open`, checkpoints read through mmap), so no
rank ever holds a full copy of the model. Under ZeRO-3 a rank writes only its own partition.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import ModelMixin
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedModel

from ..model.export import config_from_dict, config_to_dict
from ..model.xgem import PRESETS, XGeMConfig, build_xgem, computes_differently, released_function
from .checkpoint import STATE
from .ema import EMAReader
from .zero_checkpoint import ZeroCheckpoint, newest_checkpoint

log = logging.getLogger(__name__)
COMPONENTS = ("unet_frontal", "unet_lateral", "unet_text", "vae", "optimus", "clip")
_IMAGE_UNETS = ("unet_frontal", "unet_lateral")
# the components each function-changing setting (computes_differently) concerns
_CONCERNS = {"image_unet.skip_mode": _IMAGE_UNETS, "text_unet.skip_mode": ("unet_text",),
             "wiring": (*_IMAGE_UNETS, "unet_text")}
_ENGINE_PREFIX = "model."  # engine.module is the TrainingTask; the XGeM is its `model`
TIED_GPT2 = ("optimus.decoder.transformer.wte.weight", "optimus.decoder.lm_head.weight")


def parse_init_from(spec: str) -> dict[str, Path]:
    """component -> the folder holding its weights. `spec`: a component-folder layout (save_components,
    convert-released, export) and/or `component=path` pairs, comma-separated; a bare folder (first) fills
    the components not named. A pair's path may be the component's own folder or a whole layout."""
    named: dict[str, Path] = {}
    base = None
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        component, sep, path = item.partition("=")
        if not sep:
            if base is not None or named:
                raise ValueError(f"init_from: a bare folder may only come first, once; got {spec!r}")
            base = Path(item)
            continue
        component, path = component.strip(), Path(path.strip())
        if component not in COMPONENTS:
            raise ValueError(f"init_from: unknown component {component!r}; valid: {', '.join(COMPONENTS)}")
        if component in named:
            raise ValueError(f"init_from: {component} is named twice")
        whole_layout = (path / "xgem_config.json").exists() and (path / component).is_dir()
        named[component] = path / component if whole_layout else path
    if base is not None:
        for component in COMPONENTS:
            named.setdefault(component, base / component)
    return {c: named[c] for c in COMPONENTS if c in named}


def check_computes_alike(sources: dict[str, Path], cfg: XGeMConfig) -> None:
    """Refuses a source whose xgem_config.json (beside its component folder) computes differently from cfg
    in a setting that concerns that component (e.g. a released conversion's UNets for `tiny`)."""
    for component, folder in sources.items():
        file = folder.parent / "xgem_config.json"
        if not file.exists():
            continue
        theirs = config_from_dict(json.loads(file.read_text()))
        relevant = [d for d in computes_differently(theirs, cfg) if component in _CONCERNS[d.split(":")[0]]]
        if relevant:
            raise ValueError(f"init_from {component}={folder}: {file} was trained for another function than the "
                             f"model being trained ({'; '.join(relevant)}); initialise from weights of the same "
                             "function (skip_mode, wiring) or train the model those settings describe")


class ComponentSource:
    """One component's tensors in a folder of safetensors files (one file or an index of shards), named as
    the component's state_dict names them. A diffusers UNet2DConditionModel folder given for an image UNet
    fills its `unet.` part."""

    def __init__(self, component: str, folder: Path):
        self.component, self.folder = component, Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"init_from {component}: {self.folder} is not a folder")
        index = sorted(self.folder.glob("*.safetensors.index.json"))
        files = sorted(self.folder.glob("*.safetensors"))
        if index:
            keys = {k: self.folder / f for k, f in json.loads(index[0].read_text())["weight_map"].items()}
        elif len(files) == 1:
            with safe_open(str(files[0]), framework="pt") as f:
                keys = dict.fromkeys(f.keys(), files[0])
        else:
            raise ValueError(f"init_from {component}: {self.folder} should hold one .safetensors file (or a "
                             f"*.safetensors.index.json), found {[f.name for f in files]}")
        config = self.folder / "config.json"
        diffusers_unet = (component in _IMAGE_UNETS and config.exists()
                          and json.loads(config.read_text()).get("_class_name") == "UNet2DConditionModel")
        self.prefix = "unet." if diffusers_unet else ""
        self._keys = {self.prefix + k: (path, k) for k, path in keys.items()}
        self._open: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._keys

    def names(self) -> list[str]:
        return list(self._keys)

    def _handle(self, name: str):
        path, key = self._keys[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[path], key

    def shape(self, name: str) -> tuple[int, ...]:
        handle, key = self._handle(name)
        return tuple(handle.get_slice(key).get_shape())

    def get(self, name: str) -> torch.Tensor:
        handle, key = self._handle(name)
        return handle.get_tensor(key)


def model_tensors(module: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, tuple[str, ...]]], set[str]]:
    """(name -> (parameter or persistent buffer, all names it goes by), names of non-persistent buffers).
    A tied tensor appears once, under the first of its names."""
    groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), (param, []))[1].append(name)
    transient = set()
    for prefix, sub in module.named_modules():
        for name, buffer in sub._buffers.items():
            full = f"{prefix}.{name}" if prefix else name
            if name in sub._non_persistent_buffers_set:
                transient.add(full)
            elif buffer is not None:
                groups.setdefault(id(buffer), (buffer, []))[1].append(full)
    return {names[0]: (tensor, tuple(names)) for tensor, names in groups.values()}, transient


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def _listed(names: list[str]) -> str:
    return f"{len(names)} {names[:10]}{' ...' if len(names) > 10 else ''}"


def match_strictly(module: nn.Module, source: ComponentSource) -> dict[str, tuple[torch.Tensor, str]]:
    """model tensor name -> (the tensor, its name in the source) for every tensor under source.prefix; a
    ValueError naming the missing, unexpected and wrongly shaped tensors otherwise."""
    tensors, transient = model_tensors(module)
    chosen, missing, wrong, used = {}, [], [], set()
    for canonical, (tensor, names) in tensors.items():
        if not canonical.startswith(source.prefix):
            continue
        present = [n for n in names if n in source]
        if not present:
            missing.append(canonical)
            continue
        used.update(present)
        if source.shape(present[0]) != _shape(tensor):
            wrong.append(f"{present[0]}: {source.shape(present[0])} in the file, {_shape(tensor)} in the model")
        chosen[canonical] = (tensor, present[0])
    unexpected = [n for n in source.names() if n not in used and n not in transient]
    if missing or unexpected or wrong:
        raise ValueError(f"init_from {source.component}: {source.folder} does not fit the model: missing "
                         f"{_listed(missing)}; unexpected {_listed(unexpected)}; wrong shape {_listed(wrong)}")
    return chosen


def assign(param: torch.Tensor, read: Callable[[int, int], torch.Tensor], rank: int, world_size: int) -> None:
    """Writes a tensor given by `read(start, end)` (its flat elements) into `param`: under ZeRO-3 only this
    rank's partition (elements [rank*p, (rank+1)*p), p = ceil(numel/world), zero padded)."""
    with torch.no_grad():
        if not hasattr(param, "ds_tensor"):
            param.data.copy_(read(0, param.numel()).view_as(param.data))
            return
        numel, part = param.ds_numel, param.ds_tensor.data.view(-1)
        if part.numel() != -(-numel // world_size):
            raise ValueError(f"a partition of {part.numel()} elements of a {numel}-element parameter is not "
                             f"1/{world_size} of it: partitioned over another group than the world")
        start = min(rank * part.numel(), numel)
        end = min(start + part.numel(), numel)
        part[end - start :].zero_()
        part[: end - start].copy_(read(start, end))
        if param.data.numel() == numel:  # gathered right now (a persistent small parameter): keep it in step
            param.data.copy_(read(0, numel).view_as(param.data))


def load_init_weights(model: nn.Module, spec: str, rank: int, world_size: int) -> None:
    """Loads every component `spec` names (see parse_init_from) strictly into the freshly built model, before
    deepspeed.initialize, so the optimizer's fp32 master copy starts from these weights."""
    sources = parse_init_from(spec)
    check_computes_alike(sources, model.config)
    for component, folder in sources.items():
        module = getattr(model, component)
        if module is None:  # not built: a run with precomputed conditioning
            continue
        source = ComponentSource(component, folder)
        chosen = match_strictly(module, source)
        if source.prefix and rank == 0:
            log.warning("init_from %s: %s is a diffusers UNet2DConditionModel; it fills %s.unet, the environment "
                        "encoder and connectors keep their initialisation", component, folder, component)
        for param, name in tqdm(chosen.values(), desc=f"init {component}", unit="tensor", disable=rank != 0):
            flat = source.get(name).reshape(-1)
            assign(param, lambda start, end, flat=flat: flat[start:end], rank, world_size)


def restore_frozen(engine, checkpoint_folder: str | Path) -> None:
    """After a world-size-changing (universal) load, which restores only optimizer-owned parameters: every
    frozen parameter reassembled from the saved ranks' frozen_param_fragments, this rank's partition."""
    checkpoint = ZeroCheckpoint(checkpoint_folder)
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    frozen = [(name, p) for name, p in engine.module.named_parameters() if not p.requires_grad]
    missing = [name for name, _ in frozen if name not in checkpoint.frozen_shapes]
    if missing:
        raise ValueError(f"{checkpoint.folder}: the checkpoint holds no frozen_param_fragments for "
                         f"{_listed(missing)}; it cannot be resumed on another world size")
    for name, param in frozen:
        if tuple(checkpoint.shape(name)) != _shape(param):
            raise ValueError(f"{checkpoint.folder}: {name} is {tuple(checkpoint.shape(name))} in the checkpoint, "
                             f"{_shape(param)} in the model")
        assign(param, lambda start, end, name=name: checkpoint.read(name, start, end), rank, world_size)


# ---- export

def releasable(cfg: XGeMConfig) -> bool:
    """Whether cfg has the released model's layout (temporal blocks) and function, so to_released applies."""
    temporal = cfg.image_unet.temporal and cfg.vae.temporal and cfg.clip.temporal
    return temporal and not computes_differently(cfg, released_function(cfg))


def export(src: str | Path, out: str | Path, dtype: str = "fp32", released: bool = False, ema: bool = False) -> Path:
    """The newest complete checkpoint under `src` -> `out` in the save_components layout (vae/ and clip/
    loadable by diffusers / transformers) with the run's tokenizers/. Trainable tensors: the fp32 master weights
    (with `ema`, their EMA). Frozen ones: from the run's init_from source where it still holds them unchanged
    (bit-identical to what the stage was given, also after bf16 training), else from the checkpoint. With
    `released`, also xgem_released.pt."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; remove it or export elsewhere")
    folder = newest_checkpoint(src)
    state = json.loads((folder / STATE).read_text())
    cfg = config_from_dict(state["model_config"]) if "model_config" in state else PRESETS[state["config"]["model"]]
    if released and not releasable(cfg):
        raise ValueError("--released needs a model with the released layout and function (the xgem preset); "
                         f"{folder} trained {state['config']['model']!r}")
    init_from = state["config"].get("init_from", "")
    sources = {c: p for c, p in parse_init_from(init_from).items() if p.is_dir()} if init_from else {}
    checkpoint = ZeroCheckpoint(folder)
    averages = EMAReader(folder) if ema else None
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "xgem_config.json").write_text(json.dumps(config_to_dict(cfg), indent=1))
    for component, module in build_xgem(cfg, device="meta").named_children():
        source = ComponentSource(component, sources[component]) if component in sources else None
        tensors = _component_tensors(component, module, checkpoint, source, dtypes[dtype], averages)
        _write_component(partial / component, module, tensors)
        del tensors
    if (folder / "tokenizers").is_dir():
        shutil.copytree(folder / "tokenizers", partial / "tokenizers")
    if released:
        torch.save({"state_dict": released_state(partial, cfg)}, partial / "xgem_released.pt")
    os.replace(partial, out)
    return out


def _component_tensors(component: str, module: nn.Module, checkpoint: ZeroCheckpoint,
                       source: ComponentSource | None, dtype: torch.dtype,
                       averages: EMAReader | None = None) -> dict[str, torch.Tensor]:
    tensors, _ = model_tensors(module)
    if not any(name.startswith(f"{_ENGINE_PREFIX}{component}.") for name in checkpoint.names()):
        # a run with precomputed conditioning does not build its frozen encoders: they are its init_from's
        if source is None:
            raise ValueError(f"{checkpoint.folder}: no {component} in the checkpoint (the run did not build it) "
                             f"and no init_from folder of the run holds it")
        return {canonical: _cast(source.get(name), dtype) for canonical, (_, name) in
                match_strictly(module, source).items()}
    out, stale = {}, []
    for canonical, (tensor, names) in tqdm(tensors.items(), desc=f"export {component}", unit="tensor"):
        saved = next((n for n in (f"{_ENGINE_PREFIX}{component}.{a}" for a in names) if n in checkpoint),
                     None)
        if saved is None:
            raise ValueError(f"{checkpoint.folder}: no parameter {component}.{canonical} in the checkpoint")
        value = checkpoint.full(saved)
        if averages is not None and checkpoint.is_trainable(saved):
            value = averages.read(saved).reshape(value.shape)
        given = next((n for n in names if source is not None and n in source), None)
        if not checkpoint.is_trainable(saved) and given is not None:
            original = source.get(given)
            # the engine's frozen copy is the source, rounded to the training dtype: else the source changed
            if original.shape == value.shape and torch.equal(original.to(value.dtype), value):
                value = original
            else:
                stale.append(canonical)
        if tuple(value.shape) != _shape(tensor):
            raise ValueError(f"{checkpoint.folder}: {saved} is {tuple(value.shape)}, the model's {_shape(tensor)}")
        out[canonical] = _cast(value, dtype)
    if stale:
        log.warning("export %s: %s no longer holds what the run was given for %s; those come from the checkpoint",
                    component, source.folder, _listed(stale))
    return out


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (value.to(dtype) if value.is_floating_point() else value).contiguous()


def _write_component(folder: Path, module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir()
    filename = "model.safetensors"
    if isinstance(module, ModelMixin):
        module.save_config(folder)
        filename = "diffusion_pytorch_model.safetensors"
    elif isinstance(module, PreTrainedModel):
        module.config.save_pretrained(folder)
    save_file(tensors, str(folder / filename), metadata={"format": "pt"})


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


def mapped_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors backed by its pages (read when used), so torch.save streams them."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        start = f.tell()
    header.pop("__metadata__", None)
    data = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=os.path.getsize(path))
    flat = torch.empty(0, dtype=torch.uint8).set_(data)
    return {name: flat[start + lo : start + hi].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
            for name, info in header.items() for lo, hi in [info["data_offsets"]]}


def released_state(folder: Path, cfg: XGeMConfig) -> dict[str, torch.Tensor]:
    """An exported folder's tensors under the released names (convert.to_released), file-backed."""
    from ..model.convert import to_released

    ours = {}
    for component in COMPONENTS:
        (path,) = sorted((folder / component).glob("*.safetensors"))
        ours |= {f"{component}.{k}": v for k, v in mapped_safetensors(path).items()}
    tied = next(ours[n] for n in TIED_GPT2 if n in ours)
    ours |= dict.fromkeys(TIED_GPT2, tied)
    return to_released(ours, cfg)
