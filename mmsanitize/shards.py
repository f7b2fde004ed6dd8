"""Shard I/O in img2dataset's webdataset layout: expand specs, read samples, write shards atomically.

A shard is `NNNNN.tar` with members `KEY.jpg|png|webp|jpeg`, `KEY.txt`, `KEY.json`, next to
`NNNNN.parquet` (one row per sample) and `NNNNN_stats.json`; a dataset folder also holds
`sizes.json` (shard file name -> sample count) for open_clip's webdataset loader.

The tar reader is a small strict parser (regular files, GNU long names and pax headers only) so
that every member's byte range is known: rewriters copy untouched members as raw bytes.
`rewrite_shard` reads a plain shard (the usual layout) in memory with the same checks done for all
headers at once (`_scan_plain_tar`), and any other through that parser.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, NamedTuple

from .errors import ShardError, UsageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
META_EXT = "json"
BLOCK = 512
RECORD = 20 * BLOCK
# Fixed tar header fields so the same samples always give byte-identical tars.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_MODE = 0o644


# --------------------------------------------------------------------------- shard specs


def expand_shards(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Expand a shard spec into an ordered list of existing `.tar` paths, made absolute (so Dask
    workers started in another working directory can open them).

    `spec` is a directory (its `*.tar`, sorted), a single `.tar`, a brace pattern
    (`data/{00000..00009}.tar`), a glob, or a list of any of these.
    Raises UsageError when nothing matches or a named shard does not exist.
    """
    if not isinstance(spec, (str, os.PathLike)):
        out: list[Path] = []
        for item in spec:
            out.extend(expand_shards(item))
        return out
    return [p.absolute() for p in _expand(spec)]


