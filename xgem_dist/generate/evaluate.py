"""`xgem-dist evaluate`: generate for a fixed, seeded list of a split's studies and measure the results.

- Studies: per combination, the first `samples` studies (of a seeded order of the split) holding every
  modality the combination reads or writes; the same list for every model.
- Work: per combination and replica (`per_prompt` samples per study), the studies in fixed batches;
  batch j goes to rank j mod W (torchrun: plain torch.distributed, gloo on CPU; each rank holds the whole
  model). Every item has its own seeded generator and the batches do not depend on W, so eval.json does not.
- Gathering and resuming: after each round the ranks' results go to rank 0 (gather_object), which writes
  each item atomically under out/cache/<combination>/; a rerun generates only what is missing there.
- Rank 0 computes the figures (metrics.py), writes eval.json, a grid PNG per combination, index.html
  and timing.json (the world size and seconds: kept out of eval.json).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm import tqdm

from ..model.sample import parse_combination
from . import html, metrics
from .load import load_model
from .sample import combination_slug, generate, make_sampler, write_atomic
from .studies import Studies, to_uint8

log = logging.getLogger(__name__)
DEFAULT_COMBINATIONS = ("T->F", "T->L", "F->T", "L->T", "F+L->T", "T->F+L")


@dataclass(frozen=True)
class EvalConfig:
    model: str
    shards: str
    out: str
    split: str = "test"
    reference_split: str = "validate"
    combinations: tuple[str, ...] = DEFAULT_COMBINATIONS
    samples: int = 100  # studies per combination
    per_prompt: int = 2  # samples per study
    steps: int = 50
    guidance: float = 7.5
    seed: int = 0
    image_size: int = 0  # 0: the model's VAE size
    batch_size: int = 8
    max_report_tokens: int = 100
    device: str = "cpu"
    dtype: str = "fp32"
    ema: bool = False
    feature_extractor: str = "inception"
    feature_weights: str = ""
    label_classifier: str = ""
    classifier_weights: str = ""
    progress: bool = True


@dataclass(frozen=True)
class Batch:
    combination: str
    replica: int
    keys: tuple[str, ...]


class World:
    """torch.distributed when launched by torchrun (RANK set), else one process without collectives."""

    def __init__(self, device: str):
        self.distributed = "RANK" in os.environ
        self.device = device
        if self.distributed and not torch.distributed.is_initialized():
            cuda = device.startswith("cuda")
            if cuda:
                self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        self.rank = torch.distributed.get_rank() if self.distributed else 0
        self.size = torch.distributed.get_world_size() if self.distributed else 1

    def broadcast(self, value):
        if not self.distributed:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's value on rank 0; [] on the others."""
        if not self.distributed:
            return [value]
        out = [None] * self.size if self.rank == 0 else None
        torch.distributed.gather_object(value, out, dst=0)
        return out or []

    def close(self) -> None:
        if self.distributed:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def check_config(cfg: EvalConfig) -> None:
    for combination in cfg.combinations:
        parse_combination(combination)
    if not cfg.combinations:
        raise ValueError("--combinations: none given")
    if cfg.samples < 1 or cfg.per_prompt < 1 or cfg.batch_size < 1:
        raise ValueError("--samples, --per-prompt and --batch-size must be at least 1")
    metrics.check_weights("--feature-weights", cfg.feature_weights)
    metrics.check_weights("--classifier-weights", cfg.classifier_weights)


def plan(cfg: EvalConfig, studies: Studies) -> tuple[dict[str, list[str]], list[Batch]]:
    keys = {}
    for combination in cfg.combinations:
        given, wanted = parse_combination(combination)
        keys[combination] = studies.study_list(given + wanted, cfg.samples, cfg.seed)
        if not keys[combination]:
            raise ValueError(f"{cfg.shards} ({cfg.split}): no study holds all of {given + wanted} for {combination}")
    batches = [Batch(c, r, tuple(keys[c][i : i + cfg.batch_size])) for c in cfg.combinations
               for r in range(cfg.per_prompt) for i in range(0, len(keys[c]), cfg.batch_size)]
    return keys, batches


