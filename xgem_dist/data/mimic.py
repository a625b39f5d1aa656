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
import re
import zlib
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


# MIMIC-CXR ids: dicom_id is hex groups joined by '-' (e.g. 02aa804e-bde0afdd-112c0b34-7bc16630-4e384014),
# subject and study ids are digits; anything else (a '/', '..') must not be joined into a path.
DICOM_ID = re.compile(r"[0-9a-fA-F]+(?:-[0-9a-fA-F]+)*")
NUMERIC_ID = re.compile(r"[0-9]+")


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


def read_csv(url: str, kind: str) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a (possibly gzipped) CSV; raises InputError naming the file and what is wrong.

    A UTF-8 byte order mark before the header is tolerated (spreadsheet exports write one).
    """
    try:
        with fsspec.open(url, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise InputError(f"{url}: file not found ({kind} table)") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise InputError(f"{url}: truncated or damaged gzip file ({e}); download it again") from e
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{url}: not UTF-8 text (byte offset {e.start}); convert the {kind} table to UTF-8") from e
    reader = csv.DictReader(io.StringIO(text))
    try:
        columns = reader.fieldnames or []
        missing = [c for c in REQUIRED[kind] if c not in columns]
        if missing:
            raise InputError(f"{url}: missing column(s) {missing} in the {kind} table (has {columns})")
        return [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise InputError(f"{url}, line {reader.line_num}: {e}") from e


def _label(url: str, line: int, column: str, value: str | None) -> int | None:
    """A CheXpert label: 1, 0, -1 (uncertain) or empty (not mentioned); anything else names its cell."""
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError:
        number = None
    if number not in (1.0, 0.0, -1.0):
        raise InputError(f"{url}, line {line}, column {column!r}: {value!r} is not a CheXpert label "
                         "(1, 0, -1 or empty)")
    return int(number)


def id_problem(row: dict[str, str | None], columns: tuple[str, ...]) -> str | None:
    """Why a row's ids do not have the MIMIC-CXR format (None when they do); such ids never reach a path."""
    for column in columns:
        value = (row.get(column) or "").strip()
        pattern = DICOM_ID if column == "dicom_id" else NUMERIC_ID
        if not pattern.fullmatch(value):
            return f"{column} {row.get(column)!r} is not a MIMIC-CXR {column}"
    return None


def study_dir(root: str, subject_id: int, study_id: int) -> str:
    subject = str(subject_id)
    return f"{root.rstrip('/')}/files/p{subject[:2]}/p{subject}/s{study_id}"


@dataclass
class Planned:
    studies: list[StudyPlan]  # sorted by (split, subject, study)
    skipped_studies: list[dict]  # {subject_id, study_id, split: None, reason}: dropped before any image I/O
    skipped_rows: list[dict]  # {file, line, reason}: table rows not used


def plan_studies(
    images_root: str, reports_root: str, metadata_csv: str, split_csv: str, chexpert_csv: str | None
) -> Planned:
    """Every study with its images, split and labels; bad rows and ambiguous studies are listed, not used.

    Every CSV is read and checked first, so a missing column fails before anything is written.
    """
    metadata = read_csv(metadata_csv, "metadata")
    splits = read_csv(split_csv, "split")
    chexpert = read_csv(chexpert_csv, "chexpert") if chexpert_csv else []
    skipped_rows: list[dict] = []

    def usable(url: str, line: int, row: dict, columns: tuple[str, ...]) -> bool:
        problem = id_problem(row, columns)
        if problem:
            skipped_rows.append({"file": url, "line": line, "reason": problem})
        return problem is None

    split_of: dict[int, set[str]] = {}
    for line, row in splits:
        if usable(split_csv, line, row, ("study_id",)):
            split_of.setdefault(int(row["study_id"]), set()).add((row["split"] or "").strip())

    labels_of: dict[int, tuple[int, dict[str, int | None]]] = {}  # study -> (line, labels) of its first row
    for line, row in chexpert:
        if not usable(chexpert_csv, line, row, ("subject_id", "study_id")):
            continue
        study_id = int(row["study_id"])
        labels = {n: _label(chexpert_csv, line, n, row[n]) for n in CHEXPERT_LABELS}
        if study_id not in labels_of:
            labels_of[study_id] = (line, labels)
        elif labels_of[study_id][1] != labels:
            skipped_rows.append({"file": chexpert_csv, "line": line, "reason": (
                f"labels of s{study_id} differ from line {labels_of[study_id][0]}; the first row is used")})

    images: dict[tuple[int, int], list[ImageRef]] = {}
    lines_of: dict[int, list[int]] = {}
    for line, row in metadata:
        if not usable(metadata_csv, line, row, ("dicom_id", "subject_id", "study_id")):
            continue
        subject_id, study_id, dicom_id = int(row["subject_id"]), int(row["study_id"]), row["dicom_id"].strip()
        path = f"{study_dir(images_root, subject_id, study_id)}/{dicom_id}.jpg"
        images.setdefault((subject_id, study_id), []).append(
            ImageRef(dicom_id, (row["ViewPosition"] or "").strip().upper(), path))
        lines_of.setdefault(study_id, []).append(line)
    subjects_of: dict[int, list[int]] = {}
    for subject_id, study_id in sorted(images):
        subjects_of.setdefault(study_id, []).append(subject_id)

    plans, skipped = [], []
    for (subject_id, study_id), refs in sorted(images.items()):
        found = split_of.get(study_id, set())
        reason = None
        if len(subjects_of[study_id]) > 1:
            reason = (f"study_id {study_id} is listed under subjects {subjects_of[study_id]} in {metadata_csv} "
                      f"(lines {lines_of[study_id][0]}..{lines_of[study_id][-1]}); fix the table to keep it")
        elif len(found) != 1 or next(iter(found)) not in SPLITS:
            reason = "not in the split table" if not found else f"split label(s) {sorted(found)} not usable"
        if reason:
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
            labels=labels_of[study_id][1] if study_id in labels_of else dict.fromkeys(CHEXPERT_LABELS),
        ))
    plans.sort(key=lambda p: (SPLITS.index(p.split), p.subject_id, p.study_id))
    return Planned(plans, skipped, skipped_rows)
