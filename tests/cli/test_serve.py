"""``tetherless serve`` output: the ready line follows ``--log-format``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.relay_process import RelayProcess


def test_with_json_logs_the_ready_line_is_json_too(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data", extra_args=["--log-format", "json", "--log-level", "warning"])
    relay.start()
    try:
        assert relay.url.startswith("http://127.0.0.1:")
    finally:
        assert relay.stop() == 0
    lines = [line for line in relay.logs().splitlines() if line.strip()]
    ready = [line for line in lines if "ready at" in line]
    assert len(ready) == 1
    entry = json.loads(ready[0])
    assert entry["level"] == "info"
    assert entry["msg"].startswith(f"tetherless relay ready at {relay.url} (relay name {relay.name}, data ")
    for line in lines:
        json.loads(line)  # every line of a JSON-logging relay is JSON


def test_with_text_logs_the_ready_line_is_text(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "data", extra_args=["--log-level", "warning"])
    relay.start()
    assert relay.stop() == 0
    (ready,) = [line for line in relay.logs().splitlines() if "ready at" in line]
    assert ready.startswith(f"tetherless relay ready at {relay.url} (relay name {relay.name}, data ")
