"""A real relay process with short timeouts for the attack tests (one per test: attacks leave state behind)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.relay_process import RelayProcess

# Short timeouts keep the tests fast; the budgets stay at their defaults
# because the documented outcome is "GOAWAY once the default budget is spent".
ATTACK_ENV = {
    "TETHERLESS_HEADER_TIMEOUT_SECONDS": "1",
    "TETHERLESS_BODY_TIMEOUT_SECONDS": "2",
    "TETHERLESS_IDLE_TIMEOUT_SECONDS": "2",
    "TETHERLESS_TLS_HANDSHAKE_TIMEOUT_SECONDS": "1",
    "TETHERLESS_MAX_CONNECTIONS_PER_IP": "32",
    "TETHERLESS_SEND_BUFFER_BYTES": str(256 * 1024),
    "TETHERLESS_LOG_LEVEL": "warning",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/attacks/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    process = RelayProcess(tmp_path / "data", env=ATTACK_ENV)
    process.start()
    try:
        yield process
    finally:
        assert process.proc is not None
        assert process.proc.poll() is None, f"the relay died during the attack:\n{process.logs()[-3000:]}"
        assert process.stop() == 0, process.logs()[-3000:]
        assert "Traceback" not in process.logs(), process.logs()[-3000:]


@pytest.fixture
def pid(relay: RelayProcess) -> int:
    assert relay.proc is not None
    return relay.proc.pid
