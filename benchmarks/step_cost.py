"""What a training step costs, in figures that need no GPU: FLOPs per sample with online vs precomputed
conditioning, and collectives and bytes per step under stock ZeRO-3, tuned ZeRO-3 and ZeRO-2.

    python benchmarks/step_cost.py                       # xgem FLOPs (meta device) + tiny at W=2 on CPU
    python benchmarks/step_cost.py --flops-model tiny --stages frontal --variants zero3,zero3-leaf --steps 2

1. FLOPs per sample (forward and backward of one step, torch's FLOP counter on the meta device, no weights) for
   each stage of --flops-model (default xgem at 256 px), with the frozen encoders run online and with their
   outputs precomputed. The once-per-run empty-prompt embeddings are not counted.
2. For the tiny preset on the demo data at W=2 on CPU (torchrun, gloo), the frontal stage: collectives and bytes
   per step by type (DeepSpeed's comms logger; steady state: the mean over the steps after the first) and the
   per-step losses, for each variant in --variants.

Prints one table and writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

# name -> (TrainConfig overrides, description)
VARIANTS = {
    "zero3": ({"deepspeed_config": "zero3", "zero3_leaf_modules": False, "replicate_frozen": False},
              "stock ZeRO-3 (one gather per module, frozen encoders partitioned)"),
    "zero3-leaf": ({"deepspeed_config": "zero3_tuned", "zero3_leaf_modules": True, "replicate_frozen": True},
                   "ZeRO-3, leaf blocks, frozen encoders replicated, tuned persistence/prefetch"),
    "zero3-leaf-precomputed": ({"deepspeed_config": "zero3_tuned", "zero3_leaf_modules": True,
                                "replicate_frozen": True, "conditioning": "precomputed"},
                               "as zero3-leaf, conditioning precomputed"),
    "zero2": ({"deepspeed_config": "zero2"}, "ZeRO-2"),
}
STAGES = ("frontal", "lateral", "text", "joint-text", "joint-frontal", "joint-lateral")
RESULTS = Path(__file__).resolve().parent / "results"


def meta_batch(model, size: int, batch: int, conditioning: str, report_tokens: int = 64) -> dict:
    """A batch of `batch` samples with both views and a report, as the loader gives it (online: images and token
    ids; precomputed: the encoders' outputs), with floating tensors on the meta device."""
    from xgem_dist.data.loader import VIEWS

    common = {"seed": list(range(batch)), "valid": torch.ones(batch, dtype=torch.bool), "report": ["a"] * batch,
              "key": [str(i) for i in range(batch)],
              **{f"{v}_present": torch.ones(batch, dtype=torch.bool) for v in VIEWS}}
    ids = torch.ones(batch, report_tokens, dtype=torch.long)
    tokens = {"clip_ids": torch.ones(batch, 77, dtype=torch.long), "bert_ids": ids, "bert_mask": torch.ones_like(ids),
              "gpt2_ids": ids}
    if conditioning == "online":
        return common | tokens | {v: torch.zeros(batch, 1, size, size, device="meta") for v in VIEWS}
    with torch.no_grad():
        latent = model.vae.encode(torch.zeros(1, 3, size, size, device="meta")).latent_dist.mean.shape[1:]
    width = model.clip.config.projection_dim
    latent_dim = model.optimus.to_posterior.out_features // 2
    out = {"clip_report": torch.zeros(batch, width, device="meta"),
           "optimus_mean": torch.zeros(batch, latent_dim, device="meta"),
           "optimus_logvar": torch.zeros(batch, latent_dim, device="meta")}
    for v in VIEWS:
        out |= {f"clip_{v}": torch.zeros(batch, width, device="meta"),
                f"vae_{v}_mean": torch.zeros(batch, *latent, device="meta"),
                f"vae_{v}_logvar": torch.zeros(batch, *latent, device="meta")}
    return common | out


def flops_per_sample(preset: str, stage: str, conditioning: str, size: int, batch: int = 2) -> float:
    from xgem_dist.model.attention import set_attention_backend
    from xgem_dist.model.stages import apply_stage
    from xgem_dist.model.tokenizers import train_small_tokenizers
    from xgem_dist.model.xgem import build_xgem
    from xgem_dist.profile.metrics import count_flops
    from xgem_dist.train.task import TrainingTask

    model = build_xgem(preset, device="meta")
    set_attention_backend(model, "auto")
    apply_stage(model, stage)
    width = model.clip.config.projection_dim
    empty = {"text": torch.zeros(width, device="meta"), "image": torch.zeros(width, device="meta")}
    # the empty-prompt embeddings are given in both modes: they are computed once per run, not per step
    task = TrainingTask(model, stage, train_small_tokenizers(["a report"]), 100, conditioning=conditioning,
                        empty=empty)
    task.step = 100
    inputs = meta_batch(model, size, batch, conditioning)
    with mock.patch("transformers.masking_utils._ignore_bidirectional_mask_sdpa", return_value=False):
        # BERT asks whether its padding mask is all ones (a value the meta device does not have): say no
        return count_flops(lambda: task(inputs).backward()) / batch


def flops_table(preset: str, stages: list[str], size: int) -> list[dict]:
    rows = []
    for stage in stages:
        online, pre = (flops_per_sample(preset, stage, mode, size) for mode in ("online", "precomputed"))
        rows.append({"stage": stage, "online_tflop": online / 1e12, "precomputed_tflop": pre / 1e12,
                     "saved": 1 - pre / online})
    return rows


def _demo_inputs(work: Path) -> tuple[str, str, str]:
    """Demo shards, seeded tiny weights and their precomputed conditioning under `work`."""
    from xgem_dist.config import PrecomputeConfig, ShardConfig
    from xgem_dist.data.demo import make_demo
    from xgem_dist.data.precompute import precompute
    from xgem_dist.data.shard import shard
    from xgem_dist.model.export import save_components
    from xgem_dist.model.xgem import build_xgem

    demo = make_demo(work / "mimic")
    shards, init, cond = work / "shards", work / "init", work / "cond"
    shard(ShardConfig(images=demo["root"], reports=demo["root"], out=str(shards), max_side=128,
                      samples_per_shard=16, progress=False))
    torch.manual_seed(1234)
    save_components(build_xgem("tiny"), init)
    precompute(PrecomputeConfig(shards=str(shards), init_from=str(init), out=str(cond), progress=False))
    return str(shards), str(init), str(cond)


def comms_table(variants: list[str], steps: int, work: Path) -> list[dict]:
    """Each variant through the real entry point (`xgem-dist train` under torchrun, 2 ranks, comms_logger on):
    the per-step collectives and bytes and the losses its steps.jsonl records."""
    shards, init, cond = _demo_inputs(work)
    rows = []
    for name in variants:
        run_dir = work / name
        settings = {"model": "tiny", "stage": "frontal", "global_batch": 6, "precision": "fp32", "init_from": init,
                    "tokenizers": f"{cond}/tokenizers", "conditioning_shards": cond, "comms_logger": True,
                    "val_every": 0, "profile_flops": False, **VARIANTS[name][0]}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(_free_port()), "-m", "xgem_dist.cli", "train", "--launcher",
                   "local", "--shards", shards, "--run-dir", str(run_dir), "--steps", str(steps),
                   *(x for key, value in settings.items() for x in ("--set", f"{key}={value}"))]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if result.returncode != 0:
            raise RuntimeError(f"variant {name} failed:\n{result.stderr[-4000:]}")
        per_step = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
        steady = per_step[1:] or per_step
        keys = sorted({k for s in steady for k in s if k.startswith("comms/")})
        mean = {k: sum(s.get(k, 0) for s in steady) / len(steady) for k in keys}
        rows.append({"variant": name, "description": VARIANTS[name][1], "losses": [s["train/loss"] for s in per_step],
                     "all_gathers": sum(v for k, v in mean.items() if "all_gather" in k and k.endswith("/calls")),
                     "calls": mean.get("comms/calls", 0), "bytes": mean.get("comms/bytes", 0), "by_type": mean,
                     "wall_s": round(time.perf_counter() - started, 1)})
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_tables(flops: list[dict], comms: list[dict], flops_model: str) -> None:
    print(f"\nFLOPs per sample, {flops_model} preset (forward + backward, meta device)")
    print("| stage | online TFLOP | precomputed TFLOP | saved |\n|---|---|---|---|")
    for r in flops:
        print(f"| {r['stage']} | {r['online_tflop']:.4f} | {r['precomputed_tflop']:.4f} | {100 * r['saved']:.1f}% |")
    if not comms:
        return
    base = next((r for r in comms if r["variant"] == "zero3"), comms[0])
    print("\nCollectives per step, tiny preset, frontal stage, W=2 on CPU (gloo), steady state")
    print("| variant | all-gathers | all collectives | MB moved | all-gathers vs stock ZeRO-3 | losses |")
    print("|---|---|---|---|---|---|")
    for r in comms:
        ratio = base["all_gathers"] / r["all_gathers"] if r["all_gathers"] else float("inf")
        losses = ", ".join(f"{x:.6f}" for x in r["losses"])
        print(f"| {r['variant']} | {r['all_gathers']:.0f} | {r['calls']:.0f} | {r['bytes'] / 1e6:.2f} | "
              f"{ratio:.1f}x fewer | {losses} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops-model", default="xgem")
    parser.add_argument("--image-size", type=int, default=0, help="0: 256 for xgem presets, 64 for tiny")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated; empty: no comms part")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="", help="JSON path (default benchmarks/results/step_cost.json)")
    args = parser.parse_args()
    size = args.image_size or (64 if args.flops_model == "tiny" else 256)
    flops = flops_table(args.flops_model, [s for s in args.stages.split(",") if s], size)
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="xgem-step-cost-") as work:
        comms = comms_table(variants, args.steps, Path(work)) if variants else []
    print_tables(flops, comms, args.flops_model)
    out = Path(args.out) if args.out else RESULTS / "step_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"flops_model": args.flops_model, "image_size": size, "flops_per_sample": flops,
                               "comms_tiny_w2": comms}, indent=1))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
