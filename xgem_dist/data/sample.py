"""Build one WebDataset sample from one study: choose and check views, resize, pick the report text.

Runs in sharder worker processes, so it takes and returns plain picklable values.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import fsspec
import simplejpeg
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


def libjpeg_damage(raw: bytes) -> str | None:
    """What libjpeg-turbo reports about a JPEG that it still decodes and PIL never mentions ("Corrupt JPEG
    data": damaged Huffman codes, extraneous bytes, a scan cut short, restart markers out of order):
    simplejpeg's strict mode turns those warnings into errors. The whole entropy-coded stream is decoded,
    at the smallest DCT scale (cheap). None when libjpeg has nothing to say."""
    try:
        simplejpeg.decode_jpeg(raw, colorspace="GRAY", strict=True, min_height=1, min_width=1)
    except ValueError as error:
        return str(error)
    return None


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
        if damage := libjpeg_damage(raw):  # what libjpeg decoded with a warning only
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
