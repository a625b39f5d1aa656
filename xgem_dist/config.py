"""Typed configuration: dataclasses filled from a YAML preset, then from CLI overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


@dataclasses.dataclass
class ShardConfig:
    """How `xgem-dist shard` turns a MIMIC-CXR-JPG tree into WebDataset shards."""

    images: str = ""  # root of MIMIC-CXR-JPG: holds files/ and the CSVs
    reports: str = ""  # root of the reports: holds files/pNN/p<subject>/s<study>.txt
    out: str = ""  # any fsspec URL: a local path, s3://bucket/prefix, ...
    metadata_csv: str = ""  # default: <images>/mimic-cxr-2.0.0-metadata.csv.gz
    split_csv: str = ""  # default: <images>/mimic-cxr-2.0.0-split.csv.gz
    chexpert_csv: str = ""  # default: <images>/mimic-cxr-2.0.0-chexpert.csv.gz (optional file)
    report_section: str = "auto"  # auto | impression | findings | last_paragraph | comparison | full
    missing_report: str = "empty"  # empty | skip
    max_side: int = 0  # 0 keeps the original JPEG bytes; N resizes so the longer side is N
    jpeg_quality: int = 95
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1_000_000_000
    workers: int = 1
    progress: bool = True

    def validate(self) -> None:
        choices = ("auto", "impression", "findings", "last_paragraph", "comparison", "full")
        if self.report_section not in choices:
            raise ValueError(f"report_section must be one of {choices}, got {self.report_section!r}")
        if self.missing_report not in ("empty", "skip"):
            raise ValueError(f"missing_report must be 'empty' or 'skip', got {self.missing_report!r}")
        for name in ("images", "reports", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.max_side < 0 or self.samples_per_shard < 1 or self.max_shard_bytes < 1 or self.workers < 1:
            raise ValueError("max_side >= 0, samples_per_shard >= 1, max_shard_bytes >= 1, workers >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


def _coerce(value: Any, annotation: Any) -> Any:
    if annotation is bool and isinstance(value, str):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"not a boolean: {value!r}")
        return value.lower() in ("1", "true", "yes")
    if annotation in (int, float, str) and not isinstance(value, annotation):
        return annotation(value)
    return value


def build_config(cls: type[T], preset: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """`cls` defaults <- YAML preset <- overrides (None values in overrides are ignored)."""
    values: dict[str, Any] = {}
    if preset:
        loaded = yaml.safe_load(Path(preset).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{preset}: expected a mapping at the top level")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: _coerce(v, hints[k]) for k, v in values.items()})


def config_hash(config: Any, exclude: tuple[str, ...] = ()) -> str:
    """A stable hash of a dataclass's fields, to detect a resume under different settings."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in exclude}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
