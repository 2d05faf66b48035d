"""A sync engine without a relay, for unit tests that hand it pages or inbox items directly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from protocol.client.store import HistoryMessage
from protocol.client.sync import SyncEngine
from tests.support.engine_parts import client_store, device_keys


def offline_engine(
    home: Path,
    account_id: str,
    *,
    device_id: str = "d" * 32,
    on_message: Callable[[HistoryMessage, int | None, bytes | None], None] | None = None,
) -> SyncEngine:
    """A format-2 device ``device_id`` of ``account_id`` with random keys and a fresh ``state.db`` in ``home``;
    its relay URL leads nowhere (the engine must not be run)."""
    return SyncEngine(device_keys(account_id, device_id), client_store(home), on_message=on_message)
