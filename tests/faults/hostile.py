"""Builders of hostile shards and model files for the fault suite (real bytes, no mocks)."""

from __future__ import annotations

import gzip
import json
import random
import tarfile
import zlib

from conftest import make_image
from mmsanitize.shards import BLOCK, RECORD, tar_member


def _pad(blob: bytes) -> bytes:
    end = len(blob) + 2 * BLOCK
    return blob + b"\0" * (2 * BLOCK + (-end % RECORD))


def sample(key: str, caption: bytes | str = "a photo of a dog", image: bytes | None = None,
           meta: bytes | None = None, ext: str = "jpg") -> bytes:
    """Tar members of one sample (image, txt, json) as our writer lays them out."""
    image = make_image("dog", zlib.crc32(key.encode()) % 1000) if image is None else image
    caption = caption.encode() if isinstance(caption, str) else caption
    parts = [tar_member(f"{key}.{ext}", image), tar_member(f"{key}.txt", caption)]
    if meta is None:
        meta = json.dumps({"key": key, "label": "dog"}).encode()
    parts.append(tar_member(f"{key}.json", meta))
    return b"".join(parts)


def good_tar(n: int = 4, prefix: str = "0000") -> bytes:
    return _pad(b"".join(sample(f"{prefix}{i:05d}"[:9]) for i in range(n)))


def _header(name: str, size: int, typeflag: bytes = b"0", size_field: bytes | None = None,
            linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = max(size, 0)
    info.type = typeflag
    info.linkname = linkname
    buf = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT if len(name) < 100 else tarfile.GNU_FORMAT))
    if size_field is not None:
        buf[124:136] = size_field.ljust(12, b"\0")[:12]
        buf[148:156] = b"        "
        chk = sum(buf[:BLOCK])
        buf[148:156] = b"%06o\0 " % chk
    return bytes(buf[:BLOCK]) + bytes(buf[BLOCK:])


def _pax(records: dict[str, str], size_override: bytes | None = None, typeflag: bytes = b"x") -> bytes:
    body = b""
    for k, v in records.items():
        rec = f" {k}={v}\n".encode()
        n = len(rec) + len(str(len(rec)))
        n = len(rec) + len(str(n))
        body += str(n).encode() + rec
    hdr = _header("././@PaxHeader", len(body), typeflag, size_field=size_override)
    return hdr + body + b"\0" * (-len(body) % BLOCK)


def _neg256(n: int) -> bytes:
    return (n % (1 << 96)).to_bytes(12, "big", signed=False)[:12] if n >= 0 else n.to_bytes(12, "big", signed=True)


HOSTILE: dict[str, callable] = {}


def hostile(name):
    def deco(fn):
        HOSTILE[name] = fn
        return fn
    return deco


@hostile("truncated")
def _truncated():
    return good_tar()[:3000]


@hostile("dotdot-name")
def _dotdot():
    return _pad(tar_member("../999990001.jpg", make_image("dog", 1)) + sample("999990002"))


@hostile("absolute-name")
def _absolute():
    return _pad(_header("/etc/999990001.jpg", 0) + sample("999990002"))


@hostile("symlink")
def _symlink():
    return _pad(sample("999990001") + _header("999990002.jpg", 0, b"2", linkname="/etc/passwd"))


@hostile("hardlink")
def _hardlink():
    return _pad(sample("999990001") + _header("999990002.jpg", 0, b"1", linkname="999990001.jpg"))


@hostile("fifo")
def _fifo():
    return _pad(_header("999990001.jpg", 0, b"6") + sample("999990002"))


@hostile("device")
def _device():
    return _pad(_header("999990001.jpg", 0, b"3") + sample("999990002"))


@hostile("ihdr-bomb")
def _bomb():
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)) \
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    return _pad(sample("999990001") + sample("999990002", image=png, ext="png"))


@hostile("not-an-image")
def _not_image():
    return _pad(sample("999990001") + sample("999990002", image=b"<html>not an image</html>"))


@hostile("caption-10MB")
def _cap10():
    return _pad(sample("999990001") + sample("999990002", caption=("dog " * (10 << 18))))


@hostile("caption-1MB-one-word")
def _cap1w():
    return _pad(sample("999990001") + sample("999990002", caption="d" * (1 << 20)))


@hostile("caption-non-utf8")
def _nonutf8():
    return _pad(sample("999990001") + sample("999990002", caption=b"\xff\xfe caption"))


@hostile("dotted-key")
def _dotted():
    return _pad(sample("999990001") + tar_member("999990002.x.jpg", make_image("dog", 2)))


