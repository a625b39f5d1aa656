"""Samples while training: every `sample_every` steps, fixed validate studies through a few any-to-any
combinations (default T->F, F->L, F->T, T->F+L) with a few DDIM steps.

ZeRO-3 gathers each module's parameters collectively, so ranks that ran different forwards would deadlock:
every rank generates the whole (short) list with the same inputs and seeds, in lockstep, and rank 0 writes
it: images to TensorBoard and a PNG grid per combination (rows: studies; columns: the given views, then the
generated ones) under run_dir/samples/step-NNNNNNN/, reports as TensorBoard text and .txt beside the real ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import TrainConfig
from ..generate.sample import combination_slug, png_bytes, write_atomic
from ..generate.studies import Studies, to_uint8
from ..model.sample import MODALITIES, Sampler, SamplerConfig, parse_combination
from .validate import Validator

log = logging.getLogger(__name__)


class TrainingSamples:
    def __init__(self, cfg: TrainConfig, validator: Validator, run_dir: str | Path):
        # the views themselves (given as inputs, shown beside the outputs), also when training reads conditioning
        studies = Studies(cfg.shards, "validate", cfg.image_size)
        keys = [validator.loader.samples[i].key for i in validator.indices]
        complete = [k for k in keys if all(studies.has(k, m) for m in MODALITIES)]
        if len(complete) < cfg.sample_studies:
            log.warning("samples: %d validate studies with both views and a report among the first %d (wanted %d)",
                        len(complete), len(keys), cfg.sample_studies)
        self.batch = studies.read(complete[: cfg.sample_studies] or keys[: cfg.sample_studies])
        self.combinations = [c.strip() for c in cfg.sample_combinations.split(",") if c.strip()]
        for combination in self.combinations:
            parse_combination(combination)  # a bad one fails at start, not at the first sampling step
        self.config = SamplerConfig(steps=cfg.sample_steps, guidance=cfg.sample_guidance, image_size=cfg.image_size,
                                    max_report_tokens=cfg.sample_report_tokens)
        self.seed, self.folder = cfg.seed, Path(run_dir) / "samples"

    @torch.no_grad()
    def generate(self, model, tokenizers) -> dict[str, dict]:
        """Every combination for every study (all ranks call, with the same results)."""
        sampler = Sampler(model, tokenizers, self.config)
        results = {}
        for i, combination in enumerate(self.combinations):
            given, wanted = parse_combination(combination)
            inputs = {m: self.batch[m] for m in given}
            results[combination] = sampler(inputs, wanted, torch.Generator().manual_seed(self.seed * 1009 + i))
        return results

    def write(self, step: int, results: dict[str, dict], sinks) -> Path:
        folder = self.folder / f"step-{step:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        for combination, out in results.items():
            given, wanted = parse_combination(combination)
            columns = [self.batch[m] for m in given if m != "text"] + [out[m].cpu() for m in wanted if m != "text"]
            if columns:
                rows = torch.cat([c.float() for c in columns], dim=3)  # [N, 1, H, W x columns]
                grid = torch.cat(list(rows), dim=1)  # [1, N x H, W x columns]
                write_atomic(folder / f"{combination_slug(combination)}.png", png_bytes(to_uint8(grid[None])[0]))
                sinks.images(f"samples/{combination}", rows, step)
            if "text" in wanted:
                lines = []
                for key, real, generated in zip(self.batch["key"], self.batch["text"], out["text"]):
                    lines.append(f"{key}\n  real:      {real.strip()}\n  generated: {generated.strip()}\n")
                write_atomic(folder / f"{combination_slug(combination)}.txt", "\n".join(lines).encode())
                sinks.text(f"samples/{combination}", "\n\n".join(
                    f"**{k}** real: {r.strip()}  \ngenerated: {g.strip()}"
                    for k, r, g in zip(self.batch["key"], self.batch["text"], out["text"])), step)
        return folder
