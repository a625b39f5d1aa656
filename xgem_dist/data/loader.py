"""The streaming loader: exactly-once delivery from a shard split, on any world size, across resumes.

- Order: each epoch is a permutation of the split's samples that depends only on (seed, epoch,
  manifest). Every optimizer step consumes the next `global_batch` positions; micro-batch m of rank r
  is a fixed contiguous slice of them. Nothing depends on the world size but the slicing.
- State: (seed, epoch, samples consumed in the epoch, manifest hash) as of the last step handed to the
  trainer, whatever has been prefetched. Restoring it on any world size continues the same global
  sequence.
- The last partial global batch of an epoch: `drop` (default) or `pad`, where the missing positions
  come as invalid rows (`valid` False, zero images) — never as repeated samples.
- Start: the split's manifest, index files and tars must agree (`load_shard_set`: sizes, sample counts, index
  checksums, keys), else it refuses to train and points to `xgem-dist verify-shards`.
- Bytes: read by offset through the DALI index files (any fsspec URL, s3:// included): local shards
  through a memory map (no copy before the decoder's), object stores by concurrent range requests.
  Decoded on the GPU with DALI or on the CPU (decode.py). A background thread decodes a bounded number
  of steps ahead while the reads of the next step run beside it.
- Precomputed conditioning (`conditioning`: the `xgem-dist precompute` output): its shards have the split's keys in
  the same order and are read beside the reports at the same positions; the JPEGs are then not read at all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import os
import queue
import tarfile
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..storage import Store
from .decode import DALI_INSTALL, DALIDecoder, PILDecoder, dali_missing
from .mimic import InputError
from .shard import MANIFEST

log = logging.getLogger(__name__)
VIEWS = ("frontal", "lateral")


@dataclass(frozen=True)
class SampleRef:
    key: str
    shard: str
    members: dict[str, tuple[int, int]]  # ext -> (offset, size) in the shard


def read_index(text: str, shard: str) -> list[SampleRef]:
    """Parse a DALI v1.2 webdataset index; a malformed line is an error naming the shard and the line."""
    lines = text.strip().split("\n")
    header = lines[0].split()
    if len(header) != 2 or header[0] != "v1.2" or header[1] != str(len(lines) - 1):
        raise ValueError(f"{shard}'s index: header {lines[0]!r}, expected 'v1.2 {len(lines) - 1}' "
                         f"for its {len(lines) - 1} sample lines")
    refs = []
    for number, line in enumerate(lines[1:], 2):
        fields = line.split()
        try:
            if not fields or len(fields) % 4:
                raise ValueError("not groups of 'ext offset size name'")
            key = fields[3][: -len(fields[0]) - 1]
            members = {}
            for ext, offset, size, name in zip(*[iter(fields)] * 4):
                if name != f"{key}.{ext}" or ext in members:
                    raise ValueError(f"member {name} under {ext}")
                members[ext] = (int(offset), int(size))
        except ValueError as e:
            raise ValueError(f"{shard}'s index: line {number} ({e}): {line[:200]!r}") from None
        refs.append(SampleRef(key, shard, members))
    return refs


def _layout_problem(refs: list[SampleRef], tar_bytes: int) -> str | None:
    """Index entries that cannot be members of a tar of this size: past its end, or overlapping another member
    or the header block before their data."""
    extents = sorted((offset, size, ref.key, ext) for ref in refs for ext, (offset, size) in ref.members.items())
    end, previous = 0, "the start of the tar"
    for offset, size, key, ext in extents:
        if offset < end + tarfile.BLOCKSIZE:
            return f"index entry {key}.{ext} at byte {offset} overlaps {previous} or its header"
        end, previous = offset + size, f"{key}.{ext}"
    if end > tar_bytes:
        return f"index entry {previous} ends at byte {end}, past the tar's {tar_bytes}"
    return None


def _header_problems(store: Store, spots: list[tuple[str, str, int, int]]) -> list[str]:
    """Whether the tar header before each (shard, member name, offset, size) names that member and size: the
    first and last member of each shard catch a tar swapped for another of the same size (one range each)."""
    blocks = store.fs.cat_ranges([f"{store.path}/{shard}" for shard, *_ in spots],
                                 [offset - tarfile.BLOCKSIZE for *_, offset, _ in spots],
                                 [offset for *_, offset, _ in spots], on_error="raise")
    problems = []
    for (shard, name, offset, size), block in zip(spots, blocks):
        try:
            header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            found = f"{header.name} ({header.size} bytes)"
        except tarfile.TarError:
            found = "no tar header"
        if found != f"{name} ({size} bytes)":
            problems.append(f"{shard}: the index has {name} ({size} bytes) at byte {offset}, the tar has {found}")
    return problems


def load_shard_set(store: Store, manifest: dict) -> list[SampleRef]:
    """The split's samples, once its manifest, index files and tars agree: every listed tar present with the
    manifest's size, no unlisted tar beside them, each index matching its manifest checksum (when the manifest
    has one), sample count and first/last key, the tar headers of its first and last member, and no key in two
    shards. One listing of the folder, the (small) index files and two 512-byte ranges per shard: cheap on
    object stores too."""
    store.fs.invalidate_cache(store.path)
    sizes = {info["name"].rstrip("/").rsplit("/", 1)[-1]: info["size"]
             for info in store.fs.ls(store.path, detail=True) if info["type"] == "file"}
    entries = manifest["shards"]
    problems = [f"{name} is in the folder but not in the manifest (a manifest from another build?)"
                for name in sorted(set(sizes) - {e["url"] for e in entries}) if name.endswith(".tar")]
    present = [e["index"] for e in entries if e["index"] in sizes]
    texts = store.fs.cat_ranges([f"{store.path}/{name}" for name in present], [0] * len(present),
                                [None] * len(present), on_error="raise")
    indexes = dict(zip(present, texts))
    samples, owner, unchecked, spots = [], {}, 0, []
    for entry in entries:
        tar, index = entry["url"], indexes.get(entry["index"])
        if tar not in sizes:
            problems.append(f"{tar} is missing")
        elif sizes[tar] != entry["bytes"]:
            empty = " (empty)" if sizes[tar] == 0 else ""
            problems.append(f"{tar} has {sizes[tar]} bytes{empty}, the manifest says {entry['bytes']}")
        if index is None:
            problems.append(f"{entry['index']} is missing")
            continue
        if "index_sha256" not in entry:
            unchecked += 1
        elif hashlib.sha256(index).hexdigest() != entry["index_sha256"]:
            problems.append(f"{entry['index']}: sha256 differs from the manifest (an edited or replaced index)")
        try:
            refs = read_index(index.decode(errors="replace"), tar)
        except ValueError as e:
            problems.append(str(e))
            continue
        keys = [ref.key for ref in refs]
        if len(refs) != entry["samples"]:
            problems.append(f"{entry['index']}: {len(refs)} samples, the manifest says {entry['samples']}")
        elif (keys[0], keys[-1]) != (entry["first_key"], entry["last_key"]):
            problems.append(f"{entry['index']}: keys {keys[0]}..{keys[-1]}, the manifest says "
                            f"{entry['first_key']}..{entry['last_key']}")
        if refs and sizes.get(tar) == entry["bytes"]:
            if layout := _layout_problem(refs, entry["bytes"]):
                problems.append(f"{entry['index']}: {layout}")
            else:  # the first member of the first sample, the last of the last
                ends = [(ref.key, *pick(ref.members.items(), key=lambda m: m[1][0]))
                        for ref, pick in ((refs[0], min), (refs[-1], max))]
                spots += [(tar, f"{key}.{ext}", offset, size) for key, ext, (offset, size) in ends]
        repeated = Counter(owner[key] for key in keys if key in owner)
        problems += [f"{n} sample(s) of {tar} are also in {other} (samples repeated)" for other, n in repeated.items()]
        problems += [f"{entry['index']}: {key} repeated" for key, n in Counter(keys).items() if n > 1]
        owner.update(dict.fromkeys(keys, tar))
        samples += refs
    problems += _header_problems(store, spots) if spots else []
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise InputError(f"{store.url}: the shards do not agree with {MANIFEST}, refusing to train on them:\n  "
                         + "\n  ".join(shown) + f"\nCheck the set with `xgem-dist verify-shards {store.url}` and "
                         "rebuild it with `xgem-dist shard` (or restore the files from the same build).")
    if unchecked:
        log.warning("%s: %d index file(s) without a checksum in the manifest (written by an older xgem-dist); "
                    "they were checked for structure only: `xgem-dist verify-shards %s` checks them against "
                    "the tars", store.url_of(MANIFEST), unchecked, store.url)
    return samples


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A seed of its own for the sample at `position` of the epoch's global order."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


def tokenize_reports(tokenizers, reports: list[str]) -> dict[str, torch.Tensor]:
    """Token ids for CLIP (padded to its 77 positions), the Optimus encoder (BERT) and decoder (GPT-2)."""
    clip = tokenizers.clip(reports, padding="max_length", max_length=tokenizers.clip_max_length, truncation=True,
                           return_tensors="pt")
    bert = tokenizers.bert(reports, padding=True, truncation=True, max_length=tokenizers.bert_max_length,
                           return_tensors="pt")
    gpt2 = tokenizers.gpt2(reports, padding=True, truncation=True, max_length=tokenizers.gpt2_max_length,
                           return_tensors="pt")
    return {"clip_ids": clip["input_ids"], "bert_ids": bert["input_ids"], "bert_mask": bert["attention_mask"],
            "gpt2_ids": gpt2["input_ids"]}


def default_threads() -> int:
    """Decode/read threads per rank: the CPUs this process may use shared by the node's ranks, 2 to 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(2, min(16, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))


