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
from hostile import HOSTILE, corrupt, good_tar
from mmsanitize.errors import ShardError
from mmsanitize.shards import iter_raw_samples, parse_sample

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
