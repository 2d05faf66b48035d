"""Storage: the :class:`Store` interface and its backends (the only importers of database drivers)."""

from .base import (
    ChallengeOutcome,
    ConsumedChallenge,
    DeviceRecord,
    ExpiryReport,
    InboxRecord,
    NewEnvelope,
    OutboxRecord,
    PeerState,
    ReceivedEnvelope,
    ReceivedOutcome,
    SessionRecord,
    Store,
    StoredEnvelope,
    StoreUnavailableError,
)
from .postgres import PostgresStore, is_postgres_url, redact_url
from .sqlite import SQLiteStore

__all__ = [
    "ChallengeOutcome",
    "ConsumedChallenge",
    "DeviceRecord",
    "ExpiryReport",
    "InboxRecord",
    "NewEnvelope",
    "OutboxRecord",
    "PeerState",
    "PostgresStore",
    "ReceivedEnvelope",
    "ReceivedOutcome",
    "SQLiteStore",
    "SessionRecord",
    "Store",
    "StoreUnavailableError",
    "StoredEnvelope",
    "is_postgres_url",
    "redact_url",
]
