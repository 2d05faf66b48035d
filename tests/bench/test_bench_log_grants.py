"""Smoke run of bench/log_grants.py: every operation runs and the report has its figures and sizes (no thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = {
    "v1_grant_seal",
    "v1_grant_open",
    "hybrid_grant_wrap",
    "hybrid_grant_unwrap",
    "v1_record_seal",
    "v1_record_open",
    "signed_record_seal",
    "signed_record_open",
    "rotation_3_devices",
    "rotation_10_devices",
    "verify_rotation_10_devices",
    "rotation_v3_closing_1_writer",
    "recovery_backup_write_12_epochs",
    "recovery_backup_open_12_epochs",
}


def test_log_grants_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "log-grants.json"
    cmd = [sys.executable, "-m", "bench.log_grants", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["kind"] == "log-grants"
    assert set(report["operations"]) == OPERATIONS
    for name, row in report["operations"].items():
        assert row["us_per_op"]["median"] > 0, name
    sizes = report["sizes"]
    assert sizes["hybrid_grant_bytes"] == sizes["hybrid_grant_overhead_bytes"] + 53  # one key: 53 B msgpack
    assert sizes["recovery_backup_12_epochs_bytes"] % 1024 == 0  # padded like every record
