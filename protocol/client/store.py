"""The offline-first client's local store (docs/account-log.md §8), in ``<home>/state.db``.

Tables live in the client's :class:`~protocol.client.localdb.LocalDB` (one
file per home, WAL, ``synchronous=FULL``); every secret column is sealed with
``LocalDB.seal(table, pk, value)`` (XChaCha20-Poly1305, AD = the row's table
and primary key), and peers appear only as keyed hashes (:meth:`LocalDB.blind`),
so a stolen disk shows ids, positions, counts and order but not with whom,
which way, when or what (§8 lists what stays clear, crypto.md §13.3). The
layout is versioned: :func:`migrate` runs the numbered :data:`MIGRATIONS` at
every open. Tables (topic-prefixed, §8 names in brackets):

- ``history_messages`` [messages]: one row per logical message, unique on a
  keyed hash of ``(sender_device, message_uid)``; 🔒 sender device, direction
  and times (``meta``), sender, recipients, content type, body.
- ``outbox_entries`` [outbox] and ``outbox_envelopes``: what the user sent,
  with the exact sealed envelopes (so a retry reuses the same bytes and keys);
  🔒 times and last error (``status``).
- ``log_pending``: records to append, 🔒 plaintext (encrypted under the
  newest epoch key at append time; the record id never changes).
- ``log_cursors`` [cursors], ``log_counters`` [counters], ``log_epoch_keys``
  [epoch_keys] 🔒, ``log_grants`` (which device holds which epoch), ``log_key_commitments``
  and ``log_session_keys`` 🔒 (keys received through sessions, kept until their key record is read).
- ``contacts`` (migration 3): short names for addresses, 🔒 name and address (``entry``), keyed hashes of
  the folded name and of the address (:mod:`protocol.client.contacts`).
- ``log_snapshot_writes``, ``log_snapshot_loads``, ``log_snapshot_keys`` and ``history_gaps`` (migration 4;
  created on first use before it): snapshots written and loaded, and retention gaps
  (:mod:`protocol.client.engine.snapshots`).
- ``media_uploads`` (migration 5): unfinished file uploads, 🔒 ``state`` (path, file key, capability …);
  ``media_cache``: the LRU order of the encrypted media cache (:mod:`protocol.client.blobs`).

Every multi-table change is one :meth:`LocalDB.transaction` (§10). Blocking,
small, local: called from the engine's trio task directly.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Final

import msgspec

from .. import codec, log
from ..errors import LocalErrorCode
from ..signing import digest
from .localdb import LocalDB, LocalDBError, SealedColumns, TamperedRowError

#: The replay cache of :mod:`protocol.client.sessions` (its ``T_TRANSCRIPT``; that module imports this one).
TRANSCRIPT_TABLE: Final = "session_transcript"
#: The device-list high-water marks of :mod:`protocol.client.chains` (which imports this module).
MARK_TABLE: Final = "device_marks"
#: Key-value tables whose rows are checks: deleting one must not turn its check off (crypto.md §13.3).
GUARDED_SETS: Final = (MARK_TABLE, TRANSCRIPT_TABLE)

# Schema 1 (before numbered migrations): what every home made before schema 2 holds. Migration 1 creates it
# (a no-op on those homes: they have it), migration 2 rewrites it; never edit it, add a migration instead.
_SCHEMA_1: Final = """
CREATE TABLE IF NOT EXISTS history_messages (
  msg_key BLOB PRIMARY KEY, message_uid BLOB NOT NULL, sender_device TEXT NOT NULL, direction TEXT NOT NULL,
  pair_seq INTEGER NOT NULL DEFAULT 0, sent_at_ms INTEGER NOT NULL, relay_sent_at_ms INTEGER NOT NULL DEFAULT 0,
  log_position INTEGER, via TEXT NOT NULL, late INTEGER NOT NULL DEFAULT 0, local_seq INTEGER NOT NULL,
  inbox_seen INTEGER NOT NULL DEFAULT 0, held INTEGER NOT NULL DEFAULT 0, held_cursor INTEGER, held_since_ms INTEGER,
  sender BLOB NOT NULL, recipients BLOB NOT NULL, content_type BLOB NOT NULL, body BLOB NOT NULL,
  UNIQUE (sender_device, message_uid)
);
CREATE INDEX IF NOT EXISTS history_messages_pos ON history_messages(log_position);
CREATE TABLE IF NOT EXISTS outbox_entries (
  local_id INTEGER PRIMARY KEY AUTOINCREMENT, message_uid BLOB NOT NULL UNIQUE, pair_seq INTEGER NOT NULL,
  state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at_ms INTEGER NOT NULL DEFAULT 0,
  last_error TEXT NOT NULL DEFAULT '', created_at_ms INTEGER NOT NULL, sent_at_ms INTEGER NOT NULL,
  recipient BLOB NOT NULL, content_type BLOB NOT NULL, body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_entries_state ON outbox_entries(state, local_id);
CREATE TABLE IF NOT EXISTS outbox_envelopes (
  local_id INTEGER NOT NULL, n INTEGER NOT NULL, idempotency_key BLOB NOT NULL, ciphertext BLOB NOT NULL,
  recipient_device BLOB NOT NULL, accepted_id BLOB, relay_sent_at_ms INTEGER,
  PRIMARY KEY (local_id, n)
);
CREATE TABLE IF NOT EXISTS log_pending (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, record_id BLOB NOT NULL UNIQUE, kind TEXT NOT NULL,
  needs_expected_head INTEGER NOT NULL DEFAULT 0, epoch INTEGER NOT NULL DEFAULT 0,
  device_list_version INTEGER, inbox_cursor INTEGER, outbox_local_id INTEGER, attempts INTEGER NOT NULL DEFAULT 0,
  plaintext BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS log_cursors (name TEXT PRIMARY KEY, value INTEGER NOT NULL, updated_at_ms INTEGER);
CREATE TABLE IF NOT EXISTS log_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS log_epoch_keys (epoch INTEGER PRIMARY KEY, key BLOB NOT NULL, source BLOB);
CREATE TABLE IF NOT EXISTS log_grants (epoch INTEGER NOT NULL, device_id TEXT NOT NULL, PRIMARY KEY (epoch, device_id));
"""

# Schema 2's history: who, which way and when are sealed (``meta``, ``held_since``); the sender appears only
# as keyed hashes (``sender_index`` for the per-sender order, ``uid_index`` for uniqueness). What stays clear
# is listed, with its reason, in docs/account-log.md §8.
_HISTORY_2: Final = """
CREATE TABLE history_messages (
  msg_key BLOB PRIMARY KEY, message_uid BLOB NOT NULL, uid_index BLOB NOT NULL UNIQUE, sender_index BLOB NOT NULL,
  pair_seq INTEGER NOT NULL DEFAULT 0, log_position INTEGER, via TEXT NOT NULL, late INTEGER NOT NULL DEFAULT 0,
  local_seq INTEGER NOT NULL, inbox_seen INTEGER NOT NULL DEFAULT 0, held INTEGER NOT NULL DEFAULT 0,
  held_cursor INTEGER, held_since BLOB,
  meta BLOB NOT NULL, sender BLOB NOT NULL, recipients BLOB NOT NULL, content_type BLOB NOT NULL, body BLOB NOT NULL
);
CREATE INDEX history_messages_pos ON history_messages(log_position);
CREATE INDEX history_messages_sender ON history_messages(sender_index, pair_seq);
"""

#: Every column this module seals (LocalDB.seal_column labels), for LocalDB.rekey when the DEK rotates
#: (Keystore.change_passphrase). A new sealed column must be added here, or rotation leaves it unreadable
#: (tests/protocol/client/test_offline_store.py checks the schema against this table).
SEALED_COLUMNS: Final[dict[str, SealedColumns]] = {
    "history_messages": (
        ("msg_key",),
        (
            ("meta", "meta"),
            ("held_since", "held_since"),
            ("sender", "sender"),
            ("recipients", "recipients"),
            ("content_type", "content_type"),
            ("body", "body"),
        ),
    ),
    "outbox_entries": (
        ("local_id",),
        (("status", "status"), ("recipient", "recipient"), ("content_type", "content_type"), ("body", "body")),
    ),
    "outbox_envelopes": (("local_id", "n"), (("recipient_device", "recipient"), ("relay_sent_at", "relay_sent_at"))),
    "log_pending": (("record_id",), (("plaintext", "plaintext"),)),
    "log_epoch_keys": (("epoch",), (("key", "key"),)),
    "contacts": (("name_index",), (("entry", "entry"),)),
    "media_uploads": (("path_index",), (("state", "state"),)),
}

OUTBOX_STATES: Final = ("queued", "sealed", "posted", "logged", "failed")


class HistoryMessage(msgspec.Struct, frozen=True):
    """One message of the local history (sent or received), in log order."""

    msg_key: bytes
    message_uid: bytes
    sender_device: str
    direction: str
    pair_seq: int
    sent_at_ms: int
    relay_sent_at_ms: int
    log_position: int | None
    via: str
    late: bool
    sender: str
    recipients: list[str]
    content_type: str
    body: bytes
    # Which device of the account wrote the log record this came from (account-log.md §4.6): None with
    # ``authenticated`` False for a legacy unsigned (v1) record, None with True for a message this device
    # took from its own inbox or outbox before writers were recorded.
    writer: str | None = None
    authenticated: bool = True

    @property
    def text(self) -> str | None:
        if not self.content_type.lower().startswith("text/"):
            return None
        return self.body.decode("utf-8", errors="replace")


class EpochInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What this device accepted about one epoch (account-log.md §5.4 "clients enforce"), from its key records.

    ``record_format`` 2: created by a v2 key record; its records must be signed by one of ``writers`` (device
    id → Ed25519 key of every device a verified key record granted the epoch). 1: a legacy epoch, whose
    records are unsigned. ``position``: the log position of the creating record (``records`` under an older
    epoch after it are refused); ``created_at_ms``: the creator's signed clock, for scheduled rotation.
    """

    epoch: int
    record_format: int
    position: int
    list_version: int
    created_at_ms: int
    writers: dict[str, bytes] = {}


class OutboxEntry(msgspec.Struct, frozen=True):
    local_id: int
    message_uid: bytes
    pair_seq: int
    state: str
    attempts: int
    next_attempt_at_ms: int
    last_error: str
    created_at_ms: int
    sent_at_ms: int
    recipient: str
    content_type: str
    body: bytes
    # Why it waits or failed (account-log.md §10 "Outbox entry states"): a stable code of protocol/errors.py
    # (empty: none), and the relay that cannot be reached for a ``retrying`` entry (empty: not about reachability).
    reason_code: str = ""
    destination: str = ""


class PendingRecord(msgspec.Struct, frozen=True):
    seq: int
    record_id: bytes
    kind: str
    needs_expected_head: bool
    epoch: int
    device_list_version: int | None
    inbox_cursor: int | None
    outbox_local_id: int | None
    plaintext: bytes


class _HistoryMeta(msgspec.Struct, frozen=True, array_like=True):
    """The sealed ``meta`` column of ``history_messages``: who sent it, which way, and when."""

    sender_device: str
    direction: str
    sent_at_ms: int
    relay_sent_at_ms: int


class _OutboxStatus(msgspec.Struct, frozen=True, array_like=True):
    """The sealed ``status`` column of ``outbox_entries``: when, and the last error (it can name peers)."""

    created_at_ms: int
    sent_at_ms: int
    next_attempt_at_ms: int = 0
    last_error: str = ""
    # Trailing fields with defaults: rows written before them decode unchanged (no migration needed).
    reason_code: str = ""
    destination: str = ""


def _seal_status(db: LocalDB, local_id: int, status: _OutboxStatus) -> bytes:
    return db.seal_column("outbox_entries", local_id, "status", msgspec.msgpack.encode(status))


def _seal_relay_time(db: LocalDB, local_id: int, n: int, relay_sent_at_ms: int) -> bytes:
    return db.seal_column("outbox_envelopes", (local_id, n), "relay_sent_at", _ms(relay_sent_at_ms))


def _sender_index(db: LocalDB, sender_device: str) -> bytes:
    return db.blind("history-sender", sender_device)


def _uid_index(db: LocalDB, sender_device: str, message_uid: bytes) -> bytes:
    return db.blind("history-message", sender_device, message_uid)


def _pair_seq_counter(db: LocalDB, peer: str) -> str:
    return "pair_seq:" + db.blind("pair-seq", peer).hex()


# -- numbered migrations of state.db (PRAGMA user_version) ------------------------------------------------


class StateTooNewError(LocalDBError):
    """``state.db`` was migrated by a newer tetherless than this one: refused rather than misread."""

    code: ClassVar[LocalErrorCode | None] = LocalErrorCode.LOCAL_STATE_TOO_NEW


class Migration(msgspec.Struct, frozen=True):
    """Step ``version`` of ``state.db``: ``apply`` runs inside the runner's transaction and must not commit."""

    version: int
    summary: str
    apply: Callable[[LocalDB], None]


def _create_schema_1(db: LocalDB) -> None:
    for statement in _SCHEMA_1.split(";"):
        if statement.strip():
            db.execute(statement)


def _seal_metadata(db: LocalDB) -> None:
    """Migration 2 (docs/account-log.md §8, crypto.md §13.3): the history's sender, direction and times move
    into sealed columns and its keys become keyed hashes; device-list marks and per-peer ``pair_seq`` counters
    are keyed by keyed hashes; the marks and the replay cache are guarded sets."""
    db.create_index_key()
    # History: the sealed columns keep their table, primary key and labels, so their blobs move unchanged.
    db.execute("ALTER TABLE history_messages RENAME TO history_messages_1")
    db.execute("DROP INDEX IF EXISTS history_messages_pos")
    for statement in _HISTORY_2.split(";"):
        if statement.strip():
            db.execute(statement)
    table = "history_messages"
    rows = db.execute(
        "SELECT msg_key, message_uid, sender_device, direction, pair_seq, sent_at_ms, relay_sent_at_ms, "
        "log_position, via, late, local_seq, inbox_seen, held, held_cursor, held_since_ms, sender, recipients, "
        "content_type, body FROM history_messages_1"
    ).fetchall()
    for r in rows:
        meta = _HistoryMeta(sender_device=r[2], direction=r[3], sent_at_ms=r[5], relay_sent_at_ms=r[6])
        held_since = None if r[14] is None else db.seal_column(table, r[0], "held_since", _ms(r[14]))
        db.execute(
            "INSERT INTO history_messages (msg_key, message_uid, uid_index, sender_index, pair_seq, log_position, "
            "via, late, local_seq, inbox_seen, held, held_cursor, held_since, meta, sender, recipients, content_type, "
            "body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r[0],
                r[1],
                _uid_index(db, r[2], r[1]),
                _sender_index(db, r[2]),
                r[4],
                r[7],
                r[8],
                r[9],
                r[10],
                r[11],
                r[12],
                r[13],
                held_since,
                db.seal_column(table, r[0], "meta", msgspec.msgpack.encode(meta)),
                *r[15:],
            ),
        )
    db.execute("DROP TABLE history_messages_1")
    # Outbox: times and the last error (which can name a peer) move into sealed columns.
    db.execute("ALTER TABLE outbox_entries ADD COLUMN status BLOB NOT NULL DEFAULT x''")
    for local_id, created, sent, next_at, error in db.execute(
        "SELECT local_id, created_at_ms, sent_at_ms, next_attempt_at_ms, last_error FROM outbox_entries"
    ).fetchall():
        status = _OutboxStatus(created_at_ms=created, sent_at_ms=sent, next_attempt_at_ms=next_at, last_error=error)
        db.execute(
            "UPDATE outbox_entries SET status = ? WHERE local_id = ?", (_seal_status(db, local_id, status), local_id)
        )
    for column in ("created_at_ms", "sent_at_ms", "next_attempt_at_ms", "last_error"):
        db.execute(f"ALTER TABLE outbox_entries DROP COLUMN {column}")
    db.execute("ALTER TABLE outbox_envelopes ADD COLUMN relay_sent_at BLOB")
    for local_id, n, relay_ms in db.execute(
        "SELECT local_id, n, relay_sent_at_ms FROM outbox_envelopes WHERE relay_sent_at_ms IS NOT NULL"
    ).fetchall():
        db.execute(
            "UPDATE outbox_envelopes SET relay_sent_at = ? WHERE local_id = ? AND n = ?",
            (_seal_relay_time(db, local_id, n, relay_ms), local_id, n),
        )
    db.execute("ALTER TABLE outbox_envelopes DROP COLUMN relay_sent_at_ms")
    db.execute("UPDATE log_cursors SET updated_at_ms = NULL")  # when each sync ran: no longer written
    # pair_seq counters were named by an unkeyed hash of the peer: rename those of every peer this device ever
    # queued a message to (every counter has an outbox row, which keeps its sealed recipient).
    for local_id, blob in db.execute("SELECT local_id, recipient FROM outbox_entries").fetchall():
        recipient = db.open_column("outbox_entries", local_id, "recipient", blob).decode()
        for peer in {recipient, _account_of(recipient)}:
            old = "pair_seq:" + digest("peer-index", peer).hex()[:32]
            db.execute("UPDATE log_counters SET name = ? WHERE name = ?", (_pair_seq_counter(db, peer), old))
    # Device-list marks: ``account@relay`` keys become keyed hashes (protocol.client.chains.mark_key).
    for key in db.keys(MARK_TABLE):
        if isinstance(key, str):
            account, _, relay = key.partition("@")
            value = db.get(MARK_TABLE, key)
            assert value is not None
            db.put(MARK_TABLE, db.blind("device-mark", account, relay.lower()), value)
            db.delete(MARK_TABLE, key)
    for guarded in GUARDED_SETS:
        db.guard_set(guarded)


#: The contacts of :mod:`protocol.client.contacts` (docs/account-log.md §8, "Contacts"): one row per name,
#: keyed by a keyed hash of the case-folded name; the name and address are sealed in ``entry``, and the address
#: appears only as a keyed hash (``address_index``, unique: one name per address).
CONTACTS_TABLE: Final = "contacts"


def _create_contacts(db: LocalDB) -> None:
    """Migration 3: the contacts table (empty; nothing older holds contacts)."""
    db.execute(
        f"CREATE TABLE {CONTACTS_TABLE} (name_index BLOB PRIMARY KEY, address_index BLOB NOT NULL UNIQUE, "
        "entry BLOB NOT NULL)"
    )


#: The snapshot tables of :mod:`protocol.client.engine.snapshots` (docs/account-log.md §6): the plan of a snapshot
#: being written, the snapshots chosen and loaded, the copies of ``key`` records a snapshot carries, and the
#: retention gaps. Clients up to schema 3 created them on first use, so migration 4 accepts them already there.
SNAPSHOT_TABLES: Final = ("log_snapshot_writes", "log_snapshot_loads", "log_snapshot_keys", "history_gaps")
_SNAPSHOT_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS log_snapshot_writes (
  snapshot_id BLOB PRIMARY KEY, covers INTEGER NOT NULL, since_ms INTEGER NOT NULL, created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS log_snapshot_loads (
  snapshot_id BLOB PRIMARY KEY, position INTEGER NOT NULL, covers INTEGER NOT NULL, parts INTEGER NOT NULL,
  epoch INTEGER NOT NULL, loaded_at_ms INTEGER, messages INTEGER
);
CREATE TABLE IF NOT EXISTS log_snapshot_keys (
  position INTEGER PRIMARY KEY, record_id BLOB NOT NULL, epoch INTEGER NOT NULL,
  device_list_version INTEGER NOT NULL, committed_at_ms INTEGER NOT NULL, ciphertext BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS history_gaps (
  after INTEGER PRIMARY KEY, upto INTEGER NOT NULL, noted_at_ms INTEGER NOT NULL
);
"""


def _create_snapshot_tables(db: LocalDB) -> None:
    """Migration 4: the snapshot tables. ``IF NOT EXISTS``: a home that already synced with a client up to schema 3
    has those it used (created on demand, same layout), and keeps their rows."""
    for statement in _SNAPSHOT_SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


#: The media tables of :mod:`protocol.client.blobs` (docs/decisions/0014-media-blobs.md D6): unfinished uploads,
#: one row per file path (``path_index``: a keyed hash of the path; 🔒 ``state``: the path, its size and mtime, the
#: file key, nonce, capability, digest, the relay's upload id and, once complete, the blob id), and the encrypted
#: media cache (``<home>/media/<blob_id>``: ciphertext, whose key stays in the sealed history) with its LRU order.
MEDIA_UPLOADS_TABLE: Final = "media_uploads"
MEDIA_CACHE_TABLE: Final = "media_cache"


def _create_media_tables(db: LocalDB) -> None:
    """Migration 5: the media tables (empty; nothing older uploads or caches media). ``IF NOT EXISTS``: the step
    may run again after the version was put back, like the others."""
    db.execute(
        f"CREATE TABLE IF NOT EXISTS {MEDIA_UPLOADS_TABLE} (path_index TEXT PRIMARY KEY, "
        "created_seq INTEGER NOT NULL, state BLOB NOT NULL)"
    )
    db.execute(
        f"CREATE TABLE IF NOT EXISTS {MEDIA_CACHE_TABLE} (blob_id TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL, "
        "used_seq INTEGER NOT NULL)"
    )


def _account_of(address: str) -> str:
    """``account@relay`` of a device address (``device.account@relay``), or the address itself."""
    local, at, relay = address.partition("@")
    return local.split(".", 1)[1] + at + relay if "." in local else address


def _ms(value: int) -> bytes:
    return value.to_bytes(8, "big")


#: Every step, in order. A new storage format adds one here (issue 14 builds on this runner); never edit one.
MIGRATIONS: Final = (
    Migration(1, "the offline store's tables (schema 1)", _create_schema_1),
    Migration(2, "sealed history metadata, keyed row keys, guarded marks and replay cache", _seal_metadata),
    Migration(3, "contacts: short names for addresses (protocol/client/contacts.py)", _create_contacts),
    Migration(4, "snapshot tables, once made on first use (client/engine/snapshots.py)", _create_snapshot_tables),
    Migration(5, "media: unfinished uploads and the encrypted media cache (client/blobs.py)", _create_media_tables),
)
SCHEMA_VERSION: Final = MIGRATIONS[-1].version


def schema_version(db: LocalDB) -> int:
    """The version ``state.db`` is at (``PRAGMA user_version``; 0 in a new file or one made before schema 2)."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: LocalDB) -> int:
    """Bring ``state.db`` to :data:`SCHEMA_VERSION`; returns how many migrations ran (0: already there).

    All pending steps run in one ``BEGIN IMMEDIATE`` transaction together with the version update, so a
    crash or a cancellation leaves the file at its old version, untouched, and the next open runs them
    again; two processes opening one home at once migrate once (the second re-reads the version under the
    write lock). Idempotent. Raises :class:`StateTooNewError` for a file from a newer client, and
    :class:`~protocol.client.localdb.TamperedRowError` when a step fails on rows it cannot read (a sealed
    value that does not open, or a layout that does not match its version: changed outside tetherless).
    """
    if schema_version(db) == SCHEMA_VERSION:
        return 0
    applied = 0
    with db.transaction():
        current = schema_version(db)
        if current > SCHEMA_VERSION:
            raise StateTooNewError(
                f"{db.path} is at schema {current}, newer than this tetherless knows ({SCHEMA_VERSION}): "
                "update tetherless"
            )
        for step in MIGRATIONS:
            if step.version <= current:
                continue
            try:
                step.apply(db)
            except (sqlite3.Error, msgspec.DecodeError, ValueError) as exc:
                raise TamperedRowError(
                    f"migration {step.version} of {db.path} ({step.summary}) failed and changed nothing: {exc}"
                ) from exc
            db.execute(f"PRAGMA user_version = {int(step.version)}")
            applied += 1
    return applied


def default_dek(home: Path, signing_seed: bytes) -> bytes:
    """The local DEK when the keystore does not provide one (interim: derived from the device's secret seed)."""
    return digest("local-dek", signing_seed)


class ClientStore:
    """The engine's tables over one :class:`LocalDB`. ``now_ms`` and randomness are injectable."""

    def __init__(self, db: LocalDB, *, random_bytes: Any = os.urandom, wall_clock: Any = time.time) -> None:
        self.db = db
        self._random = random_bytes
        self._clock = wall_clock
        # Counters read inside :meth:`page` (valid while ``db.rollbacks`` is unchanged); None outside a page.
        self._page_counters: dict[str, int] | None = None
        self._page_rollbacks = 0
        self._sender_indexes: dict[str, bytes] = {}  # keyed hashes are fixed for a file (its index key)
        migrate(db)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def transaction(self) -> Any:
        return self.db.transaction()

    @contextlib.contextmanager
    def page(self) -> Iterator[None]:
        """One transaction for a page of log records (account-log.md §10 "Read"): everything written inside
        commits together, durably, or (on an exception or cancellation) not at all. The counters it reads are
        kept in memory until it ends (each write still goes to the file at once); a rolled-back savepoint
        inside drops them. No other process can change them meanwhile: the transaction holds the file's write
        lock (``BEGIN IMMEDIATE``). Nests inside a transaction (then a savepoint); a page nested in a page
        ends the outer one's cache (correct, only slower)."""
        with self.db.transaction():
            self._page_counters, self._page_rollbacks = {}, self.db.rollbacks
            try:
                yield
            finally:
                self._page_counters = None

    def _seal(self, table: str, pk: Any, column: str, value: bytes) -> bytes:
        return self.db.seal_column(table, pk, column, value)

    def _open(self, table: str, pk: Any, column: str, blob: bytes) -> bytes:
        return self.db.open_column(table, pk, column, blob)

    # -- cursors and counters ----------------------------------------------------------------

    def cursor(self, name: str) -> int:
        row = self.db.execute("SELECT value FROM log_cursors WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def set_cursor(self, name: str, value: int) -> None:
        self.db.execute(
            "INSERT INTO log_cursors (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    def counter(self, name: str) -> int:
        cache = self._page_counters
        if cache is not None and self.db.rollbacks != self._page_rollbacks:
            cache.clear()
            self._page_rollbacks = self.db.rollbacks
        if cache is not None and name in cache:
            return cache[name]
        row = self.db.execute("SELECT value FROM log_counters WHERE name = ?", (name,)).fetchone()
        value = int(row[0]) if row else 0
        if cache is not None:
            cache[name] = value
        return value

    def advance_counter(self, name: str, by: int) -> int:
        """Move counter ``name`` on by ``by`` (the rollback recovery: past values a lost future used)."""
        value = self.counter(name) + by
        self.db.execute(
            "INSERT INTO log_counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )
        if self._page_counters is not None:
            self._page_counters[name] = value
        return value

    def next_counter(self, name: str) -> int:
        return self.advance_counter(name, 1)

    # -- epoch keys -----------------------------------------------------------------------------

    def epoch_key(self, epoch: int) -> bytes | None:
        row = self.db.execute("SELECT key FROM log_epoch_keys WHERE epoch = ?", (epoch,)).fetchone()
        return self._open("log_epoch_keys", epoch, "key", row[0]) if row else None

    def newest_epoch(self) -> int:
        row = self.db.execute("SELECT max(epoch) FROM log_epoch_keys").fetchone()
        return int(row[0]) if row and row[0] else 0

    def put_epoch_key(self, epoch: int, key: bytes, source: bytes) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO log_epoch_keys (epoch, key, source) VALUES (?, ?, ?)",
            (epoch, self._seal("log_epoch_keys", epoch, "key", key), source),
        )

    def add_grants(self, epoch: int, device_ids: list[str]) -> None:
        for device_id in device_ids:
            self.db.execute("INSERT OR IGNORE INTO log_grants (epoch, device_id) VALUES (?, ?)", (epoch, device_id))

    def granted(self, epoch: int) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT device_id FROM log_grants WHERE epoch = ?", (epoch,))}

    def key_epochs_seen(self) -> int:
        row = self.db.execute("SELECT max(epoch) FROM log_grants").fetchone()
        return int(row[0]) if row and row[0] else 0

    def epoch_info(self, epoch: int) -> EpochInfo | None:
        return self.db.get_struct("log_epoch_info", epoch, EpochInfo)

    def put_epoch_info(self, info: EpochInfo) -> None:
        self.db.put_struct("log_epoch_info", info.epoch, info)

    def epoch_infos(self) -> list[EpochInfo]:
        """Every epoch this device accepted a creating key record for, in epoch order."""
        return [msgspec.msgpack.decode(value, type=EpochInfo) for _, value in self.db.items("log_epoch_info")]

    def set_writer(self, msg_key: bytes, writer: str | None) -> None:
        """Who wrote the record a message came from (``None``: a legacy unsigned record); kept once."""
        if self.db.get("history_writers", msg_key) is None:
            self.db.put("history_writers", msg_key, (writer or "").encode())

    def put_commitment(self, epoch: int, commitment: bytes) -> None:
        """The ``key_commitment`` of a verified key record of ``epoch`` (what a session-delivered key must match)."""
        if self.db.get("log_key_commitments", epoch) is None:
            self.db.put("log_key_commitments", epoch, commitment)

    def commitment(self, epoch: int) -> bytes | None:
        return self.db.get("log_key_commitments", epoch)

    def offer_session_key(self, epoch: int, key: bytes) -> None:
        """Keep a key that arrived in a ``tetherless/account-key`` session message until its key record is read."""
        self.db.put("log_session_keys", epoch, key)

    def session_key(self, epoch: int) -> bytes | None:
        return self.db.get("log_session_keys", epoch)

    def drop_session_key(self, epoch: int) -> None:
        self.db.delete("log_session_keys", epoch)

    # -- messages --------------------------------------------------------------------------------

    def upsert_message(
        self,
        *,
        msg_key: bytes,
        message_uid: bytes,
        sender_device: str,
        direction: str,
        pair_seq: int,
        sent_at_ms: int,
        relay_sent_at_ms: int,
        via: str,
        sender: str,
        recipients: list[str],
        content_type: str,
        body: bytes,
        log_position: int | None = None,
        late: bool = False,
        inbox_seen: bool = False,
    ) -> bool:
        """Insert the message, or merge into the existing row (position, relay time). True when it is new.

        Unique per ``(sender_device, message_uid)``, found by its keyed hash (``uid_index``)."""
        table = "history_messages"
        uid_index = _uid_index(self.db, sender_device, message_uid)
        row = self.db.execute(
            "SELECT msg_key, log_position, inbox_seen, meta FROM history_messages WHERE uid_index = ?", (uid_index,)
        ).fetchone()
        if row is not None:
            if log_position is not None and row[1] is None:
                self.db.execute(
                    # Logged (by another device, or seen again in the log): no longer held back here.
                    "UPDATE history_messages SET log_position = ?, held = 0, held_since = NULL WHERE msg_key = ?",
                    (log_position, row[0]),
                )
            if relay_sent_at_ms:
                meta = self._meta(row[0], row[3])
                if relay_sent_at_ms > meta.relay_sent_at_ms:
                    meta = msgspec.structs.replace(meta, relay_sent_at_ms=relay_sent_at_ms)
                    self.db.execute(
                        "UPDATE history_messages SET meta = ? WHERE msg_key = ?",
                        (self._seal(table, row[0], "meta", msgspec.msgpack.encode(meta)), row[0]),
                    )
            if inbox_seen and not row[2]:
                self.db.execute("UPDATE history_messages SET inbox_seen = 1 WHERE msg_key = ?", (row[0],))
            return False
        local_seq = self.next_counter("local_seq")
        meta = _HistoryMeta(
            sender_device=sender_device, direction=direction, sent_at_ms=sent_at_ms, relay_sent_at_ms=relay_sent_at_ms
        )
        sealed = self.db.seal_columns(
            table,
            msg_key,
            {
                "meta": msgspec.msgpack.encode(meta),
                "sender": sender.encode(),
                "recipients": codec.encode(recipients),
                "content_type": content_type.encode(),
                "body": body,
            },
        )
        self.db.execute(
            "INSERT INTO history_messages (msg_key, message_uid, uid_index, sender_index, pair_seq, log_position, via, "
            "late, local_seq, inbox_seen, meta, sender, recipients, content_type, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                msg_key,
                message_uid,
                uid_index,
                self._sender_index(sender_device),
                pair_seq,
                log_position,
                via,
                int(late),
                local_seq,
                int(inbox_seen),
                sealed["meta"],
                sealed["sender"],
                sealed["recipients"],
                sealed["content_type"],
                sealed["body"],
            ),
        )
        return True

    def _sender_index(self, sender_device: str) -> bytes:
        index = self._sender_indexes.get(sender_device)
        if index is None:
            index = self._sender_indexes[sender_device] = _sender_index(self.db, sender_device)
        return index

    def set_position(self, msg_key: bytes, position: int) -> None:
        self.db.execute(
            "UPDATE history_messages SET log_position = ? WHERE msg_key = ? AND log_position IS NULL",
            (position, msg_key),
        )

    _HISTORY_COLUMNS: Final = (
        "msg_key, message_uid, pair_seq, log_position, via, late, meta, sender, recipients, content_type, body"
    )

    def history(
        self,
        *,
        since_position: int = 0,
        since_ms: int = 0,
        limit: int | None = None,
        newest: int | None = None,
        where: Callable[[HistoryMessage], bool] | None = None,
    ) -> list[HistoryMessage]:
        """Messages in log order (logged ones by position, then not-yet-logged ones in local order).

        ``limit``: the oldest ``limit`` that match; ``newest``: the newest ``newest`` that match, still returned
        oldest first (``history --limit``). ``since_ms`` and ``where`` (e.g. "involves this peer") test sealed
        values, so they run on each opened row: rows are then opened one at a time, newest first for ``newest``,
        until enough match — without them the SQL ``LIMIT`` does it and no other row is opened. Read-only."""
        if limit is not None and newest is not None:
            raise ValueError("history: give limit or newest, not both")
        order = "log_position IS NULL, log_position, local_seq"
        if newest is not None:
            order = "log_position IS NULL DESC, log_position DESC, local_seq DESC"
        sql = (
            f"SELECT {self._HISTORY_COLUMNS} FROM history_messages "
            f"WHERE coalesce(log_position, 9223372036854775807) > ? ORDER BY {order}"
        )
        params: tuple[Any, ...] = (since_position,)
        wanted = limit if limit is not None else newest
        filtered = bool(since_ms) or where is not None
        if wanted is not None and not filtered:
            sql += " LIMIT ?"
            params += (max(0, wanted),)
        selected: list[HistoryMessage] = []
        if wanted is None or wanted > 0:
            # Not fetchall(): with a filter, only the rows up to the last one needed are read and opened.
            for row in self.db.execute(sql, params):
                message = self._message_row(row)
                if message.sent_at_ms >= since_ms and (where is None or where(message)):
                    selected.append(message)
                    if wanted is not None and len(selected) >= wanted:
                        break
        return selected[::-1] if newest is not None else selected

    def message(self, msg_key: bytes) -> HistoryMessage | None:
        row = self.db.execute(
            f"SELECT {self._HISTORY_COLUMNS} FROM history_messages WHERE msg_key = ?", (msg_key,)
        ).fetchone()
        return self._message_row(row) if row else None

    def _meta(self, msg_key: bytes, blob: bytes) -> _HistoryMeta:
        return msgspec.msgpack.decode(self._open("history_messages", msg_key, "meta", blob), type=_HistoryMeta)

    def _message_row(self, r: Any) -> HistoryMessage:
        table = "history_messages"
        key = r[0]
        stored = self.db.get("history_writers", key)
        writer = stored.decode() if stored else None
        authenticated = bool(writer) if stored is not None else r[4] != "log"
        meta = self._meta(key, r[6])
        return HistoryMessage(
            msg_key=key,
            message_uid=r[1],
            sender_device=meta.sender_device,
            direction=meta.direction,
            pair_seq=r[2],
            sent_at_ms=meta.sent_at_ms,
            relay_sent_at_ms=meta.relay_sent_at_ms,
            log_position=r[3],
            via=r[4],
            late=bool(r[5]),
            sender=self._open(table, key, "sender", r[7]).decode(),
            recipients=codec.decode(self._open(table, key, "recipients", r[8]), list[str]),
            content_type=self._open(table, key, "content_type", r[9]).decode(),
            body=self._open(table, key, "body", r[10]),
            writer=writer,
            authenticated=authenticated,
        )

    def message_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM history_messages").fetchone()[0])

    # -- outbox ------------------------------------------------------------------------------------

    def enqueue(self, recipient: str, content_type: str, body: bytes, *, peer: str | None = None) -> OutboxEntry:
        """Step 1 of §10: the outbox row and its ``pair_seq``, in one transaction. ``peer`` (whose ``pair_seq``
        counter it takes) defaults to the recipient's account address, as :meth:`give_back_pair_seq` reads it."""
        with self.db.transaction():
            pair_seq = self.next_counter(_pair_seq_counter(self.db, peer or _account_of(recipient)))
            uid = self._random(log.MESSAGE_UID_BYTES)
            now = self.now_ms()
            table = "outbox_entries"
            cur = self.db.execute(
                "INSERT INTO outbox_entries (message_uid, pair_seq, state, status, recipient, content_type, body) "
                "VALUES (?, ?, 'queued', x'', x'', x'', x'')",
                (uid, pair_seq),
            )
            local_id = int(cur.lastrowid or 0)
            self.db.execute(
                "UPDATE outbox_entries SET status = ?, recipient = ?, content_type = ?, body = ? WHERE local_id = ?",
                (
                    _seal_status(self.db, local_id, _OutboxStatus(created_at_ms=now, sent_at_ms=now)),
                    self._seal(table, local_id, "recipient", recipient.encode()),
                    self._seal(table, local_id, "content_type", content_type.encode()),
                    self._seal(table, local_id, "body", body),
                    local_id,
                ),
            )
        entry = self.outbox_entry(local_id)
        assert entry is not None
        return entry

    def _outbox_row(self, r: Any) -> OutboxEntry:
        table = "outbox_entries"
        local_id = r[0]
        status = self._status(local_id, r[5])
        return OutboxEntry(
            local_id=local_id,
            message_uid=r[1],
            pair_seq=r[2],
            state=r[3],
            attempts=r[4],
            next_attempt_at_ms=status.next_attempt_at_ms,
            last_error=status.last_error,
            created_at_ms=status.created_at_ms,
            sent_at_ms=status.sent_at_ms,
            recipient=self._open(table, local_id, "recipient", r[6]).decode(),
            content_type=self._open(table, local_id, "content_type", r[7]).decode(),
            body=self._open(table, local_id, "body", r[8]),
            reason_code=status.reason_code,
            destination=status.destination,
        )

    def _status(self, local_id: int, blob: bytes) -> _OutboxStatus:
        return msgspec.msgpack.decode(self._open("outbox_entries", local_id, "status", blob), type=_OutboxStatus)

    def _update_status(self, local_id: int, **changes: Any) -> None:
        row = self.db.execute("SELECT status FROM outbox_entries WHERE local_id = ?", (local_id,)).fetchone()
        if row is not None:
            status = msgspec.structs.replace(self._status(local_id, row[0]), **changes)
            self.db.execute(
                "UPDATE outbox_entries SET status = ? WHERE local_id = ?",
                (_seal_status(self.db, local_id, status), local_id),
            )

    _OUTBOX_COLUMNS: Final = "local_id, message_uid, pair_seq, state, attempts, status, recipient, content_type, body"

    def outbox_entry(self, local_id: int) -> OutboxEntry | None:
        r = self.db.execute(
            f"SELECT {self._OUTBOX_COLUMNS} FROM outbox_entries WHERE local_id = ?", (local_id,)
        ).fetchone()
        return self._outbox_row(r) if r else None

    def outbox(self, states: tuple[str, ...] = ("queued", "sealed", "posted", "failed")) -> list[OutboxEntry]:
        marks = ",".join("?" for _ in states)
        rows = self.db.execute(
            f"SELECT {self._OUTBOX_COLUMNS} FROM outbox_entries WHERE state IN ({marks}) ORDER BY local_id", states
        ).fetchall()
        return [self._outbox_row(r) for r in rows]

    def set_outbox_state(
        self, local_id: int, state: str, *, error: str | None = None, reason_code: str | None = None
    ) -> None:
        """Move an entry to ``state``; ``error`` / ``reason_code`` replace the stored reason when given."""
        with self.db.transaction():
            self.db.execute("UPDATE outbox_entries SET state = ? WHERE local_id = ?", (state, local_id))
            changes: dict[str, Any] = {}
            if error is not None:
                changes["last_error"] = error[:200]
            if reason_code is not None:
                changes["reason_code"] = reason_code
            if changes:
                self._update_status(local_id, **changes)

    def note_attempt(
        self, local_id: int, error: str, next_attempt_at_ms: int, *, reason_code: str = "", destination: str = ""
    ) -> None:
        """A transient failure: one more attempt, its reason and the destination that failed, the next time."""
        with self.db.transaction():
            self.db.execute("UPDATE outbox_entries SET attempts = attempts + 1 WHERE local_id = ?", (local_id,))
            self._update_status(
                local_id,
                last_error=error[:200],
                next_attempt_at_ms=next_attempt_at_ms,
                reason_code=reason_code,
                destination=destination,
            )

    def reschedule(self, local_id: int, state: str) -> None:
        """Make an entry due now in ``state`` (``queued`` or ``sealed``), its reason cleared (``outbox retry``)."""
        with self.db.transaction():
            self.db.execute("UPDATE outbox_entries SET state = ? WHERE local_id = ?", (state, local_id))
            self._update_status(local_id, last_error="", next_attempt_at_ms=0, reason_code="", destination="")

    def delete_outbox_entry(self, local_id: int) -> None:
        """Remove an entry and its envelopes (``outbox cancel``). Idempotent."""
        with self.db.transaction():
            self.db.execute("DELETE FROM outbox_envelopes WHERE local_id = ?", (local_id,))
            self.db.execute("DELETE FROM outbox_entries WHERE local_id = ?", (local_id,))

    def drop_envelope(self, local_id: int, n: int) -> None:
        """Forget one envelope the relay refused for good (a device removed from an account since sealing)."""
        self.db.execute(
            "DELETE FROM outbox_envelopes WHERE local_id = ? AND n = ? AND accepted_id IS NULL", (local_id, n)
        )

    def give_back_pair_seq(self, entry: OutboxEntry) -> bool:
        """Undo the ``pair_seq`` of an entry that will never reach its peer (cancelled, or failed before any
        envelope was accepted), so the recipient does not hold later messages back for the gap (§9).

        Possible only when every later number of that peer belongs to an entry that is still ``queued``
        (nothing sealed carries it yet): those move down by one, the peer's counter with them, and the entry's
        own number becomes 0 ("none": :meth:`renumber` gives it a fresh one if it is retried). Otherwise
        nothing changes and the result is False: the gap stays, and the recipient logs the later messages
        ``late`` after its hold-back. Call inside a transaction.
        """
        if entry.pair_seq <= 0:
            return False
        peer = _account_of(entry.recipient)
        later = [
            e
            for e in self.outbox(OUTBOX_STATES)
            if e.local_id != entry.local_id and e.pair_seq > entry.pair_seq and _account_of(e.recipient) == peer
        ]
        counter = _pair_seq_counter(self.db, peer)
        if self.counter(counter) != entry.pair_seq + len(later) or any(e.state != "queued" for e in later):
            return False
        for e in later:
            self.db.execute("UPDATE outbox_entries SET pair_seq = ? WHERE local_id = ?", (e.pair_seq - 1, e.local_id))
        self.db.execute("UPDATE outbox_entries SET pair_seq = 0 WHERE local_id = ?", (entry.local_id,))
        self.advance_counter(counter, -1)
        return True

    def renumber(self, local_id: int) -> None:
        """Give an entry whose ``pair_seq`` was given back (0) the peer's next one (``outbox retry``)."""
        entry = self.outbox_entry(local_id)
        if entry is not None and entry.pair_seq <= 0:
            pair_seq = self.next_counter(_pair_seq_counter(self.db, _account_of(entry.recipient)))
            self.db.execute("UPDATE outbox_entries SET pair_seq = ? WHERE local_id = ?", (pair_seq, local_id))

    def put_envelopes(self, local_id: int, envelopes: list[tuple[str, bytes, bytes]]) -> None:
        """``(recipient device address, idempotency key, ciphertext)`` per device, sealed once."""
        for n, (recipient, key, ciphertext) in enumerate(envelopes):
            self.db.execute(
                "INSERT OR IGNORE INTO outbox_envelopes (local_id, n, idempotency_key, ciphertext, recipient_device) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    local_id,
                    n,
                    key,
                    ciphertext,
                    self._seal("outbox_envelopes", (local_id, n), "recipient", recipient.encode()),
                ),
            )

    def envelopes(self, local_id: int) -> list[tuple[int, str, bytes, bytes, bytes | None, int | None]]:
        rows = self.db.execute(
            "SELECT n, recipient_device, idempotency_key, ciphertext, accepted_id, relay_sent_at "
            "FROM outbox_envelopes WHERE local_id = ? ORDER BY n",
            (local_id,),
        ).fetchall()
        table = "outbox_envelopes"
        return [
            (
                r[0],
                self._open(table, (local_id, r[0]), "recipient", r[1]).decode(),
                r[2],
                r[3],
                r[4],
                None
                if r[5] is None
                else int.from_bytes(self._open(table, (local_id, r[0]), "relay_sent_at", r[5]), "big"),
            )
            for r in rows
        ]

    def set_receipt(self, local_id: int, n: int, accepted_id: bytes, relay_sent_at_ms: int) -> None:
        self.db.execute(
            "UPDATE outbox_envelopes SET accepted_id = ?, relay_sent_at = ? WHERE local_id = ? AND n = ?",
            (accepted_id, _seal_relay_time(self.db, local_id, n, relay_sent_at_ms), local_id, n),
        )

    # -- log_pending -----------------------------------------------------------------------------

    def add_pending(
        self,
        record_id: bytes,
        kind: str,
        plaintext: bytes,
        *,
        needs_expected_head: bool = False,
        epoch: int = 0,
        device_list_version: int | None = None,
        inbox_cursor: int | None = None,
        outbox_local_id: int | None = None,
    ) -> None:
        cur = self.db.execute(
            "INSERT OR IGNORE INTO log_pending (record_id, kind, needs_expected_head, epoch, device_list_version, "
            "inbox_cursor, outbox_local_id, plaintext) VALUES (?, ?, ?, ?, ?, ?, ?, x'')",
            (record_id, kind, int(needs_expected_head), epoch, device_list_version, inbox_cursor, outbox_local_id),
        )
        if cur.rowcount:
            self.db.execute(
                "UPDATE log_pending SET plaintext = ? WHERE record_id = ?",
                (self._seal("log_pending", record_id, "plaintext", plaintext), record_id),
            )

    def renumber_pending(self, record_id: bytes, plaintext: bytes) -> None:
        """Replace a pending record's plaintext (its ``writer_seq`` given at first seal), so a restart seals the
        same number again instead of taking a new one (account-log.md §4.6). No-op if the record is gone."""
        self.db.execute(
            "UPDATE log_pending SET plaintext = ? WHERE record_id = ?",
            (self._seal("log_pending", record_id, "plaintext", plaintext), record_id),
        )

    def pending(self, limit: int = 500) -> list[PendingRecord]:
        rows = self.db.execute(
            "SELECT seq, record_id, kind, needs_expected_head, epoch, device_list_version, inbox_cursor, "
            "outbox_local_id, plaintext FROM log_pending ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            PendingRecord(
                seq=r[0],
                record_id=r[1],
                kind=r[2],
                needs_expected_head=bool(r[3]),
                epoch=r[4],
                device_list_version=r[5],
                inbox_cursor=r[6],
                outbox_local_id=r[7],
                plaintext=self._open("log_pending", r[1], "plaintext", r[8]),
            )
            for r in rows
        ]

    def pending_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM log_pending").fetchone()[0])

    def is_pending(self, record_id: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM log_pending WHERE record_id = ?", (record_id,)).fetchone() is not None

    def drop_pending(self, record_id: bytes) -> None:
        self.db.execute("DELETE FROM log_pending WHERE record_id = ?", (record_id,))

    def ack_point(self) -> int:
        """The highest inbox cursor all of whose messages are logged (custody rule D5; held-back ones are not)."""
        point = self.cursor("inbox_received")
        for sql in (
            "SELECT min(inbox_cursor) FROM log_pending WHERE inbox_cursor IS NOT NULL",
            "SELECT min(held_cursor) FROM history_messages WHERE held = 1 AND held_cursor IS NOT NULL",
        ):
            row = self.db.execute(sql).fetchone()
            if row and row[0] is not None:
                point = min(point, int(row[0]) - 1)
        return point

    def hold(self, msg_key: bytes, inbox_cursor: int) -> None:
        """Hold a received message back (not logged, not acknowledged) until its predecessors are here (§9)."""
        since = self._seal("history_messages", msg_key, "held_since", _ms(self.now_ms()))
        self.db.execute(
            "UPDATE history_messages SET held = 1, held_cursor = coalesce(held_cursor, ?), "
            "held_since = coalesce(held_since, ?) WHERE msg_key = ? AND log_position IS NULL",
            (inbox_cursor, since, msg_key),
        )

    def held(self) -> list[tuple[bytes, str, int, int, int]]:
        """``(msg_key, sender_device, pair_seq, held_cursor, held_since_ms)`` per held message, grouped by
        sender (in keyed-hash order) and by ``pair_seq`` within a sender."""
        held: list[tuple[bytes, str, int, int, int]] = []
        for key, pair_seq, cursor, since, meta in self.db.execute(
            "SELECT msg_key, pair_seq, held_cursor, held_since, meta FROM history_messages "
            "WHERE held = 1 ORDER BY sender_index, pair_seq"
        ).fetchall():
            since_ms = int.from_bytes(self._open("history_messages", key, "held_since", since), "big") if since else 0
            held.append((key, self._meta(key, meta).sender_device, pair_seq, cursor, since_ms))
        return held

    def has_predecessors(self, sender_device: str, pair_seq: int) -> bool:
        """Whether messages 1 … pair_seq-1 of the sender are all here and not held."""
        row = self.db.execute(
            "SELECT count(DISTINCT pair_seq) FROM history_messages WHERE sender_index = ? AND pair_seq >= 1 "
            "AND pair_seq < ? AND held = 0",
            (self._sender_index(sender_device), pair_seq),
        ).fetchone()
        return int(row[0]) == pair_seq - 1

    def release(self, msg_key: bytes, *, late: bool) -> None:
        # The hold time is dropped with the hold: it would date the message's arrival for no further use.
        self.db.execute(
            "UPDATE history_messages SET held = 0, late = ?, held_since = NULL WHERE msg_key = ?", (int(late), msg_key)
        )

    def iter_rows(self, sql: str, params: tuple[Any, ...] = ()) -> Iterator[Any]:
        yield from self.db.execute(sql, params).fetchall()


def encode_plaintext(plaintext: log.LogPlaintext) -> bytes:
    return msgspec.msgpack.encode(plaintext)


def decode_plaintext(data: bytes) -> log.LogPlaintext:
    return codec.decode(data, log.LogPlaintext)


__all__ = [
    "CONTACTS_TABLE",
    "GUARDED_SETS",
    "MARK_TABLE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SNAPSHOT_TABLES",
    "TRANSCRIPT_TABLE",
    "ClientStore",
    "EpochInfo",
    "HistoryMessage",
    "Migration",
    "OutboxEntry",
    "PendingRecord",
    "StateTooNewError",
    "decode_plaintext",
    "default_dek",
    "encode_plaintext",
    "migrate",
    "schema_version",
]
