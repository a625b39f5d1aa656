"""Build one WebDataset sample from one study: choose and check views, resize, pick the report text.

Runs in sharder worker processes, so it takes and returns plain picklable values.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import fsspec
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from .mimic import StudyPlan
from .reports import select_section


class BadImage(ValueError):
    pass


@dataclass(frozen=True)
class SampleOptions:
    max_side: int = 0  # 0: original bytes
    jpeg_quality: int = 95
    report_section: str = "auto"
    missing_report: str = "empty"  # or "skip"


@dataclass
class SampleResult:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # ext -> bytes; empty when skipped
    skipped: str | None = None
    degraded: list[str] = field(default_factory=list)
    views: dict[str, str] = field(default_factory=dict)  # "frontal"/"lateral" -> ViewPosition used
    unused_views: list[str] = field(default_factory=list)


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality, optimize=False)
    return out.getvalue()


def decode_at_eighth_scale(image: Image.Image) -> None:
    """Decodes the whole entropy-coded stream at 1/8 scale (JPEG DCT scaling: cheap); raises on corrupt data."""
    image.draft("L", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
    image.load()


# Markers that may follow a scan (progressive tables and scans, restart interval, comments, APPn, EOI).
_AFTER_SCAN = {0xC4, 0xCC, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)}


def scan_damage(raw: bytes) -> str | None:
    """Damage in a JPEG's marker structure and scan data that libjpeg only warns about ("Corrupt JPEG data":
    extraneous bytes, a scan cut short by an end-of-image marker, restart markers missing their interval or
    out of order) and PIL never reports. Found from the markers alone, without Huffman decoding, so damage
    inside the Huffman codes themselves (e.g. zeroed bytes) is not seen. None when the structure is sound.
    """
    i, end, interval = 2, len(raw), 0
    while i + 1 < end:
        if raw[i] != 0xFF:
            skip = raw.find(b"\xff", i)
            return f"{(skip if skip >= 0 else end) - i} extraneous bytes at offset {i}"
        marker = raw[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:
            trailing = raw[i + 2 :].strip(b"\x00\xff")
            return f"{len(trailing)} bytes after the end-of-image marker at offset {i}" if trailing else None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            return f"marker 0x{marker:02x} outside scan data at offset {i}"
        if marker == 0xDD:
            interval = int.from_bytes(raw[i + 4 : i + 6], "big")
        i += 2 + int.from_bytes(raw[i + 2 : i + 4], "big")
        if marker != 0xDA:
            continue
        restart = 0
        while (j := raw.find(b"\xff", i)) >= 0 and j + 1 < end:
            following = raw[j + 1]
            if following in (0x00, 0xFF):  # stuffed 0xFF or fill
                i = j + 1 + (following == 0x00)
            elif 0xD0 <= following <= 0xD7:
                if not interval or following - 0xD0 != restart:
                    due = f"{restart} was due" if interval else "no restart interval is set"
                    return f"restart marker {following - 0xD0} where {due}, at offset {j}"
                restart, i = (restart + 1) % 8, j + 2
            elif following in _AFTER_SCAN:
                i = j
                break
            else:
                return f"scan data cut by marker 0x{following:02x} at offset {j}"
        else:
            return "scan data runs to the end of the file"
    return "no end-of-image marker"


def prepare_image(raw: bytes, options: SampleOptions) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """(stored bytes, original (w, h), stored (w, h)); raises BadImage for unreadable data.

    Original-bytes mode still decodes the image (decode_at_eighth_scale) so that truncated or corrupt
    files are caught here, not in training. An EXIF orientation other than 1 is applied here, in every mode
    (the image is rotated upright and re-encoded), and stored JPEGs carry no orientation: every decoder
    (PIL, DALI) then sees the same upright pixels.
    """
    try:
        image = Image.open(io.BytesIO(raw))
        size = image.size
        if image.format != "JPEG":
            raise BadImage(f"not a JPEG ({image.format})")
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        swapped = orientation in (5, 6, 7, 8)  # orientations that exchange width and height
        upright = (size[1], size[0]) if swapped else size
        target = upright
        if options.max_side and max(upright) > options.max_side:
            scale = options.max_side / max(upright)
            target = (max(1, round(upright[0] * scale)), max(1, round(upright[1] * scale)))
        if orientation == 1 and target == size and (not options.max_side or image.mode == "L"):
            decode_at_eighth_scale(image)
            stored, stored_size = raw, size
        else:
            image.draft("L", (target[1], target[0]) if swapped else target)  # DCT-domain downscale to >= target
            if orientation != 1:
                image = ImageOps.exif_transpose(image)
            image = image.convert("L")
            if image.size != target:
                image = image.resize(target, Image.Resampling.LANCZOS)
            stored, stored_size = encode_jpeg(image, options.jpeg_quality), target
        if damage := scan_damage(raw):  # what libjpeg decoded with a warning only
            raise BadImage(f"corrupt JPEG data: {damage}")
        return stored, size, stored_size
    except BadImage:
        raise
    except UnidentifiedImageError as e:
        raise BadImage("not an image file") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{type(e).__name__}: {e}") from e


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def build_sample(plan: StudyPlan, options: SampleOptions) -> SampleResult:
    result = SampleResult(key=plan.key)
    meta: dict = {"subject_id": plan.subject_id, "study_id": plan.study_id, "split": plan.split}

    for slot, candidates in (("frontal", plan.frontal), ("lateral", plan.lateral)):
        meta[slot] = None
        for ref in candidates:
            try:
                data, original, stored = prepare_image(_read(ref.path), options)
            except FileNotFoundError:
                result.degraded.append(f"{slot} {ref.dicom_id}: file missing")
                continue
            except OSError as e:  # a folder where the file should be, a study folder that is a file, ...
                result.degraded.append(f"{slot} {ref.dicom_id}: cannot read {ref.path} ({e.strerror or e})")
                continue
            except BadImage as e:
                result.degraded.append(f"{slot} {ref.dicom_id}: unreadable JPEG ({e})")
                continue
            result.members[f"{slot}.jpg"] = data
            result.views[slot] = ref.view_position
            meta[slot] = {"dicom_id": ref.dicom_id, "view_position": ref.view_position,
                          "original_size": list(original), "stored_size": list(stored)}
            break
        if meta[slot] is None and candidates:
            result.degraded.append(f"no usable {slot} view")
    result.unused_views = [ref.view_position or "UNKNOWN" for ref in plan.unused]
    meta["unused_images"] = [{"dicom_id": r.dicom_id, "view_position": r.view_position} for r in plan.unused]

    if not result.members:
        result.skipped = "no usable view: " + ("; ".join(result.degraded) or "no frontal or lateral image")
        return result

    try:
        text, section = select_section(_read(plan.report_path).decode("utf-8"), options.report_section)
        if section is None:
            result.degraded.append(f"report has no {options.report_section} section")
    except (OSError, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            problem = "report missing"
        elif isinstance(e, UnicodeDecodeError):
            problem = f"report {plan.report_path} is not UTF-8 text (byte offset {e.start})"
        else:
            problem = f"report {plan.report_path} unreadable ({e.strerror or e})"
        if options.missing_report == "skip":
            result.skipped, result.members = problem, {}
            return result
        text, section = "", None
        result.degraded.append(problem)
    meta["report_section"] = section
    meta["labels"] = plan.labels
    result.members["report.txt"] = text.encode("utf-8")
    result.members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return result