def _expand(spec: str | os.PathLike) -> list[Path]:
    text = os.fspath(spec)
    path = Path(text)
    if "{" in text:
        import braceexpand

        paths = [Path(p) for p in braceexpand.braceexpand(text)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UsageError(f"shard spec {text}: {len(missing)} shard(s) missing, first {missing[0]}")
        return paths
    if path.is_dir():
        paths = sorted(path.glob("*.tar"))
        if not paths:
            raise UsageError(f"no .tar shards in directory {path}")
        return paths
    if any(c in text for c in "*?["):
        paths = sorted(Path(p) for p in glob.glob(text) if p.endswith(".tar"))
        if not paths:
            raise UsageError(f"shard spec {text} matches no .tar file")
        return paths
    if path.is_file():
        if path.suffix != ".tar":
            raise UsageError(f"{path} is not a .tar shard")
        return [path]
    raise UsageError(f"shard spec {text}: no such file or directory")


def spec_root(spec: str | os.PathLike) -> Path:
    """The folder a shard spec lives in (the directory itself, or the shards' parent)."""
    paths = expand_shards(spec)
    return paths[0].parent


def shard_stem(path: str | os.PathLike) -> str:
    """`/x/00003.tar` -> `00003`."""
    name = Path(path).name
    return name[:-4] if name.endswith(".tar") else name


_FINGERPRINTS: dict[tuple, dict] = {}
_RACY_NS = 2_000_000_000  # a file changed this recently may change again within one timestamp tick


def _fingerprint_memo(path: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmsanitize" / "fingerprints" / (hashlib.sha256(path.encode()).hexdigest()[:32] + ".json")


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Name, size and sha256 of a file's content: what resume and artifact checks compare.

    Content-based, so copying or touching a shard changes nothing. The hash is memoised by
    (path, size, mtime, ctime, inode, device): in-process, and across processes in
    `CACHE_HOME/mmsanitize/fingerprints/` (one small file per path; not for files changed in the
    last 2 s), so the catalog, the planning client and the tasks hash each file once. Rewriting a
    file always changes its ctime, which no program can set back, so a stale entry is never used.
    """
    p = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(p)
    except OSError as e:
        raise ShardError(Path(p).name, f"cannot read: {e.strerror}") from None
    stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]
    memo_key = (p, *stat)
    fp = _FINGERPRINTS.get(memo_key)
    if fp is not None:
        return dict(fp)
    memo = _fingerprint_memo(p)
    try:
        entry = json.loads(memo.read_text())
        if entry["path"] == p and entry["stat"] == stat:
            fp = entry["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if fp is None:
        h = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:
            raise ShardError(Path(p).name, f"cannot read: {e.strerror}") from None
        fp = {"name": Path(p).name, "size": st.st_size, "sha256": h.hexdigest()}
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_NS:
            with contextlib.suppress(OSError):
                memo.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(memo, {"path": p, "stat": stat, "fingerprint": fp})
    if len(_FINGERPRINTS) > 100_000:
        _FINGERPRINTS.clear()
    _FINGERPRINTS[memo_key] = fp
    return dict(fp)


# --------------------------------------------------------------------------- tar parsing


@dataclass(frozen=True)
class Member:
    """One regular file of a tar: its name and byte ranges (`start` = first header block)."""

    name: str
    start: int
    data_offset: int
    size: int

    @property
    def end(self) -> int:
        """Offset just past the member's padded data."""
        return self.data_offset + -(-self.size // BLOCK) * BLOCK


def _nts(field_bytes: bytes) -> bytes:
    return field_bytes.split(b"\0", 1)[0]


def _octal(field_bytes: bytes, what: str = "number") -> int:
    """A tar numeric field: octal text, or GNU base-256 (first byte 0x80/0xff). Raises ValueError."""
    if field_bytes[:1] in (b"\x80", b"\xff"):  # GNU base-256 for large sizes
        if field_bytes[:1] == b"\xff":
            return int.from_bytes(field_bytes, "big", signed=True)
        return int.from_bytes(field_bytes[1:], "big")
    text = _nts(field_bytes).strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)  # a sign or junk: negative sizes are refused by the caller
    except ValueError:
        raise ValueError(f"bad octal {what} field {bytes(text[:16])!r}") from None


_PAX_MAX_RECORDS = 10_000


def _parse_pax(data: bytes) -> dict[str, str]:
    """Parse pax records `LEN key=value\n`; raises ValueError on a malformed record."""
    out = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        m = re.match(rb"(\d{1,20}) ", data[pos:pos + 24])
        if not m:
            raise ValueError(f"malformed pax record at offset {pos}")
        length = int(m.group(1))
        if length <= m.end() or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise ValueError(f"malformed pax record length {length} at offset {pos}")
        record = data[pos + m.end(): pos + length - 1]
        k, eq, v = record.partition(b"=")
        if not eq:
            raise ValueError(f"pax record without '=' at offset {pos}")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "replace")
        pos += length
        if len(out) > _PAX_MAX_RECORDS:
            raise ValueError("too many pax records")
    return out


class _ChunkReader:
    """Sequential byte ranges of a file served from large buffered chunks (few syscalls, few copies)."""

    def __init__(self, fileobj: BinaryIO, chunk: int = 16 << 20):
        self.f = fileobj
        self.chunk = chunk
        self.buf = b""
        self.base = 0  # file offset of buf[0]

    def get(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file (shorter at end of file); `start` never goes backwards."""
        off = start - self.base
        if end - self.base > len(self.buf):
            if off >= len(self.buf):
                self.f.seek(start)
                keep = b""
            else:
                keep = self.buf[off:]
            more = self.f.read(max(self.chunk, end - start - len(keep)))
            self.buf = keep + more if keep else more
            self.base, off = start, 0
        return self.buf[off: off + end - start]


_ZERO_BLOCK = bytes(BLOCK)


_MAGIC = {b"\x1f\x8b": "gzip-compressed", b"BZh": "bzip2-compressed", b"\xfd7zXZ": "xz-compressed",
          b"\x28\xb5\x2f\xfd": "zstd-compressed", b"PK\x03\x04": "a zip file"}
# Header types: regular file (0, NUL, 7), directory (5, skipped), GNU long name (L), pax (x, g).
_TYPE_NAMES = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device", b"4": "a block device",
               b"6": "a fifo", b"K": "a GNU long link name"}


def iter_tar(fileobj: BinaryIO, shard: str, with_data=True) -> Iterator[tuple[Member, bytes | None]]:
    """Yield `(Member, data)` for each regular file of a tar stream, in order.

    Total: any bytes give members or ShardError (never another exception, never a loop), in time
    and memory bounded by the file size. Rejects compressed files, truncated archives, bad header
    checksums or numbers, negative or oversized sizes, malformed pax records, links, devices,
    fifos, absolute names and names with `..`. Directory entries are skipped.
    `with_data` is True (read every member), False (skip data, yield None) or a predicate
    on the member name saying which members to read.
    """
    try:
        yield from _iter_tar(fileobj, shard, with_data)
    except ShardError:
        raise
    except OSError as e:
        raise ShardError(shard, f"cannot read: {e.strerror or e}") from None
    except (ValueError, OverflowError, UnicodeError, IndexError, MemoryError, RecursionError) as e:
        raise ShardError(shard, f"malformed tar ({type(e).__name__}: {e})") from None


def _file_size(fileobj: BinaryIO) -> int | None:
    try:
        return os.fstat(fileobj.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        try:
            here = fileobj.tell()
            size = fileobj.seek(0, os.SEEK_END)
            fileobj.seek(here)
            return size
        except (AttributeError, OSError):
            return None


def _iter_tar(fileobj: BinaryIO, shard: str, with_data) -> Iterator[tuple[Member, bytes | None]]:
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    header_start: int | None = None
    file_size = _file_size(fileobj)
    # Skipping data still reads it in 1 MiB chunks: one pread per header costs more than reading
    # through small members (a 3-member tiny sample: 3x slower), and little for large ones.
    get = _ChunkReader(fileobj, chunk=16 << 20 if with_data is True else 1 << 20).get

    def check_size(size: int, at: int, what: str) -> None:
        if size < 0:
            raise ShardError(shard, f"corrupt tar header at byte {at} (negative {what} size {size})")
        if file_size is not None and at + BLOCK + size > file_size:
            raise ShardError(shard, f"truncated tar ({what} at byte {at} declares {size} bytes, "
                                    f"past the end of the {file_size}-byte file)")

    while True:
        header = get(pos, pos + BLOCK)
        if pos == 0:
            for magic, kind in _MAGIC.items():
                if header.startswith(magic):
                    raise ShardError(shard, f"not a tar archive: the file is {kind}")
        if len(header) < BLOCK:
            if pos == 0 and not header:
                raise ShardError(shard, "empty file (0 bytes), not a tar archive")
            raise ShardError(shard, f"truncated tar (archive ends inside a header at byte {pos})")
        if header == _ZERO_BLOCK:
            if long_name is not None or pax:
                raise ShardError(shard, f"truncated tar (extended header at byte {header_start} has no member)")
            return
        try:
            checksum = _octal(header[148:156], "checksum")
        except ValueError:
            checksum = -1
        if checksum != sum(header) - sum(header[148:156]) + 256:
            raise ShardError(shard, f"corrupt tar header at byte {pos} (checksum mismatch)")
        if header_start is None:
            header_start = pos
        try:
            size = _octal(header[124:136], "size")
        except ValueError as e:
            raise ShardError(shard, f"corrupt tar header at byte {pos} ({e})") from None
        typeflag = header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        if header[345] and header[257:262] == b"ustar":
            name = _nts(header[345:500]) + b"/" + name
        check_size(size, pos, "member")
        data_offset = pos + BLOCK
        at = pos
        pos = data_offset + ((size + BLOCK - 1) & ~(BLOCK - 1))
        if typeflag in (b"L", b"x", b"g"):
            if size > (16 << 20):
                raise ShardError(shard, f"corrupt tar header at byte {at} (extended header of {size} bytes)")
            data = get(data_offset, data_offset + size)
            if len(data) < size:
                raise ShardError(shard, f"truncated tar (archive ends inside member data at byte {pos})")
            if typeflag == b"L":
                long_name = _nts(data).decode("utf-8", "replace")
            elif typeflag == b"x":
                try:
                    pax = _parse_pax(data)
                except ValueError as e:
                    raise ShardError(shard, f"corrupt pax header at byte {at} ({e})") from None
            continue
        full = long_name or pax.get("path") or name.decode("utf-8", "replace")
        if pax:
            if "size" in pax:
                text = pax["size"].strip()
                if not re.fullmatch(r"[0-9]{1,20}", text):
                    raise ShardError(shard, f"corrupt pax header before byte {at} (size {text[:20]!r})", key=full)
                size = int(text)
                check_size(size, at, "member")
                pos = data_offset + ((size + BLOCK - 1) & ~(BLOCK - 1))
            pax = {}
        long_name = None
        start, header_start = header_start, None
        if typeflag in _TYPE_NAMES:
            raise ShardError(shard, f"tar member is {_TYPE_NAMES[typeflag]}, not a regular file", key=full)
        if typeflag == b"5":
            continue
        if typeflag not in (b"0", b"\0", b"7"):
            raise ShardError(shard, f"tar member has unsupported type {typeflag!r}", key=full)
        if not full:
            raise ShardError(shard, f"tar member at byte {start} has an empty name")
        if full[0] == "/" or ".." in full.split("/"):
            raise ShardError(shard, "tar member name escapes the shard directory", key=full)
        member = Member(full, start, data_offset, size)
        if with_data is True or (with_data is not False and with_data(full)):
            data = get(data_offset, data_offset + size)
            if len(data) < size:
                raise ShardError(shard, f"truncated tar (archive ends inside member data at byte {pos})", key=full)
            yield member, data
        else:
            yield member, None


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def split_name(name: str, shard: str) -> tuple[str, str]:
    """Split a member name into (key, extension) as webdataset does (at the first dot of the basename)."""
    directory, _, base = name.rpartition("/")
    if "." not in base:
        raise ShardError(shard, "tar member has no extension", key=name)
    key, ext = base.split(".", 1)
    if "." in ext:
        raise ShardError(shard, f"key contains a dot (member {name!r}); keys must not contain dots",
                         key=(directory + "/" if directory else "") + base.rsplit(".", 1)[0])
    if not key:
        raise ShardError(shard, "tar member has an empty key", key=name)
    if _CONTROL_CHARS.search(key):
        raise ShardError(shard, "key contains control characters", key=key)
    return (directory + "/" + key if directory else key), ext.lower()


# --------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One image-text pair as stored in a shard."""

    key: str
    image: bytes
    image_ext: str
    caption: str
    meta: dict | None = None
    extras: dict[str, bytes] = field(default_factory=dict)


@dataclass
class RawSample:
    """A sample's members as raw bytes with their positions in the tar (for splicing)."""

    key: str
    members: list[tuple[Member, str, bytes | None]]  # (member, ext, data)

    @property
    def start(self) -> int:
        return self.members[0][0].start

    @property
    def end(self) -> int:
        return self.members[-1][0].end

    def data(self, ext: str) -> bytes | None:
        for _, e, d in self.members:
            if e == ext:
                return d
        return None


def iter_raw_samples(path: str | os.PathLike, with_data=True) -> Iterator[RawSample]:
    """Group a shard's members by key (consecutive members sharing a key form one sample).

    `with_data` as in `iter_tar` (True, False, or a predicate on member names).

    Raises ShardError for a key that appears twice in the shard and for an empty shard.
    """
    shard = Path(path).name
    seen: set[str] = set()
    current: RawSample | None = None
    count = 0
    try:
        fileobj = open(path, "rb")
    except OSError as e:
        raise ShardError(shard, f"cannot open: {e.strerror}") from None
    with fileobj:
        for member, data in iter_tar(fileobj, shard, with_data=with_data):
            key, ext = split_name(member.name, shard)
            if current is not None and key == current.key:
                if any(e == ext for _, e, _ in current.members):
                    raise ShardError(shard, f"member .{ext} appears twice", key=key)
                current.members.append((member, ext, data))
                continue
            if current is not None:
                yield current
                count += 1
            if key in seen:
                raise ShardError(shard, "duplicate key in shard", key=key)
            seen.add(key)
            current = RawSample(key, [(member, ext, data)])
        if current is not None:
            yield current
            count += 1
    if count == 0:
        raise ShardError(shard, "shard contains no samples")


_PLAIN_NAME = re.compile(rb"([\x20-\x2d\x30-\x7e]+)\.([\x20-\x2d\x30-\x40\x5b-\x7e]+)")
_PLAIN_SIZE = re.compile(rb"[0-7]{11}\x00")
_PLAIN_CHECKSUM = re.compile(rb"[0-7]{6}\x00 ")


def plain_sample_members(blob: bytes, key: str) -> list[tuple[Member, str, bytes]] | None:
    """The members `(member, ext, data)` of one sample's byte range `blob` (offsets relative to it),
    as `iter_tar` + `split_name` give them, when the range is exactly the sample's members and every
    header is a plain one (regular file, 11-digit size, the usual checksum spelling, a flat
    `KEY.EXT` name with a lower-case extension, no prefix) naming `key`; None otherwise, and the
    caller reads the range with `iter_tar`, which gives the usual result or error."""
    if any(blob.startswith(magic) for magic in _MAGIC):
        return None
    out = []
    pos, n = 0, len(blob)
    while pos < n:
        header = blob[pos:pos + BLOCK]
        if len(header) < BLOCK or header[156] not in (48, 0, 55) or header[345] != 0:
            return None
        size_field, checksum_field = header[124:136], header[148:156]
        if not (_PLAIN_SIZE.fullmatch(size_field) and _PLAIN_CHECKSUM.fullmatch(checksum_field)):
            return None
        if int(checksum_field[:6], 8) != sum(header) - sum(checksum_field) + 256:
            return None
        name_end = header.find(b"\0", 0, 100)
        m = _PLAIN_NAME.fullmatch(header, 0, name_end) if name_end > 0 else None
        if m is None or m.group(1).decode("ascii") != key:
            return None
        size = int(size_field[:11], 8)
        data_offset = pos + BLOCK
        pos = data_offset + ((size + BLOCK - 1) & ~(BLOCK - 1))
        if pos > n:
            return None
        out.append((Member(header[:name_end].decode("ascii"), data_offset - BLOCK, data_offset, size),
                    m.group(2).decode("ascii"), blob[data_offset:data_offset + size]))
    return out or None


def parse_sample(raw: RawSample, shard: str) -> Sample:
    """Check a raw sample's members and decode caption and metadata (the image stays encoded).

    Raises ShardError when the image or caption is missing, the caption is not UTF-8 or is empty,
    there is more than one image, or the json is not valid.
    """
    images = [(e, d) for _, e, d in raw.members if e in IMAGE_EXTS]
    if not images:
        raise ShardError(shard, "sample has no image (.jpg/.jpeg/.png/.webp)", key=raw.key)
    if len(images) > 1:
        raise ShardError(shard, f"sample has {len(images)} images", key=raw.key)
    txt = raw.data(TEXT_EXT)
    if txt is None:
        raise ShardError(shard, "sample has no caption (.txt)", key=raw.key)
    try:
        caption = txt.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardError(shard, f"caption is not valid UTF-8 (byte {e.start})", key=raw.key) from None
    if not caption.strip():
        raise ShardError(shard, "sample has an empty caption", key=raw.key)
    meta = None
    js = raw.data(META_EXT)
    if js is not None:
        try:
            meta = json.loads(js.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(shard, f"invalid json metadata ({e})", key=raw.key) from None
    extras = {e: d for _, e, d in raw.members if e not in IMAGE_EXTS and e not in (TEXT_EXT, META_EXT)}
    return Sample(raw.key, images[0][1], images[0][0], caption, meta, extras)


def iter_samples(path: str | os.PathLike) -> Iterator[Sample]:
    """Stream a shard's samples in order, validated (see `parse_sample`)."""
    shard = Path(path).name
    for raw in iter_raw_samples(path):
        yield parse_sample(raw, shard)


# --------------------------------------------------------------------------- writing


def tar_header(name: str, size: int) -> bytes:
    """A deterministic tar header (GNU format, fixed mtime/uid/gid/mode) for a regular file:
    tarfile's bytes. The usual member (a name of at most 100 UTF-8 bytes, a size below 8 GiB, one
    header block) is its fixed template with the name, size and checksum filled in (~10x faster)."""
    encoded = name.encode("utf-8")
    if len(encoded) <= 100 and 0 <= size < 8 ** 11:
        template, checksum = _header_template()
        digits = b"%011o" % size
        checksum += sum(encoded) + sum(digits) - 48 * 11  # the template's size field is 11 "0"s
        return b"".join((encoded, template[len(encoded):124], digits, template[135:148], b"%06o\0" % checksum,
                         template[155:]))
    return _tarfile_header(name, size)


@functools.cache
def _header_template() -> tuple[bytes, int]:
    """tarfile's header of an empty regular file with an empty name, and its checksum (the sum of
    its bytes with the checksum field as 8 spaces)."""
    header = _tarfile_header("", 0)
    return header, sum(header[:148]) + 8 * 32 + sum(header[156:])


def _tarfile_header(name: str, size: int) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")


def tar_member(name: str, data: bytes) -> bytes:
    """Header + data + padding for one regular file."""
    pad = -len(data) % BLOCK
    return tar_header(name, len(data)) + data + b"\0" * pad


def sample_members(sample: Sample) -> bytes:
    """Serialise a sample as tar members in the canonical order: image, txt, json, extras."""
    parts = [tar_member(f"{sample.key}.{sample.image_ext}", sample.image),
             tar_member(f"{sample.key}.txt", sample.caption.encode("utf-8"))]
    if sample.meta is not None:
        parts.append(tar_member(f"{sample.key}.json", json_bytes(sample.meta)))
    for ext in sorted(sample.extras):
        parts.append(tar_member(f"{sample.key}.{ext}", sample.extras[ext]))
    return b"".join(parts)


def json_bytes(obj) -> bytes:
    """Canonical JSON encoding (sorted keys) used for every json we write."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def validate_key(key: str, shard: str = "<new>") -> None:
    """Raise ShardError unless `key` is a usable webdataset key (non-empty, no dots, no slashes)."""
    if not key or "." in key or "/" in key or key.strip() != key:
        raise ShardError(shard, "invalid key (must be non-empty, without dots, slashes or spaces)", key=key)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield `PATH.tmp` to write; it is renamed to `path` on success and removed on any failure
    (a full disk, an exception), so no partial file is ever left under either name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write pretty, sorted JSON to `path` via a temporary file and rename."""
    _atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode())


def pandas_table(df):
    """A DataFrame as the Arrow table we write: no pandas index, no schema metadata (deterministic)."""
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)


def write_table_atomic(table, path: str | os.PathLike) -> None:
    """Write an Arrow table to parquet via temp file + rename."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_parquet_atomic(df, path: str | os.PathLike) -> None:
    """Write a DataFrame to parquet deterministically (no pandas index) via temp file + rename."""
    write_table_atomic(pandas_table(df), path)


def _row(key: str, caption: str, meta: dict | None) -> dict:
    """A shard parquet row: the sample json's scalar fields, its key and caption, status 'success'
    unless the json says otherwise."""
    row = {k: v for k, v in (meta or {}).items() if not isinstance(v, (dict, list))}
    row.update(key=key, caption=caption)
    row.setdefault("status", "success")
    return row


def _rows_table_by_rows(rows: list[tuple[str, str, dict | None]]):
    """The parquet table of `rows` through pandas' type inference: one dict per sample."""
    import pandas as pd

    df = pd.DataFrame([_row(*r) for r in rows])
    return pandas_table(df[["key", "caption"] + [c for c in df.columns if c not in ("key", "caption")]])


# a column whose values all have one of these sets of Python types gets the same Arrow type and
# values from pyarrow's list conversion as from pandas' inference (ints within int64, floats not NaN)
_PLAIN_TYPES = ({str}, {int}, {float}, {bool}, {type(None)}, {str, type(None)})
_INT64 = (-(2**63), 2**63 - 1)


def rows_table(rows: list[tuple[str, str, dict | None]]):
    """The Arrow table a shard's parquet holds for `rows` (key, caption, json per sample): the
    columns key, caption, then the json's scalar fields in order, then status.

    When every sample's json has the same fields in the same order and each field holds one plain
    type, the columns are built directly (a quarter of the time of a DataFrame of one dict per
    sample); otherwise through pandas. Both give the same table (tests compare the bytes)."""
    table = plain_rows_table(rows)
    return _rows_table_by_rows(rows) if table is None else table  # (which raises what pandas raises)


def plain_rows_table(rows: list[tuple[str, str, dict | None]]):
    """`rows_table(rows)` built directly from columns, or None when the rows need pandas' inference
    (json fields that differ between samples or hold other types; see `rows_table`)."""
    import pyarrow as pa

    first = rows[0][2] if rows else None
    fields = tuple(first) if isinstance(first, dict) else ()
    if any((m is None) != (first is None) or (m is not None and (not isinstance(m, dict) or tuple(m) != fields))
           for _, _, m in rows):
        return None
    data = {"key": [r[0] for r in rows], "caption": [r[1] for r in rows]}
    for f in fields:
        if f in ("key", "caption"):
            continue
        col = [r[2][f] for r in rows]
        types = set(map(type, col))
        if types not in _PLAIN_TYPES or (int in types and not _INT64[0] <= min(col) <= max(col) <= _INT64[1]) \
                or (float in types and any(map(math.isnan, col))):
            return None
        data[f] = col
    data.setdefault("status", ["success"] * len(rows))
    return pa.Table.from_pydict(data)


def json_fields(meta: dict | None) -> list[str] | None:
    """The field names of a sample's json in order (None without json): what makes two samples'
    rows take `plain_rows_table`'s columns together."""
    return None if meta is None else list(meta)


class ShardLayout(NamedTuple):
    """A shard as its catalog part describes it: each sample's key and byte range `[start, end)`
    in the tar, the Arrow table `plain_rows_table` gives for all its samples, and their common
    `json_fields`."""

    keys: list[str]
    starts: Any  # numpy int64
    ends: Any
    rows: Any  # pyarrow.Table
    fields: list[str] | None


_ARROW_TYPES = {"string": str, "int64": int, "double": float, "bool": bool}


def _python_types(column) -> set | None:
    """The set of Python types whose values `plain_rows_table` turned into this column (None when
    its type is not one that table makes)."""
    if str(column.type) == "null":
        return {type(None)}
    base = _ARROW_TYPES.get(str(column.type))
    if base is None:
        return None
    return {base} | ({type(None)} if column.null_count else set())


def _rows_schema(stored, new=None):
    """The Arrow schema `rows_table` gives rows of the `stored` table (a `plain_rows_table`) and
    of `new` (the same for new samples) together, or None when their types do not mix in one
    plain column (e.g. int and None: pandas' inference) or their columns differ."""
    import pyarrow as pa

    schema = []
    for f in stored.schema:
        types = _python_types(stored.column(f.name))
        if new is not None:
            other = _python_types(new.column(f.name)) if f.name in new.column_names else None
            types = None if types is None or other is None else types | other
        if types is None or frozenset(types) not in {frozenset(t) for t in _PLAIN_TYPES}:
            return None
        kind = (types - {type(None)} or {type(None)}).pop()
        schema.append(pa.field(f.name, {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
                                        type(None): pa.null()}[kind]))
    schema = pa.schema(schema)
    if new is not None and new.schema.names != schema.names:
        return None
    return schema


def layout_rows_table(stored, pieces: list[tuple[int, int, int]], new=None):
    """`rows_table` of the rows given as `pieces` in order, each `(0, lo, hi)` rows lo..hi-1 of the
    `stored` table (a `plain_rows_table`) or `(1, lo, hi)` rows of `new` (the `plain_rows_table` of
    new samples with the same json fields), built from the two tables without the rows; None when
    the rows would need pandas' inference (see `_rows_schema`). A column left with only None
    becomes Arrow's null type, as a list of Nones does."""
    import pyarrow as pa

    schema = _rows_schema(stored, new)
    if schema is None:
        return None
    tables = [t if t is None else t.cast(schema) for t in (stored, new)]
    joined = pa.concat_tables([tables[which].slice(lo, hi - lo) for which, lo, hi in pieces
                               if hi > lo]).combine_chunks() if pieces else schema.empty_table()
    for i, f in enumerate(joined.schema):
        if f.type != pa.null() and joined.num_rows and joined.column(i).null_count == joined.num_rows:
            joined = joined.set_column(i, f.name, pa.nulls(joined.num_rows))
    return joined


class ShardWriter:
    """Write one output shard `OUT/NAME.tar` (+ `.parquet`, `_stats.json`) atomically.

    Use as a context manager; samples go in with `write(sample)` or, for splicing, as raw member
    bytes with `write_raw(bytes, row)`. Everything is written under `.tmp` names and renamed on a
    clean exit; on an exception the temporaries are removed and no output appears.
    `stats_extra` is merged into the stats file (e.g. the input fingerprint used by resume).
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, stats_extra: dict | None = None):
        self.out_dir = Path(out_dir)
        self.name = name
        self.tar_path = self.out_dir / f"{name}.tar"
        self.tmp_path = self.out_dir / f"{name}.tar.tmp"
        self.stats_extra = stats_extra or {}
        self.rows: list[tuple[str, str, dict | None]] = []  # (key, caption, meta) per sample, for the parquet
        self.table = None  # the parquet's Arrow table when the caller built it (then `rows` is unused)
        self.keys: set[str] = set()
        self._f: BinaryIO | None = None

    def __enter__(self) -> "ShardWriter":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp_path, "wb", buffering=1 << 20)
        return self

    def write(self, sample: Sample) -> None:
        """Append a sample (key validated, unique within the shard)."""
        validate_key(sample.key, self.name + ".tar")
        self.write_raw(sample_members(sample), sample.key, sample.caption, sample.meta)

    def write_raw(self, blob: bytes | memoryview, key: str, caption: str, meta: dict | None) -> None:
        """Append already-serialised tar members for one sample; `key/caption/meta` feed the parquet."""
        if key in self.keys:
            raise ShardError(self.name + ".tar", "duplicate key in output shard", key=key)
        self.keys.add(key)
        self._f.write(blob)
        self.rows.append((key, caption, meta))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            with contextlib.suppress(OSError):
                self._f.close()
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            with contextlib.suppress(OSError):
                self._f.close()
            self.abort()
            raise

    def abort(self) -> None:
        """Remove temporaries; nothing of this shard remains."""
        for p in (self.tmp_path, self.out_dir / f"{self.name}.parquet.tmp"):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def close(self) -> dict:
        """Finish the archive, write parquet then stats, rename into place; returns the stats."""
        f = self._f
        end = f.tell() + 2 * BLOCK
        f.write(b"\0" * (2 * BLOCK + (-end % RECORD)))
        f.close()
        n = len(self.rows) if self.table is None else self.table.num_rows
        if not n:
            self.abort()
            raise ShardError(self.name + ".tar", "refusing to write an empty shard")
        write_table_atomic(rows_table(self.rows) if self.table is None else self.table,
                           self.out_dir / f"{self.name}.parquet")
        os.replace(self.tmp_path, self.tar_path)
        stats = {
            "count": n,
            "successes": n,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": n},
            "bytes": self.tar_path.stat().st_size,
            **self.stats_extra,
        }
        write_json_atomic(self.out_dir / f"{self.name}_stats.json", stats)
        return stats


def write_sizes(out_dir: str | os.PathLike) -> dict[str, int]:
    """Write `sizes.json` (shard file name -> sample count) from the `_stats.json` files present."""
    out_dir = Path(out_dir)
    sizes = {}
    for tar in sorted(out_dir.glob("*.tar")):
        stats = out_dir / f"{shard_stem(tar)}_stats.json"
        if stats.exists():
            sizes[tar.name] = int(json.loads(stats.read_text())["count"])
    write_json_atomic(out_dir / "sizes.json", sizes)
    return sizes


def read_stats(out_dir: str | os.PathLike, name: str) -> dict | None:
    """The `_stats.json` of shard `name` in `out_dir`, or None when absent/unreadable."""
    p = Path(out_dir) / f"{name}_stats.json"
    try:
        return json.loads(p.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def sha256(data: bytes) -> str:
    """Hex sha256 of bytes (the image hash used in catalogs and manifests)."""
    return hashlib.sha256(data).hexdigest()


def image_size(data: bytes, shard: str, key: str) -> tuple[int, int]:
    """Decode an image fully (cheaply for JPEG via draft mode) and return (width, height).

    Raises ShardError when the bytes are not a decodable image or declare a decompression bomb.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
            if im.format == "JPEG":
                im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
            return size
    except Image.DecompressionBombError as e:
        raise ShardError(shard, f"image is a decompression bomb ({e})", key=key) from None
    except Exception as e:  # Pillow raises many types for bad data
        raise ShardError(shard, f"undecodable image ({type(e).__name__}: {e})", key=key) from None


def _text_members(name: str) -> bool:
    return name.endswith((".txt", ".json"))


def _sendfile_at(src: int, dst: int, count: int, start: int, at: int) -> int:
    os.lseek(dst, at, os.SEEK_SET)  # sendfile writes at the output's file position
    return os.sendfile(dst, src, start, count)


def copy_range(src: BinaryIO, dst: BinaryIO, start: int, end: int) -> None:
    """Copy bytes [start, end) of `src` to the current position of `dst`, in the kernel where
    possible: copy_file_range within a filesystem, sendfile across two (copy_file_range refuses
    e.g. ext4 to tmpfs), else through user space."""
    dst.flush()
    at = dst.tell()
    remaining = end - start
    for kernel_copy in (os.copy_file_range, _sendfile_at):
        try:
            while remaining > 0:
                n = kernel_copy(src.fileno(), dst.fileno(), remaining, start, at)
                if n == 0:
                    break
                start, at, remaining = start + n, at + n, remaining - n
        except OSError:  # not supported between these files: the next way
            continue
        break
    dst.seek(at)
    src.seek(start)
    while remaining > 0:
        chunk = src.read(min(remaining, 8 << 20))
        if not chunk:
            raise OSError("unexpected end of file while copying")
        dst.write(chunk)
        remaining -= len(chunk)


# A plain flat member name `KEY.EXT`: printable ASCII, one dot, no slash, a lower-case extension
# (what `split_name` accepts unchanged and `_text_members` reads exactly for txt/json).
_PLAIN_NAMES = re.compile(rb"(?:[\x20-\x2d\x30-\x7e]+\.[\x20-\x2d\x30-\x40\x5b-\x7e]+\x00)*")
_FAST_SCAN = True  # tests turn it off to compare with the streaming reader
# Larger shards go through the streaming reader: it holds 1 MiB at a time, the fast path the whole
# file (tiny samples, where the per-sample cost matters most, make 30 MB shards of 10,000).
_FAST_MAX_BYTES = 256 << 20


def _scan_plain_tar(buf) -> tuple[list, list, list, list, list] | None:
    """The samples of a whole shard held in memory as columns `(keys, starts, ends, txts, jsons)`
    (`txts[i]`/`jsons[i]` the sample's .txt/.json member data or None), exactly what
    `iter_raw_samples(with_data=_text_members)` gives, or None when the tar is not a plain one
    that this fast path can read.

    Plain: only regular members (typeflag 0, NUL or 7) whose size field is 11 octal digits + NUL
    and whose names are flat printable-ASCII `KEY.EXT` (one dot, lower-case extension), no ustar
    prefix, and every check of `_iter_tar`, `split_name` and `iter_raw_samples` passes (magic,
    header checksums, sizes inside the file, a zero block after the last member, no repeated key or
    extension). Anything else (long names, pax headers, directories, ..., and every malformed tar)
    gives None: the caller then reads the shard with `iter_raw_samples`, which raises the usual
    ShardError. The checks run on all headers at once with numpy.
    """
    import numpy as np

    n = len(buf)
    nblocks = n // BLOCK
    if nblocks == 0 or any(buf[:len(m)] == m for m in _MAGIC):
        return None
    blocks = np.frombuffer(buf, np.uint8, count=nblocks * BLOCK).reshape(nblocks, BLOCK)
    # Blocks that may be plain headers (a regular typeflag, 11 octal size digits and a NUL); the
    # chain of member sizes from block 0 says which are.
    flag, first = blocks[:, 156], blocks[:, 124]
    heads = np.flatnonzero(((flag == 48) | (flag == 0) | (flag == 55)) & (blocks[:, 135] == 0)
                           & (first >= 48) & (first <= 55))
    digits = blocks[heads, 124:135].astype(np.int64) - 48
    octal = ((digits >= 0) & (digits <= 7)).all(axis=1)
    heads = heads[octal]
    sizes = digits[octal] @ (8 ** np.arange(10, -1, -1, dtype=np.int64))
    following = heads + 1 + (sizes + (BLOCK - 1)) // BLOCK  # the block after each member's data
    if not len(heads) or heads[0] != 0:
        return None
    if not (following[:-1] == heads[1:]).all():  # some are data that looks like a header: walk
        step = dict(zip(heads.tolist(), following.tolist()))
        chain, block, get = [], 0, step.get
        while (nxt := get(block)) is not None:  # `block` strictly increases: at most len(step) steps
            chain.append(block)
            block = nxt
        keep = np.searchsorted(heads, chain)
        heads, sizes, following = heads[keep], sizes[keep], following[keep]
    end = int(following[-1])  # must be a zero block inside the file (so all data is inside it too)
    if end >= nblocks or blocks[end].any():
        return None
    hdr = np.take(blocks, heads, axis=0)
    if hdr[:, 345].any():  # a ustar prefix (the reader would put it before the name)
        return None
    field = hdr[:, 148:156]
    digits = field[:, :6].astype(np.int64) - 48
    usual = ((digits >= 0) & (digits <= 7)).all(axis=1) & (field[:, 6] == 0) & (field[:, 7] == 32)
    stored = digits @ (8 ** np.arange(5, -1, -1, dtype=np.int64))
    for i in np.flatnonzero(~usual).tolist():  # other spellings of the checksum, parsed as the reader does
        try:
            stored[i] = _octal(field[i].tobytes(), "checksum")
        except (ValueError, OverflowError):  # the reader's mismatch (it takes a bad field as -1)
            return None
    if (stored != hdr.sum(axis=1, dtype=np.uint32) - field.sum(axis=1, dtype=np.int64) + 256).any():
        return None
    # Names (each up to its first NUL), joined by NULs and checked all at once.
    count = len(heads)
    nul = hdr[:, :100] == 0
    length = nul.argmax(axis=1)
    if nul[np.arange(count), length].all():  # every name ends with a NUL inside the field
        joined = hdr[:, :100][np.arange(100) <= length[:, None]].tobytes()
    else:  # some fill all 100 bytes: add a NUL column
        length[~nul[np.arange(count), length]] = 100
        names = np.zeros((count, 101), np.uint8)
        names[:, :100] = hdr[:, :100]
        joined = names[np.arange(101) <= length[:, None]].tobytes()
    if not _PLAIN_NAMES.fullmatch(joined):  # also refuses an empty name
        return None
    parts = joined[:-1].decode("ascii").replace(".", "\0").split("\0")
    keys, exts = parts[0::2], parts[1::2]
    offsets = heads * BLOCK + BLOCK
    stops = offsets + sizes
    # Usually every sample has the same members in the same order: then the samples are every
    # `period` members, and a repeated name is a repeated extension in that pattern.
    period = next((i for i, k in enumerate(keys) if k != keys[0]), count)
    pattern = exts[:period]
    if (count % period == 0 and exts == pattern * (count // period) and len(set(pattern)) == period
            and all(keys[i::period] == keys[::period] for i in range(1, period))):
        firsts = np.arange(0, count, period)
        keys = keys[::period]
        if len(set(keys)) != len(keys):  # a key that comes back after another key's members
            return None
        columns = []
        for wanted in (TEXT_EXT, META_EXT):  # each sample's txt and json data (None when it has none)
            if wanted in pattern:
                at = slice(pattern.index(wanted), None, period)
                columns.append([buf[i:j] for i, j in zip(offsets[at].tolist(), stops[at].tolist())])
            else:
                columns.append([None] * len(keys))
        starts = (heads[firsts] * BLOCK).tolist()
        return keys, starts, starts[1:] + [end * BLOCK], columns[0], columns[1]
    if len(set(map("{}.{}".format, keys, exts))) != count:  # a repeated name: a repeated key or extension
        return None
    # Members with the same key as the one before belong to its sample.
    firsts = np.flatnonzero(np.fromiter(map(str.__ne__, keys[1:], keys[:-1]), bool, count - 1)) + 1
    firsts = np.concatenate([[0], firsts])
    keys = [keys[i] for i in firsts.tolist()]
    if len(set(keys)) != len(keys):  # a key that comes back after another key's members
        return None
    columns = []
    for wanted in (TEXT_EXT, META_EXT):  # each sample's txt and json data (None when it has none)
        which = np.flatnonzero(np.fromiter(map(wanted.__eq__, exts), bool, count))
        data = [buf[i:j] for i, j in zip(offsets[which].tolist(), stops[which].tolist())]
        owner = np.searchsorted(firsts, which, side="right") - 1  # the sample of each such member
        if len(owner) == len(keys) and (owner == np.arange(len(keys))).all():
            columns.append(data)
        else:
            column: list = [None] * len(keys)
            for i, d in zip(owner.tolist(), data):
                column[i] = d
            columns.append(column)
    starts = (heads[firsts] * BLOCK).tolist()
    return keys, starts, starts[1:] + [end * BLOCK], columns[0], columns[1]


_SCAN_ONCE = json.JSONDecoder().scan_once  # what json.loads runs (its default decoder's)


def _loads(data: bytes):
    """`json.loads(data)`, with the same result and exceptions; faster for the usual member, a
    UTF-8 object with no surrounding whitespace (json.loads then does exactly this scan)."""
    if data[:1] == b"{" and data[1:2] != b"\0":  # json.loads's detect_encoding gives utf-8
        try:
            text = data.decode("utf-8")
            obj, end = _SCAN_ONCE(text, 0)
        except Exception:  # noqa: BLE001 - json.loads below raises what it raises
            return json.loads(data)
        if end == len(text):
            return obj
    return json.loads(data)


def _read_whole(fileobj: BinaryIO, limit: int) -> bytes | None:
    """The whole file, or None when it is larger than `limit` bytes or cannot be read in one go
    (the streaming reader then reads it, or reports)."""
    try:
        size = os.fstat(fileobj.fileno()).st_size
        if size > limit:
            return None
        fileobj.seek(0)
        data = fileobj.read()
    except (OSError, MemoryError, ValueError):
        return None
    return data if len(data) == size else None


def _stream_text_members(src) -> Iterator[tuple[str, int, int, bytes | None, bytes | None]]:
    """`_scan_plain_tar`'s tuples from the streaming reader (any tar it accepts; ShardError otherwise)."""
    for raw in iter_raw_samples(src, with_data=_text_members):
        yield raw.key, raw.start, raw.end, raw.data(TEXT_EXT), raw.data(META_EXT)


def rewrite_shard(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str,
    *,
    replace: dict[str, Sample] | None = None,
    drop: Iterable[str] = (),
    append: Iterable[Sample] = (),
    stats_extra: dict | None = None,
) -> dict:
    """Write `out_dir/name.tar` as a copy of shard `src` with some samples changed, by splicing.

    Untouched samples are copied as raw byte ranges (never decoded or re-encoded); a sample in
    `replace` (by key) is rebuilt in place from the given Sample (its key may differ), keys in
    `drop` are left out and `append` samples go at the end. Only `.txt`/`.json` members are read
    (for the shard's parquet). The output is atomic (ShardWriter). Returns the stats dict.
    Raises ShardError when a key to replace or drop is not in the shard.

    A plain tar (see `_scan_plain_tar`) is parsed in memory in one pass; any other goes through
    the streaming reader. Both give the same samples, so the same output bytes and errors.
    """
    replace = replace or {}
    drop = set(drop)
    edited = drop | replace.keys()
    shard = Path(src).name
    found: set[str] = set()
    with open(src, "rb") as fin, ShardWriter(out_dir, name, stats_extra) as w:
        run_start = run_end = None
        pending: list[tuple[str, str, dict | None]] = []

        def flush():
            nonlocal run_start, run_end
            if run_start is not None:
                copy_range(fin, w._f, run_start, run_end)
                w.keys.update([p[0] for p in pending])
                w.rows.extend(pending)
                pending.clear()
                run_start = run_end = None

        columns = None
        if _FAST_SCAN:
            buf = _read_whole(fin, _FAST_MAX_BYTES)
            try:
                columns = _scan_plain_tar(buf) if buf is not None else None
            except MemoryError:  # its arrays did not fit: the streaming reader needs less
                columns = None
            del buf
        samples = zip(*columns) if columns is not None else _stream_text_members(src)
        keys = w.keys
        for key, start, end, txt, js in samples:
            if key in edited:
                found.add(key)
                flush()
                if key in replace:
                    w.write(replace[key])
                continue
            if key in keys:
                raise ShardError(shard, "duplicate key in output shard", key=key)
            try:
                caption = txt.decode("utf-8") if txt is not None else ""
                meta = _loads(js) if js is not None else None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ShardError(shard, f"unreadable caption or json ({e})", key=key) from None
            if run_start is None:
                run_start = start
            run_end = end
            pending.append((key, caption, meta))
        flush()
        missing = (set(replace) | drop) - found
        if missing:
            raise ShardError(shard, "key to rewrite not found in shard", key=sorted(missing)[0])
        for sample in append:
            w.write(sample)
    return read_stats(out_dir, name)


def rewrite_from_layout(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str,
    layout: ShardLayout,
    *,
    replace: dict[str, Sample] | None = None,
    drop: Iterable[str] = (),
    append: Iterable[Sample] = (),
    stats_extra: dict | None = None,
) -> dict | None:
    """`rewrite_shard` with the same arguments, output bytes and errors, from the shard's catalog
    `layout` instead of parsing it: each run of untouched samples is one byte range and the
    parquet is built from the stored rows plus the new samples' rows. Returns None, writing
    nothing, when the new samples' json makes the parquet need pandas' inference (the caller then
    runs `rewrite_shard`)."""
    replace = replace or {}
    drop = set(drop)
    append = list(append)
    new = None
    if replace or append:
        new_samples = [*replace.values(), *append]
        if any(json_fields(s.meta) != layout.fields for s in new_samples):
            return None
        new = plain_rows_table([(s.key, s.caption, s.meta) for s in new_samples])
        if new is None:
            return None
    if _rows_schema(layout.rows, new) is None:  # checked before writing: layout_rows_table then gives a table
        return None
    order = {k: i for i, k in enumerate(replace)}  # a replacement's row in `new`
    shard = Path(src).name
    edited = drop | replace.keys()
    pieces: list[tuple[int, int, int]] = []  # the parquet's rows: (0, lo, hi) stored, (1, lo, hi) new
    with open(src, "rb") as fin, ShardWriter(out_dir, name, stats_extra) as w:
        run = None  # first row of the current run of untouched samples

        def flush(stop: int) -> None:
            nonlocal run
            if run is not None:
                copy_range(fin, w._f, int(layout.starts[run]), int(layout.ends[stop - 1]))
                pieces.append((0, run, stop))
                run = None

        for i, key in enumerate(layout.keys):
            if key in edited:
                flush(i)
                if key in replace:
                    w.write(replace[key])
                    pieces.append((1, order[key], order[key] + 1))
                continue
            if key in w.keys:
                raise ShardError(shard, "duplicate key in output shard", key=key)
            w.keys.add(key)
            if run is None:
                run = i
        flush(len(layout.keys))
        missing = edited.difference(layout.keys)
        if missing:
            raise ShardError(shard, "key to rewrite not found in shard", key=min(missing))
        for j, sample in enumerate(append, start=len(replace)):
            w.write(sample)
            pieces.append((1, j, j + 1))
        w.table = layout_rows_table(layout.rows, pieces, new)
    return read_stats(out_dir, name)


def outputs_done(out_dir: str | os.PathLike, name: str, **expected) -> dict | None:
    """Resume check: the stats of `out_dir/name` when the shard is complete and every field in
    `expected` (e.g. `input=file_fingerprint(src)`, `spec=hash`) matches; otherwise None."""
    stats = read_stats(out_dir, name)
    if stats is None or not (Path(out_dir) / f"{name}.tar").exists():
        return None
    if any(stats.get(k) != v for k, v in expected.items()):
        return None
    return stats
