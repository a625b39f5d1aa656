"""A MODEL path -> (XGeM, Tokenizers), ready for sampling.

MODEL is either an export folder (model/export.py's save_components layout plus `tokenizers/` in the
Tokenizers.save layout), or a run dir / checkpoint folder, exported into a temporary folder first.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..model.export import load_components
from ..model.tokenizers import Tokenizers, load_tokenizers
from ..model.xgem import XGeM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_export(path: Path) -> bool:
    return (path / "xgem_config.json").is_file()


def load_model(path: str | Path, ema: bool = False, device: str | torch.device = "cpu",
               dtype: str = "fp32") -> tuple[XGeM, Tokenizers]:
    """The model in eval mode on `device` in `dtype` ("fp32" | "bf16"), and its tokenizers."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such model (an export folder, a run dir or a checkpoint folder)")
    if is_export(path):
        if ema:
            raise ValueError(f"{path} is an export, which holds one set of weights; export the run with --ema "
                             "and pass that folder instead")
        return _load_export(path, device, dtype, path)
    from ..train.weights import export

    with tempfile.TemporaryDirectory(prefix="xgem-export-") as tmp:
        return _load_export(export(path, Path(tmp) / "model", ema=ema), device, dtype, path)


def _load_export(folder: Path, device: str | torch.device, dtype: str, source: Path) -> tuple[XGeM, Tokenizers]:
    try:
        tokenizers = load_tokenizers(folder / "tokenizers")
    except FileNotFoundError as e:
        exported = "" if folder == source else " (exported)"
        raise ValueError(f"{source}{exported}: no usable tokenizers/ folder ({e}); an export carries the tokenizers "
                         "it was trained with (Tokenizers.save layout: tokenizers/clip, tokenizers/bert, "
                         "tokenizers/gpt2)") from e
    model = load_components(folder, device=device).to(DTYPES[dtype]).eval()
    model.requires_grad_(False)
    return model, tokenizers
