"""Smoke run of bench/crypto.py: every operation runs and the JSON report has its figures (no thresholds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = {
    "v1_seal",
    "v1_open",
    "handshake_initiator",
    "handshake_responder",
    "v2_encrypt",
    "v2_decrypt",
    "v2_fanout_10",
    "state_encode_decode",
}


def test_crypto_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "crypto.json"
    cmd = [sys.executable, "-m", "bench.crypto", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["kind"] == "crypto"
    assert set(report["operations"]) == OPERATIONS
    for name, row in report["operations"].items():
        assert row["us_per_op"]["median"] > 0, name
        assert row["ops_per_second"] > 0, name
    assert report["comparison"]["v2_encrypt_over_v1_seal"] > 0
