"""Run one CLI verb in-process as a hostile user would and classify what happened.

Outcome of a run: `ok` (exit 0), `error` (exit 2, exactly one escaped `error:` line; warnings a
terminal would show count as lines), or a
failure: `hang` (no end within the limit), `traceback`, `internal` (exit 3), `noisy` (more than
one line), `wrong-exit`. `data lost` counts runs that changed a file outside their --out.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path

SURVIVED = ("ok", "error")


class Hang(BaseException):
    pass


def tree_digest(root: Path, exclude: tuple = ()) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') of everything under `root`, except `exclude` folders."""
    out = {}
    ex = tuple(str(Path(e).resolve()) for e in exclude)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not str(Path(dirpath, d).resolve()).startswith(ex)]
        rel = os.path.relpath(dirpath, root)
        out[rel] = "dir"
        for f in filenames:
            p = Path(dirpath, f)
            out[os.path.join(rel, f)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "special"
    return out


@dataclass
class Run:
    outcome: str
    code: int | None
    stderr: str
    changed: list = field(default_factory=list)


def run_cli(argv: list[str], *, watch: Path | None = None, outs: tuple = (), limit: float = 120.0) -> Run:
    """Run `mmsanitize ARGV` in this process with a time limit; `watch` is a folder that must not
    change except under `outs` (the run's --out folders)."""
    from mmsanitize.cli import main

    before = tree_digest(watch, outs) if watch else None
    err, out = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    code: int | None = 0
    caught: list = []
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # what a user's terminal would show, once per place
            main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Hang:
        code = None
    except BaseException as e:  # noqa: BLE001 - an escaped exception is a traceback for the user
        import traceback

        err.write("Traceback (most recent call last):\n" + "".join(traceback.format_exception(e)))
        code = 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    text = err.getvalue() + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                                    for w in shown)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if code is None:
        outcome = "hang"
    elif "Traceback" in text:
        outcome = "traceback"
    elif code == 0:
        outcome = "ok"
    elif code == 3:
        outcome = "internal"
    elif code != 2:
        outcome = "wrong-exit"
    elif len(lines) != 1 or not lines[0].startswith("error: ") or "\x1b" in text:
        outcome = "noisy"
    else:
        outcome = "error"
    changed = []
    if watch:
        after = tree_digest(watch, outs)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return Run(outcome, code, text, changed)


def _alarm(signum, frame):
    raise Hang()


class Matrix:
    """fault x verb outcomes, with the totals the suite prints."""

    def __init__(self):
        self.cells: dict[tuple[str, str], Run] = {}

    def add(self, fault: str, verb: str, run: Run) -> None:
        self.cells[(fault, verb)] = run

    def counts(self) -> dict[str, int]:
        runs = list(self.cells.values())
        return {"tried": len(runs), "survived": sum(r.outcome in SURVIVED and not r.changed for r in runs),
                "data lost": sum(bool(r.changed) for r in runs), "hangs": sum(r.outcome == "hang" for r in runs),
                "tracebacks": sum(r.outcome in ("traceback", "internal") for r in runs),
                "noisy": sum(r.outcome in ("noisy", "wrong-exit") for r in runs)}

    def markdown(self, title: str) -> str:
        faults = list(dict.fromkeys(f for f, _ in self.cells))
        verbs = list(dict.fromkeys(v for _, v in self.cells))
        lines = [f"### {title}", "", "| fault | " + " | ".join(verbs) + " |", "|---" * (len(verbs) + 1) + "|"]
        for f in faults:
            cells = []
            for v in verbs:
                r = self.cells.get((f, v))
                cells.append("" if r is None else r.outcome + (" DATA-LOST" if r.changed else ""))
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
        c = self.counts()
        lines += ["", "counts: " + ", ".join(f"{k} {v}" for k, v in c.items()), ""]
        return "\n".join(lines)


def report(pytestconfig, text: str) -> None:
    """Print `text` on the terminal (even under capture) and append it to $MMSANITIZE_FAULTS_REPORT."""
    tr = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if tr is not None:
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            tr.write_line("")
            for line in text.splitlines():
                tr.write_line(line)
    dest = os.environ.get("MMSANITIZE_FAULTS_REPORT")
    if dest:
        with open(dest, "a", encoding="utf-8") as f:
            f.write(text + "\n")
