"""`xgem-dist sample`: one combination (e.g. 'T->F+L') for given inputs or for studies of a shard split.

Writes <key>__<combination>__<output>.png per generated view (8-bit grayscale) and .txt per generated
report. Each item draws from its own generator, seeded from (seed, key, combination, replica), so the same
seed gives byte-identical files whatever else is in the batch, and on any device.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.decode import PILDecoder
from ..model.sample import Sampler, SamplerConfig, parse_combination
from ..model.tokenizers import Tokenizers
from ..model.xgem import XGeM
from .load import load_model
from .studies import Studies, to_uint8

FLAG = {"text": "--report", "frontal": "--frontal", "lateral": "--lateral"}


def item_generators(seed: int, keys: list[str], combination: str, replica: int = 0) -> list[torch.Generator]:
    """A CPU generator per item (draws on the CPU are the same on every machine; they are moved to the model)."""
    out = []
    for key in keys:
        digest = hashlib.sha256(f"{key}\0{combination}\0{replica}".encode()).digest()
        words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
        state = np.random.SeedSequence([seed, *words]).generate_state(2, np.uint32)
        out.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return out


def make_sampler(model: XGeM, tokenizers: Tokenizers, steps: int, guidance: float, image_size: int = 0,
                 max_report_tokens: int = 100) -> Sampler:
    """image_size 0: the size the model's VAE was configured for."""
    size = image_size or model.config.vae.sample_size
    return Sampler(model, tokenizers, SamplerConfig(steps=steps, guidance=guidance, image_size=size,
                                                    max_report_tokens=max_report_tokens))


def generate(sampler: Sampler, combination: str, inputs: dict, keys: list[str], seed: int,
             replica: int = 0) -> dict[str, list]:
    """The combination's outputs for a batch: reports as str, views as [H, W] uint8 arrays."""
    given, wanted = parse_combination(combination)
    out = sampler({m: inputs[m] for m in given}, wanted, generator=item_generators(seed, keys, combination, replica))
    return {m: list(out[m]) if m == "text" else list(to_uint8(out[m])) for m in wanted}


def combination_slug(combination: str) -> str:
    return combination.replace("->", "-to-")


def write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def png_bytes(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _given_inputs(combination: str, report: str | None, frontal: str | None, lateral: str | None,
                  image_size: int) -> dict:
    """The inputs given on the command line, checked against the combination's."""
    given, _ = parse_combination(combination)
    values = {"text": report, "frontal": frontal, "lateral": lateral}
    extra = [FLAG[m] for m, v in values.items() if v is not None and m not in given]
    missing = [FLAG[m] for m in given if values[m] is None]
    if extra or missing:
        raise ValueError(f"{combination} takes {', '.join(FLAG[m] for m in given)}"
                         + (f"; missing {', '.join(missing)}" if missing else "")
                         + (f"; not used: {', '.join(extra)}" if extra else ""))
    inputs: dict = {}
    if report is not None:
        path = Path(report)
        inputs["text"] = [path.read_text() if path.is_file() else report]
    decoder = PILDecoder(image_size, threads=1)
    for view in ("frontal", "lateral"):
        if values[view] is not None:
            path = Path(values[view])
            if not path.is_file():
                raise ValueError(f"{FLAG[view]} {path}: no such file")
            images, present = decoder([path.read_bytes()])
            if not bool(present[0]):
                raise ValueError(f"{FLAG[view]} {path}: not a readable JPEG")
            inputs[view] = images
    return inputs


def _shard_inputs(combination: str, studies: Studies, keys: list[str]) -> dict:
    given, _ = parse_combination(combination)
    lacking = [f"{k} has no {m}" for k in keys if k in studies.by_key for m in given if not studies.has(k, m)]
    if lacking:
        raise ValueError(f"{combination} needs {', '.join(given)}: {'; '.join(lacking[:5])}")
    batch = studies.read(keys)
    return {m: batch[m] for m in given}


def sample_to_files(model: str | Path, combination: str, out: str | Path, *, report: str | None = None,
                    frontal: str | None = None, lateral: str | None = None, shards: str | None = None,
                    keys: list[str] | None = None, split: str = "test", steps: int = 50, guidance: float = 7.5,
                    seed: int = 0, image_size: int = 0, device: str = "cpu", dtype: str = "fp32",
                    ema: bool = False, batch_size: int = 8, max_report_tokens: int = 100) -> list[Path]:
    """Generates `combination` for the given inputs (report: text or a file; frontal/lateral: JPEG files) or
    for the studies `keys` of `shards`/`split`, and returns the files written into `out`."""
    parse_combination(combination)
    if shards is not None and (report or frontal or lateral):
        raise ValueError("give the inputs either from --from-shards (with --keys) or as --report/--frontal/--lateral")
    if shards is not None and not keys:
        raise ValueError("--from-shards needs --keys k1,k2,...")
    loaded, tokenizers = load_model(model, ema=ema, device=device, dtype=dtype)
    sampler = make_sampler(loaded, tokenizers, steps, guidance, image_size, max_report_tokens)
    size = sampler.cfg.image_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if shards is None:
        batches = [(["input"], _given_inputs(combination, report, frontal, lateral, size))]
    else:
        studies = Studies(shards, split, size)
        batches = [(keys[i : i + batch_size], _shard_inputs(combination, studies, keys[i : i + batch_size]))
                   for i in range(0, len(keys), batch_size)]
    written = []
    for batch_keys, inputs in batches:
        results = generate(sampler, combination, inputs, batch_keys, seed)
        for modality, values in results.items():
            for key, value in zip(batch_keys, values):
                stem = f"{key}__{combination_slug(combination)}__{modality}"
                path = out / (f"{stem}.txt" if modality == "text" else f"{stem}.png")
                write_atomic(path, value.encode() if modality == "text" else png_bytes(value))
                written.append(path)
    return written
