"""Progress inside a shard: tasks report samples while they run, the client's bar counts them."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mmsanitize.engine import Progress, ShardProgress, map_shards


@dataclass(frozen=True)
class SlowTask:
    name: str
    samples: int


def slow_shard(task: SlowTask) -> dict:
    """A shard whose samples take 0.05 s each, reported as they finish."""
    progress = ShardProgress(task.name, every=0.2)
    for _ in range(task.samples):
        time.sleep(0.05)
        progress.add(1)
    return {"count": task.samples}


def test_samples_inside_a_running_shard_reach_the_bar(dask_address, monkeypatch):
    from distributed import Client

    seen = []
    real = Progress._event

    def spy(self, event):
        real(self, event)
        seen.append((self.done, self.samples))  # shards finished, samples counted at that moment

    monkeypatch.setattr(Progress, "_event", spy)
    with Client(dask_address) as client:
        res = map_shards(slow_shard, [SlowTask("a", 60), SlowTask("b", 60)], client=client, desc="slow")
    assert {r["count"] for r in res.results.values()} == {60}
    # events arrived while no shard had finished, counting samples inside the shards
    assert any(done == 0 and n > 0 for done, n in seen)
    assert ShardProgress("x").worker is None  # outside a worker: a no-op
    ShardProgress("x").add(5)


def test_progress_total_equals_counts_after_events():
    p = Progress(2, "t", enabled=False)
    p.names = set()
    p._event((0.0, {"task": "a", "n": 30}))
    p._event((0.0, {"task": "a", "n": 10}))
    assert p.samples == 40
    p.update({"count": 100}, "a")
    p.update({"count": 7}, "b")
    assert p.samples == 107 and p.partial == {}
    p.close()
