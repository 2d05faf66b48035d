"""CI-sized run of the crash checker (``make crash-test`` runs 100 cycles)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.jepsen.crash_checker import run

CI_CYCLES = 20


@pytest.mark.e2e
@pytest.mark.slow
def test_no_acknowledged_send_is_lost_duplicated_or_invented_across_sigkills(tmp_path: Path) -> None:
    report = run(CI_CYCLES, workdir=tmp_path)
    print(report.render())
    assert report.valid, report.render()
    assert report.ok >= 50, f"the clients barely got through; the run proves little\n{report.render()}"