class Cache:
    """out/cache/<combination>/<key>__s<seed>__r<replica>.safetensors: the generated views as uint8 tensors,
    the report in the metadata. settings.json records what else decides the samples."""

    def __init__(self, root: Path, settings: dict, seed: int):
        self.root, self.seed = root, seed
        recorded = root / "settings.json"
        if recorded.exists() and json.loads(recorded.read_text()) != settings:
            raise ValueError(f"{root} holds samples made with other settings ({recorded.read_text().strip()}); "
                             f"use another --out, or delete {root} to regenerate")
        self.settings = settings

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / "settings.json", json.dumps(self.settings, indent=1, sort_keys=True).encode())

    def path(self, combination: str, key: str, replica: int) -> Path:
        return self.root / combination_slug(combination) / f"{key}__s{self.seed}__r{replica}.safetensors"

    def has(self, batch: Batch) -> bool:
        return all(self.path(batch.combination, k, batch.replica).exists() for k in batch.keys)

    def write(self, batch: Batch, results: dict[str, list]) -> None:
        (self.root / combination_slug(batch.combination)).mkdir(parents=True, exist_ok=True)
        for i, key in enumerate(batch.keys):
            tensors = {m: torch.from_numpy(v[i]) for m, v in results.items() if m != "text"}
            meta = {"text": results["text"][i]} if "text" in results else {}
            write_atomic(self.path(batch.combination, key, batch.replica), save(tensors, metadata=meta))

    def read(self, combination: str, key: str, replica: int) -> dict:
        path = self.path(combination, key, replica)
        out = {m: t.numpy() for m, t in load_file(path).items()}
        with safe_open(path, "pt") as f:
            out.update(f.metadata() or {})
        return out


def evaluate(cfg: EvalConfig) -> dict | None:
    """Returns eval.json's content on rank 0, None on the other ranks."""
    check_config(cfg)
    world = World(cfg.device)
    result = _evaluate(cfg, world)  # an error ends this process: torchrun then stops the others
    world.close()
    return result


def _evaluate(cfg: EvalConfig, world: World) -> dict | None:
    out = Path(cfg.out)
    model, tokenizers = load_model(cfg.model, ema=cfg.ema, device=world.device, dtype=cfg.dtype)
    sampler = make_sampler(model, tokenizers, cfg.steps, cfg.guidance, cfg.image_size, cfg.max_report_tokens)
    size = sampler.cfg.image_size
    studies = Studies(cfg.shards, cfg.split, size)
    reference = Studies(cfg.shards, cfg.reference_split, size)  # read now: a missing split fails before generating
    keys, batches = plan(cfg, studies)
    settings = {"model": str(Path(cfg.model).resolve()), "ema": cfg.ema, "steps": cfg.steps, "guidance": cfg.guidance,
                "image_size": size, "max_report_tokens": cfg.max_report_tokens, "dtype": cfg.dtype,
                "device": torch.device(world.device).type}
    cache = Cache(out / "cache", settings, cfg.seed)
    if world.rank == 0:
        measures = Measures(cfg)  # built before generating: a bad extractor or classifier fails first
        cache.create()
    todo = world.broadcast([i for i, b in enumerate(batches) if not cache.has(b)] if world.rank == 0 else None)
    bar = tqdm(total=sum(len(batches[i].keys) for i in todo), desc="evaluate: generate", unit="sample",
               disable=not cfg.progress or world.rank != 0)
    start = time.perf_counter()
    for first in range(0, len(todo), world.size):
        mine = todo[first + world.rank] if first + world.rank < len(todo) else None
        result = None
        if mine is not None:
            batch = batches[mine]
            given, _ = parse_combination(batch.combination)
            read = studies.read(list(batch.keys))
            result = (mine, generate(sampler, batch.combination, {m: read[m] for m in given}, list(batch.keys),
                                     cfg.seed, batch.replica))
        for gathered in world.gather(result):
            if gathered is not None:
                cache.write(batches[gathered[0]], gathered[1])
                bar.update(len(batches[gathered[0]].keys))
    bar.close()
    seconds = time.perf_counter() - start
    if world.rank != 0:
        return None
    generated = sum(len(batches[i].keys) for i in todo)
    report, examples = figures(cfg, measures, keys, cache, studies, reference, size)
    write_atomic(out / "eval.json", json.dumps(report, indent=1, sort_keys=True).encode())
    for combination, example in examples.items():
        write_atomic(out / f"grid_{combination_slug(combination)}.png", html.grid_png(example["columns"]))
    timing = {"world_size": world.size, "samples_generated": generated, "seconds": round(seconds, 2),
              "seconds_per_1000_samples": round(1000 * seconds / generated, 1) if generated else None,
              "device": world.device, "steps": cfg.steps}
    write_atomic(out / "timing.json", json.dumps(timing, indent=1).encode())
    html.write_page(out, report, timing, examples)
    print(f"evaluate: {generated} samples generated in {seconds:.1f} s; {out / 'eval.json'}, {out / 'index.html'}")
    return report


