"""The sharder's input gone wrong: every case is a clear error or a counted, recorded skip, never silent."""

import gzip
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import ExifTags, Image, ImageOps

from xgem_dist.cli import main as cli_main
from xgem_dist.data.mimic import InputError, plan_studies, read_csv, study_dir
from xgem_dist.data.sample import libjpeg_damage
from xgem_dist.data.shard import OutputLock, shard
from xgem_dist.data.verify import verify
from xgem_dist.storage import Store

from .conftest import shard_config

METADATA = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"


@pytest.fixture
def root(demo, tmp_path) -> Path:
    """A writable copy of the demo dataset."""
    copy = tmp_path / "mimic"
    shutil.copytree(demo["root"], copy)
    return copy


def plain_studies(root: Path, demo) -> list[tuple[int, int]]:
    """(subject, study) of studies without a deliberate defect, in table order."""
    seen = []
    for _, row in read_csv(str(root / METADATA), "metadata"):
        ids = (int(row["subject_id"]), int(row["study_id"]))
        if f"s{ids[1]}" not in demo["defects"] and ids not in seen:
            seen.append(ids)
    return seen


def edit_table(path: Path, edit) -> None:
    """Rewrites a gzipped CSV's lines through edit(lines) -> lines."""
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    path.write_bytes(gzip.compress(("\n".join(edit(lines)) + "\n").encode()))


def manifests(out: Path) -> dict[str, dict]:
    return {s: json.loads((out / s / "manifest.json").read_text()) for s in ("train", "validate", "test")}


def plan(root: Path):
    return plan_studies(str(root), str(root), str(root / METADATA), str(root / SPLIT), str(root / CHEXPERT))


# 1. build identity


def test_rerun_from_other_roots_or_changed_images_is_refused(root, tmp_path):
    out, hashed = tmp_path / "out", tmp_path / "hashed"
    shard(shard_config(root, out))
    shard(shard_config(root, hashed, hash_inputs=True))
    other = tmp_path / "other"
    shutil.copytree(root, other)
    with pytest.raises(InputError, match=r"the --images root: .*the --reports root: .*use another --out or delete"):
        shard(shard_config(other, out))

    image = next((root / "files").rglob("*.jpg"))
    stat = image.stat()
    image.write_bytes(image.read_bytes()[::-1])  # same size, other bytes, new mtime
    with pytest.raises(InputError, match="an image under <images>/files was added, removed or changed"):
        shard(shard_config(root, out))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only the hash tells
    shard(shard_config(root, out))
    with pytest.raises(InputError, match="an image under <images>/files was added, removed or changed"):
        shard(shard_config(root, hashed, hash_inputs=True))


# 2. unreadable reports and study folders


def test_bad_reports_and_study_folders_are_recorded_and_the_run_goes_on(root, demo, tmp_path):
    (latin1, utf16, report_dir, study_file, *_) = plain_studies(root, demo)
    reports = {ids: Path(study_dir(str(root), *ids) + ".txt") for ids in (latin1, utf16, report_dir)}
    reports[latin1].write_bytes("Effusion \xe9valu\xe9e.".encode("latin-1"))
    reports[utf16].write_bytes(reports[utf16].read_text().encode("utf-16"))
    reports[report_dir].unlink()
    reports[report_dir].mkdir()
    folder = Path(study_dir(str(root), *study_file))
    shutil.rmtree(folder)
    folder.write_text("not a folder")

    out = tmp_path / "out"
    summary = shard(shard_config(root, out))
    found = manifests(out)
    degraded = {e["study_id"]: e["reasons"] for m in found.values() for e in m["degraded"]}
    skipped = {e["study_id"]: e["reason"] for m in found.values() for e in m["skipped"]}
    for ids in (latin1, utf16):
        assert degraded[ids[1]] == [f"report {reports[ids]} is not UTF-8 text (byte offset "
                                    f"{9 if ids == latin1 else 0})"]
    assert degraded[report_dir[1]] == [f"report {reports[report_dir]} unreadable (Is a directory)"]
    assert f"cannot read {folder}/" in skipped[study_file[1]] and "(Not a directory)" in skipped[study_file[1]]
    assert sum(s["num_samples"] for s in summary["splits"].values()) == demo["studies"] - 2
    assert verify(str(out)).ok

    skip_out = tmp_path / "skip"
    shard(shard_config(root, skip_out, missing_report="skip"))
    skipped = {e["study_id"]: e["reason"] for m in manifests(skip_out).values() for e in m["skipped"]}
    assert {latin1[1], utf16[1], report_dir[1], study_file[1]} <= set(skipped)


# 3. CSV values and encodings


def set_cell(lines: list[str], line: int, column: str, value: str) -> list[str]:
    row = lines[line - 1].split(",")
    row[lines[0].split(",").index(column)] = value
    return lines[: line - 1] + [",".join(row)] + lines[line:]