@functools.cache
def _warn_no_dali(reason: str) -> None:
    log.warning("decoder auto: NVIDIA DALI is not usable here (%s), so JPEGs are decoded on the CPU with PIL; "
                "for decoding on the GPU %s", reason, DALI_INSTALL)


def choose_decoder(kind: str, cuda_device: int | None) -> str:
    """`auto`: DALI on the GPU when there is a GPU and DALI imports, else PIL (with one warning per process
    when only DALI is missing)."""
    if kind != "auto":
        return kind
    if cuda_device is None:
        return "pil"
    reason = dali_missing()
    if reason is None:
        return "dali-gpu"
    _warn_no_dali(reason)
    return "pil"


def make_decoder(kind: str, size: int, max_batch: int, threads: int, cuda_device: int | None):
    """cuda_device: the rank's GPU (None without one), where DALI's GPU decode runs and allocates."""
    kind = choose_decoder(kind, cuda_device)
    if kind == "dali-gpu" and cuda_device is None:
        raise ValueError("decoder dali-gpu needs a CUDA GPU; use dali-cpu or pil on this machine")
    if kind in ("dali-gpu", "dali-cpu") and (missing := dali_missing()) is not None:
        raise ValueError(f"decoder {kind} needs NVIDIA DALI ({missing}): {DALI_INSTALL}, or use decoder pil")
    if kind == "pil":
        return PILDecoder(size, threads)
    if kind in ("dali-gpu", "dali-cpu"):
        return DALIDecoder(size, max_batch, device=kind.split("-")[1],
                           device_id=cuda_device if kind == "dali-gpu" else 0, threads=threads)
    raise ValueError(f"decoder must be auto, pil, dali-cpu or dali-gpu, got {kind!r}")


