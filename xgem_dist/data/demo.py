"""`xgem-dist make-demo`: a small, fully synthetic dataset in the exact MIMIC-CXR-JPG + reports layout.

Images are procedural radiograph-like grayscale JPEGs (q95, 1-1.7k px, or MIMIC-CXR's full 2.4-3.1k px);
reports follow the real section structure; the CSVs carry the real column names. No patient data.
Deliberate defects, one study each (listed in DEFECTS and in <out>/DEMO_DEFECTS.json), exercise every
bad-input path of the sharder.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .mimic import CHEXPERT_LABELS, METADATA_COLUMNS, SPLIT_COLUMNS, study_dir
from .sample import encode_jpeg

NUM_STUDIES = 64
# study index -> defect; every other study has a PA (or AP) frontal and most have a lateral.
DEFECTS = {
    3: "no_lateral", 10: "no_lateral", 17: "no_lateral", 24: "no_lateral", 31: "no_lateral",
    5: "frontal_less",
    7: "corrupt_only_view",  # its single frontal is truncated -> study skipped
    12: "corrupt_pa_with_ap",  # PA is garbage bytes -> falls back to the AP
    9: "no_impression",
    11: "addendum",
    13: "unknown_view",  # a third image with an empty ViewPosition
    15: "rare_view",  # a third image with ViewPosition SWIMMERS
    19: "missing_report",
    21: "no_findings_no_impression",
    26: "two_pa",
    28: "ll_lateral",
    30: "ap_only",
}

FINDINGS = [
    "The lungs are clear without focal consolidation.", "No pleural effusion or pneumothorax is seen.",
    "The cardiac silhouette is within normal limits.", "Mild pulmonary vascular congestion is present.",
    "There is a small left pleural effusion.", "Bibasilar atelectasis is noted.",
    "The mediastinal contours are stable.", "Moderate cardiomegaly is unchanged.",
    "A right internal jugular catheter terminates in the low SVC.", "Degenerative changes of the thoracic spine.",
    "Patchy opacity in the right lower lobe may reflect pneumonia.", "Hyperinflated lungs suggest COPD.",
]
IMPRESSIONS = [
    "No acute cardiopulmonary process.", "Small left pleural effusion.", "Right lower lobe pneumonia.",
    "Mild pulmonary edema.", "Stable cardiomegaly without failure.", "Bibasilar atelectasis.",
]


def _uid(rng: np.random.Generator) -> str:
    return "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))


def radiograph(rng: np.random.Generator, width: int, height: int, lateral: bool) -> Image.Image:
    """A radiograph-like 8-bit image: soft tissue, lung fields, heart, spine, ribs, diaphragm, noise."""
    h, w = height // 4, width // 4  # anatomy is smooth: build at 1/4 scale, then add full-res noise
    y, x = np.mgrid[-1 : 1 : h * 1j, -1 : 1 : w * 1j].astype(np.float32)
    jitter = rng.uniform(-0.05, 0.05, size=6).astype(np.float32)
    img = 0.75 - 0.25 * (np.abs(x) ** 3)
    if lateral:
        lung = ((x - 0.05 - jitter[0]) / 0.55) ** 2 + ((y + 0.05) / 0.7) ** 2 < 1
        img -= 0.4 * lung
        img += 0.35 * np.exp(-(((x + 0.15) / 0.25) ** 2 + ((y - 0.25) / 0.3) ** 2))  # heart
        img += 0.3 * (np.abs(x - 0.65 - jitter[1]) < 0.1)  # spine
    else:
        for side in (-1, 1):
            cx = side * (0.38 + jitter[side])
            img -= 0.45 * ((((x - cx) / 0.3) ** 2 + ((y + 0.05) / 0.65) ** 2) < 1)
        img += 0.45 * np.exp(-(((x + 0.08 + jitter[2]) / 0.22) ** 2 + ((y - 0.25) / 0.3) ** 2))  # heart
        img += 0.25 * (np.abs(x) < 0.07)  # spine
        ribs = np.sin(18 * (y + 0.35 * x**2 + jitter[3])) > 0.8
        img += 0.12 * ribs * (np.abs(x) > 0.1)
    img += 0.5 * (y > 0.55 + 0.15 * np.cos(2.5 * x) + jitter[4])  # diaphragm and abdomen
    img *= 0.25 + 0.75 * ((x / (0.92 + jitter[5])) ** 2 < 1)  # air outside the body
    small = Image.fromarray(np.clip(img * 200, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(w / 80))
    big = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    big = big + rng.normal(0, 6, size=big.shape).astype(np.float32)
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8), mode="L")


def report_text(rng: np.random.Generator, defect: str | None) -> str:
    findings = " ".join(rng.choice(FINDINGS, size=3, replace=False))
    impression = str(rng.choice(IMPRESSIONS))
    lines = ["", " " * 33 + "FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ",
             " INDICATION:  ___ year old with shortness of breath  // ?effusion", " ",
             " TECHNIQUE:  Chest PA and lateral", " ", " COMPARISON:  ___", " "]
    if defect == "no_findings_no_impression":
        lines[-2:] = [" COMPARISON:  None.", " ", " " + findings]
        return "\n".join(lines) + "\n"
    lines += [" FINDINGS: ", " ", " " + findings, " "]
    if defect != "no_impression":
        lines += [" IMPRESSION: ", " ", " " + impression]
    body = "\n".join(lines) + "\n"
    if defect == "addendum":
        body = ("\n ADDENDUM:  Findings were discussed with Dr. ___ by telephone at 10:15.\n"
                " " + "_" * 78 + body)
    return body


def _write_csv_gz(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.getvalue().encode())


DEMO_SIDES = (1000, 1700)
FULL_SIZE_SIDES = (2400, 3100)  # MIMIC-CXR-JPG's native images are ~2500-3000 px a side


def make_demo(out: str | Path, num_studies: int = NUM_STUDIES, seed: int = 0,
              sides: tuple[int, int] = DEMO_SIDES) -> dict:
    """Writes the dataset (images, reports and CSVs under one root) and returns a summary. Image widths and
    heights are drawn from [sides[0], sides[1])."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    metadata, splits, chexpert = [], [], []
    subject_id = 10000032
    study_id = 50000000
    for i in range(num_studies):
        if i % 3 == 0:  # about three studies a patient
            subject_id += int(rng.integers(1, 9000))
            split = rng.choice(["train"] * 8 + ["validate", "test"])
        study_id += int(rng.integers(1, 99999))
        defect = DEFECTS.get(i)
        views = {"no_lateral": ["PA"], "frontal_less": ["LATERAL"], "corrupt_only_view": ["PA"],
                 "corrupt_pa_with_ap": ["PA", "AP", "LATERAL"], "unknown_view": ["PA", "LATERAL", ""],
                 "rare_view": ["PA", "LATERAL", "SWIMMERS"], "two_pa": ["PA", "PA", "LATERAL"],
                 "ll_lateral": ["PA", "LL"], "ap_only": ["AP"]}.get(defect, ["PA", "LATERAL"])
        folder = Path(study_dir(str(out), subject_id, study_id))
        folder.mkdir(parents=True, exist_ok=True)
        for j, view in enumerate(views):
            dicom_id = _uid(rng)
            width, height = (int(v) for v in rng.integers(*sides, size=2))
            data = encode_jpeg(radiograph(rng, width, height, lateral=view in ("LATERAL", "LL")), quality=95)
            if defect == "corrupt_only_view":
                data = data[: len(data) // 2]  # truncated mid-scan
            elif defect == "corrupt_pa_with_ap" and j == 0:
                data = bytes(rng.integers(0, 256, size=4096, dtype=np.uint8))
            (folder / f"{dicom_id}.jpg").write_bytes(data)
            desc = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral",
                    "LL": "left lateral"}.get(view, "")
            metadata.append({
                "dicom_id": dicom_id, "subject_id": subject_id, "study_id": study_id,
                "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                "Rows": height, "Columns": width, "StudyDate": 21800506 + i, "StudyTime": f"{120000 + i}.000",
                "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)", "ViewCodeSequence_CodeMeaning": desc,
                "PatientOrientationCodeSequence_CodeMeaning": "Erect",
            })
            splits.append({"dicom_id": dicom_id, "study_id": study_id, "subject_id": subject_id, "split": split})
        if defect != "missing_report":
            (folder.parent / f"s{study_id}.txt").write_text(report_text(rng, defect))
        labels = rng.choice(["1.0", "0.0", "-1.0", "", "", ""], size=len(CHEXPERT_LABELS))
        chexpert.append({"subject_id": subject_id, "study_id": study_id, **dict(zip(CHEXPERT_LABELS, labels))})

    _write_csv_gz(out / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, metadata)
    _write_csv_gz(out / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_COLUMNS, splits)
    _write_csv_gz(out / "mimic-cxr-2.0.0-chexpert.csv.gz", ("subject_id", "study_id") + CHEXPERT_LABELS, chexpert)
    summary = {"root": str(out), "studies": num_studies, "images": len(metadata),
               "defects": {f"s{row['study_id']}": DEFECTS[i] for i, row in enumerate(chexpert) if i in DEFECTS}}
    (out / "DEMO_DEFECTS.json").write_text(json.dumps(summary, indent=1))
    return summary
