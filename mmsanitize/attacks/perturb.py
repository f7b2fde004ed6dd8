"""Per-copy image perturbations of dirty-label poisons (`poison --perturb KIND`).

A careful attacker does not upload one image many times: every copy is re-encoded or slightly
transformed, so no two poison copies share bytes and a byte-hash check sees unrelated images.
Every copy has its own seed, `(--seed, copy index)` (the copy index is the edit's position in the
plan = its row in `manifest.parquet`), so the same command gives byte-identical outputs.

Kinds:
- `reencode`: JPEG at a seeded quality in [75, 95] (always JPEG, whatever the source format);
- `resize`: a seeded scale in [0.8, 1.2] of both sides (bicubic), stored at that size;
- `crop`: a seeded crop keeping 80-95% of each side (seeded offset), resized back (bicubic) to
  the original size;
- `jitter`: seeded brightness and contrast factors in [0.9, 1.1] and Gaussian noise (sigma 2 levels).
`resize`, `crop` and `jitter` keep the source's format (JPEG at quality 95, else PNG).

After the transform every kind adds an imperceptible mark that makes copies distinct: all pixels
of a subset of the 8x8 blocks are shifted by 1 level (up, or down where the block touches 255;
blocks holding both 0 and 255 are skipped). The subset spells the copy index + 1 in binary over
an order of the blocks seeded by `--seed` and the image size, so two copies of one image at one
size never carry the same mark (an image with k usable blocks tells 2^k - 1 copies apart; a
32x32 image has 16 blocks). A whole-block shift of 1 moves the JPEG luma DC coefficient by 8, at
least one quantisation step for quality >= 75, so the mark survives JPEG encoding. A copy whose
bytes equal the source's is redone with the next attempt's seed; `poison` checks at the end that
all copies differ and fails with one line otherwise.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from ..errors import ShardError, UsageError

KINDS = ("reencode", "resize", "crop", "jitter")
JPEG_QUALITY = 95  # resize/crop/jitter of JPEG sources, as for backdoor triggers
SALT = 0x5EED  # separates the perturbation streams from the planners' streams
MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class Perturbation:
    """What to do to one poison copy: `kind` (one of KINDS), the user `seed` and the `copy` index."""

    kind: str
    seed: int
    copy: int


def check_kind(kind: str | None) -> None:
    """Raise UsageError unless `kind` is None or one of KINDS."""
    if kind is not None and kind not in KINDS:
        raise UsageError(f"--perturb must be one of {', '.join(KINDS)}, not {kind!r}")


def _rng(p: Perturbation, attempt: int):
    import numpy as np

    return np.random.default_rng([SALT, int(p.seed), int(p.copy), int(attempt)])


def _decode(image: bytes, shard: str, key: str):
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32).copy()
    except Exception as e:  # Pillow raises many types for bad data
        raise ShardError(shard, f"undecodable image ({type(e).__name__}: {e})", key=key) from None


def _resample(arr, width: int, height: int):
    import numpy as np
    from PIL import Image

    im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return np.asarray(im.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32).copy()


def _transform(arr, kind: str, rng):
    """The seeded transform of one copy (float RGB array in, float RGB array out) and its JPEG quality."""
    h, w = arr.shape[:2]
    if kind == "reencode":
        return arr, int(rng.integers(75, 96))
    if kind == "resize":
        scale = float(rng.uniform(0.8, 1.2))
        return _resample(arr, max(1, round(w * scale)), max(1, round(h * scale))), JPEG_QUALITY
    if kind == "crop":
        cw = max(1, min(w, round(w * float(rng.uniform(0.80, 0.95)))))
        ch = max(1, min(h, round(h * float(rng.uniform(0.80, 0.95)))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return _resample(arr[y:y + ch, x:x + cw], w, h), JPEG_QUALITY
    # jitter
    brightness, contrast = float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.9, 1.1))
    mean = arr.mean()
    out = ((arr - mean) * contrast + mean) * brightness + rng.normal(0.0, 2.0, size=arr.shape)
    return out, JPEG_QUALITY


def _mark(pixels, number: int, seed: int):
    """Shift whole 8x8 blocks by +-1 so that the set of shifted blocks spells `number` in binary,
    over an order of the blocks seeded by `seed` and the image size only (the same for every copy
    of one size, so different numbers always give different marks)."""
    import numpy as np

    h, w = pixels.shape[:2]
    blocks = [(by, bx) for by in range(0, h, 8) for bx in range(0, w, 8)]
    order = np.random.default_rng([SALT, int(seed), h, w]).permutation(len(blocks))
    out = pixels.astype(np.int16)
    bit = 0
    for i in order:
        if number >> bit == 0:
            break
        by, bx = blocks[i]
        block = out[by:by + 8, bx:bx + 8]
        lo, hi = int(block.min()), int(block.max())
        if lo == 0 and hi == 255:
            continue  # cannot shift without clipping: not a usable block
        if number >> bit & 1:
            block += 1 if hi < 255 else -1
        bit += 1
    return out.astype(np.uint8)


def _encode(pixels, fmt: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpg":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    else:
        Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def perturb_image(image: bytes, ext: str, p: Perturbation, shard: str = "?", key: str = "?",
                  attempt: int = 0) -> tuple[bytes, str]:
    """Decode `image`, apply perturbation `p` (seeded by its seed, copy index and `attempt`), mark
    and re-encode it. Returns (bytes, extension): `jpg` for `reencode` and for JPEG sources, else
    `png`. Never returns the source's bytes (a copy equal to them is redone with the next
    attempt). Deterministic for the same input. Raises ShardError for an undecodable image."""
    import numpy as np

    check_kind(p.kind)
    arr = _decode(image, shard, key)
    fmt = "jpg" if p.kind == "reencode" or ext in ("jpg", "jpeg") else "png"
    for a in range(attempt, attempt + MAX_ATTEMPTS):
        rng = _rng(p, a)
        out, quality = _transform(arr, p.kind, rng)
        pixels = _mark(np.clip(np.rint(out), 0, 255).astype(np.uint8), int(p.copy) + 1, p.seed)
        data = _encode(pixels, fmt, quality)
        if data != image:
            return data, fmt
    raise ShardError(shard, f"--perturb {p.kind}: every attempt reproduced the source image's bytes", key=key)
