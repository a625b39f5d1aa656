"""The evaluation's pictures: a grid PNG per combination (inputs, real and generated views of the first
studies) and one self-contained HTML page (the grids inlined, the figures, real vs generated reports)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .sample import combination_slug, write_atomic

GRID_ROWS = 8
TITLE_HEIGHT = 14


def grid_png(columns: list[tuple[str, np.ndarray]]) -> bytes:
    """columns: (title, [rows, H, W] uint8), one study per row."""
    rows, side = len(columns[0][1]), columns[0][1].shape[-1]
    canvas = Image.new("L", (side * len(columns), TITLE_HEIGHT + side * rows), color=255)
    draw = ImageDraw.Draw(canvas)
    for c, (title, images) in enumerate(columns):
        draw.text((c * side + 2, 1), title, fill=0)
        for r, image in enumerate(images):
            canvas.paste(Image.fromarray(image, mode="L"), (c * side, TITLE_HEIGHT + r * side))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(json.dumps(value)) if isinstance(value, (dict, list)) else html.escape(str(value))


def _rows(prefix: str, value) -> list[tuple[str, str]]:
    """A nested dict flattened to (dotted name, shown value) rows."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in _rows(f"{prefix}.{k}" if prefix else k, v)]
    return [(prefix, _figure(value))]


def write_page(out: Path, report: dict, timing: dict, examples: dict) -> None:
    parts = ["<!doctype html><meta charset='utf-8'><title>xgem-dist evaluate</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}</style>",
             "<h1>xgem-dist evaluate</h1><h2>Settings</h2><table>"]
    parts += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in _rows("", report["settings"] | {"timing": timing})]
    parts.append("</table>")
    if report["not_computed"]:
        parts.append("<h2>Not computed</h2><ul>" + "".join(f"<li>{html.escape(r)}</li>"
                                                            for r in report["not_computed"]) + "</ul>")
    for combination, entry in report["combinations"].items():
        parts.append(f"<h2>{html.escape(combination)} ({entry['studies']} studies)</h2><table>")
        parts += [f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in _rows("", {m: f for m, f in entry.items()
                                                                              if m not in ("studies", "keys")})]
        parts.append("</table>")
        grid = out / f"grid_{combination_slug(combination)}.png"
        if grid.exists():
            data = base64.b64encode(grid.read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(combination)}' src='data:image/png;base64,{data}'></p>")
        reports = [r for r in examples[combination]["reports"] if r[2] is not None]
        if reports:
            parts.append("<table><tr><th>study</th><th>real report</th><th>generated report</th></tr>")
            parts += [f"<tr><td>{html.escape(k)}</td><td>{html.escape(real)}</td><td>{html.escape(gen)}</td></tr>"
                      for k, real, gen in reports]
            parts.append("</table>")
    write_atomic(out / "index.html", "\n".join(parts).encode())
