"""Smoke run of bench/cli_startup.py: every command is measured next to its baseline (no thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cli_startup_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cli_startup.json"
    cmd = [sys.executable, "-m", "bench.cli_startup", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["benchmark"] == "cli_startup"
    names = ("baseline", "help", "version", "whoami", "send_test_kdf", "send_default_kdf", "send_default_kdf_2cores")
    for name in names:
        assert report["figures"][name]["cpu_ms"]["runs"] == 2
        assert report["figures"][name]["cpu_ms"]["median"] > 0
    for name in ("help", "version", "whoami"):
        verdict = report["verdicts"][name]
        assert verdict["baseline_cpu_ms"] == report["figures"]["baseline"]["cpu_ms"]["median"]
        assert verdict["ratio"] > 0
    assert report["verdicts"]["send_default_kdf"]["wall_ms"] > 0
    assert report["verdicts"]["send_default_kdf_2cores"]["wall_ms"] > 0
