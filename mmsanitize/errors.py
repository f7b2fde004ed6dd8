"""Error types: every user-facing failure is one of these, rendered as one line by the CLI."""

from __future__ import annotations


class MmsanitizeError(Exception):
    """A failure the user can act on; `str()` is a complete one-line message."""


class UsageError(MmsanitizeError):
    """A request that cannot be honoured as asked (bad option combination, unknown class...)."""


class ShardError(MmsanitizeError):
    """Bad input data, located by shard and (when known) sample key."""

    def __init__(self, shard: str, reason: str, key: str | None = None):
        self.shard = str(shard)
        self.key = key
        self.reason = reason
        where = f"shard {self.shard}" + (f", key {key}" if key is not None else "")
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # picklable across Dask workers
        return (ShardError, (self.shard, self.reason, self.key))
