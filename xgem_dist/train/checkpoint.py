"""Checkpoints: DeepSpeed's shards from every rank plus our own state, complete or absent, resumable on
any world size.

A checkpoint folder holds DeepSpeed's `latest` + `<tag>/` (model and optimizer shards of each rank)
and `xgem_state.json` (step, samples consumed, data-stream state, RNG state per rank, the TrainConfig and
the model configuration: a resume that would change the trajectory is refused from them).
- Local launchers: ranks write `<run_dir>/checkpoints/<tag>.partial/`; after a barrier rank 0 adds the
  state, renames the folder to `<tag>` and only then points `latest` at it; the last K are kept, and the
  one with the best validation loss (`best_checkpoint`). A
  crash mid-save leaves a `.partial` folder that nothing reads.
- Ray Train: each rank writes a local folder and reports it with the same name; Ray registers the
  checkpoint only once every rank reported, persists it to the run's storage and keeps the latest plus
  the K best by validation loss (the last K without validation).
- Beside DeepSpeed's files: each rank's EMA partition (`ema/`) and the run's tokenizers (`tokenizers/`).
- Loading on a world size other than the one that saved converts the checkpoint to DeepSpeed's
  universal format first (once per node, under $XGEM_SCRATCH or the temp dir), then loads with
  load_universal and deletes the conversion once every rank has loaded it.
- Before a resume builds the engine, the checkpoint is checked for completeness (checkpoint_problem); a
  damaged newest one is skipped by name for the previous complete one. Its files are read as data only
  (safe_load).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)
STATE = "xgem_state.json"
LATEST = "latest_checkpoint"
BEST = "best_checkpoint"  # the checkpoint with the lowest validation loss (local launchers)


def saved_world_size(folder: str | Path) -> int:
    return int(CheckpointManager.read_state(Path(folder))["world_size"])


def checkpoint_problem(folder: Path) -> str | None:
    """What makes a checkpoint folder unusable (the missing or damaged file, named), or None if it is complete:
    the state file parses and every rank file of the world size that saved it is there and not empty."""
    state_file, latest = folder / STATE, folder / "latest"
    if not folder.is_dir():
        return f"{folder}: no such checkpoint folder"
    try:
        state = json.loads(state_file.read_text())
        world_size, _ = int(state["world_size"]), int(state["step"])
    except FileNotFoundError:
        return f"{state_file} is missing"
    except (ValueError, KeyError, TypeError) as error:
        return f"{state_file} is damaged ({type(error).__name__}: {error})"
    if not latest.is_file() or not latest.read_text().strip():
        return f"{latest} (DeepSpeed's tag pointer) is missing or empty"
    if state.get("ema"):
        for rank in range(world_size):
            ema = folder / "ema" / f"rank-{rank:05d}.pt"
            if not ema.is_file() or ema.stat().st_size == 0:
                return f"{ema} (rank {rank}'s EMA) is missing or empty"
    tag_dir = folder / latest.read_text().strip()
    # ZeRO-3 writes a model file per rank, ZeRO-1/2 one for all; every stage an optimizer file per rank
    per_rank_models = any(tag_dir.glob("zero_pp_rank_*_model_states.pt"))
    patterns = [f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in range(world_size)]
    patterns += ([f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in range(world_size)]
                 if per_rank_models else ["mp_rank_00_model_states.pt"])
    for pattern in patterns:
        found = sorted(tag_dir.glob(pattern))
        if not found:
            return f"{tag_dir / pattern.lstrip('*')} is missing (the checkpoint was saved by {world_size} rank(s))"
        if found[0].stat().st_size == 0:
            return f"{found[0]} is empty"
    return None


def to_universal(folder: str | Path, scratch: str | Path) -> Path:
    """DeepSpeed's ds_to_universal into `scratch` (reading the checkpoint as data only, see safe_load);
    returns the folder to load with load_universal."""
    folder, scratch = Path(folder), Path(scratch)
    tag = (folder / "latest").read_text().strip()
    target = scratch / f"{tag}_universal"
    if not (scratch / "latest_universal").exists():
        converted = subprocess.run([sys.executable, "-m", "xgem_dist.train.safe_load", "--input_folder",
                                    str(folder / tag), "--output_folder", str(target), "--num_extract_workers", "1",
                                    "--num_merge_workers", "1"], capture_output=True, text=True)
        if converted.returncode != 0:
            shown = "\n".join(converted.stderr.strip().splitlines()[-20:])
            raise ValueError(f"{folder / tag}: DeepSpeed's universal conversion (for a resume on another world "
                             f"size) failed with exit code {converted.returncode}:\n{shown}")
    return scratch


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """This rank's global generators (only dropout in trainable modules draws from them: everything else
    draws from per-sample seeds)."""
    return {"torch": _encode(torch.get_rng_state()),
            "cuda": _encode(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None}


def restore_rng(saved: list | str, rank: int, world_size: int) -> None:
    """Restores this rank's generators when the checkpoint has one state per rank of this world size."""
    if not isinstance(saved, list) or len(saved) != world_size:
        log.warning("the checkpoint's RNG states are for another world size: dropout masks in trainable modules "
                    "(if any) continue from fresh generators")
        return
    torch.set_rng_state(_decode(saved[rank]["torch"]))
    if saved[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_decode(saved[rank]["cuda"]))


