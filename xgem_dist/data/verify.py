"""`xgem-dist verify-shards`: re-read every shard with webdataset and check it against its manifest, and
every line of its index file against the tar's member headers."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import group_by_keys

from ..storage import Store
from .mimic import SPLITS
from .shard import FORMAT, MANIFEST, PARTIAL, index_text

log = logging.getLogger(__name__)


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through it."""

    def __init__(self, stream):
        self.stream, self.digest, self.count = stream, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.count += len(data)
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class VerifyReport:
    manifests: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.shards > 0


def find_manifests(url: str) -> list[tuple[Store, str]]:
    """(folder, manifest file name) for a manifest URL, a split folder or a shard-set root."""
    if url.endswith(".json"):
        parent, _, name = url.rstrip("/").rpartition("/")
        return [(Store(parent), name)]
    store = Store(url)
    if store.exists(MANIFEST) or store.exists(PARTIAL):
        return [(store, MANIFEST)]
    return [(store.child(s), MANIFEST) for s in SPLITS if store.child(s).exists(MANIFEST)
            or store.child(s).exists(PARTIAL)]


def _check_sample(sample: dict, decode: bool) -> list[str]:
    key = sample["__key__"]
    problems = [f"{key}: missing {m}" for m in ("json", "report.txt") if m not in sample]
    if not {"frontal.jpg", "lateral.jpg"} & sample.keys():
        problems.append(f"{key}: neither frontal.jpg nor lateral.jpg")
    if "json" in sample:
        meta = json.loads(sample["json"])
        if f"s{meta.get('study_id')}" != key:
            problems.append(f"{key}: json study_id {meta.get('study_id')} does not match the key")
    if decode:
        for view in ("frontal.jpg", "lateral.jpg"):
            if view in sample:
                try:
                    Image.open(io.BytesIO(sample[view])).load()
                except OSError as e:
                    problems.append(f"{key}: {view} does not decode ({e})")
    return problems


def _tar_members(stream, url: str, headers: list[tarfile.TarInfo]):
    """Each regular member as webdataset's grouping takes it; its header goes to `headers`."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if info.isreg():
                headers.append(info)
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # keep only what `headers` holds


def _line_key(line: str) -> str:
    name = (line.split()[3:4] or [line])[0]
    base = name.rsplit("/", 1)[-1]
    return name[: len(name) - len(base) + base.find(".")] if "." in base else name


def _members(line: str) -> dict[str, str]:
    fields = line.split()
    return {fields[i]: " ".join(fields[i + 1 : i + 4]) for i in range(0, len(fields) - 3, 4)}


def index_problems(index: str, headers: list[tarfile.TarInfo]) -> list[str]:
    """Every line of an index file that the tar's member headers do not give (name, offset, size), by line."""
    expected = index_text(headers).splitlines()
    lines = index.splitlines()
    problems = [] if lines[:1] == expected[:1] else [f"line 1 is {lines[0] if lines else ''!r}, the tar gives "
                                                     f"{expected[0]!r}"]
    tar_lines = {_line_key(line): line for line in expected[1:]}
    seen: dict[str, None] = {}  # in line order
    for number, line in enumerate(lines[1:], 2):
        key = _line_key(line)
        if key not in tar_lines or key in seen:
            problems.append(f"line {number}: {key!r} is {'repeated' if key in seen else 'not a sample of the tar'}")
            continue
        seen[key] = None
        got, want = _members(line), _members(tar_lines[key])
        problems += [f"line {number} ({key}): {ext} is {got.get(ext, 'absent')!r}, the tar's header gives "
                     f"{want.get(ext, 'no such member')!r} (offset size name)"
                     for ext in sorted(got.keys() | want.keys()) if got.get(ext) != want.get(ext)]
    problems += [f"{key} (the tar's sample {i}) has no index line"
                 for i, key in enumerate(tar_lines, 1) if key not in seen]
    if not problems and list(seen) != list(tar_lines):
        problems.append("lines are not in the tar's order")
    return problems


def verify_split(store: Store, name: str, decode: bool, report: VerifyReport) -> None:
    if not store.exists(name):
        hint = " (a partial build: rerun `xgem-dist shard` to finish it)" if store.exists(PARTIAL) else ""
        report.problems.append(f"{store.url_of(name)}: no manifest{hint}")
        return
    manifest = json.loads(store.read_bytes(name))
    report.manifests.append(store.url_of(name))
    if manifest.get("format") != FORMAT:
        report.problems.append(f"{store.url_of(name)}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        return
    seen: set[str] = set()
    for entry in tqdm(manifest["shards"], desc=f"verify {manifest['split']}", unit="shard"):
        url, index_url = store.url_of(entry["url"]), store.url_of(entry["index"])
        report.shards += 1
        headers: list[tarfile.TarInfo] = []
        try:
            with store.open(entry["url"]) as raw:
                stream = HashingReader(raw)
                keys = []
                for sample in group_by_keys(_tar_members(stream, url, headers)):
                    keys.append(sample["__key__"])
                    report.problems += [f"{url}: {p}" for p in _check_sample(sample, decode)]
                stream.drain()
        except Exception as e:  # any unreadable shard is a finding, not a crash
            report.problems.append(f"{url}: cannot be read ({type(e).__name__}: {e})")
            continue
        report.samples += len(keys)
        checks = [
            (len(keys) == entry["samples"], f"{len(keys)} samples, manifest says {entry['samples']}"),
            (stream.count == entry["bytes"], f"{stream.count} bytes, manifest says {entry['bytes']}"),
            (stream.digest.hexdigest() == entry["sha256"], "sha256 differs from the manifest"),
            (not seen & set(keys), "keys repeated from an earlier shard"),
            (keys == sorted(keys) and len(set(keys)) == len(keys), "keys out of order or repeated"),
        ]
        report.problems += [f"{url}: {msg}" for ok, msg in checks if not ok]
        seen.update(keys)
        try:
            index = store.read_bytes(entry["index"])
        except Exception as e:
            report.problems.append(f"{index_url}: cannot be read ({type(e).__name__}: {e})")
            continue
        if "index_sha256" in entry and hashlib.sha256(index).hexdigest() != entry["index_sha256"]:
            report.problems.append(f"{index_url}: sha256 differs from the manifest")
        found = index_problems(index.decode(errors="replace"), headers)
        more = [f"... and {len(found) - 8} more lines that disagree"] if len(found) > 8 else []
        report.problems += [f"{index_url}: {p}" for p in found[:8] + more]
    total = sum(e["samples"] for e in manifest["shards"])
    if manifest.get("num_samples") != total:
        report.problems.append(f"{store.url_of(name)}: num_samples {manifest.get('num_samples')} != {total}")


def verify(url: str, decode: bool = False) -> VerifyReport:
    report = VerifyReport()
    targets = find_manifests(url)
    if not targets:
        report.problems.append(f"{url}: no manifest.json here or in {list(SPLITS)}")
    for store, name in targets:
        verify_split(store, name, decode, report)
    return report
