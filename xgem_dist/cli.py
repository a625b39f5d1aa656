"""`xgem-dist`: argument parsing only; each subcommand calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import sys

from .config import LaunchConfig, PrecomputeConfig, ShardConfig, TrainConfig, build_config
from .presets import preset_path


# errors of an output that cannot be written (full, read-only, not permitted, over quota)
UNWRITABLE = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def _add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="YAML recipe (see shards/); flags below override it")
    p.add_argument("--images", help="MIMIC-CXR-JPG root (holds files/ and the CSVs)")
    p.add_argument("--reports", help="reports root (holds files/pNN/p<subject>/s<study>.txt)")
    p.add_argument("--out", help="output URL: a local path or s3://bucket/prefix (any fsspec URL)")
    p.add_argument("--metadata-csv", dest="metadata_csv")
    p.add_argument("--split-csv", dest="split_csv")
    p.add_argument("--chexpert-csv", dest="chexpert_csv")
    p.add_argument("--report-section", dest="report_section",
                   help="auto (official MIMIC-CXR priority) | impression | findings | last_paragraph | "
                        "comparison | full")
    p.add_argument("--missing-report", dest="missing_report", help="empty | skip")
    p.add_argument("--max-side", dest="max_side", type=int, help="resize so the longer side is N (0: keep bytes)")
    p.add_argument("--jpeg-quality", dest="jpeg_quality", type=int)
    p.add_argument("--samples-per-shard", dest="samples_per_shard", type=int)
    p.add_argument("--max-shard-bytes", dest="max_shard_bytes", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--hash-inputs", dest="hash_inputs", action="store_const", const=True,
                   help="identify the input by every file's sha256 (default: size and mtime)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)


def _shard_config(args: argparse.Namespace) -> ShardConfig:
    fields = {f.name for f in dataclasses.fields(ShardConfig)}
    return build_config(ShardConfig, args.recipe, {k: v for k, v in vars(args).items() if k in fields})


def cmd_make_demo(args: argparse.Namespace) -> int:
    from .data.demo import DEMO_SIDES, FULL_SIZE_SIDES, make_demo

    summary = make_demo(args.out, num_studies=args.studies, seed=args.seed,
                        sides=FULL_SIZE_SIDES if args.full_size else DEMO_SIDES)
    print(json.dumps(summary, indent=1))
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from .data.shard import shard

    summary = shard(_shard_config(args))
    print(json.dumps(summary["splits"], indent=1))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .data.verify import verify

    report = verify(args.url, decode=args.decode)
    for problem in report.problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    status = "OK" if report.ok else "FAILED"
    print(f"{status}: {len(report.manifests)} manifest(s), {report.shards} shard(s), {report.samples} sample(s), "
          f"{len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def cmd_precompute(args: argparse.Namespace) -> int:
    from .data.precompute import precompute

    fields = {f.name for f in dataclasses.fields(PrecomputeConfig)}
    summary = precompute(build_config(PrecomputeConfig, None, {k: v for k, v in vars(args).items() if k in fields}))
    if summary:
        print(json.dumps(summary, indent=1))
    return 0


def cmd_convert_released(args: argparse.Namespace) -> int:
    from .model.export import convert_released_checkpoint

    counts = convert_released_checkpoint(args.checkpoint, args.out, args.preset)
    print(f"converted {sum(counts.values())} tensors into {args.out}: {counts}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .train.weights import export

    print(f"exported {export(args.src, args.out, args.dtype, args.released, args.ema)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .generate.sample import sample_to_files

    keys = [k for k in (args.keys or "").split(",") if k]
    files = sample_to_files(args.model, args.combination, args.out, report=args.report, frontal=args.frontal,
                            lateral=args.lateral, shards=args.from_shards, keys=keys, split=args.split,
                            steps=args.steps, guidance=args.guidance, seed=args.seed, image_size=args.image_size,
                            device=_device(args), dtype=args.dtype, ema=args.ema, batch_size=args.batch_size,
                            max_report_tokens=args.max_report_tokens)
    print("\n".join(str(f) for f in files))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .generate.evaluate import EvalConfig, evaluate

    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    values["combinations"] = tuple(c for c in args.combinations.split(",") if c)
    values["device"] = _device(args)
    evaluate(EvalConfig(**values))
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an export folder (with tokenizers/), a run dir or a checkpoint folder")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", dest="image_size", type=int, default=0, help="0: the model's VAE size")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when there is a GPU)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--ema", action="store_true", help="the run's EMA weights (a run dir or checkpoint folder)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--max-report-tokens", dest="max_report_tokens", type=int, default=100,
                   help="longest generated report, in GPT-2 tokens (counting <BOS> and <EOS>)")


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {pair!r}")
        out[key.replace("-", "_")] = value
    return out


def _train_configs(args: argparse.Namespace, **launch_defaults) -> tuple[TrainConfig, LaunchConfig]:
    train = build_config(TrainConfig, preset_path(args.config) if args.config else None,
                         {**_overrides(args.set), "shards": args.shards, "run_dir": args.run_dir,
                          "steps": args.steps})
    launch_fields = {f.name for f in dataclasses.fields(LaunchConfig)}
    given = {k: v for k, v in vars(args).items() if k in launch_fields and v is not None}
    return train, build_config(LaunchConfig, None, {**launch_defaults, **given})


def cmd_profile(args: argparse.Namespace) -> int:
    from .profile.command import profile

    train, launch = _train_configs(args, launcher="local")
    profile(train, launch, args.out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    train, launch = _train_configs(args)
    if launch.launcher == "local":
        from .train.trainer import run

        summary = run(train, use_ray=False, timeout_s=launch.timeout_s)
    elif launch.launcher == "ray":
        from .train.ray_launch import launch_ray

        summary = launch_ray(train, launch)
    else:
        raise ValueError(f"launcher must be 'ray' or 'local', got {launch.launcher!r}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import quickstart

    return quickstart(args.workdir, steps=args.steps)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a TrainConfig preset (name in xgem_dist/presets or a YAML path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a TrainConfig field")
    p.add_argument("--shards")
    p.add_argument("--run-dir", dest="run_dir")
    p.add_argument("--steps", type=int)
    p.add_argument("--launcher", help="ray (default) | local")
    p.add_argument("--num-workers", dest="num_workers", type=int)
    p.add_argument("--min-workers", dest="min_workers", type=int, help="elastic: shrink down to this many")
    p.add_argument("--use-gpu", dest="use_gpu", action="store_const", const=True)
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=float)
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--storage-path", dest="storage_path", help="Ray checkpoint storage: path, s3://, gs://")
    p.add_argument("--name", help="Ray run name (reusing it resumes that run)")
    p.add_argument("--max-failures", dest="max_failures", type=int)
    p.add_argument("--timeout-s", dest="timeout_s", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xgem-dist", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every degraded study")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-demo", help="write a small synthetic dataset in the MIMIC-CXR-JPG layout")
    p.add_argument("out")
    p.add_argument("--studies", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full-size", action="store_true", help="images at MIMIC-CXR's native 2.4-3.1k px (for benchmarks)")
    p.set_defaults(func=cmd_make_demo)

    p = sub.add_parser("shard", help="MIMIC-CXR-JPG + reports -> WebDataset shards per split")
    _add_shard_args(p)
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("verify-shards", help="re-read shards and check them against their manifests")
    p.add_argument("url", help="a shard-set root, a split folder or a manifest.json (any fsspec URL)")
    p.add_argument("--decode", action="store_true", help="also decode every JPEG")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("precompute", help="the frozen encoders' outputs (VAE and Optimus posteriors, CLIP embeddings) "
                                          "for every sample, as shards beside the image shards (torchrun: per rank)")
    p.add_argument("--shards", required=True, help="the image shards: a shard-set root or a split folder (any URL)")
    p.add_argument("--init-from", dest="init_from", required=True, help="the encoders' weights (as TrainConfig.init_from)")
    p.add_argument("--out", required=True, help="output URL (any fsspec URL)")
    p.add_argument("--model", help="model preset (default tiny)")
    p.add_argument("--image-size", dest="image_size", type=int, help="the training run's image_size")
    p.add_argument("--tokenizers", help="folder with clip/ bert/ gpt2/ (tiny: trained on the train split)")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("convert-released", help="released XGeM checkpoint -> safetensors component folders")
    p.add_argument("checkpoint", help="the released .pt/.ckpt (read with torch.load(weights_only=True))")
    p.add_argument("out")
    p.add_argument("--preset", default="xgem", choices=["xgem"])
    p.set_defaults(func=cmd_convert_released)

    p = sub.add_parser("export", help="a run's newest checkpoint (or one checkpoint folder) -> safetensors component "
                                      "folders (vae/, clip/ loadable by diffusers / transformers)")
    p.add_argument("src", help="a run dir (local or Ray storage) or one checkpoint folder")
    p.add_argument("out")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--released", action="store_true", help="also the released single-file layout (xgem preset)")
    p.add_argument("--ema", action="store_true", help="the trained weights' EMA (a run with ema_decay or "
                                                       "ema_half_life_steps) instead of the weights themselves")
    p.set_defaults(func=cmd_export)

    for name in ("train", "profile"):
        p = sub.add_parser(name, help="train a stage of XGeM on shards (Ray Train by default; --launcher local for "
                                      "torchrun or one process)" if name == "train" else
                           "a short training job (local launcher by default) with a step-time breakdown, "
                           "TFLOP/s, MFU, telemetry, a table and an HTML report")
        _add_train_args(p)
        if name == "profile":
            p.add_argument("--out", default="profile_out", help="where profile.json/.html and the run go")
        p.set_defaults(func=cmd_train if name == "train" else cmd_profile)

    p = sub.add_parser("sample", help="generate one combination (e.g. 'T->F+L') from given inputs or shard studies")
    _add_generation_args(p)
    p.add_argument("--combination", required=True, help="inputs->outputs over T (report), F, L, e.g. 'F+L->T'")
    p.add_argument("--report", help="the report: text, or a file holding it")
    p.add_argument("--frontal", help="a frontal view (JPEG)")
    p.add_argument("--lateral", help="a lateral view (JPEG)")
    p.add_argument("--from-shards", dest="from_shards", help="take the inputs from these shards' studies (--keys)")
    p.add_argument("--keys", help="comma-separated sample keys of --from-shards")
    p.add_argument("--split", default="test")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="generate for a fixed, seeded list of a split's studies and measure "
                                        "(FID/KID, MS-SSIM, BLEU, ROUGE-L, label AUROC): eval.json, grids, HTML")
    _add_generation_args(p)
    p.add_argument("--shards", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--reference-split", dest="reference_split", default="validate",
                   help="the real-vs-real floor: this split's studies against --split's")
    p.add_argument("--combinations", default="T->F,T->L,F->T,L->T,F+L->T,T->F+L")
    p.add_argument("--samples", type=int, default=100, help="studies per combination")
    p.add_argument("--per-prompt", dest="per_prompt", type=int, default=2,
                   help="samples per study (MS-SSIM diversity among them needs 2 or more)")
    p.add_argument("--feature-extractor", dest="feature_extractor", default="inception",
                   help="FID/KID features: inception (torch-fidelity's, from --feature-weights), rad-dino (a "
                        "chest X-ray backbone: a local transformers folder such as microsoft/rad-dino) or "
                        "MODULE:FUNCTION (called with the weights path, returns an nn.Module)")
    p.add_argument("--feature-weights", dest="feature_weights",
                   help="local weights of the feature extractor (a file; a folder for rad-dino)")
    p.add_argument("--label-classifier", dest="label_classifier",
                   help="MODULE:FUNCTION (called with --classifier-weights) returning a module: uint8 images "
                        "[B,3,H,W] -> 14 CheXpert logits; AUROC per label on generated views")
    p.add_argument("--classifier-weights", dest="classifier_weights")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quickstart", help="the end-to-end demo on generated data")
    p.add_argument("--workdir", default="quickstart_out")
    p.add_argument("--steps", type=int, default=8)
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:  # bad input or settings: a message, not a traceback
        from .data.mimic import InputError

        if isinstance(e, InputError) or type(e) is ValueError:
            print(f"xgem-dist: error: {e}", file=sys.stderr)
            return 2
        raise
    except OSError as e:  # the output cannot be written: every writer is atomic, so nothing written is lost
        if e.errno not in UNWRITABLE:
            raise
        print(f"xgem-dist: error: cannot write {e.filename or 'the output'}: {e.strerror}. What was already "
              "written is complete and kept; free space or fix the permissions, then rerun the same command "
              "(it resumes)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
