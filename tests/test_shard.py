import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from xgem_dist.cli import main as cli_main
from xgem_dist.data.mimic import CHEXPERT_LABELS, InputError
from xgem_dist.data.shard import shard
from xgem_dist.data.verify import verify

from .conftest import shard_config


def files_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (staging excluded)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".staging" not in p.parts}


def read_split(split_dir: Path) -> dict[str, dict]:
    urls = sorted(str(p) for p in split_dir.glob("shard-*.tar"))
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


@pytest.fixture(scope="module")
def built(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "shards"
    summary = shard(shard_config(demo["root"], out, samples_per_shard=8, workers=2))
    return out, summary


def test_round_trip_counts_views_and_defects(built, demo, demo_defects):
    out, summary = built
    samples = {**read_split(out / "train"), **read_split(out / "validate"), **read_split(out / "test")}
    assert len(samples) == demo["studies"] - 1 == sum(s["num_samples"] for s in summary["splits"].values())
    manifests = {s: json.loads((out / s / "manifest.json").read_text()) for s in ("train", "validate", "test")}
    skipped = [e for m in manifests.values() for e in m["skipped"]]
    assert [f"s{e['study_id']}" for e in skipped] == [demo_defects["corrupt_only_view"]]
    assert "truncated" in skipped[0]["reason"]
    degraded = {f"s{e['study_id']}": e["reasons"] for m in manifests.values() for e in m["degraded"]}
    assert set(degraded) == {demo_defects["corrupt_pa_with_ap"], demo_defects["missing_report"]}
    assert degraded[demo_defects["missing_report"]] == ["report missing"]

    def meta(defect):
        return json.loads(samples[demo_defects[defect]]["json"])

    fallback = samples[demo_defects["corrupt_pa_with_ap"]]
    assert json.loads(fallback["json"])["frontal"]["view_position"] == "AP"
    assert "unreadable JPEG" in degraded[demo_defects["corrupt_pa_with_ap"]][0]
    lateral_only = samples[demo_defects["frontal_less"]]
    assert "frontal.jpg" not in lateral_only and "lateral.jpg" in lateral_only
    for defect in ("no_lateral", "ap_only"):
        assert "lateral.jpg" not in samples[demo_defects[defect]]
    assert meta("ap_only")["frontal"]["view_position"] == "AP"
    assert meta("ll_lateral")["lateral"]["view_position"] == "LL"
    assert [u["view_position"] for u in meta("unknown_view")["unused_images"]] == [""]
    assert [u["view_position"] for u in meta("rare_view")["unused_images"]] == ["SWIMMERS"]
    assert samples[demo_defects["missing_report"]]["report.txt"] == b""
    assert meta("no_impression")["report_section"] == "findings"
    assert meta("no_findings_no_impression")["report_section"] == "last_paragraph"
    assert meta("addendum")["report_section"] == "impression"
    assert "discussed" not in samples[demo_defects["addendum"]]["report.txt"].decode()

    views = {k: sum(m["views"][k].get(v, 0) for m in manifests.values())
             for k, v in (("frontal", "PA"), ("lateral", "LL"), ("unused", "SWIMMERS"))}
    assert views == {"frontal": 60, "lateral": 1, "unused": 1}
    assert sum(m["views"]["no_frontal"] for m in manifests.values()) == 1


def test_sample_json_matches_the_csvs(built, demo):
    out, _ = built
    root = Path(demo["root"])
    rows = list(__import__("csv").DictReader(io.StringIO(
        gzip.decompress((root / "mimic-cxr-2.0.0-metadata.csv.gz").read_bytes()).decode())))
    size_of = {r["dicom_id"]: [int(r["Columns"]), int(r["Rows"])] for r in rows}
    labels = {r["study_id"]: r for r in __import__("csv").DictReader(io.StringIO(
        gzip.decompress((root / "mimic-cxr-2.0.0-chexpert.csv.gz").read_bytes()).decode()))}
    for split in ("train", "validate", "test"):
        for key, sample in read_split(out / split).items():
            meta = json.loads(sample["json"])
            assert key == f"s{meta['study_id']}" and meta["split"] == split
            for view in ("frontal", "lateral"):
                if meta[view]:
                    assert meta[view]["original_size"] == size_of[meta[view]["dicom_id"]]
                    assert Image.open(io.BytesIO(sample[f"{view}.jpg"])).size == tuple(meta[view]["original_size"])
            row = labels[str(meta["study_id"])]
            assert set(meta["labels"]) == set(CHEXPERT_LABELS)
            for name, value in meta["labels"].items():
                assert value == (None if row[name] == "" else int(float(row[name])))


def test_original_bytes_are_untouched(built, demo, demo_defects):
    out, _ = built
    sample = read_split(out / "train")[demo_defects["two_pa"]]
    meta = json.loads(sample["json"])
    path = next(Path(demo["root"]).rglob(f"{meta['frontal']['dicom_id']}.jpg"))
    assert sample["frontal.jpg"] == path.read_bytes()
    pa_ids = [u for u in (meta["frontal"]["dicom_id"],)]
    siblings = sorted(p.stem for p in path.parent.glob("*.jpg"))
    assert pa_ids[0] in siblings[:2]  # of the two PA images, the lowest dicom_id is chosen


def test_gnu_tar_reads_the_same_bytes(built, tmp_path):
    out, _ = built
    shard_path = out / "train" / "shard-000000.tar"
    listing = subprocess.run(["tar", "tvf", str(shard_path)], check=True, capture_output=True, text=True).stdout
    assert all(" xgem/xgem " in line and "1970-01-01" in line for line in listing.splitlines())
    subprocess.run(["tar", "xf", str(shard_path), "-C", str(tmp_path)], check=True)
    samples = read_split(out / "train")
    extracted = sorted(tmp_path.iterdir())
    assert len(extracted) == sum(len([k for k in s if not k.startswith("__")])
                                 for s in samples.values() if s["__url__"].endswith("shard-000000.tar"))
    for path in extracted:
        key, ext = path.name.split(".", 1)
        assert samples[key][ext] == path.read_bytes()


def test_index_files_equal_dalis_wds2idx(built, tmp_path):
    out, _ = built
    tool = Path(sys.executable).parent / "wds2idx"
    if not tool.exists():
        pytest.skip("DALI's wds2idx is not installed")
    for tar in sorted((out / "train").glob("*.tar")):
        subprocess.run([str(tool), str(tar), str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert (tmp_path / "ref.idx").read_text() == tar.with_suffix(".idx").read_text()


def test_dali_webdataset_reader_on_cpu_with_index_files(built):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn

    out, _ = built
    tars = sorted(str(p) for p in (out / "train").glob("*.tar"))
    exts = ["frontal.jpg", "lateral.jpg", "report.txt", "json"]
    manifest = json.loads((out / "train" / "manifest.json").read_text())

    @dali.pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        return tuple(fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=exts,
                                           missing_component_behavior="empty", name="reader"))

    p = pipe()
    p.build()
    assert p.epoch_size("reader") == manifest["num_samples"]
    expected = read_split(out / "train")
    got = []
    while len(got) < manifest["num_samples"]:
        for outputs in zip(*[[np.asarray(t).tobytes() for t in o] for o in p.run()]):
            got.append(dict(zip(exts, outputs)))
    got = got[: manifest["num_samples"]]
    assert [json.loads(g["json"])["study_id"] for g in got] == sorted(int(k[1:]) for k in expected)
    for g in got:
        sample = expected[f"s{json.loads(g['json'])['study_id']}"]
        for ext in exts:
            assert g[ext] == sample.get(ext, b"")


def test_verify_passes_then_catches_a_flipped_byte(built, tmp_path, capsys):
    out, _ = built
    report = verify(str(out), decode=True)
    assert report.ok and report.samples == 63 and report.shards == 10
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    victim = copy / "train" / "shard-000001.tar"
    data = bytearray(victim.read_bytes())
    data[3000] ^= 0xFF  # inside the first member's data
    victim.write_bytes(bytes(data))
    assert cli_main(["verify-shards", str(copy)]) == 1
    assert "sha256 differs" in capsys.readouterr().err
    (copy / "validate" / "shard-000000.tar").unlink()
    truncated = copy / "test" / "shard-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    report = verify(str(copy))
    assert any("validate/shard-000000.tar: cannot be read" in p for p in report.problems)
    assert any("test/shard-000001.tar" in p for p in report.problems)


def test_same_input_gives_identical_bytes_across_worker_counts(demo, tmp_path):
    for workers in (1, 2):
        shard(shard_config(demo["root"], tmp_path / f"w{workers}", samples_per_shard=8, max_side=256,
                           workers=workers))
    one, two = files_digest(tmp_path / "w1"), files_digest(tmp_path / "w2")
    assert one == two and len([k for k in one if k.endswith(".tar")]) >= 8


def test_max_side_resizes_keeping_aspect(demo, tmp_path):
    shard(shard_config(demo["root"], tmp_path / "s", samples_per_shard=64, max_side=300))
    for sample in read_split(tmp_path / "s" / "train").values():
        meta = json.loads(sample["json"])
        for view in ("frontal", "lateral"):
            if meta[view]:
                image = Image.open(io.BytesIO(sample[f"{view}.jpg"]))
                w, h = meta[view]["original_size"]
                assert image.mode == "L" and max(image.size) == 300 and list(image.size) == meta[view]["stored_size"]
                assert abs(image.size[0] / image.size[1] - w / h) < 0.01


def test_max_shard_bytes_and_missing_report_skip(demo, demo_defects, tmp_path):
    summary = shard(shard_config(demo["root"], tmp_path / "s", max_shard_bytes=3_000_000, missing_report="skip"))
    manifest = json.loads((tmp_path / "s" / "train" / "manifest.json").read_text())
    biggest_sample = 2 * 1_200_000
    assert all(e["bytes"] <= 3_000_000 + biggest_sample for e in manifest["shards"])
    assert len(manifest["shards"]) > 10
    skipped = {f"s{e['study_id']}": e["reason"] for s in ("train", "validate", "test")
               for e in json.loads((tmp_path / "s" / s / "manifest.json").read_text())["skipped"]}
    assert skipped[demo_defects["missing_report"]] == "report missing"
    assert sum(s["num_samples"] for s in summary["splits"].values()) == 62


def test_missing_csv_column_fails_before_anything_is_written(demo, tmp_path, capsys):
    root = tmp_path / "broken"
    subprocess.run(["cp", "-r", demo["root"], str(root)], check=True)
    table = root / "mimic-cxr-2.0.0-split.csv.gz"
    lines = gzip.decompress(table.read_bytes()).decode().splitlines()
    lines[0] = lines[0].replace("split", "fold")
    table.write_bytes(gzip.compress("\n".join(lines).encode()))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=r"mimic-cxr-2.0.0-split.csv.gz: missing column\(s\) \['split'\]"):
        shard(shard_config(root, out))
    assert not out.exists()
    assert cli_main(["shard", "--images", str(root), "--reports", str(root), "--out", str(out)]) == 2
    assert "missing column(s) ['split']" in capsys.readouterr().err


def test_rerun_with_other_settings_is_refused_and_keeps_files(demo, tmp_path):
    out = tmp_path / "s"
    shard(shard_config(demo["root"], out, samples_per_shard=32))
    before = files_digest(out)
    with pytest.raises(InputError, match="built with other settings"):
        shard(shard_config(demo["root"], out, samples_per_shard=16))
    assert files_digest(out) == before


@pytest.mark.slow
def test_kill_mid_run_then_resume_gives_the_same_bytes(demo, tmp_path):
    args = ["--images", demo["root"], "--reports", demo["root"], "--samples-per-shard", "4",
            "--max-side", "512", "--no-progress"]
    shard(shard_config(demo["root"], tmp_path / "ref", samples_per_shard=4, max_side=512))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "xgem_dist.cli", "shard", *args, "--out", str(out)],
                            stderr=subprocess.DEVNULL)
    partial = out / "train" / "manifest.partial.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads(partial.read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = json.loads(partial.read_text())["shards"]
    assert 3 <= len(done_before) < 12 and not (out / "train" / "manifest.json").exists()
    mtimes = {e["url"]: os.stat(out / "train" / e["url"]).st_mtime_ns for e in done_before}

    assert cli_main(["shard", *args, "--out", str(out)]) == 0
    assert files_digest(out) == files_digest(tmp_path / "ref")
    assert mtimes == {u: os.stat(out / "train" / u).st_mtime_ns for u in mtimes}  # finished shards kept as is
    assert not (out / "train" / ".staging").exists() and not partial.exists()


