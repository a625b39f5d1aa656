"""Shard sets that disagree with themselves: index checksums in the manifest, `verify-shards` against the tar
headers line by line, and the loader's start-up check that refuses a disagreeing set."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from xgem_dist.data.loader import ShardLoader
from xgem_dist.data.mimic import InputError
from xgem_dist.data.shard import shard
from xgem_dist.data.verify import verify

from .conftest import shard_config


@pytest.fixture(scope="module")
def other_build(demo, tmp_path_factory) -> Path:
    """The same demo sharded with 32 samples a shard: train is 32 + 19 samples."""
    out = tmp_path_factory.mktemp("other") / "shards"
    shard(shard_config(demo["root"], out, max_side=128, samples_per_shard=32))
    return out


@pytest.fixture
def copy(shards, tmp_path) -> Path:
    """A private copy of the session's shards; returns its train split folder."""
    shutil.copytree(shards, tmp_path / "set")
    return tmp_path / "set" / "train"


def loader(split: Path | str) -> ShardLoader:
    return ShardLoader(str(split), 6, 0, 1, 32, prefetch=0)


def drop_index_checksums(split: Path) -> None:
    """Make the manifest look like one written before index checksums existed."""
    manifest = json.loads((split / "manifest.json").read_text())
    for entry in manifest["shards"]:
        del entry["index_sha256"]
    (split / "manifest.json").write_text(json.dumps(manifest))


def swap_views(fields: list[str]) -> list[str]:
    """frontal.jpg and lateral.jpg point at each other's bytes (names kept)."""
    f, l = fields.index("frontal.jpg"), fields.index("lateral.jpg")
    fields[f + 1 : f + 3], fields[l + 1 : l + 3] = fields[l + 1 : l + 3], fields[f + 1 : f + 3]
    return fields


def report_at_json(fields: list[str]) -> list[str]:
    r, j = fields.index("report.txt"), fields.index("json")
    fields[r + 1 : r + 3] = fields[j + 1 : j + 3]
    return fields


def damage_index(split: Path, damage: str) -> tuple[str, str]:
    """Damages the line of the first sample after the second with both views in shard-000001.idx; returns
    (that sample's key, what verify says)."""
    index = split / "shard-000001.idx"
    lines = index.read_text().splitlines()
    n = next(n for n in range(3, len(lines)) if " frontal.jpg " in f" {lines[n]}" and " lateral.jpg " in lines[n])
    key = lines[n].split()[3].split(".")[0]
    if damage == "missing_line":
        del lines[n]
        lines[0] = f"v1.2 {len(lines) - 1}"  # a consistent header: only the manifest and the tar disagree
        finding = f"{key} (the tar's sample {n}) has no index line"
    else:
        lines[n] = " ".join({"swap_views": swap_views, "report_at_json": report_at_json}[damage](lines[n].split()))
        finding = f"line {n + 1} ({key}): " + ("frontal.jpg is" if damage == "swap_views" else "report.txt is")
    index.write_text("\n".join(lines) + "\n")
    return key, finding


def test_the_manifest_holds_each_index_files_sha256(shards):
    for split in ("train", "validate", "test"):
        folder = Path(shards) / split
        for entry in json.loads((folder / "manifest.json").read_text())["shards"]:
            assert entry["index_sha256"] == hashlib.sha256((folder / entry["index"]).read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["swap_views", "report_at_json", "missing_line"])
def test_a_damaged_index_is_refused_by_the_loader_and_located_by_verify(copy, damage):
    key, finding = damage_index(copy, damage)
    with pytest.raises(InputError, match=r"(?s)shard-000001.idx: sha256 differs.*xgem-dist verify-shards"):
        loader(copy)
    report = verify(str(copy))
    assert not report.ok
    problems = [p for p in report.problems if "train/shard-000001.idx: " in p]
    assert any(finding in p for p in problems), problems
    assert not [p for p in report.problems if "shard-000001.idx" not in p and "sha256" not in p], report.problems


