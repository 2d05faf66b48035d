"""A sync engine without a relay, for unit tests that hand it pages or inbox items directly."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from protocol.client.keystore import DeviceKeys
from protocol.client.localdb import LocalDB
from protocol.client.store import ClientStore, HistoryMessage
from protocol.client.sync import SyncEngine

RELAY = "relay.test"


def offline_engine(
    home: Path,
    account_id: str,
    *,
    device_id: str = "d" * 32,
    on_message: Callable[[HistoryMessage, int | None, bytes | None], None] | None = None,
) -> SyncEngine:
    """A format-2 device ``device_id`` of ``account_id`` with random keys and a fresh ``state.db`` in ``home``;
    its relay URL leads nowhere (the engine must not be run)."""
    keys = DeviceKeys(
        signing_seed=os.urandom(32),
        box_private_key=os.urandom(32),
        relay_url="http://127.0.0.1:1",
        account_id=account_id,
        device_id=device_id,
        address=f"{device_id}.{account_id}@{RELAY}",
        device_name="test",
        list_format=2,
    )
    return SyncEngine(keys, ClientStore(LocalDB.open(home, os.urandom(32))), on_message=on_message)
