"""The offline-first client's local store (docs/account-log.md §8), in ``<home>/state.db``.

Tables live in the client's :class:`~protocol.client.localdb.LocalDB` (one
file per home, WAL, ``synchronous=FULL``); every secret column is sealed with
``LocalDB.seal(table, pk, value)`` (XChaCha20-Poly1305, AD = the row's table
and primary key), so a stolen disk shows ids, positions, counts and times but
not with whom or what. Tables (topic-prefixed, §8 names in brackets):

- ``history_messages`` [messages]: one row per logical message, unique on
  ``(sender_device, message_uid)``; 🔒 sender, recipients, content type, body.
- ``outbox_entries`` [outbox] and ``outbox_envelopes``: what the user sent,
  with the exact sealed envelopes (so a retry reuses the same bytes and keys).
- ``log_pending``: records to append, 🔒 plaintext (encrypted under the
  newest epoch key at append time; the record id never changes).
- ``log_cursors`` [cursors], ``log_counters`` [counters], ``log_epoch_keys``
  [epoch_keys] 🔒, ``log_grants`` (which device holds which epoch), ``log_key_commitments``
  and ``log_session_keys`` 🔒 (keys received through sessions, kept until their key record is read).

Every multi-table change is one :meth:`LocalDB.transaction` (§10). Blocking,
small, local: called from the engine's trio task directly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec

from .. import codec, log
from ..signing import digest
from .localdb import LocalDB, SealedColumns

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
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

#: Every column this module seals (LocalDB.seal_column labels), for LocalDB.rekey when the DEK rotates
#: (Keystore.change_passphrase). A new sealed column must be added here, or rotation leaves it unreadable
#: (tests/protocol/client/test_offline_store.py checks the schema against this table).
SEALED_COLUMNS: Final[dict[str, SealedColumns]] = {
    "history_messages": (
        ("msg_key",),
        (("sender", "sender"), ("recipients", "recipients"), ("content_type", "content_type"), ("body", "body")),
    ),
    "outbox_entries": (("local_id",), (("recipient", "recipient"), ("content_type", "content_type"), ("body", "body"))),
    "outbox_envelopes": (("local_id", "n"), (("recipient_device", "recipient"),)),
    "log_pending": (("record_id",), (("plaintext", "plaintext"),)),
    "log_epoch_keys": (("epoch",), (("key", "key"),)),
}

OUTBOX_STATES: Final = ("queued", "sealed", "posted", "logged", "failed")


@dataclass(frozen=True, slots=True)
class HistoryMessage:
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


@dataclass(frozen=True, slots=True)
class OutboxEntry:
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


@dataclass(frozen=True, slots=True)
class PendingRecord:
    seq: int
    record_id: bytes
    kind: str
    needs_expected_head: bool
    epoch: int
    device_list_version: int | None
    inbox_cursor: int | None
    outbox_local_id: int | None
    plaintext: bytes


def default_dek(home: Path, signing_seed: bytes) -> bytes:
    """The local DEK when the keystore does not provide one (interim: derived from the device's secret seed)."""
    return digest("local-dek", signing_seed)


class ClientStore:
    """The engine's tables over one :class:`LocalDB`. ``now_ms`` and randomness are injectable."""

    def __init__(self, db: LocalDB, *, random_bytes: Any = os.urandom, wall_clock: Any = time.time) -> None:
        self.db = db
        self._random = random_bytes
        self._clock = wall_clock
        with db.transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def transaction(self) -> Any:
        return self.db.transaction()

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
            "INSERT INTO log_cursors (name, value, updated_at_ms) VALUES (?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
            (name, value, self.now_ms()),
        )

    def counter(self, name: str) -> int:
        row = self.db.execute("SELECT value FROM log_counters WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def advance_counter(self, name: str, by: int) -> int:
        """Move counter ``name`` on by ``by`` (the rollback recovery: past values a lost future used)."""
        value = self.counter(name) + by
        self.db.execute(
            "INSERT INTO log_counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )
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
        """Insert the message, or merge into the existing row (position, relay time). True when it is new."""
        row = self.db.execute(
            "SELECT msg_key, log_position, inbox_seen FROM history_messages "
            "WHERE sender_device = ? AND message_uid = ?",
            (sender_device, message_uid),
        ).fetchone()
        if row is not None:
            if log_position is not None and row[1] is None:
                self.db.execute(
                    # Logged (by another device, or seen again in the log): no longer held back here.
                    "UPDATE history_messages SET log_position = ?, held = 0 WHERE msg_key = ?",
                    (log_position, row[0]),
                )
            if relay_sent_at_ms:
                self.db.execute(
                    "UPDATE history_messages SET relay_sent_at_ms = max(relay_sent_at_ms, ?) WHERE msg_key = ?",
                    (relay_sent_at_ms, row[0]),
                )
            if inbox_seen and not row[2]:
                self.db.execute("UPDATE history_messages SET inbox_seen = 1 WHERE msg_key = ?", (row[0],))
            return False
        local_seq = self.next_counter("local_seq")
        table = "history_messages"
        self.db.execute(
            "INSERT INTO history_messages (msg_key, message_uid, sender_device, direction, pair_seq, sent_at_ms, "
            "relay_sent_at_ms, log_position, via, late, local_seq, inbox_seen, sender, recipients, content_type, body) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                msg_key,
                message_uid,
                sender_device,
                direction,
                pair_seq,
                sent_at_ms,
                relay_sent_at_ms,
                log_position,
                via,
                int(late),
                local_seq,
                int(inbox_seen),
                self._seal(table, msg_key, "sender", sender.encode()),
                self._seal(table, msg_key, "recipients", codec.encode(recipients)),
                self._seal(table, msg_key, "content_type", content_type.encode()),
                self._seal(table, msg_key, "body", body),
            ),
        )
        return True

    def set_position(self, msg_key: bytes, position: int) -> None:
        self.db.execute(
            "UPDATE history_messages SET log_position = ? WHERE msg_key = ? AND log_position IS NULL",
            (position, msg_key),
        )

    def history(self, *, since_position: int = 0, since_ms: int = 0, limit: int | None = None) -> list[HistoryMessage]:
        """Messages in log order (logged ones by position, then not-yet-logged ones in local order)."""
        sql = (
            "SELECT msg_key, message_uid, sender_device, direction, pair_seq, sent_at_ms, relay_sent_at_ms, "
            "log_position, via, late, sender, recipients, content_type, body FROM history_messages "
            "WHERE coalesce(log_position, 9223372036854775807) > ? AND sent_at_ms >= ? "
            "ORDER BY log_position IS NULL, log_position, local_seq"
        )
        params: tuple[Any, ...] = (since_position, since_ms)
        if limit is not None:
            sql += " LIMIT ?"
            params += (limit,)
        return [self._message_row(r) for r in self.db.execute(sql, params).fetchall()]

    def message(self, msg_key: bytes) -> HistoryMessage | None:
        row = self.db.execute(
            "SELECT msg_key, message_uid, sender_device, direction, pair_seq, sent_at_ms, relay_sent_at_ms, "
            "log_position, via, late, sender, recipients, content_type, body FROM history_messages WHERE msg_key = ?",
            (msg_key,),
        ).fetchone()
        return self._message_row(row) if row else None

    def _message_row(self, r: Any) -> HistoryMessage:
        table = "history_messages"
        key = r[0]
        stored = self.db.get("history_writers", key)
        writer = stored.decode() if stored else None
        authenticated = bool(writer) if stored is not None else r[8] != "log"
        return HistoryMessage(
            msg_key=key,
            message_uid=r[1],
            sender_device=r[2],
            direction=r[3],
            pair_seq=r[4],
            sent_at_ms=r[5],
            relay_sent_at_ms=r[6],
            log_position=r[7],
            via=r[8],
            late=bool(r[9]),
            sender=self._open(table, key, "sender", r[10]).decode(),
            recipients=codec.decode(self._open(table, key, "recipients", r[11]), list[str]),
            content_type=self._open(table, key, "content_type", r[12]).decode(),
            body=self._open(table, key, "body", r[13]),
            writer=writer,
            authenticated=authenticated,
        )

    def message_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM history_messages").fetchone()[0])

    # -- outbox ------------------------------------------------------------------------------------

    def enqueue(self, recipient: str, content_type: str, body: bytes, *, peer: str) -> OutboxEntry:
        """Step 1 of §10: the outbox row and its ``pair_seq``, in one transaction."""
        with self.db.transaction():
            pair_seq = self.next_counter("pair_seq:" + digest("peer-index", peer).hex()[:32])
            uid = self._random(log.MESSAGE_UID_BYTES)
            now = self.now_ms()
            table = "outbox_entries"
            cur = self.db.execute(
                "INSERT INTO outbox_entries (message_uid, pair_seq, state, created_at_ms, sent_at_ms, recipient, "
                "content_type, body) VALUES (?, ?, 'queued', ?, ?, x'', x'', x'')",
                (uid, pair_seq, now, now),
            )
            local_id = int(cur.lastrowid or 0)
            self.db.execute(
                "UPDATE outbox_entries SET recipient = ?, content_type = ?, body = ? WHERE local_id = ?",
                (
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
        return OutboxEntry(
            local_id=local_id,
            message_uid=r[1],
            pair_seq=r[2],
            state=r[3],
            attempts=r[4],
            next_attempt_at_ms=r[5],
            last_error=r[6],
            created_at_ms=r[7],
            sent_at_ms=r[8],
            recipient=self._open(table, local_id, "recipient", r[9]).decode(),
            content_type=self._open(table, local_id, "content_type", r[10]).decode(),
            body=self._open(table, local_id, "body", r[11]),
        )

    _OUTBOX_COLUMNS: Final = (
        "local_id, message_uid, pair_seq, state, attempts, next_attempt_at_ms, last_error, created_at_ms, "
        "sent_at_ms, recipient, content_type, body"
    )

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

    def set_outbox_state(self, local_id: int, state: str, *, error: str | None = None) -> None:
        if error is None:
            self.db.execute("UPDATE outbox_entries SET state = ? WHERE local_id = ?", (state, local_id))
        else:
            self.db.execute(
                "UPDATE outbox_entries SET state = ?, last_error = ? WHERE local_id = ?", (state, error, local_id)
            )

    def note_attempt(self, local_id: int, error: str, next_attempt_at_ms: int) -> None:
        self.db.execute(
            "UPDATE outbox_entries SET attempts = attempts + 1, last_error = ?, next_attempt_at_ms = ? "
            "WHERE local_id = ?",
            (error[:200], next_attempt_at_ms, local_id),
        )

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
            "SELECT n, recipient_device, idempotency_key, ciphertext, accepted_id, relay_sent_at_ms "
            "FROM outbox_envelopes WHERE local_id = ? ORDER BY n",
            (local_id,),
        ).fetchall()
        return [
            (r[0], self._open("outbox_envelopes", (local_id, r[0]), "recipient", r[1]).decode(), r[2], r[3], r[4], r[5])
            for r in rows
        ]

    def set_receipt(self, local_id: int, n: int, accepted_id: bytes, relay_sent_at_ms: int) -> None:
        self.db.execute(
            "UPDATE outbox_envelopes SET accepted_id = ?, relay_sent_at_ms = ? WHERE local_id = ? AND n = ?",
            (accepted_id, relay_sent_at_ms, local_id, n),
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
        self.db.execute(
            "UPDATE history_messages SET held = 1, held_cursor = coalesce(held_cursor, ?), "
            "held_since_ms = coalesce(held_since_ms, ?) WHERE msg_key = ? AND log_position IS NULL",
            (inbox_cursor, self.now_ms(), msg_key),
        )

    def held(self) -> list[tuple[bytes, str, int, int, int]]:
        """``(msg_key, sender_device, pair_seq, held_cursor, held_since_ms)`` per held message, by sender and seq."""
        return [
            (r[0], r[1], r[2], r[3], r[4])
            for r in self.db.execute(
                "SELECT msg_key, sender_device, pair_seq, held_cursor, held_since_ms FROM history_messages "
                "WHERE held = 1 ORDER BY sender_device, pair_seq"
            ).fetchall()
        ]

    def has_predecessors(self, sender_device: str, pair_seq: int) -> bool:
        """Whether messages 1 … pair_seq-1 of the sender are all here and not held."""
        row = self.db.execute(
            "SELECT count(DISTINCT pair_seq) FROM history_messages WHERE sender_device = ? AND pair_seq >= 1 "
            "AND pair_seq < ? AND held = 0",
            (sender_device, pair_seq),
        ).fetchone()
        return int(row[0]) == pair_seq - 1

    def release(self, msg_key: bytes, *, late: bool) -> None:
        self.db.execute("UPDATE history_messages SET held = 0, late = ? WHERE msg_key = ?", (int(late), msg_key))

    def iter_rows(self, sql: str, params: tuple[Any, ...] = ()) -> Iterator[Any]:
        yield from self.db.execute(sql, params).fetchall()


def encode_plaintext(plaintext: log.LogPlaintext) -> bytes:
    return msgspec.msgpack.encode(plaintext)


def decode_plaintext(data: bytes) -> log.LogPlaintext:
    return codec.decode(data, log.LogPlaintext)


__all__ = [
    "ClientStore",
    "EpochInfo",
    "HistoryMessage",
    "OutboxEntry",
    "PendingRecord",
    "decode_plaintext",
    "default_dek",
    "encode_plaintext",
]
