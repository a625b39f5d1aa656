import csv
import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from PIL import Image

from xgem_dist.cli import main as cli_main
from xgem_dist.data.demo import DEFECTS
from xgem_dist.data.mimic import CHEXPERT_COLUMNS, METADATA_COLUMNS, SPLIT_COLUMNS


def read_table(path: Path) -> tuple[list[str], list[dict]]:
    reader = csv.DictReader(io.StringIO(gzip.decompress(path.read_bytes()).decode()))
    rows = list(reader)
    return reader.fieldnames, rows


def test_demo_has_the_mimic_cxr_jpg_layout_and_columns(demo):
    root = Path(demo["root"])
    columns, metadata = read_table(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert tuple(columns) == METADATA_COLUMNS
    assert tuple(read_table(root / "mimic-cxr-2.0.0-split.csv.gz")[0]) == SPLIT_COLUMNS
    columns, chexpert = read_table(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert tuple(columns) == CHEXPERT_COLUMNS and len(chexpert) == demo["studies"] == 64
    assert {r["split"] for r in read_table(root / "mimic-cxr-2.0.0-split.csv.gz")[1]} == {"train", "validate", "test"}
    for row in metadata:
        assert re.fullmatch(r"1\d{7}", row["subject_id"]) and re.fullmatch(r"5\d{7}", row["study_id"])
        assert re.fullmatch(r"([0-9a-f]{8}-){4}[0-9a-f]{8}", row["dicom_id"])
        path = root / "files" / f"p{row['subject_id'][:2]}" / f"p{row['subject_id']}" / f"s{row['study_id']}"
        assert (path / f"{row['dicom_id']}.jpg").is_file()
    reports = list(root.glob("files/p*/p*/s*.txt"))
    assert len(reports) == 63  # one study deliberately has no report
    text = reports[0].read_text()
    assert text.startswith("\n") and "FINAL REPORT" in text and "\n EXAMINATION:" in text
    assert {r["ViewPosition"] for r in metadata} == {"PA", "AP", "LATERAL", "LL", "", "SWIMMERS"}
    assert sorted(demo["defects"].values()) == sorted(DEFECTS.values())


def test_demo_images_are_grayscale_radiograph_sized_jpegs(demo):
    sizes = []
    for path in sorted(Path(demo["root"]).rglob("*.jpg"))[:10]:
        try:
            image = Image.open(path)
            image.load()
        except OSError:
            continue  # the deliberately corrupt ones
        assert image.format == "JPEG" and image.mode == "L"
        sizes.append(max(image.size))
    assert sizes and all(1000 <= s <= 2000 for s in sizes)


def test_make_demo_is_deterministic(tmp_path):
    assert cli_main(["make-demo", str(tmp_path / "a"), "--studies", "6"]) == 0
    assert cli_main(["make-demo", str(tmp_path / "b"), "--studies", "6"]) == 0
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files_a:
        if rel.name != "DEMO_DEFECTS.json":  # it names its root folder
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_recipe_and_flag_override(demo, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_side: 128\nsamples_per_shard: 100\nreport_section: findings\n")
    out = tmp_path / "s"
    assert cli_main(["shard", "--recipe", str(recipe), "--images", demo["root"], "--reports", demo["root"],
                     "--out", str(out), "--samples-per-shard", "20", "--no-progress"]) == 0
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["build"]["max_side"] == 128 and manifest["build"]["samples_per_shard"] == 20
    assert manifest["build"]["report_section"] == "findings"
    recipe.write_text("max_sidee: 1\n")
    assert cli_main(["shard", "--recipe", str(recipe), "--images", "x", "--reports", "x", "--out", "y"]) == 2


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    """The README's main command, judged by what it observed: shards; 2 Ray workers with validation, EMA and
    samples, one killed on purpose and restarted from a checkpoint; 1 worker resuming the 2-worker checkpoint;
    an EMA export; a sampled image and report; a short output without tracebacks."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RAY_DISABLE_USAGE_STATS": "1"}
    done = subprocess.run([sys.executable, "-m", "xgem_dist.cli", "quickstart", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    print(out)
    assert "[2/7] shards: 63 samples in 6 shards, verify OK" in out
    assert ("a worker was killed after step 5 on purpose; Ray restarted the group, which resumed from "
            "checkpoint-0000004 and finished step 8") in out
    assert "[4/7] 1 worker: resumed from checkpoint-0000008 (saved by 2 workers) and finished step 12" in out
    assert "Traceback" not in out + done.stderr and "Failed to query" not in out + done.stderr
    lines = len((out + done.stderr).splitlines())
    print(f"quickstart output: {lines} lines")
    assert lines < 60
    run_dir = tmp_path / "run"
    runs = [json.loads(line) for line in (run_dir / "summary.jsonl").read_text().splitlines()]
    assert [(r["world_size"], r["start_step"], r["end_step"]) for r in runs] == [(2, 4, 8), (1, 8, 12)]
    assert [v["step"] for r in runs for v in r["validations"]] == [6, 8, 10, 12]
    assert (run_dir / "samples" / "step-0000008" / "T-to-F.png").is_file()
    assert (run_dir / "samples" / "step-0000012" / "F-to-T.txt").is_file()
    assert (tmp_path / "model" / "tokenizers").is_dir()
    written = sorted(p.suffix for p in (tmp_path / "sample").iterdir())
    assert ".png" in written and ".txt" in written
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"train/loss", "val/loss", "val_ema/loss", "train/grad_norm"} <= set(events.Tags()["scalars"])
    assert "samples/T->F" in events.Tags()["images"]


def test_an_output_that_cannot_be_written_is_a_message_not_a_traceback(monkeypatch, capsys, demo, tmp_path):
    import xgem_dist.data.shard as shard_module
    from xgem_dist.cli import main

    def onto_a_full_disk(cfg):
        with open("/dev/full", "wb") as f:  # every write fails with ENOSPC, as on a full disk
            f.write(b"x" * 65536)

    monkeypatch.setattr(shard_module, "shard", onto_a_full_disk)
    assert main(["shard", "--images", demo["root"], "--reports", demo["root"], "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "xgem-dist: error: cannot write" in err and "No space left on device" in err
    assert "rerun the same command" in err and "Traceback" not in err