class ShardLoader:
    def __init__(self, url: str, global_batch: int, rank: int, world_size: int, image_size: int,
                 grad_accum: int = 1, seed: int = 0, split: str = "train", decoder: str = "pil",
                 threads: int = 0, prefetch: int = 2, last_batch: str = "drop", pin_memory: bool = False,
                 tokenizers=None, fixed_reads: bool = False, conditioning: str = ""):
        """threads: decode and read threads (0: default_threads()); prefetch: steps decoded ahead (0: none,
        everything happens in next_step); fixed_reads: only read_fixed is used (validation), so a split smaller
        than one global batch is fine; conditioning: URL of precomputed conditioning shards for this set."""
        if global_batch % (world_size * grad_accum):
            raise ValueError(f"global batch {global_batch} does not divide into {grad_accum} micro-batch(es) "
                             f"over {world_size} rank(s); pick a global batch that is a multiple of "
                             f"{world_size * grad_accum}")
        if last_batch not in ("drop", "pad"):
            raise ValueError(f"last_batch must be 'drop' or 'pad', got {last_batch!r}")
        store = Store(url)
        if not store.exists(MANIFEST):
            store = store.child(split)
        manifest_bytes = store.read_bytes(MANIFEST)
        self.manifest = json.loads(manifest_bytes)
        self.manifest_hash = hashlib.sha256(manifest_bytes).hexdigest()[:16]
        self.store = store
        self.samples = load_shard_set(store, self.manifest)
        if len(self.samples) < global_batch and not fixed_reads:
            raise ValueError(f"{store.url}: {len(self.samples)} samples, fewer than one global batch ({global_batch})")
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.grad_accum, self.image_size, self.seed, self.last_batch = grad_accum, image_size, seed, last_batch
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_available() else None  # this rank's GPU
        self.pin_memory, self.prefetch = pin_memory and self._cuda_device is not None, prefetch
        threads = threads if threads > 0 else default_threads()
        self.decoder = make_decoder(decoder, image_size, 2 * global_batch // (world_size * grad_accum), threads,
                                    self._cuda_device)
        self._maps: dict[str, mmap.mmap] = {}  # local shards, mapped once
        self.conditioning = _ConditioningSet(conditioning, split, self) if conditioning else None
        self.tokenizers = tokenizers
        self.epoch, self.consumed = 0, 0  # as of the last step handed out
        self._cursor = (0, 0)  # as of the last step produced
        self._order: tuple[int, torch.Tensor] | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.samples), self.global_batch
        return n // b if self.last_batch == "drop" else -(-n // b)

    @property
    def skipped_views(self) -> int:
        return self.decoder.failures

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed,
                "manifest_hash": self.manifest_hash}

    def load_state_dict(self, state: dict) -> None:
        if state["manifest_hash"] != self.manifest_hash or state["seed"] != self.seed:
            raise ValueError("the checkpoint's data state belongs to another manifest or seed; "
                             "resume with the same shards and seed")
        self.close()
        self.epoch, self.consumed = state["epoch"], state["consumed"]
        self._cursor = (self.epoch, self.consumed)

    def order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.samples), generator=generator))
        return self._order[1]

    def _advance(self) -> tuple[int, int, list[list[int]]]:
        """Move the production cursor one step; returns (epoch, start, this rank's positions per micro-batch)."""
        epoch, consumed = self._cursor
        if consumed >= self.steps_per_epoch * self.global_batch:
            epoch, consumed = epoch + 1, 0
        micro = self.global_batch // self.grad_accum
        per_rank = micro // self.world_size
        positions = [list(range(consumed + m * micro + self.rank * per_rank,
                                consumed + m * micro + (self.rank + 1) * per_rank)) for m in range(self.grad_accum)]
        self._cursor = (epoch, consumed + self.global_batch)
        return epoch, consumed + self.global_batch, positions

    def _read_step(self) -> tuple[list[dict], tuple[int, int]]:
        """The next step's micro-batches as raw bytes, and the (epoch, consumed) it leaves the cursor at."""
        epoch, consumed_after, positions = self._advance()
        order = self.order(epoch)
        return [self._read(order, epoch, p) for p in positions], (epoch, consumed_after)

    def _produce(self, raw: tuple[list[dict], tuple[int, int]]) -> tuple[list[dict], tuple[int, int]]:
        batches, cursor = raw
        return [self._decode(batch) for batch in batches], cursor

    def _offer(self, item) -> None:
        """Queue an item (or an error) unless the loader is being closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _worker(self) -> None:
        """Decodes step n while a reader thread fetches the bytes of step n + 1; queues at most `prefetch`."""
        if self._cuda_device is not None:
            # a new thread starts on cuda:0: pinning there would open a context on GPU 0 for every rank
            torch.cuda.set_device(self._cuda_device)
        reader = ThreadPoolExecutor(1, thread_name_prefix="xgem-read-ahead")
        try:
            pending: Future = reader.submit(self._read_step)
            while not self._stop.is_set():
                raw = pending.result()
                pending = reader.submit(self._read_step)
                self._offer(self._produce(raw))
        except Exception as e:  # hand the error to the trainer's thread
            self._offer(e)
        finally:
            reader.shutdown(wait=True)

    def next_step(self) -> list[dict]:
        """This rank's micro-batches for the next optimizer step."""
        if self.prefetch <= 0:
            batches, (self.epoch, self.consumed) = self._produce(self._read_step())
            return batches
        if self._thread is None:
            self._stop.clear()
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._worker, name="xgem-loader", daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, Exception):
            raise item
        batches, (self.epoch, self.consumed) = item
        return batches

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
        self._cursor = (self.epoch, self.consumed)

    def _mapped(self, store: Store, shard: str) -> memoryview:
        path = f"{store.path}/{shard}"
        if path not in self._maps:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    raise OSError(f"{store.url_of(shard)} is empty (0 bytes) since training started; "
                                  f"check the set with `xgem-dist verify-shards {store.url}`")
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._maps[path])

    def read_members(self, wanted: list[tuple[SampleRef | None, str]],
                     store: Store | None = None) -> list[bytes | memoryview | None]:
        """The bytes of each (sample, member), None where absent, read by offset: from local shards as
        zero-copy views of the mapped file (the decoder's copy is the only one), from object stores as
        concurrent range requests. store: where the samples' shards are (default: the image shards)."""
        store = store or self.store
        out: list[bytes | memoryview | None] = [None] * len(wanted)
        ranges = [(i, ref.shard, *ref.members[ext]) for i, (ref, ext) in enumerate(wanted)
                  if ref is not None and ext in ref.members]
        for i, _, _, size in ranges:
            if size == 0:
                out[i] = b""  # never requested: an object store answers an empty range with the whole object
        ranges = [r for r in ranges if r[3] > 0]
        if store.is_local:
            datas = [self._mapped(store, shard)[offset : offset + size] for _, shard, offset, size in ranges]
        elif ranges:
            datas = store.fs.cat_ranges([f"{store.path}/{shard}" for _, shard, _, _ in ranges],
                                             [offset for *_, offset, _ in ranges],
                                             [offset + size for *_, offset, size in ranges], on_error="raise")
        else:
            datas = []
        for (i, shard, offset, size), data in zip(ranges, datas):
            if len(data) != size:
                raise OSError(f"{store.url_of(shard)}: {len(data)} bytes at offset {offset}, the index says "
                              f"{size}; the shard is truncated or does not match its index")
            out[i] = data
        return out

    def _read(self, order: torch.Tensor, epoch: int, positions: list[int]) -> dict:
        """One micro-batch's identity and raw bytes (reports, then views in VIEWS order)."""
        indexes = [int(order[p]) if p < len(self.samples) else None for p in positions]
        return self._raw(indexes, positions, [sample_seed(self.seed, epoch, p) for p in positions])

    def _raw(self, indexes: list[int | None], positions: list[int], seeds: list[int]) -> dict:
        refs = [self.samples[i] if i is not None else None for i in indexes]
        batch = {"key": [r.key if r else "" for r in refs], "position": positions, "seed": seeds,
                 "valid": torch.tensor([r is not None for r in refs])}
        reports = self.read_members([(r, "report.txt") for r in refs])
        if self.conditioning is not None:
            return batch | {"members": reports, "conditioning": self.conditioning.read(indexes)}
        return batch | {"members": reports + self.read_members([(r, f"{v}.jpg") for v in VIEWS for r in refs])}

    def read_fixed(self, indices: list[int | None], seeds: list[int]) -> dict:
        """One decoded micro-batch of the samples at these indices of the manifest's order (None: a padding row,
        invalid), with the given per-sample seeds: validation and samples read the same studies every time."""
        return self._decode(self._raw(indices, [-1 if i is None else i for i in indices], seeds))

    def _decode(self, batch: dict) -> dict:
        members, n = batch.pop("members"), len(batch["key"])
        batch["report"] = [bytes(data or b"").decode("utf-8") for data in members[:n]]
        if self.tokenizers is not None:
            batch.update(tokenize_reports(self.tokenizers, batch["report"]))
        if self.conditioning is not None:
            conditioning = self.conditioning.decode(batch.pop("conditioning"))
            for view in VIEWS:
                conditioning[f"{view}_present"] = conditioning[f"{view}_present"].bool()
            return batch | conditioning
        images, present = self.decoder(members[n:])
        for i, view in enumerate(VIEWS):
            batch[view] = images[i * n : (i + 1) * n]
            batch[f"{view}_present"] = present[i * n : (i + 1) * n]
            if self.pin_memory and batch[view].device.type == "cpu":
                batch[view] = batch[view].pin_memory()
        return batch