@pytest.mark.parametrize("damage, refusal", [
    ("report_at_json", r"shard-000001.idx: index entry s\d+.report.txt at byte \d+ overlaps s\d+.json"),
    ("missing_line", "shard-000001.idx: 15 samples, the manifest says 16"),
])
def test_without_index_checksums_the_structure_is_still_checked(copy, damage, refusal):
    damage_index(copy, damage)
    drop_index_checksums(copy)
    with pytest.raises(InputError, match=refusal):
        loader(copy)


def test_an_old_manifest_without_index_checksums_warns_and_trains(copy, caplog):
    drop_index_checksums(copy)
    with caplog.at_level(logging.WARNING):
        assert len(loader(copy).samples) == 51
    assert "4 index file(s) without a checksum" in caplog.text and "xgem-dist verify-shards" in caplog.text


def test_a_manifest_from_another_build_is_refused(copy, other_build):
    shutil.copy(other_build / "train" / "manifest.json", copy / "manifest.json")
    with pytest.raises(InputError) as refused:
        loader(copy)  # the old loader trained on the 32 samples of the first two indexes
    message = str(refused.value)
    assert "shard-000002.tar is in the folder but not in the manifest" in message
    assert "shard-000000.idx: 16 samples, the manifest says 32" in message


def test_a_shard_from_another_build_is_refused(copy, other_build):
    for name in ("shard-000001.tar", "shard-000001.idx"):
        shutil.copy(other_build / "train" / name, copy / name)
    with pytest.raises(InputError) as refused:
        loader(copy)  # the old loader repeated the samples the two builds' shards share
    message = str(refused.value)
    assert "shard-000001.tar has" in message and "shard-000001.idx: sha256 differs" in message
    assert "16 sample(s) of shard-000002.tar are also in shard-000001.tar (samples repeated)" in message


def test_two_tars_of_the_same_size_swapped_are_refused(copy):
    first, second = copy / "shard-000000.tar", copy / "shard-000001.tar"
    assert first.stat().st_size == second.stat().st_size  # sizes and indexes agree with the manifest
    first_bytes = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(first_bytes)
    with pytest.raises(InputError, match=r"shard-000000.tar: the index has s\d+.frontal.jpg \(\d+ bytes\) at byte "
                                         r"512, the tar has s\d+.frontal.jpg"):
        loader(copy)


def test_a_missing_or_empty_tar_is_found_at_start(copy):
    (copy / "shard-000002.tar").unlink()
    (copy / "shard-000003.tar").write_bytes(b"")
    with pytest.raises(InputError) as refused:
        loader(copy)  # the old loader started and failed at the first read of either, mid-epoch
    message = str(refused.value)
    assert "shard-000002.tar is missing" in message
    assert "shard-000003.tar has 0 bytes (empty), the manifest says 40960" in message


def test_a_tar_emptied_during_training_is_named(copy):
    reader = loader(copy)
    for tar in copy.glob("*.tar"):
        tar.write_bytes(b"")
    with pytest.raises(OSError, match=r"train/shard-00000\d.tar is empty \(0 bytes\) since training started"):
        reader.next_step()  # was: "cannot mmap an empty file", naming no shard


def test_the_start_up_check_works_on_s3(copy, s3_endpoint):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(str(copy), "cxr/agreement/train", recursive=True)
    assert len(loader("s3://cxr/agreement/train").samples) == 51  # a set that agrees trains
    fs.rm_file("cxr/agreement/train/shard-000002.tar")
    damage_index(copy, "missing_line")
    fs.put_file(str(copy / "shard-000001.idx"), "cxr/agreement/train/shard-000001.idx")
    with pytest.raises(InputError) as refused:
        loader("s3://cxr/agreement/train")
    assert "shard-000002.tar is missing" in str(refused.value)
    assert "shard-000001.idx: 15 samples, the manifest says 16" in str(refused.value)
