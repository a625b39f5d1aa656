"""`xgem-dist shard`: MIMIC-CXR-JPG + reports -> WebDataset tar shards, one sample per study.

Per split (train/validate/test) the output folder holds shard-NNNNNN.tar, its DALI index
shard-NNNNNN.idx (the `wds2idx` v1.2 format) and manifest.json. The same input and settings give
byte-identical shards whatever the worker count: studies are processed in a fixed order, tar
members are sorted with mtime 0 and a fixed owner. A shard appears only when complete; after each
one, manifest.partial.json records how far the build got, so a rerun after a kill continues from
there and produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import tarfile
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from itertools import islice
from typing import Callable, Iterable, Iterator

import fsspec
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import ShardConfig
from ..storage import Store
from .mimic import SPLITS, InputError, Planned, StudyPlan, plan_studies
from .sample import SampleOptions, SampleResult, build_sample

log = logging.getLogger(__name__)

FORMAT = "xgem-dist-shards/1"
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
TAR_OWNER = "xgem"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def dali_index(tar_path: str) -> str:
    """The index DALI's webdataset reader takes (same text as its `wds2idx` tool writes)."""
    with tarfile.open(tar_path) as tar:
        return index_text(tar)


def index_text(members: Iterable[tarfile.TarInfo]) -> str:
    """The DALI v1.2 index of a tar's member headers, in tar order."""
    samples: list[list[str]] = []
    last_key = None
    for member in members:
        if not member.isreg():
            continue
        base = member.name.rsplit("/", 1)[-1]
        dot = member.name.find(".", len(member.name) - len(base))
        key, ext = member.name[:dot], member.name[dot + 1 :]
        if not key or key.endswith("/"):
            continue
        if key != last_key:
            samples.append([])
            last_key = key
        samples[-1].append(f"{ext} {member.offset_data} {member.size} {member.name}")
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def sha256_of(f, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def tar_bytes(members: dict[str, bytes]) -> int:
    """Bytes a sample takes in a ustar archive: a 512-byte header per member plus padded data."""
    return sum(512 + -(-len(v) // 512) * 512 for v in members.values())


def _die_with_parent(parent: int) -> None:
    """Pool initializer: workers of a sharder that is SIGKILLed must not keep running (Linux: PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def ordered_map(fn: Callable, items: list, workers: int) -> Iterator:
    """fn over items in order, on `workers` processes, with a bounded number in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        source = iter(items)
        pending = deque(pool.submit(fn, item) for item in islice(source, 4 * workers))
        while pending:
            result = pending.popleft().result()
            for item in islice(source, 1):
                pending.append(pool.submit(fn, item))
            yield result


def _empty_state() -> dict:
    return {"studies_done": 0, "shards": [], "skipped": [], "degraded": [],
            "views": {"frontal": {}, "lateral": {}, "no_frontal": 0, "no_lateral": 0, "unused": {}}}


class SplitWriter:
    """Writes one split's shards, checkpointing its progress at every shard boundary."""

    def __init__(self, store: Store, split: str, build: dict, samples_per_shard: int, max_shard_bytes: int):
        self.store, self.split, self.build = store, split, build
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.state = self._load_state()
        self._writer: wds.TarWriter | None = None
        self._file = None
        self._keys: list[str] = []
        self._bytes = 0

    def _load_state(self) -> dict:
        for name in (MANIFEST, PARTIAL):
            if not self.store.exists(name):
                continue
            state = json.loads(self.store.read_bytes(name))
            if state.get("build") != self.build:
                raise InputError(
                    f"{self.store.url_of(name)} was built with other settings or input "
                    f"({build_changes(state.get('build') or {}, self.build)}); shards of two builds must not "
                    f"be mixed: use another --out or delete {self.store.url}")
            for shard in state["shards"]:
                if not self.store.exists(shard["url"]) or self.store.size(shard["url"]) != shard["bytes"]:
                    raise InputError(f"{self.store.url_of(shard['url'])} is missing or changed since it was "
                                     "written; delete the split folder and shard again")
            state["complete"] = name == MANIFEST
            return state
        self.store.clear_staging()
        return {**_empty_state(), "complete": False}

    @property
    def complete(self) -> bool:
        return self.state["complete"]

    def add(self, study_index: int, plan: StudyPlan, result: SampleResult) -> None:
        if result.members:
            size = tar_bytes(result.members)
            if self._keys and self._bytes + size > self.max_shard_bytes:
                self._close_shard(study_index)
            if self._writer is None:
                self._open_shard()
            self._writer.write({"__key__": result.key, **result.members})
            self._keys.append(result.key)
            self._bytes += size
        self._account(plan, result)
        if len(self._keys) >= self.samples_per_shard:
            self._close_shard(study_index + 1)

    def _account(self, plan: StudyPlan, result: SampleResult) -> None:
        ids = {"subject_id": plan.subject_id, "study_id": plan.study_id}
        if result.skipped:
            log.warning("skipped s%d (%s): %s", plan.study_id, self.split, result.skipped)
            self.state["skipped"].append({**ids, "reason": result.skipped})
            return
        if result.degraded:
            log.info("degraded s%d (%s): %s", plan.study_id, self.split, "; ".join(result.degraded))
            self.state["degraded"].append({**ids, "reasons": result.degraded})
        views = self.state["views"]
        for slot in ("frontal", "lateral"):
            if slot in result.views:
                views[slot][result.views[slot]] = views[slot].get(result.views[slot], 0) + 1
            else:
                views[f"no_{slot}"] += 1
        for view, n in Counter(result.unused_views).items():
            views["unused"][view] = views["unused"].get(view, 0) + n

    def _open_shard(self) -> None:
        name = shard_name(len(self.state["shards"])) + ".tar"
        self._file = open(os.path.join(self.store.staging_dir(), name), "wb")
        self._writer = wds.TarWriter(self._file, user=TAR_OWNER, group=TAR_OWNER, mtime=0)

    def _close_shard(self, studies_done: int) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            local = self._file.name
            base = shard_name(len(self.state["shards"]))
            index_local = local[: -len(".tar")] + ".idx"
            index = dali_index(local).encode()
            with open(index_local, "wb") as f:
                f.write(index)
            with open(local, "rb") as f:
                digest = sha256_of(f)
            entry = {"url": base + ".tar", "index": base + ".idx", "samples": len(self._keys),
                     "bytes": os.path.getsize(local), "sha256": digest,
                     "index_sha256": hashlib.sha256(index).hexdigest(),
                     "first_key": self._keys[0], "last_key": self._keys[-1]}
            self.store.put(index_local, entry["index"])
            self.store.put(local, entry["url"])
            self.state["shards"].append(entry)
        self._writer, self._file, self._keys, self._bytes = None, None, [], 0
        self.state["studies_done"] = studies_done
        self.store.write_bytes(PARTIAL, self._manifest_bytes())

    def _manifest_bytes(self) -> bytes:
        state = {k: v for k, v in self.state.items() if k != "complete"}
        body = {"format": FORMAT, "split": self.split, "build": self.build, **state,
                "num_samples": sum(s["samples"] for s in state["shards"]),
                "num_bytes": sum(s["bytes"] for s in state["shards"])}
        return json.dumps(body, indent=1, sort_keys=True).encode()

    def finish(self, num_studies: int) -> dict:
        if not self.complete:
            self._close_shard(num_studies)
            self.store.write_bytes(MANIFEST, self._manifest_bytes())
            self.store.remove(PARTIAL)
            self.store.clear_staging()
            self.state["complete"] = True
        return json.loads(self._manifest_bytes())


def _fingerprint(urls: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for url in urls:
        with fsspec.open(url, "rb") as f:
            digest.update(sha256_of(f).encode())
    return digest.hexdigest()


def _resolved(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    return os.path.realpath(path) if isinstance(fs, LocalFileSystem) else url.rstrip("/")


def files_identity(root: str, suffix: str, hash_contents: bool) -> str:
    """sha256 over (path, size, mtime) of every `*suffix` under <root>/files, or over their contents."""
    fs, path = fsspec.core.url_to_fs(root)
    found = fs.find(f"{path.rstrip('/')}/files", detail=True)
    digest = hashlib.sha256()
    for name in sorted(n for n in found if n.endswith(suffix)):
        info = found[name]
        if hash_contents:
            with fs.open(name, "rb") as f:
                stamp = sha256_of(f)
        else:
            stamp = next((str(info[k]) for k in ("mtime", "LastModified", "updated", "ETag") if k in info), "")
        digest.update(f"{name[len(path):]}\0{info['size']}\0{stamp}\n".encode())
    return digest.hexdigest()


# What each part of a build's identity means, for the message that refuses to mix two builds.
IDENTITY_MEANING = {
    "images_root": "the --images root", "reports_root": "the --reports root",
    "images_files": "an image under <images>/files was added, removed or changed",
    "reports_files": "a report under <reports>/files was added, removed or changed",
    "input_tables_sha256": "a CSV table changed",
}


def build_changes(old: dict, new: dict) -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            what = IDENTITY_MEANING.get(key, key)
            changes.append(f"{what}: {old.get(key)!r} -> {new.get(key)!r}" if "files" not in key else what)
    return "; ".join(changes)


class OutputLock:
    """One shard run at a time per local --out: an flock on <out>/.shard.lock, which the kernel drops when
    its holder dies, so a lock file left by a killed run is taken over. Object stores (s3://) have no lock."""

    NAME = ".shard.lock"

    def __init__(self, store: Store):
        self.store = store
        self._file = None

    def __enter__(self) -> "OutputLock":
        if not self.store.is_local:
            log.warning("%s: no lock on object storage; make sure no other shard run writes there", self.store.url)
            return self
        os.makedirs(self.store.path, exist_ok=True)
        path = os.path.join(self.store.path, self.NAME)
        while True:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                owner = f.read().strip() or "owner unknown"
                f.close()
                raise InputError(f"{self.store.url} is being written by another shard run ({owner}); wait for it "
                                 "to finish or use another --out") from None
            try:
                if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            f.close()  # the previous holder removed the file between our open and our lock: lock the new one
        f.seek(0)
        if previous := f.read().strip():
            log.warning("%s: taking over the lock left by a run that is no longer running (%s)", path, previous)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            os.remove(self._file.name)
            self._file.close()
            self._file = None


def _tables(cfg: ShardConfig) -> tuple[str, str, str | None]:
    root = cfg.images.rstrip("/")
    metadata = cfg.metadata_csv or f"{root}/mimic-cxr-2.0.0-metadata.csv.gz"
    split = cfg.split_csv or f"{root}/mimic-cxr-2.0.0-split.csv.gz"
    chexpert = cfg.chexpert_csv or f"{root}/mimic-cxr-2.0.0-chexpert.csv.gz"
    fs, path = fsspec.core.url_to_fs(chexpert)
    if not cfg.chexpert_csv and not fs.exists(path):
        log.warning("%s not found: CheXpert labels will be null", chexpert)
        chexpert = None
    return metadata, split, chexpert


def shard(cfg: ShardConfig) -> dict:
    """Build (or finish building) every split; returns the summary also written to <out>/summary.json."""
    cfg.validate()
    tables = _tables(cfg)
    planned = plan_studies(cfg.images, cfg.reports, *tables)
    for row in planned.skipped_rows:
        log.warning("%s, line %d not used: %s", row["file"], row["line"], row["reason"])
    for s in planned.skipped_studies:
        log.warning("skipped s%d: %s", s["study_id"], s["reason"])
    out = Store(cfg.out)
    with OutputLock(out):
        return _shard_locked(cfg, tables, planned, out)


def _shard_locked(cfg: ShardConfig, tables: tuple[str, str, str | None], planned: Planned, out: Store) -> dict:
    options = SampleOptions(cfg.max_side, cfg.jpeg_quality, cfg.report_section, cfg.missing_report)
    build = {**dataclasses.asdict(options), "samples_per_shard": cfg.samples_per_shard,
             "max_shard_bytes": cfg.max_shard_bytes, "format": FORMAT,
             "input_tables_sha256": _fingerprint(t for t in tables if t),
             "images_root": _resolved(cfg.images), "reports_root": _resolved(cfg.reports),
             "images_files": files_identity(cfg.images, ".jpg", cfg.hash_inputs),
             "reports_files": files_identity(cfg.reports, ".txt", cfg.hash_inputs),
             "input_identity": "sha256" if cfg.hash_inputs else "size+mtime"}
    summary: dict = {"build": build, "splits": {}, "skipped_without_split": planned.skipped_studies,
                     "skipped_rows": planned.skipped_rows}
    work = partial(build_sample, options=options)
    with logging_redirect_tqdm():
        for split in SPLITS:
            split_plans = [p for p in planned.studies if p.split == split]
            writer = SplitWriter(out.child(split), split, build, cfg.samples_per_shard, cfg.max_shard_bytes)
            start = writer.state["studies_done"]
            if not writer.complete:
                todo = split_plans[start:]
                bar = tqdm(total=len(split_plans), initial=start, desc=f"shard {split}", unit="study",
                           disable=not cfg.progress)
                for i, (plan, result) in enumerate(zip(todo, ordered_map(work, todo, cfg.workers)), start):
                    writer.add(i, plan, result)
                    bar.update()
                bar.close()
            manifest = writer.finish(len(split_plans))
            summary["splits"][split] = {k: manifest[k] for k in ("num_samples", "num_bytes", "views")} | {
                "shards": len(manifest["shards"]), "skipped": len(manifest["skipped"]),
                "degraded": len(manifest["degraded"]), "manifest": f"{split}/{MANIFEST}"}
    out.write_bytes("summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    out.clear_staging()
    return summary
