"""Smoke run of bench/keystore.py: both profiles are measured and reported (no thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_keystore_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "keystore.json"
    cmd = [sys.executable, "-m", "bench.keystore", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "keystore"
    assert report["profiles"]["default"]["params"] == {"iterations": 3, "memory_kib": 65536, "lanes": 4}
    for name in ("default", "test"):
        assert report["profiles"][name]["unlock_ms"]["runs"] == 2
        assert report["profiles"][name]["unlock_ms"]["median"] > 0
        assert report["profiles"][name]["open_local_db_ms"]["median"] > 0
