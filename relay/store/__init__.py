"""Storage: the :class:`Store` protocols (one per role, ``Store`` their union) and the two backends.

Layout: ``base.py`` (protocols and records), ``sql/`` (the SQL, one module per
topic, written once), ``engine.py`` (what differs between SQLite and
PostgreSQL), ``*_rules.py`` (pure decisions), ``sqlite.py`` / ``postgres.py``
(connections and transactions: the only importers of database drivers).
"""

from .base import (
    AccountStore,
    AuthStore,
    ChallengeOutcome,
    ConsumedChallenge,
    CredentialUse,
    DeviceListCommitted,
    DeviceListHead,
    DeviceListUpdate,
    DeviceRecord,
    DeviceStore,
    DeviceStreamState,
    ExpiryReport,
    FederationStore,
    InboxRecord,
    InboxStore,
    LogStore,
    NewCredential,
    NewEnvelope,
    OutboxRecord,
    PeerState,
    PrekeyStore,
    ReceivedEnvelope,
    ReceivedOutcome,
    SessionRecord,
    Store,
    StoredCredential,
    StoredEnvelope,
    StoreUnavailableError,
)
from .postgres import PostgresStore, is_postgres_url, redact_url
from .sqlite import SQLiteStore

__all__ = [
    "AccountStore",
    "AuthStore",
    "ChallengeOutcome",
    "ConsumedChallenge",
    "CredentialUse",
    "DeviceListCommitted",
    "DeviceListHead",
    "DeviceListUpdate",
    "DeviceRecord",
    "DeviceStore",
    "DeviceStreamState",
    "ExpiryReport",
    "FederationStore",
    "InboxRecord",
    "InboxStore",
    "LogStore",
    "NewCredential",
    "NewEnvelope",
    "OutboxRecord",
    "PeerState",
    "PostgresStore",
    "PrekeyStore",
    "ReceivedEnvelope",
    "ReceivedOutcome",
    "SQLiteStore",
    "SessionRecord",
    "Store",
    "StoreUnavailableError",
    "StoredCredential",
    "StoredEnvelope",
    "is_postgres_url",
    "redact_url",
]
