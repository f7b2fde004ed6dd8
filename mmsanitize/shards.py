"""Shard I/O in img2dataset's webdataset layout: expand specs, read samples, write shards atomically.

A shard is `NNNNN.tar` with members `KEY.jpg|png|webp|jpeg`, `KEY.txt`, `KEY.json`, next to
`NNNNN.parquet` (one row per sample) and `NNNNN_stats.json`; a dataset folder also holds
`sizes.json` (shard file name -> sample count) for open_clip's webdataset loader.

The tar reader is a small strict parser (regular files, GNU long names and pax headers only) so
that every member's byte range is known: rewriters copy untouched members as raw bytes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

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
    """A deterministic tar header (GNU format, fixed mtime/uid/gid/mode) for a regular file."""
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


def write_parquet_atomic(df, path: str | os.PathLike) -> None:
    """Write a DataFrame to parquet deterministically (no pandas index) via temp file + rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


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
        self.rows: list[dict] = []
        self.keys: set[str] = set()
        self._f: BinaryIO | None = None

    def __enter__(self) -> "ShardWriter":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp_path, "wb", buffering=1 << 20)
        return self

    def _row(self, key: str, caption: str, meta: dict | None) -> dict:
        row = {k: v for k, v in (meta or {}).items() if not isinstance(v, (dict, list))}
        row.update(key=key, caption=caption)
        row.setdefault("status", "success")
        return row

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
        self.rows.append(self._row(key, caption, meta))

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
        import pandas as pd

        f = self._f
        end = f.tell() + 2 * BLOCK
        f.write(b"\0" * (2 * BLOCK + (-end % RECORD)))
        f.close()
        if not self.rows:
            self.abort()
            raise ShardError(self.name + ".tar", "refusing to write an empty shard")
        df = pd.DataFrame(self.rows)
        cols = ["key", "caption"] + [c for c in df.columns if c not in ("key", "caption")]
        write_parquet_atomic(df[cols], self.out_dir / f"{self.name}.parquet")
        os.replace(self.tmp_path, self.tar_path)
        n = len(self.rows)
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


def copy_range(src: BinaryIO, dst: BinaryIO, start: int, end: int) -> None:
    """Copy bytes [start, end) of `src` to the current position of `dst` (in-kernel where possible)."""
    dst.flush()
    at = dst.tell()
    remaining = end - start
    try:
        while remaining > 0:
            n = os.copy_file_range(src.fileno(), dst.fileno(), remaining, start, at)
            if n == 0:
                break
            start, at, remaining = start + n, at + n, remaining - n
    except OSError:  # not supported between these files: copy through user space below
        pass
    dst.seek(at)
    src.seek(start)
    while remaining > 0:
        chunk = src.read(min(remaining, 8 << 20))
        if not chunk:
            raise OSError("unexpected end of file while copying")
        dst.write(chunk)
        remaining -= len(chunk)


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
    """
    replace = replace or {}
    drop = set(drop)
    shard = Path(src).name
    found: set[str] = set()
    with open(src, "rb") as fin, ShardWriter(out_dir, name, stats_extra) as w:
        run_start = run_end = None
        pending: list[tuple[str, str, dict | None]] = []

        def flush():
            nonlocal run_start, run_end
            if run_start is not None:
                copy_range(fin, w._f, run_start, run_end)
                for key, caption, meta in pending:
                    w.keys.add(key)
                    w.rows.append(w._row(key, caption, meta))
                pending.clear()
                run_start = run_end = None

        raws = iter_raw_samples(src, with_data=_text_members)
        for raw in raws:
            if raw.key in replace or raw.key in drop:
                found.add(raw.key)
                flush()
                if raw.key in replace:
                    w.write(replace[raw.key])
                continue
            if raw.key in w.keys:
                raise ShardError(shard, "duplicate key in output shard", key=raw.key)
            txt = raw.data(TEXT_EXT)
            js = raw.data(META_EXT)
            try:
                caption = txt.decode("utf-8") if txt is not None else ""
                meta = json.loads(js) if js is not None else None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ShardError(shard, f"unreadable caption or json ({e})", key=raw.key) from None
            if run_start is None:
                run_start = raw.start
            run_end = raw.end
            pending.append((raw.key, caption, meta))
        flush()
        missing = (set(replace) | drop) - found
        if missing:
            raise ShardError(shard, "key to rewrite not found in shard", key=sorted(missing)[0])
        for sample in append:
            w.write(sample)
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
