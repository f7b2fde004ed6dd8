"""Seeded fuzzer: >= 1,000 corrupted tars through the reader, each under a time limit.

Every case must end in samples or ShardError: no other exception type, no hang, and memory
bounded by the file size (the reader never reads past the end of the file).
"""

from __future__ import annotations

import random
import signal
import time

import pytest

from harness import report
from hostile import HOSTILE, _pad, corrupt, good_tar, sample
from mmsanitize.errors import ShardError
from mmsanitize.shards import BLOCK, iter_raw_samples, parse_sample, tar_member

CASES = 1200
SEED = 20261125
LIMIT_S = 2.0


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def read_all(path) -> str:
    """'ok' | 'ShardError' | 'hang' | 'foreign:<type>' for one file, under LIMIT_S."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    try:
        for raw in iter_raw_samples(path):
            parse_sample(raw, path.name)
        return "ok"
    except ShardError as e:
        assert "\n" not in str(e) and "\x1b" not in str(e)
        return "ShardError"
    except Hang:
        return "hang"
    except Exception as e:  # noqa: BLE001 - counted, the test fails on any
        return f"foreign:{type(e).__name__}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_fuzzed_tars_end_in_samples_or_shard_error(tmp_path, pytestconfig):
    rng = random.Random(SEED)
    bases = [good_tar(n) for n in (1, 3, 6)] + [fn() for fn in HOSTILE.values()]
    bases = [b for b in bases if len(b) >= 1024]
    outcomes: dict[str, int] = {}
    bad = []
    t0 = time.monotonic()
    path = tmp_path / "00000.tar"
    for i in range(CASES):
        data = corrupt(rng.choice(bases), rng)
        path.write_bytes(data)
        out = read_all(path)
        outcomes[out] = outcomes.get(out, 0) + 1
        if out not in ("ok", "ShardError"):
            bad.append((i, out))
            (tmp_path / f"case{i}.tar").write_bytes(data)
    seconds = time.monotonic() - t0
    foreign = sum(v for k, v in outcomes.items() if k.startswith("foreign"))
    report(pytestconfig, f"### tar fuzzer (tests/faults/test_tar_fuzz.py)\n\n{CASES} corrupted tars (seed {SEED}, "
           f"limit {LIMIT_S:.0f} s each) in {seconds:.1f} s: "
           + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
           + f"\n\ncounts: tried {CASES}, survived {CASES - len(bad)}, hangs {outcomes.get('hang', 0)}, "
           f"foreign exceptions {foreign}\n")
    assert not bad, f"{len(bad)} cases hung or raised a foreign exception: {bad[:10]}"
    assert outcomes.get("ShardError", 0) > CASES // 2


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_tar_reader(tmp_path, name):
    """Each named hostile tar: the reader ends (no hang) with samples or one escaped ShardError line."""
    path = tmp_path / "00000.tar"
    path.write_bytes(HOSTILE[name]())
    assert read_all(path) in ("ok", "ShardError")


def _fix_checksum(data: bytearray, hdr: int) -> None:
    data[hdr + 148:hdr + 156] = b"        "
    data[hdr + 148:hdr + 156] = b"%06o\0 " % sum(data[hdr:hdr + BLOCK])


def _headers(data: bytes) -> list[int]:
    """Header offsets of a valid tar (our writer's)."""
    out, pos = [], 0
    while data[pos:pos + BLOCK] != bytes(BLOCK):
        out.append(pos)
        pos += BLOCK + -(-int(data[pos + 124:pos + 135], 8) // BLOCK) * BLOCK
    return out


def mutate_header(base: bytes, rng: random.Random) -> bytes:
    """A valid tar with one header field respelled (checksum fixed): what the fast path must read
    exactly as the streaming reader does, or leave to it."""
    data = bytearray(base)
    hdr = rng.choice(_headers(base))
    size = int(data[hdr + 124:hdr + 135], 8)
    kind = rng.randrange(10)
    if kind == 0:  # other spellings of the same size, and other numbers
        field = rng.choice([b"%011o\0" % size, b"%011o " % size, b"%o\0" % size, b" %010o\0" % size,
                            b"%012o" % size, b"%o \0" % size, b"%011o\0" % (size + rng.choice([-1, 1, 512])),
                            b"\x80" + size.to_bytes(11, "big")])
        data[hdr + 124:hdr + 136] = field.ljust(12, b"\0")[:12]
    elif kind == 1:  # another typeflag
        data[hdr + 156] = rng.choice(b"0\x0075xgLK1")
    elif kind == 2:  # another name
        name = rng.choice([b"k.TXT", b"k.txt", b"a/k.txt", b"k..txt", b".txt", b"k.", b"k.tar.gz", b"\xc3\xbc.txt",
                           b"k\x01.txt", b" k.txt", b"k .json", b"K" * 96 + b".txt", b"k" * 99 + b".", b"x" * 100,
                           b"..", b"/k.txt", b"k.json\0junk.txt", b"000000000.json", b"000000001.jpg"])
        data[hdr:hdr + 100] = name.ljust(100, b"\0")[:100]
    elif kind == 3:  # ustar prefix field, with or without the magic
        data[hdr + 345:hdr + 350] = b"dir\0\0"
        if rng.random() < 0.5:
            data[hdr + 257:hdr + 263] = b"ustar\0"
    elif kind == 4:  # other checksum spellings (the checksum itself is right)
        data[hdr + 148:hdr + 156] = b"        "
        total = sum(data[hdr:hdr + BLOCK])
        data[hdr + 148:hdr + 156] = rng.choice([b"%07o\0" % total, b"%06o  " % total, b"%o\0" % total,
                                                b" %06o\0" % total, b"%08o" % total, b"%06o\0 " % (total + 1)])
        return bytes(data)
    elif kind == 5:  # a caption that is itself a plain header block (data that looks like one)
        fake = tar_member("000000077.txt", b"x" * rng.choice([0, 5, 600]))
        return bytes(_pad(b"".join(sample(f"0000{i:05d}", caption=fake if i == 1 else "a dog") for i in range(3))))
    elif kind == 6:  # bytes after the end of the archive, or no end at all
        end = _headers(base)[-1]
        end += BLOCK + -(-int(base[end + 124:end + 135], 8) // BLOCK) * BLOCK
        return base[:end] if rng.random() < 0.5 else base + base[:rng.randrange(BLOCK, 4 * BLOCK)]
    elif kind == 7:  # a zero block in the middle: the archive ends there
        return base[:hdr] + bytes(BLOCK) + base[hdr:]
    elif kind == 8:  # the same key with another extension, maybe one the sample has in another case
        key = bytes(data[hdr:hdr + 100]).split(b"\0", 1)[0].split(b".")[0]
        data[hdr:hdr + 100] = (key + b"." + rng.choice([b"TXT", b"Txt", b"JSON", b"txt", b"json", b"jpg", b"cls"])
                               ).ljust(100, b"\0")
    else:  # junk after a name's NUL
        name_end = data.index(0, hdr)
        if name_end < hdr + 99:
            data[name_end + 1:hdr + 100] = bytes(rng.randrange(32, 127) for _ in range(hdr + 99 - name_end))
    _fix_checksum(data, hdr)
    return bytes(data)


def test_fast_scan_reads_what_the_streaming_reader_reads(tmp_path):
    """rewrite_shard's in-memory scan, on valid, mutated and corrupted tars: whatever it accepts,
    the streaming reader reads without error as the very same samples (keys, byte ranges, txt/json)."""
    from mmsanitize.shards import _scan_plain_tar, _stream_text_members

    rng = random.Random(SEED + 1)
    bases = [b for b in [good_tar(n) for n in (1, 3, 6)] + [fn() for fn in HOSTILE.values()] if len(b) >= 1024]
    valid = [good_tar(n) for n in (1, 2, 5)]
    path = tmp_path / "00000.tar"
    counts = {"fast": 0, "streaming only": 0, "neither": 0}
    for i in range(1500):
        pick = rng.random()
        data = (rng.choice(valid) if pick < 0.1 else mutate_header(rng.choice(valid), rng) if pick < 0.6
                else corrupt(rng.choice(bases), rng))
        path.write_bytes(data)
        try:
            ref = list(_stream_text_members(path))
        except ShardError:
            ref = None
        fast = _scan_plain_tar(data)
        if fast is not None:
            assert ref is not None, f"case {i}: the fast path read a tar the streaming reader refuses"
            assert list(zip(*fast)) == ref, f"case {i}"
            counts["fast"] += 1
        else:
            counts["streaming only" if ref is not None else "neither"] += 1
    assert all(v >= 100 for v in counts.values()), counts