@hostile("duplicate-key")
def _dup():
    return _pad(sample("999990001") + sample("999990002") + sample("999990001"))


@hostile("empty-tar")
def _empty():
    return b"\0" * RECORD


@hostile("zero-byte")
def _zero():
    return b""


@hostile("gzip-named-tar")
def _gz():
    return gzip.compress(good_tar(), mtime=0)


@hostile("caption-without-image")
def _noimage():
    return _pad(sample("999990001") + tar_member("999990002.txt", b"a dog") + tar_member("999990002.json", b"{}"))


@hostile("invalid-json")
def _badjson():
    return _pad(sample("999990001") + sample("999990002", meta=b"{not json"))


@hostile("pax-negative-size")
def _paxneg():
    return _pad(_pax({"size": "-5000"}) + sample("999990001"))


@hostile("pax-junk-size")
def _paxjunk():
    return _pad(_pax({"size": "12abc"}) + sample("999990001"))


@hostile("x-header-negative-size")
def _xneg():
    return _pad(_pax({"path": "999990001.jpg"}, size_override=b"\xff" + b"\xff" * 10 + b"\x00") + sample("999990002"))


@hostile("L-header-negative-size")
def _lneg():
    return _pad(_header("././@LongLink", 0, b"L", size_field=b"\xff" * 11 + b"\x00") + sample("999990002"))


@hostile("g-header-negative-size")
def _gneg():
    return _pad(_pax({"comment": "x"}, size_override=b"\xff" * 12, typeflag=b"g") + sample("999990002"))


@hostile("base256-huge-size")
def _b256():
    return _pad(_header("999990001.jpg", 0, size_field=b"\x80" + b"\x7f" * 11) + sample("999990002"))


@hostile("bad-octal-size")
def _octal():
    return _pad(_header("999990001.jpg", 0, size_field=b"9z9z9z9z9z9\0") + sample("999990002"))


@hostile("control-chars-in-key")
def _ctrl():
    return _pad(sample("999990001") + tar_member("99999\n\x1b[2Jerror: forged.jpg", make_image("dog", 3))
                + tar_member("99999\n\x1b[2Jerror: forged.txt", b"a dog"))


def corrupt(base: bytes, rng: random.Random) -> bytes:
    """One random corruption of a valid tar: flips, truncation, junk header fields, splices."""
    data = bytearray(base)
    kind = rng.randrange(8)
    if kind == 0:
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        data = data[:rng.randrange(len(data))]
    elif kind in (2, 3):  # junk in a header's size field, with a fixed checksum so it is parsed
        hdr = rng.randrange(0, len(data) // BLOCK) * BLOCK
        field = rng.choice([b"\xff" * 12, b"\x80" + bytes(rng.randrange(256) for _ in range(11)),
                            b"-777", b"77777777777\0", b"1e9", bytes(rng.randrange(256) for _ in range(12)),
                            b"\xff" + b"\xff" * 10 + b"\xf0"])
        data[hdr + 124:hdr + 136] = field.ljust(12, b"\0")[:12]
        data[hdr + 148:hdr + 156] = b"        "
        data[hdr + 148:hdr + 156] = b"%06o\0 " % sum(data[hdr:hdr + BLOCK])
    elif kind == 4:  # random typeflag with fixed checksum
        hdr = rng.randrange(0, len(data) // BLOCK) * BLOCK
        data[hdr + 156] = rng.choice(b"0123456789xgLKSAVNM\0")
        data[hdr + 148:hdr + 156] = b"        "
        data[hdr + 148:hdr + 156] = b"%06o\0 " % sum(data[hdr:hdr + BLOCK])
    elif kind == 5:  # a pax header with hostile records in front
        recs = rng.choice([{"size": str(rng.randint(-10**12, 10**12))}, {"size": "x" * rng.randint(1, 30)},
                           {"path": "../" * rng.randint(1, 4) + "a.jpg"}, {"path": ""}, {"path": "/abs.jpg"}])
        data = bytearray(_pax(recs)) + data
    elif kind == 6:  # splice: duplicate / reorder random block ranges
        a, b = sorted(rng.randrange(len(data) // BLOCK) * BLOCK for _ in range(2))
        data = data[:b] + data[a:b] + data[b:]
    else:  # garbage pax record bodies
        body = bytes(rng.randrange(256) for _ in range(rng.randint(1, 600)))
        data = bytearray(_header("././@PaxHeader", len(body), b"x") + body + b"\0" * (-len(body) % BLOCK)) + data
    return bytes(data)
