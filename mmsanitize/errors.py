"""Error types: every user-facing failure is one of these, rendered as one line by the CLI."""

from __future__ import annotations

import os
import re
import time

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: object) -> str:
    """`text` with control characters shown as escapes (`\\n`, `\\x1b`), so a key or caption
    read from a shard can never forge an extra output line or drive the terminal."""
    def sub(m: re.Match) -> str:
        c = m.group(0)
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
            f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _CONTROL.sub(sub, str(text))


class MmsanitizeError(Exception):
    """A failure the user can act on; `str()` is a complete one-line message."""


class UsageError(MmsanitizeError):
    """A request that cannot be honoured as asked (bad option combination, unknown class...)."""


class ShardError(MmsanitizeError):
    """Bad input data, located by shard and (when known) sample key (both shown escaped)."""

    def __init__(self, shard: str | None = None, reason: str | None = None, key: str | None = None, *,
                 message: str | None = None):
        if message is not None and reason is None:  # re-raised by torch's DataLoader: see `message`
            shard, reason, key = _from_worker_message(message)
        self.shard = str(shard)
        self.key = key
        self.reason = reason
        where = f"shard {escape(self.shard)}" + (f", key {escape(key)}" if key is not None else "")
        super().__init__(f"{where}: {escape(reason)}")

    # torch's DataLoader re-raises a worker's exception as `type(message=...)` when the class has a
    # truthy `message` attribute; without it a ShardError would become a RuntimeError traceback.
    message = property(lambda self: str(self))

    def __reduce__(self):  # picklable across Dask workers
        return (ShardError, (self.shard, self.reason, self.key))


def _from_worker_message(message: str) -> tuple[str, str, None]:
    """(shard, reason, None) from torch's "Caught ShardError ... Traceback ... ShardError: shard X: R"."""
    last = [ln for ln in str(message).splitlines() if ln.strip()][-1:] or ["?"]
    line = last[0].split("ShardError: ", 1)[-1]
    if line.startswith("shard ") and ": " in line:
        where, reason = line[len("shard "):].split(": ", 1)
        return where, reason, None
    return "?", line, None


def log_dir() -> str:
    """Where internal-error tracebacks go: `MMSANITIZE_LOG_DIR`, else `$XDG_CACHE_HOME/mmsanitize/logs`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("MMSANITIZE_LOG_DIR") or os.path.join(base, "mmsanitize", "logs")


def log_traceback(text: str) -> str:
    """Write a traceback to a new file in `log_dir()` (or the temp dir) and return its path."""
    import tempfile

    name = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.getpid()}.log"
    for folder in (log_dir(), tempfile.gettempdir()):
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return "(no writable log folder)"
