"""CI-sized run of the crash checker (``make crash-test`` runs 100 cycles)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.jepsen.crash_checker import run
from tests.relay.store.postgres_db import require_server

CI_CYCLES = 20
CI_POSTGRES_CYCLES = 5  # each cycle restarts a replica (~1-2 s); `make crash-test-postgres` runs 100


@pytest.mark.e2e
@pytest.mark.slow
def test_no_acknowledged_send_is_lost_duplicated_or_invented_across_sigkills(tmp_path: Path) -> None:
    report = run(CI_CYCLES, workdir=tmp_path)
    print(report.render())
    assert report.valid, report.render()
    assert report.ok >= 50, f"the clients barely got through; the run proves little\n{report.render()}"


@pytest.mark.e2e
@pytest.mark.slow
def test_postgres_replicas_lose_duplicate_or_invent_nothing_across_sigkills(tmp_path: Path) -> None:
    report = run(CI_POSTGRES_CYCLES, workdir=tmp_path, database=require_server())
    print(report.render())
    assert report.valid, report.render()
    assert report.ok >= 50, f"the clients barely got through; the run proves little\n{report.render()}"
