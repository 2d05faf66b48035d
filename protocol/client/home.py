"""Opening a client home's local state: its :class:`~protocol.client.store.ClientStore` and a sync engine on it.

Used by the ``tetherless`` command line and by tests and benchmarks that drive the engine in process; it was
part of the CLI (``protocol/client/cli_sync.py``) until the CLI became its own package
(docs/decisions/0010-cli-package.md).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from .keystore import DeviceKeys, Keystore, KeystoreError
from .localdb import LocalDB
from .store import ClientStore, default_dek
from .sync import DEFAULT_ROTATE_AFTER_RECORDS, DEFAULT_ROTATE_AFTER_SECONDS, SyncEngine


def open_store(keystore: Keystore, keys: DeviceKeys) -> ClientStore:
    """The home's client store: in the keystore's ``state.db`` when it has a DEK, else a DEK from the device seed.

    The first open of a home made by the first client imports its inbox cursor (account-log.md §8); later opens
    change nothing, so calling it again is safe. Raises :class:`~protocol.client.keystore.KeystoreError` /
    :class:`~protocol.client.localdb.LocalDBError` when the state cannot be opened (wrong key, restored older
    copy). The caller closes ``store.db``.
    """
    try:
        db = keystore.local_db()
    except KeystoreError:
        db = LocalDB.open(keystore.home, default_dek(Path(keystore.home), keys.signing_seed))
    store = ClientStore(db)
    if store.cursor("inbox_received") == 0:
        # One-time import of the first client's inbox cursor (§8).
        try:
            legacy = keystore.load_state().inbox_cursor
        except KeystoreError:
            legacy = 0
        if legacy:
            with store.transaction():
                store.set_cursor("inbox_received", legacy)
                store.set_cursor("inbox_acked", legacy)
    return store


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def make_engine(keys: DeviceKeys, store: ClientStore, **options: Any) -> SyncEngine:
    """A :class:`SyncEngine` for ``store`` with the timings the ``TETHERLESS_SYNC_*`` / ``TETHERLESS_LOG_ROTATE_*``
    / ``TETHERLESS_HOLDBACK_SECONDS`` variables set (tests shorten them; an unparsable value is ignored).
    ``options`` go to the engine (``on_message``, ``on_status``, …). Raises nothing; no I/O until it runs."""
    return SyncEngine(
        keys,
        store,
        max_backoff=_env_float("TETHERLESS_SYNC_MAX_BACKOFF", 60.0),
        poll_seconds=_env_float("TETHERLESS_SYNC_POLL_SECONDS", 1.0),
        holdback_seconds=_env_float("TETHERLESS_HOLDBACK_SECONDS", 6 * 3600.0),
        rotate_after_records=int(_env_float("TETHERLESS_LOG_ROTATE_RECORDS", DEFAULT_ROTATE_AFTER_RECORDS)),
        rotate_after_seconds=_env_float("TETHERLESS_LOG_ROTATE_SECONDS", DEFAULT_ROTATE_AFTER_SECONDS),
        rng=random.Random(),
        **options,
    )


__all__ = ["make_engine", "open_store"]
