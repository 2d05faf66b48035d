"""Smoke run of bench/browser.py: both implementations seal and open, and the JSON report has its figures.

No timing thresholds. Needs node with web/node_modules (the ``npm`` fixture installs them from the lock
file), Playwright and Debian's chromium: skipped without them, a failure under ``CI=true``, as the other
browser tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.web.conftest import (
    CHROMIUM,
    _unavailable,
    npm,  # noqa: F401  (the fixture)
)

ROOT = Path(__file__).resolve().parents[2]


def test_browser_bench_smoke(npm: str, tmp_path: Path) -> None:  # noqa: F811
    try:
        import playwright.sync_api  # noqa: F401  (only whether it is installed)
    except ImportError:
        _unavailable("playwright is not installed (it is in requirements/dev.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    out = tmp_path / "browser.json"
    cmd = [sys.executable, "-m", "bench.browser", "--smoke", "--out", str(out)]
    env = {**os.environ, "TETHERLESS_CHROMIUM": CHROMIUM}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["kind"] == "browser"
    assert report["runs"] == 1
    assert report["messages"] > 0
    assert report["machine"]["chromium"]
    assert set(report["implementations"]) == {"python", "browser"}
    for name, figures in report["implementations"].items():
        assert set(figures) == {"seal", "open"}, name
        for way, row in figures.items():
            assert row["messages_per_second"]["median"] > 0, (name, way)
            assert len(row["runs"]) == 1, (name, way)
    assert set(report["comparison"]) == {"seal_browser_over_python", "open_browser_over_python"}
    assert all(ratio > 0 for ratio in report["comparison"].values())
    assert len(report["load_average"]["before"]) == 3