def fingerprint(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Full fp32 parameters and Adam moments of every trainable parameter, and every frozen parameter as the
    model holds it (a collective: all ranks call)."""
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            with zero.GatheredParameters([param] if hasattr(param, "ds_id") else []):
                out[name] = {"param": param.detach().cpu().clone()}
            continue
        out[name] = {"param": safe_get_full_fp32_param(param).detach().cpu().clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            state = safe_get_full_optimizer_state(param, key)
            out[name][key] = None if state is None else state.detach().cpu().clone()
    return out


class CheckpointManager:
    def __init__(self, folder: str | Path, rank: int, world_size: int, keep: int, use_ray: bool,
                 scratch_root: str | Path | None = None):
        """scratch_root: where universal conversions go (node-local; default $XGEM_SCRATCH, else the temp dir)."""
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.keep, self.use_ray = keep, use_ray
        self.best: str | None = None  # a tag kept beside the last `keep` (local launchers)
        self.scratch_root = Path(scratch_root or os.environ.get("XGEM_SCRATCH") or tempfile.gettempdir())
        self._scratch: Path | None = None  # the conversion this node made, until release()

    # ---- finding what to resume from
    @contextmanager
    def latest(self, explicit: str = "auto"):
        """The folder of the checkpoint to resume from (or None), valid inside the with-block."""
        if explicit == "none":
            yield None
        elif explicit != "auto":
            yield _complete(Path(explicit), f"resume={explicit}")
        elif self.use_ray:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            if checkpoint is None:
                yield None
            else:
                with self._newest_complete_in_storage(checkpoint) as folder:
                    yield folder
        else:
            yield self._newest_complete()

    @contextmanager
    def _newest_complete_in_storage(self, latest):
        """Ray's latest checkpoint if it is complete, else (with a warning naming what is wrong) the newest
        complete one beside it in the run's storage (Ray keeps the last `keep_checkpoints`)."""
        from pyarrow import fs
        from ray.train import Checkpoint

        parent = latest.path.rstrip("/").rsplit("/", 1)[0]
        beside = latest.filesystem.get_file_info(fs.FileSelector(parent))
        older = sorted((info.path for info in beside if info.type == fs.FileType.Directory
                        and info.base_name.startswith("checkpoint-") and info.path != latest.path), reverse=True)
        problems = []
        for path in [latest.path, *older]:
            with Checkpoint(path, latest.filesystem).as_directory() as folder:
                problem = checkpoint_problem(Path(folder))
                if problem is None:
                    if problems and self.rank == 0:
                        log.warning("skipping damaged or incomplete checkpoint(s): %s; resuming from %s",
                                    "; ".join(problems), path)
                    yield Path(folder)
                    return
            problems.append(f"{path}: {problem}")
        raise ValueError(f"no complete checkpoint in {parent} to resume from: {'; '.join(problems)}. Restore "
                         "the files, or start over under another --name")

    def _newest_complete(self) -> Path | None:
        """The folder `latest_checkpoint` names if it is complete, else (with a warning naming what is wrong)
        the newest complete one before it; None for a fresh run."""
        pointer = self.folder / LATEST
        candidates = sorted((p for p in self.folder.glob("checkpoint-*") if p.is_dir() and p.suffix != ".partial"),
                            reverse=True)
        if pointer.exists():
            named = self.folder / pointer.read_text().strip()
            candidates = [named] + [p for p in candidates if p != named]
        problems = []
        for folder in candidates:
            problem = checkpoint_problem(folder)
            if problem is None:
                if problems and self.rank == 0:
                    log.warning("skipping damaged or incomplete checkpoint(s): %s; resuming from %s",
                                "; ".join(problems), folder)
                return folder
            problems.append(problem)
        if problems:
            raise ValueError(f"no complete checkpoint in {self.folder} to resume from: {'; '.join(problems)}. "
                             "Restore the files, or start over with --set resume=none (or another --run-dir)")
        return None

    # ---- saving
    def save(self, engine, state: dict, tag: str, metrics: dict, write_extra=None, fail_in_save: bool = False) -> None:
        """write_extra(folder): every rank's own files beside DeepSpeed's (before the checkpoint is complete)."""
        write_extra = write_extra or (lambda folder: None)
        if self.use_ray:
            self._save_ray(engine, state, tag, metrics, write_extra, fail_in_save)
        else:
            self._save_local(engine, state, tag, write_extra, fail_in_save)

    def _write_state(self, folder: Path, state: dict) -> None:
        (folder / STATE).write_text(json.dumps(state, indent=1, sort_keys=True))

    def _save_ray(self, engine, state, tag, metrics, write_extra, fail_in_save) -> None:
        import ray.train

        folder = Path(tempfile.mkdtemp(prefix=f"xgem-{tag}-"))
        try:
            engine.save_checkpoint(str(folder), tag=tag)
            write_extra(folder)
            if fail_in_save:
                os._exit(1)
            if self.rank == 0:
                self._write_state(folder, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=tag)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _save_local(self, engine, state, tag, write_extra, fail_in_save) -> None:
        partial = self.folder / f"{tag}.partial"
        engine.save_checkpoint(str(partial), tag=tag)
        write_extra(partial)
        if fail_in_save:
            os._exit(1)
        torch.distributed.barrier()
        if self.rank == 0:
            self._write_state(partial, state)
            final = self.folder / tag
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            pointer = self.folder / f".{LATEST}.tmp"
            pointer.write_text(tag)
            os.replace(pointer, self.folder / LATEST)
            if self.best is not None:
                pointer.write_text(self.best)
                os.replace(pointer, self.folder / BEST)
            self._prune(tag)
        torch.distributed.barrier()

    def _prune(self, newest: str) -> None:
        done = sorted(p for p in self.folder.iterdir() if p.is_dir() and (p / STATE).exists())
        for old in done[: max(0, len(done) - self.keep)]:
            if old.name not in (newest, self.best):
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.folder.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)

    # ---- loading
    def needs_universal(self, folder: Path) -> bool:
        return saved_world_size(folder) != self.world_size

    def prepare(self, folder: Path, local_rank: int) -> tuple[Path, bool]:
        """(folder to load, whether it is universal). Converts once per node when the world size changed."""
        if not self.needs_universal(folder):
            return folder, False
        digest = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
        scratch = self.scratch_root / f"xgem-universal-{os.getuid()}-{digest}"
        if local_rank == 0:
            saved = saved_world_size(folder)
            log.warning("checkpoint %s was written by %d rank(s); converting for %d", folder, saved,
                        self.world_size)
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            to_universal(folder, scratch)
        torch.distributed.barrier()
        self._scratch = scratch
        return scratch, True

    def release(self, local_rank: int) -> None:
        """After every rank loaded what prepare() gave: the node's universal conversion (tens of GB at full
        size) is deleted. All ranks call it."""
        if self._scratch is None:
            return
        torch.distributed.barrier()
        if local_rank == 0:
            shutil.rmtree(self._scratch, ignore_errors=True)
        self._scratch = None

    @staticmethod
    def read_state(folder: Path) -> dict:
        return json.loads((folder / STATE).read_text())


def _complete(folder: Path, what: str) -> Path:
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise ValueError(f"{what}: the checkpoint is damaged or incomplete: {problem}")
    return folder
