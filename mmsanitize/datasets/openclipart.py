"""The Open Clip Art Library (Debian `openclipart-png` + `openclipart-svg`) as labelled image-text items.

Each PNG is paired with the SVG of the same relative path; the caption is the drawing's own
`dc:title` (the first one; later titles name authors), its `dc:description` and keywords. Titles
that name a collection rather than a drawing are dropped: empty titles, known collection names,
and any title shared by more than `MAX_TITLE_REPEATS` drawings. Labels come from the class
vocabulary in `openclipart_classes.txt`, else the top-level category folder.
SVGs are read with regular expressions only (no XML parser, so no entity expansion).
"""

from __future__ import annotations

import html
import re
from collections import Counter
from pathlib import Path

from ..errors import UsageError
from .build import SourceItem

DEFAULT_SOURCE = "/usr/share/openclipart"
DEFAULT_IMAGE_SIZE = 128
MAX_TITLE_REPEATS = 4
MAX_SVG_BYTES = 64 << 20
MAX_DESCRIPTION_CHARS = 200
MAX_KEYWORDS = 6
COLLECTION_TITLES = re.compile(
    r"gramastar|flat icon collection|lemon svg theme|etiquette icons|aiga_symbol_signs|"
    r"svg gradient collection|various cliparts|svg road signs|iconset|-theme$|icon theme",
    re.IGNORECASE,
)
_CLIPART_BY = re.compile(r"^clipart by [^-]+ - ", re.IGNORECASE)
_METADATA = re.compile(rb"<metadata.*?</metadata>", re.DOTALL)
_TITLE = re.compile(rb"<dc:title[^>]*>(.*?)</dc:title>", re.DOTALL)
_DESC = re.compile(rb"<dc:description[^>]*>(.*?)</dc:description>", re.DOTALL)
_SUBJECT = re.compile(rb"<dc:subject[^>]*>(.*?)</dc:subject>", re.DOTALL)
_LI = re.compile(rb"<rdf:li[^>]*>(.*?)</rdf:li>", re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def _text(raw: bytes) -> str:
    text = html.unescape(_TAG.sub(" ", raw.decode("utf-8", "replace")))
    return re.sub(r"\s+", " ", text).strip()


def svg_metadata(path: str | Path) -> dict:
    """Title (the first dc:title), description and keywords of an SVG's `<metadata>` block ('' / [] if absent)."""
    with open(path, "rb") as f:
        data = f.read(MAX_SVG_BYTES)
    m = _METADATA.search(data)
    block = m.group(0) if m else b""
    title = _TITLE.search(block)
    desc = _DESC.search(block)
    subject = _SUBJECT.search(block)
    keywords = [_text(k) for k in _LI.findall(subject.group(1))] if subject else []
    return {
        "title": _text(title.group(1)) if title else "",
        "description": _text(desc.group(1)) if desc else "",
        "keywords": [k for k in keywords if k and not re.fullmatch(r"0x[0-9a-f]+", k, re.IGNORECASE)],
    }


def load_vocabulary(path: str | Path | None = None) -> list[tuple[str, re.Pattern]]:
    """The class vocabulary as (class, whole-word regex over the class and its synonyms), in file order."""
    path = Path(path) if path else Path(__file__).with_name("openclipart_classes.txt")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, syn = line.partition(":")
        words = [name.strip()] + [w.strip() for w in syn.split(",") if w.strip()]
        alt = "|".join(sorted({re.escape(w.lower()) for w in words}, key=len, reverse=True))
        out.append((name.strip(), re.compile(rf"(?<![a-z])(?:{alt})(?:e?s)?(?![a-z])")))
    return out


def label_for(title: str, keywords: list[str], folder: str, vocabulary) -> str:
    """First vocabulary class found in title/keywords, then in the folder path, else the top folder."""
    texts = [" ".join([title] + keywords).lower(), folder.replace("_", " ").replace("/", " ").lower()]
    for text in texts:
        for name, pattern in vocabulary:
            if pattern.search(text):
                return name
    return folder.split("/")[0] or "unsorted"


def make_caption(title: str, description: str, keywords: list[str]) -> str:
    """`Title. Description. kw1, kw2` (description left out when it repeats the title)."""
    parts = [title.rstrip(". ")]
    d = description[:MAX_DESCRIPTION_CHARS].rstrip(". ")
    if d and d.lower() != parts[0].lower():
        parts.append(d)
    kws = list(dict.fromkeys(k.lower() for k in keywords))[:MAX_KEYWORDS]
    if kws:
        parts.append(", ".join(kws))
    return ". ".join(parts)


def clean_title(title: str) -> str:
    """Strip the `Clipart by NAME - ` prefix some uploads carry."""
    return _CLIPART_BY.sub("", title).strip()


def collect_items(source: str | None = None) -> tuple[list[SourceItem], dict]:
    """Items for every PNG under `source/png` whose SVG (same path under `source/svg`) has a usable title.

    Returns (items in sorted path order, filtered-count dict by reason). Raises UsageError when
    the folders are missing.
    """
    root = Path(source or DEFAULT_SOURCE)
    png_root, svg_root = root / "png", root / "svg"
    if not png_root.is_dir() or not svg_root.is_dir():
        raise UsageError(f"openclipart not found at {root} (no png/ and svg/ folders): "
                         f"apt-get install openclipart-png openclipart-svg, or pass --source DIR")
    vocabulary = load_vocabulary()
    records = []
    filtered: Counter = Counter()
    for png in sorted(png_root.rglob("*.png")):
        rel = png.relative_to(png_root).as_posix()[: -len(".png")]  # names may contain dots
        svg = svg_root / f"{rel}.svg"
        if not svg.is_file():
            filtered["no matching SVG"] += 1
            continue
        meta = svg_metadata(svg)
        title = clean_title(meta["title"])
        if not title:
            filtered["empty title"] += 1
            continue
        if COLLECTION_TITLES.search(title):
            filtered["collection title"] += 1
            continue
        records.append((rel, str(png), title, meta))
    repeats = Counter(r[2].lower() for r in records)
    items = []
    for rel, png, title, meta in records:
        if repeats[title.lower()] > MAX_TITLE_REPEATS:
            filtered[f"title repeated in more than {MAX_TITLE_REPEATS} drawings"] += 1
            continue
        folder = str(Path(rel).parent).replace("\\", "/")
        label = label_for(title, meta["keywords"], folder, vocabulary)
        caption = make_caption(title, meta["description"], meta["keywords"])
        items.append(SourceItem(rel, caption, label, path=png,
                                extra=(("category", folder), ("title", title))))
    return items, dict(sorted(filtered.items()))