def test_csv_value_errors_name_file_line_and_column(root, capsys):
    table = root / CHEXPERT
    original = table.read_bytes()
    for bad in ("abc", "nan"):
        edit_table(table, lambda lines: set_cell(lines, 3, "Edema", bad))
        with pytest.raises(InputError, match=rf"{CHEXPERT}, line 3, column 'Edema': '{bad}' is not a CheXpert label"):
            plan(root)
        table.write_bytes(original)
    edit_table(root / SPLIT, lambda lines: set_cell(lines, 2, "study_id", "nan"))
    assert [(r["line"], r["reason"]) for r in plan(root).skipped_rows] == [
        (2, "study_id 'nan' is not a MIMIC-CXR study_id")]

    table.write_bytes(original[: len(original) // 2])
    with pytest.raises(InputError, match=rf"{CHEXPERT}: truncated or damaged gzip file .*download it again"):
        plan(root)
    capsys.readouterr()
    assert cli_main(["shard", "--images", str(root), "--reports", str(root), "--out", str(root / "o")]) == 2
    assert "truncated or damaged gzip file" in capsys.readouterr().err


def test_utf8_bom_header_is_tolerated(root):
    before = plan(root)
    table = root / METADATA
    table.write_bytes(gzip.compress(b"\xef\xbb\xbf" + gzip.decompress(table.read_bytes())))
    after = plan(root)
    assert after.studies == before.studies and after.skipped_rows == []


# 4. ids that are not MIMIC-CXR ids


def test_malformed_ids_are_skipped_by_row_and_never_become_paths(root, demo, tmp_path):
    (subject, study), (other_subject, other_study) = plain_studies(root, demo)[:2]
    victim = next(Path(study_dir(str(root), other_subject, other_study)).glob("*.jpg")).stem
    bad_rows = [  # a new study whose only images point elsewhere on disk
        f"../s{other_study}/{victim},{subject},59999999,,PA",
        f"{victim}/x,{subject},59999999,,PA",
        f"{victim},{subject}x,59999999,,PA",
        f"{victim},{subject},59999999.0,,PA",
    ]
    edit_table(root / METADATA, lambda lines: lines + [r + ",,,,,,," for r in bad_rows])
    edit_table(root / SPLIT, lambda lines: lines + [f"{victim},59999999,{subject},train", f"x,../1,{subject},train"])
    planned = plan(root)
    first_bad = demo["images"] + 2
    assert [(r["file"].rsplit("/", 1)[-1], r["line"]) for r in planned.skipped_rows] == (
        [(SPLIT, demo["images"] + 3)] + [(METADATA, first_bad + i) for i in range(4)])
    assert [r["reason"].split(" ")[0] for r in planned.skipped_rows] == [
        "study_id", "dicom_id", "dicom_id", "subject_id", "study_id"]
    assert all(".." not in ref.path for p in planned.studies for ref in p.frontal + p.lateral + p.unused)

    summary = shard(shard_config(root, tmp_path / "out"))
    assert len(summary["skipped_rows"]) == 5
    assert "s59999999" not in json.dumps(manifests(tmp_path / "out"))


# 5. duplicates


def test_study_under_two_subjects_and_conflicting_chexpert_rows(root, demo, tmp_path):
    studies = plain_studies(root, demo)
    subject, study = studies[0]
    other_subject = next(s for s, _ in studies if s != subject)
    edit_table(root / METADATA, lambda lines: lines + [f"0000abcd,{other_subject},{study},,PA,,,,,,,"])
    chexpert_rows = gzip.decompress((root / CHEXPERT).read_bytes()).decode().splitlines()
    first = next(i for i, line in enumerate(chexpert_rows) if line.startswith(f"{subject},{study},"))
    conflicting = f"{subject},{study}," + ",".join(["1.0"] * 14)
    edit_table(root / CHEXPERT, lambda lines: lines + [lines[first], conflicting])

    planned = plan(root)
    twice = [s for s in planned.skipped_studies if s["study_id"] == study]
    assert [s["subject_id"] for s in twice] == sorted([subject, other_subject])
    assert all(f"listed under subjects {sorted([subject, other_subject])}" in s["reason"] for s in twice)
    assert planned.skipped_rows == [{"file": str(root / CHEXPERT), "line": len(chexpert_rows) + 2,
                                     "reason": f"labels of s{study} differ from line {first + 1}; the first row "
                                               "is used"}]

    out = tmp_path / "out"
    summary = shard(shard_config(root, out))
    assert sum(s["num_samples"] for s in summary["splits"].values()) == demo["studies"] - 2
    assert [s["study_id"] for s in summary["skipped_without_split"]] == [study, study]
    assert verify(str(out)).ok


# 6. one run at a time per --out


def test_a_second_run_into_the_same_out_stops_and_a_stale_lock_is_taken_over(root, tmp_path, caplog):
    out = tmp_path / "out"
    with OutputLock(Store(str(out))):
        with pytest.raises(InputError, match=rf"being written by another shard run \(pid {os.getpid()} on "):
            shard(shard_config(root, out))
        assert not (out / "train").exists()
    (out / ".shard.lock").write_text("pid 999999999 on elsewhere since then\n")
    with caplog.at_level(logging.WARNING):
        shard(shard_config(root, out))
    assert "taking over the lock left by a run that is no longer running (pid 999999999" in caplog.text
    assert not (out / ".shard.lock").exists() and verify(str(out)).ok


# 7. workers die with the sharder


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_sharder_takes_its_workers_with_it(demo, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "xgem_dist.cli", "shard", "--images", demo["root"], "--reports",
                             demo["root"], "--out", str(tmp_path / "out"), "--workers", "2", "--max-side", "1024",
                             "--no-progress"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    workers: set[int] = set()
    while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
        workers = children(proc.pid)
        time.sleep(0.05)
    assert len(workers) == 2, "the sharder did not start two workers"
    proc.kill()
    proc.wait()
    deadline = time.time() + 5
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    left = [w for w in workers if alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived the sharder"


# 8. corrupt scan data and EXIF orientation


def test_corrupt_scan_data_that_pil_decodes_counts_as_unreadable(root, demo, tmp_path):
    subject, study = plain_studies(root, demo)[0]
    planned = next(p for p in plan(root).studies if p.study_id == study)
    image = Path(planned.frontal[0].path)
    raw = image.read_bytes()
    middle = len(raw) // 2
    cut_short = raw[:middle] + b"\xff\xd9" + raw[middle + 2 :]  # libjpeg: "premature end of data segment"
    stray_restart = raw[:middle] + b"\xff\xd0" + raw[middle + 2 :]
    zeroed = raw[:middle] + bytes(64) + raw[middle + 64 :]  # damage inside the Huffman codes
    for damaged in (cut_short, stray_restart, zeroed):
        Image.open(io.BytesIO(damaged)).load()  # the premise: PIL decodes these without a word
        assert libjpeg_damage(damaged).startswith("Corrupt JPEG data"), libjpeg_damage(damaged)
    assert libjpeg_damage(raw) is None
    image.write_bytes(zeroed)

    out = tmp_path / "out"
    shard(shard_config(root, out))
    degraded = {e["study_id"]: e["reasons"] for m in manifests(out).values() for e in m["degraded"]}
    reasons = degraded[study]
    assert reasons[0].startswith(f"frontal {planned.frontal[0].dicom_id}: unreadable JPEG (corrupt JPEG data: "
                                 "Corrupt JPEG data") and reasons[1:] == ["no usable frontal view"], reasons

    with_restarts = io.BytesIO()
    Image.new("L", (256, 256), 128).save(with_restarts, "JPEG", restart_marker_blocks=4)
    data = with_restarts.getvalue()
    assert libjpeg_damage(data) is None
    first, second = data.index(b"\xff\xd0"), data.index(b"\xff\xd1")
    swapped = bytearray(data)
    swapped[first + 1], swapped[second + 1] = 0xD1, 0xD0
    Image.open(io.BytesIO(bytes(swapped))).load()
    assert libjpeg_damage(bytes(swapped)) == "Corrupt JPEG data: found marker 0xd1 instead of RST0"


@pytest.mark.parametrize("max_side", [0, 256])
def test_exif_orientation_is_applied_and_stripped(root, demo, tmp_path, max_side):
    subject, study = plain_studies(root, demo)[0]
    planned = next(p for p in plan(root).studies if p.study_id == study)
    image = Path(planned.frontal[0].path)
    original = Image.open(image)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored sideways: turn 90 degrees clockwise to view
    original.save(image, "JPEG", quality=95, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(image)).convert("L")

    out = tmp_path / "out"
    shard(shard_config(root, out, max_side=max_side))
    split_dir = out / planned.split
    sample = next(s for s in wds.WebDataset(sorted(str(p) for p in split_dir.glob("*.tar")), shardshuffle=False,
                                            empty_check=False) if s["__key__"] == f"s{study}")
    stored = Image.open(io.BytesIO(sample["frontal.jpg"]))
    assert ExifTags.Base.Orientation not in stored.getexif()
    meta = json.loads(sample["json"])["frontal"]
    assert meta["original_size"] == list(original.size)
    if max_side == 0:
        assert stored.size == upright.size == (original.size[1], original.size[0])
    else:
        assert max(stored.size) == 256 and tuple(meta["stored_size"]) == stored.size
        upright = upright.resize(stored.size, Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(stored, np.int16) - np.asarray(upright, np.int16)).mean() < 2
