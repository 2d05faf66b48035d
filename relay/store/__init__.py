"""Storage: the :class:`Store` interface and its backends (the only importers of database drivers)."""

from .base import (
    ChallengeOutcome,
    ConsumedChallenge,
    DeviceRecord,
    ExpiryReport,
    InboxRecord,
    NewEnvelope,
    SessionRecord,
    Store,
    StoredEnvelope,
    StoreUnavailableError,
)
from .sqlite import SQLiteStore

__all__ = [
    "ChallengeOutcome",
    "ConsumedChallenge",
    "DeviceRecord",
    "ExpiryReport",
    "InboxRecord",
    "NewEnvelope",
    "SQLiteStore",
    "SessionRecord",
    "Store",
    "StoreUnavailableError",
    "StoredEnvelope",
]
