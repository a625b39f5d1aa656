"""The MIMIC-CXR-JPG layout: CSV tables, per-study image lists and the choice of views.

Layout (PhysioNet MIMIC-CXR-JPG 2.x and MIMIC-CXR reports):
  <images>/files/p10/p10000032/s50414267/<dicom_id>.jpg
  <reports>/files/p10/p10000032/s50414267.txt
  <images>/mimic-cxr-2.0.0-{metadata,split,chexpert}.csv.gz
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
from dataclasses import dataclass, field

import fsspec

log = logging.getLogger(__name__)

FRONTAL_VIEWS = ("PA", "AP")  # in order of preference
LATERAL_VIEWS = ("LATERAL", "LL")
SPLITS = ("train", "validate", "test")
CHEXPERT_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)
METADATA_COLUMNS = (
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_COLUMNS = ("subject_id", "study_id") + CHEXPERT_LABELS
# Columns the sharder reads; the others are only checked when a file is written (make-demo).
REQUIRED = {
    "metadata": ("dicom_id", "subject_id", "study_id", "ViewPosition"),
    "split": SPLIT_COLUMNS,
    "chexpert": CHEXPERT_COLUMNS,
}


class InputError(ValueError):
    """Input that cannot be used as given; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ImageRef:
    dicom_id: str
    view_position: str  # "" when the metadata has none
    path: str  # fsspec URL of the JPEG


@dataclass
class StudyPlan:
    """One study and everything needed to build its sample; small and picklable for workers."""

    subject_id: int
    study_id: int
    split: str
    frontal: list[ImageRef]  # candidates, best first
    lateral: list[ImageRef]
    unused: list[ImageRef]  # images with a view that is neither frontal nor lateral
    report_path: str
    labels: dict[str, int | None] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"s{self.study_id}"


def read_csv(url: str, kind: str) -> list[dict[str, str]]:
    """Rows of a (possibly gzipped) CSV; raises InputError naming the file and any missing column."""
    try:
        with fsspec.open(url, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise InputError(f"{url}: file not found ({kind} table)") from e
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED[kind] if c not in columns]
    if missing:
        raise InputError(f"{url}: missing column(s) {missing} in the {kind} table (has {columns})")
    return list(reader)


def _label(value: str) -> int | None:
    return None if value.strip() == "" else int(float(value))


def study_dir(root: str, subject_id: int, study_id: int) -> str:
    subject = str(subject_id)
    return f"{root.rstrip('/')}/files/p{subject[:2]}/p{subject}/s{study_id}"


def plan_studies(
    images_root: str, reports_root: str, metadata_csv: str, split_csv: str, chexpert_csv: str | None
) -> tuple[list[StudyPlan], list[dict]]:
    """All studies sorted by (split, subject, study), plus the studies skipped before any I/O on images.

    Every CSV is read and checked first, so a missing column fails before anything is written.
    """
    metadata = read_csv(metadata_csv, "metadata")
    splits = read_csv(split_csv, "split")
    chexpert = read_csv(chexpert_csv, "chexpert") if chexpert_csv else []

    split_of: dict[int, set[str]] = {}
    for row in splits:
        split_of.setdefault(int(row["study_id"]), set()).add(row["split"].strip())
    labels_of = {int(r["study_id"]): {n: _label(r[n]) for n in CHEXPERT_LABELS} for r in chexpert}

    images: dict[tuple[int, int], list[ImageRef]] = {}
    for row in metadata:
        subject_id, study_id = int(row["subject_id"]), int(row["study_id"])
        path = f"{study_dir(images_root, subject_id, study_id)}/{row['dicom_id']}.jpg"
        images.setdefault((subject_id, study_id), []).append(
            ImageRef(row["dicom_id"], (row["ViewPosition"] or "").strip().upper(), path)
        )

    plans, skipped = [], []
    for (subject_id, study_id), refs in sorted(images.items()):
        found = split_of.get(study_id, set())
        if len(found) != 1 or next(iter(found)) not in SPLITS:
            reason = "not in the split table" if not found else f"split label(s) {sorted(found)} not usable"
            skipped.append({"subject_id": subject_id, "study_id": study_id, "split": None, "reason": reason})
            continue

        def ranked(views: tuple[str, ...]) -> list[ImageRef]:
            return sorted((r for r in refs if r.view_position in views),
                          key=lambda r: (views.index(r.view_position), r.dicom_id))

        plans.append(StudyPlan(
            subject_id=subject_id,
            study_id=study_id,
            split=next(iter(found)),
            frontal=ranked(FRONTAL_VIEWS),
            lateral=ranked(LATERAL_VIEWS),
            unused=sorted((r for r in refs if r.view_position not in FRONTAL_VIEWS + LATERAL_VIEWS),
                          key=lambda r: r.dicom_id),
            report_path=study_dir(reports_root, subject_id, study_id) + ".txt",
            labels=labels_of.get(study_id, dict.fromkeys(CHEXPERT_LABELS)),
        ))
    plans.sort(key=lambda p: (SPLITS.index(p.split), p.subject_id, p.study_id))
    return plans, skipped