def test_real_images_go_through_the_sharder(realdata, tmp_path):
    """The real PNG, JPEG and DICOM, converted as MIMIC-CXR-JPG was made (gray, q95), in the MIMIC layout."""
    pydicom = pytest.importorskip("pydicom")
    import numpy as np

    from xgem_dist.data.demo import _write_csv_gz
    from xgem_dist.data.mimic import METADATA_COLUMNS, SPLIT_COLUMNS, study_dir

    images = realdata / "images"
    dicom = pydicom.dcmread(next(images.glob("*.dcm")))
    pixels = dicom.pixel_array.astype(np.float32)
    pixels = (pixels - pixels.min()) / max(1.0, float(np.ptp(pixels))) * 255
    sources = {
        "png0": Image.open(images / "00000001_000.png"),
        "png1": Image.open(images / "00027426_000.png"),
        "dcm": Image.fromarray(pixels.astype(np.uint8)),
    }
    root = tmp_path / "mimic"
    metadata, splits = [], []
    for i, (name, image) in enumerate(sorted(sources.items())):
        folder = Path(study_dir(str(root), 10000001, 50000001 + i))
        folder.mkdir(parents=True)
        dicom_id = f"{i:08x}-00000000-00000000-00000000-00000000"
        image.convert("L").save(folder / f"{dicom_id}.jpg", quality=95)
        metadata.append({"dicom_id": dicom_id, "subject_id": 10000001, "study_id": 50000001 + i, "ViewPosition": "PA",
                         "Rows": image.size[1], "Columns": image.size[0]})
        splits.append({"dicom_id": dicom_id, "subject_id": 10000001, "study_id": 50000001 + i, "split": "train"})
    # the 3-channel baseline JPEG goes in as its original bytes
    folder = Path(study_dir(str(root), 10000001, 50000009))
    folder.mkdir(parents=True)
    (folder / "00000ff9-00000000-00000000-00000000-00000000.jpg").write_bytes((images / "16747_3_1.jpg").read_bytes())
    metadata.append({"dicom_id": "00000ff9-00000000-00000000-00000000-00000000", "subject_id": 10000001,
                     "study_id": 50000009, "ViewPosition": "AP"})
    splits.append({"dicom_id": "00000ff9-00000000-00000000-00000000-00000000", "subject_id": 10000001,
                   "study_id": 50000009, "split": "train"})
    report = (realdata / "reports" / "mimic_cxr_example_s00000000.txt").read_text()
    for i in (1, 2, 3, 9):
        (root / "files" / "p10" / "p10000001" / f"s5000000{i}.txt").write_text(report)
    _write_csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, metadata)
    _write_csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_COLUMNS, splits)

    for max_side in (0, 256):
        out = tmp_path / f"out{max_side}"
        summary = shard(shard_config(root, out, max_side=max_side))
        assert summary["splits"]["train"]["num_samples"] == 4
        samples = read_split(out / "train")
        assert {s["report.txt"] for s in samples.values()} == {b"Large left pleural effusion"}
        rgb = Image.open(io.BytesIO(samples["s50000009"]["frontal.jpg"]))
        assert rgb.size == ((1036, 885) if max_side == 0 else (256, 219))
        assert verify(str(out), decode=True).ok
    dcm = json.loads(read_split(tmp_path / "out0" / "train")["s50000001"]["json"])
    assert dcm["frontal"]["original_size"] == [1024, 1024]
