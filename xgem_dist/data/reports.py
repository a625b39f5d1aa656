"""MIMIC-CXR free-text reports: split into sections and pick one by the official MIMIC-CXR rules.

The rules (MIT-LCP/mimic-cxr `txt/section_parser.py` and `create_section_files.py`): a section
header is an upper-case phrase followed by a colon at the start of a line (after newline and one
space); text before the first header is the preamble; header names are normalised (synonyms and
typos); empty impression/findings sections are dropped; when a report has neither, the last
section's text after its first blank line becomes `last_paragraph`; the text used is the *last*
section named, in priority order, impression > findings > last_paragraph > comparison.
"""

from __future__ import annotations

import re

HEADER = re.compile(r"\n ([A-Z ()/,-]+):\s")
PRIORITY = ("impression", "findings", "last_paragraph", "comparison")

# Header variants seen in MIMIC-CXR reports, normalised to the names the rules use.
_SYNONYMS = {
    "impression": (
        "impression", "impressions", "impresson", "imppression", "impession", "impressin",
        "conclusion", "conclusions", "summary", "findings and impression", "findings/impression",
        "impression and recommendation", "impression and recommendations", "final impression",
        "opinion", "diagnosis",
    ),
    "findings": (
        "findings", "finding", "findngs", "findins", "fingdings", "findgings", "findigns",
        "report", "chest two views", "chest, two views", "pa and lateral views of the chest",
        "portable upright chest", "portable supine chest", "frontal chest radiograph",
    ),
    "comparison": ("comparison", "comparisons", "comparison exam", "comparison study", "prior"),
    "indication": (
        "indication", "indications", "reason for exam", "reason for examination", "clinical indication",
        "clinical information", "history", "clinical history",
    ),
    "technique": ("technique", "techniques", "procedure"),
    "examination": ("examination", "exam", "study", "type of examination"),
    "wet read": ("wet read",),
    "addendum": ("addendum", "addenda"),
}
_NORMAL_NAME = {variant: name for name, variants in _SYNONYMS.items() for variant in variants}


def normalise_name(header: str) -> str:
    name = " ".join(header.lower().split())
    return _NORMAL_NAME.get(name, name)


def split_sections(text: str) -> list[tuple[str, str]]:
    """(normalised name, body) pairs in report order, with the official edge cases applied."""
    matches = list(HEADER.finditer(text))
    if not matches:
        sections = [("full report", text)]
    else:
        sections = [("preamble", text[: matches[0].start()])]
        ends = [m.start() for m in matches[1:]] + [len(text)]
        sections += [(normalise_name(m.group(1)), text[m.end() : end]) for m, end in zip(matches, ends)]
    sections = [(n, b) for n, b in sections if n not in ("impression", "findings") or b.strip()]
    names = {n for n, _ in sections}
    if "impression" not in names and "findings" not in names and sections:
        name, body = sections[-1]
        head, sep, tail = body.partition("\n \n")
        if sep and tail.strip():
            sections[-1] = (name, head)
            sections.append(("last_paragraph", tail))
    return sections


def clean(text: str) -> str:
    return " ".join(text.split())


def select_section(text: str, section: str = "auto") -> tuple[str, str | None]:
    """Returns (text, the section it came from) or ("", None) when the report lacks it.

    `auto` applies the official priority; `full` returns the whole report cleaned of layout.
    """
    if section == "full":
        return clean(text), "full"
    sections = split_sections(text)
    wanted = PRIORITY if section == "auto" else (section,)
    for name in wanted:
        bodies = [b for n, b in sections if n == name and b.strip()]
        if bodies:
            return clean(bodies[-1]), name
    return "", None