class Measures:
    """The FID/KID feature extractor and the label classifier, each None with the reason it is missing."""

    def __init__(self, cfg: EvalConfig):
        self.extractor, no_features = metrics.feature_extractor(cfg.feature_extractor, cfg.feature_weights or None)
        self.classifier, no_classifier = metrics.label_classifier(cfg.label_classifier,
                                                                  cfg.classifier_weights or None)
        self.not_computed = [reason for reason in (no_features, no_classifier) if reason]
        for reason in self.not_computed:
            print(f"evaluate: not computed: {reason}")


def figures(cfg: EvalConfig, measures: Measures, keys: dict[str, list[str]], cache: Cache, studies: Studies,
            reference: Studies, size: int) -> tuple[dict, dict]:
    """eval.json: per combination and generated output, the figures beside their real-vs-real floors; and per
    combination the first studies' images (grid columns) and reports, for the grid and the page."""
    extractor, classifier, not_computed = measures.extractor, measures.classifier, measures.not_computed
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("out", "device", "progress", "batch_size")}
    report: dict = {"settings": settings | {"image_size": size}, "not_computed": not_computed, "combinations": {}}
    examples: dict = {}
    for combination in cfg.combinations:
        given, wanted = parse_combination(combination)
        real = studies.read(keys[combination])
        samples = [[cache.read(combination, k, r) for r in range(cfg.per_prompt)] for k in keys[combination]]
        entry: dict = {"studies": len(keys[combination]), "keys": keys[combination]}
        shown = slice(0, html.GRID_ROWS)
        columns = [(f"input {m[0].upper()}", to_uint8(real[m][shown])) for m in given if m != "text"]
        columns += [(f"{kind} {m[0].upper()}", images) for m in wanted if m != "text" for kind, images in
                    (("real", to_uint8(real[m][shown])), ("generated", np.stack([s[0][m] for s in samples[shown]])))]
        examples[combination] = {"columns": columns, "reports": [
            (k, real["text"][i], samples[i][0].get("text")) for i, k in enumerate(keys[combination][shown])]}
        for m in wanted:
            first = [s[0][m] for s in samples]
            ref_keys = reference.study_list((m,), len(first), cfg.seed)
            ref = reference.read(ref_keys) if ref_keys else None
            if m == "text":
                entry[m] = {"generated": metrics.text_figures(first, real["text"]),
                            "real_floor": metrics.text_figures(ref["text"], real["text"][: len(ref_keys)])
                            if ref else None}
                continue
            generated = np.stack(first)
            real_images = to_uint8(real[m])
            figures_m: dict = {"diversity": metrics.diversity([np.stack([r[m] for r in s]) for s in samples])}
            if extractor is not None:
                ref_images = to_uint8(ref[m]) if ref else np.zeros((0, size, size), np.uint8)
                figures_m |= metrics.distribution_figures(extractor, real_images, generated, ref_images, cfg.seed)
            if classifier is not None:
                figures_m["label_auroc"] = {
                    "generated": metrics.label_auroc(classifier, generated, real["labels"]),
                    "real": metrics.label_auroc(classifier, real_images, real["labels"])}
            entry[m] = figures_m
        report["combinations"][combination] = entry
    return report, examples