class _ConditioningSet:
    """The precomputed conditioning of a loader's split: refused unless it was computed from this very manifest
    at this image size, with the same keys in the same order."""

    def __init__(self, url: str, split: str, loader: ShardLoader):
        from .precompute import MEMBER, conditioning_store, stack_samples

        self.loader, self.member, self._stack = loader, MEMBER, stack_samples
        self.store = conditioning_store(url, split)
        if not self.store.exists(MANIFEST):
            raise InputError(f"{self.store.url_of(MANIFEST)} is missing: run `xgem-dist precompute --shards "
                             f"{loader.store.url} ... --out {url}` first (or let it finish)")
        manifest = json.loads(self.store.read_bytes(MANIFEST))
        build, self.shapes = manifest["build"], manifest["shapes"]
        if build["source_manifest"] != loader.manifest_hash:
            raise InputError(f"{self.store.url}: computed from a shard set whose manifest hash is "
                             f"{build['source_manifest']}, not {loader.store.url_of(MANIFEST)} "
                             f"({loader.manifest_hash}); rerun `xgem-dist precompute` for these shards")
        if build["image_size"] != loader.image_size:
            raise InputError(f"{self.store.url}: computed at image_size {build['image_size']}, the run has "
                             f"{loader.image_size}; precompute again with --image-size {loader.image_size}")
        self.samples = load_shard_set(self.store, manifest)
        keys, theirs = [r.key for r in loader.samples], [r.key for r in self.samples]
        if keys != theirs:
            first = next((i for i, (a, b) in enumerate(zip(keys, theirs)) if a != b), min(len(keys), len(theirs)))
            raise InputError(f"{self.store.url}: its samples are not those of {loader.store.url} in the same order "
                             f"(position {first}: {theirs[first:first + 1]} vs {keys[first:first + 1]}; "
                             f"{len(theirs)} vs {len(keys)} samples); rerun `xgem-dist precompute`")

    def read(self, indexes: list[int | None]) -> list:
        refs = [self.samples[i] if i is not None else None for i in indexes]
        return self.loader.read_members([(r, self.member) for r in refs], self.store)

    def decode(self, members: list) -> dict[str, torch.Tensor]:
        return self._stack(members, self.shapes)
