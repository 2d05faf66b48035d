"""Smoke run of bench/media.py: the relay's tus upload and Range download with their same-run raw HTTP/2 baselines
(no thresholds: the figures are reported, not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_media_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "media.json"
    cmd = [sys.executable, "-m", "bench.media", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert (report["scenario"], report["mib"], len(report["runs"])) == ("media", 4, 1)
    for key in (
        "baseline_upload_mbps",
        "relay_upload_mbps",
        "baseline_download_mbps",
        "relay_download_mbps",
        "upload_ratio",
        "download_ratio",
        "relay_upload_cpu_s_per_gib",
        "relay_download_cpu_s_per_gib",
    ):
        figure = report["summary"][key]
        assert figure["min"] <= figure["median"] <= figure["max"]
        assert figure["median"] > 0, key
