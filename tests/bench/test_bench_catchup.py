"""Smoke run of bench/catchup.py: every figure is there with its same-run baselines (no thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_catchup_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "catchup.json"
    cmd = [sys.executable, "-m", "bench.catchup", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["scenario"] == "account_log_catchup"
    assert report["messages"] == 20
    assert report["log_records"] >= 20
    assert len(report["per_run"]) == report["runs"] == 1
    for figure in (
        report["engine_records_per_s"],
        report["engine_cpu_us_per_record"],
        report["baseline"]["raw_records_per_s"],
        report["checks_only"]["records_per_s"],
        report["ratio"],
    ):
        assert figure["min"] <= figure["median"] <= figure["max"]
        assert figure["median"] > 0
    assert report["snapshot"]["covers"] >= 20
