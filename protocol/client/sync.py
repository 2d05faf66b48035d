"""The sync engine of the offline-first client (docs/account-log.md §10-§11): the public names.

The engine lives in :mod:`protocol.client.engine`, one module per part (docs/decisions/0011-sync-engine-parts.md);
this module keeps the names the command line, the tests and integrations import.
"""

from __future__ import annotations

from .engine.base import LogRekeyError, RetryError, RevokedError
from .engine.engine import (
    LIVE_RESET_SECONDS,
    TRANSITIONS,
    States,
    Status,
    SyncEngine,
    SyncOutcome,
    backoff_delay,
    format_status,
    status_json,
)
from .engine.epochs import (
    DEFAULT_ROTATE_AFTER_RECORDS,
    DEFAULT_ROTATE_AFTER_SECONDS,
    RECOVERY_BACKUP_TABLE,
    AccountKeyMessage,
    RecoveryBackupNote,
    remember_recovery_backup_key,
)
from .engine.lists import DEVICE_LIST_REFRESH_SECONDS

__all__ = [
    "DEFAULT_ROTATE_AFTER_RECORDS",
    "DEFAULT_ROTATE_AFTER_SECONDS",
    "DEVICE_LIST_REFRESH_SECONDS",
    "LIVE_RESET_SECONDS",
    "RECOVERY_BACKUP_TABLE",
    "TRANSITIONS",
    "AccountKeyMessage",
    "LogRekeyError",
    "RecoveryBackupNote",
    "RetryError",
    "RevokedError",
    "States",
    "Status",
    "SyncEngine",
    "SyncOutcome",
    "backoff_delay",
    "format_status",
    "remember_recovery_backup_key",
    "status_json",
]
