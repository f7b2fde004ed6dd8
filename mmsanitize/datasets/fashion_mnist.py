"""Fashion-MNIST (Debian `dataset-fashion-mnist`) as labelled items with class-templated captions."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

from ..errors import UsageError
from .build import SourceItem
from .splits import unit_hash

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
DEFAULT_IMAGE_SIZE = 64
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = [
    "a photo of {a} {c}",
    "a black and white picture of {a} {c}",
    "a small grey image of {a} {c}",
    "a low resolution photo of {a} {c}",
    "{a} {c} on a black background",
    "a product photo of {a} {c}",
]


def article(word: str) -> str:
    """'a' or 'an' for a word."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def caption_for(source: str, label: str) -> str:
    """A caption from one of TEMPLATES, chosen by a hash of the source id (deterministic)."""
    template = TEMPLATES[int(unit_hash(f"template:{source}") * len(TEMPLATES))]
    return template.format(a=article(label), c=label)


def _read_idx(path: Path, magic: int) -> tuple[tuple[int, ...], bytes]:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        raise UsageError(f"{path} is not an IDX file")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    n = 1
    for d in dims:
        n *= d
    if len(body) != n:
        raise UsageError(f"{path}: expected {n} bytes of data, found {len(body)}")
    return dims, body


def collect_items(source: str | None = None) -> tuple[list[SourceItem], dict]:
    """Items for all 70,000 images (`train-N`, then `t10k-N`); returns (items, {}).

    Raises UsageError when the IDX files are missing.
    """
    root = Path(source or DEFAULT_SOURCE)
    items: list[SourceItem] = []
    for part in ("train", "t10k"):
        images, labels = root / f"{part}-images-idx3-ubyte.gz", root / f"{part}-labels-idx1-ubyte.gz"
        if not images.is_file() or not labels.is_file():
            raise UsageError(f"fashion-mnist not found at {root} (no {images.name}): "
                             f"apt-get install dataset-fashion-mnist, or pass --source DIR")
        (n, h, w), pixels = _read_idx(images, 0x00000803)
        (nl,), ys = _read_idx(labels, 0x00000801)
        if nl != n:
            raise UsageError(f"{root}: {part} has {n} images but {nl} labels")
        for i in range(n):
            if ys[i] >= len(CLASSES):
                raise UsageError(f"{labels}: label {ys[i]} of item {i} is not a Fashion-MNIST class")
            label = CLASSES[ys[i]]
            source_id = f"{part}-{i}"
            items.append(SourceItem(source_id, caption_for(source_id, label), label,
                                    pixels=pixels[i * h * w:(i + 1) * h * w], shape=(h, w)))
    return items, {}
