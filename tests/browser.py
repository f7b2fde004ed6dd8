"""Render a page in headless Chromium (Debian `chromium`, installed by scripts/install.sh).

A missing browser fails the test that needs it: it never skips.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--virtual-time-budget=10000", "--window-size=1280,1800"]


def _chromium(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (scripts/install.sh)"
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def render(page: Path, screenshot: Path | None = None) -> dict:
    """Load `page` from disk; return the report's render check (images, decoded, broken, errors)
    read from the DOM after load, the DOM itself and Chromium's console lines. With `screenshot`,
    also write a PNG of the page."""
    url = page.resolve().as_uri()
    dom = _chromium(["--enable-logging=stderr", "--v=0", "--dump-dom", url])
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r"render check: images (\d+) decoded (\d+) broken (\d+) errors (\d+)", dom.stdout)
    assert m, "the page's render check never ran:\n" + dom.stdout[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        tmp = screenshot.with_name(screenshot.stem + ".tmp.png")
        shot = _chromium([f"--screenshot={tmp}", url])
        assert shot.returncode == 0 and tmp.exists(), shot.stderr[-2000:]
        tmp.replace(screenshot)
    images, decoded, broken, errors = map(int, m.groups())
    return {"images": images, "decoded": decoded, "broken": broken, "errors": errors, "dom": dom.stdout,
            "console": console}
