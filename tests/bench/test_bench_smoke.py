"""Smoke run of the benchmark suite with tiny sizes: every scenario runs end to end and writes JSON.

It checks that the harness works, not any figure (those need `make bench`
on a quiet machine). Scenarios that need h2load are skipped without it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_scenario_runs_with_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    only = [
        "raw_sqlite_batch100",
        "p1_send_single",
        "p2_send_batch100",
        "raw_stream",
        "p3_delivery",
        "p4_latency",
        "p4_latency_at_40pct",
        "p5_p9_backlog",
        "p6_idle_streams",
        "p7_mixed",
        "p8_storage",
    ]
    if shutil.which("h2load"):
        only += ["bare_post", "transport_post", "relay_livez"]
    cmd = [sys.executable, "-m", "bench", "--smoke", "--runs", "1", "--only", ",".join(only), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == {}
    for name in only:
        runs = report["scenarios"][name]["runs"]
        assert len(runs) == 1, name
        assert report["scenarios"][name]["median"] is not None, name
    labels = {row["label"] for row in report["targets"]}
    assert {"P1 single sends env/s", "P8 overhead B/env", "P9 restart to ready s"} <= labels
    # P4 at a fraction of capacity offers 40 % of the P1 rate measured earlier in the same run.
    at_share = report["scenarios"]["p4_latency_at_40pct"]["runs"][0]
    p1_rate = report["scenarios"]["p1_send_single"]["runs"][0]["envelopes_per_second"]
    assert at_share["capacity_source"] == "p1_send_single"
    assert at_share["rate"] == pytest.approx(0.4 * p1_rate)
    assert {"P4 p50 ms at 40 % of P1", "P4 p99 ms at 40 % of P1"} <= labels


def test_synapse_is_skipped_with_a_message_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import scenarios

    monkeypatch.setattr(scenarios, "synapse_dir", lambda: None)
    assert "not installed" in scenarios.synapse()["skipped"]
