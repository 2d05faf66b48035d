"""Inboxes: sending, reading, acknowledging and expiring envelopes (schema: migrations/0008_compact_inbox.sql).

A send reads the recipients' ``devices`` rows (locked, sorted, on
PostgreSQL, so batches never deadlock each other and writers to one inbox
commit in cursor order) and the sender's idempotency rows, asks
:func:`relay.store.inbox_rules.plan_send`, and writes the plan with a
constant number of statements: the bulk inserts are the hot path of the relay.

Rows name devices by ``devices.device_no`` (a small integer) rather than the
32-character device id: the inbox and idempotency rows and their indexes are
the relay's storage per envelope (docs/performance.md, P8). Lookups by device
id translate with a scalar subquery, which both engines evaluate once.

Idempotency in the compact schema (migration 0009, from the schema floor
:data:`~relay.store.inbox_rules.COMPACT_SCHEMA` on): a key claimed by an
envelope stored in a local inbox is a pointer ``idempotency_refs (key_hash →
recipient_no, seq)`` to that inbox row, which holds the original result. An
acknowledgement does not delete the row but leaves a tombstone: the
recipient number negated (no read, acknowledgement or quota sees it again),
the ciphertext replaced by its :func:`~relay.store.inbox_rules.content_digest`.
The key is remembered until the envelope expires (the envelope TTL); expiry
deletes rows and tombstones alike, then the pointers left dangling. Keys of
envelopes for other relays (the outbox) keep the 0008 row
``idempotency_keys``, read in both schemas. Below the floor (PostgreSQL while
replicas of the previous version may share the database,
docs/decisions/0009-compact-idempotency.md) sends write the 0008 rows and
acknowledgements delete, exactly as the previous version does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import count as count_from
from itertools import starmap
from operator import itemgetter
from typing import Any

from protocol.errors import TetherlessError

from ..base import InboxRecord, NewEnvelope, ReceivedEnvelope, StoredEnvelope
from ..engine import INBOX_CHANNEL, Engine, clamp
from ..inbox_rules import (
    FORGET_BUCKET_MS,
    EarlierSend,
    InboxGrowth,
    Recipient,
    content_digest,
    forget_bucket,
    forgettable_buckets,
    key_hashes,
    plan_send,
    stored_digest,
)
from .accounts import lock_devices

ENVELOPE_COLUMNS = (
    ("recipient_no", "bigint"),
    ("envelope_id", "bytea"),
    ("sent_at_ms", "bigint"),
    ("expires_at_ms", "bigint"),
    ("ciphertext", "bytea"),
)
_OUTBOX_COLUMNS = (
    ("peer", "text"),
    ("envelope_id", "bytea"),
    ("recipient", "text"),
    ("sent_at_ms", "bigint"),
    ("expires_at_ms", "bigint"),
    ("ciphertext", "bytea"),
)
_IDEMPOTENCY_COLUMNS = (
    ("key_hash", "bytea"),
    ("envelope_id", "bytea"),
    ("digest", "bytea"),
    ("sent_at_ms", "bigint"),
    ("forget_hour", "bigint"),
)
_REF_COLUMNS = (("key_hash", "bytea"), ("recipient_no", "bigint"), ("seq", "bigint"))
_DEVICE_NO = "(SELECT device_no FROM devices WHERE device_id = ?)"
# The inbox row a pointer names, live (recipient_no) or a tombstone (-recipient_no).
_POINTED_ROW = "i.seq = r.seq AND i.recipient_no IN (r.recipient_no, -r.recipient_no)"


class QueueCounts:
    """Each inbox's ``queued`` count (device_no -> envelopes queued) where one writer keeps it in memory
    instead of in ``devices.queued``: SQLite's writer thread, which writes every row of the file.

    Updating 100 ``devices`` rows per batch of 100 cost ~4 µs per envelope and dirtied the ``devices`` pages
    in every commit (docs/performance.md, P2). A count is loaded from the inbox itself (``count(*)`` of the
    device's live rows: what ``queued`` counts, expired rows included until the sweep deletes them) the first
    time a send or a delivery needs it, then kept: at start nothing is known, so a restart or a crash
    recomputes; a clean stop writes the counts back to the column (:meth:`save`). PostgreSQL keeps the
    column: replicas cannot share one memory.

    The counts follow the writer's transactions: every count an operation loads or changes is forgotten
    when the operation rolls back (its savepoint) or its transaction does not commit, so it is loaded
    again from what the database holds. Every count is forgotten when another connection has committed to
    the file since the writer's last transaction (:meth:`begin`: SQLite's ``PRAGMA data_version``; a
    second store opened on the same file, or a command run beside the relay). A revoked device's count
    is not lowered when its rows become tombstones (``sql/devices.py``), which is harmless: a send to a
    revoked device is refused before its quota is looked at. Only the writer thread uses an instance.
    """

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._op: set[int] = set()  # changed by the running operation
        self._transaction: set[int] = set()  # changed by the operations done in the running transaction
        self._data_version: int | None = None

    def begin(self, data_version: int) -> None:
        """A transaction starts, holding the write lock; ``data_version`` changes with every commit another
        connection made to the file: then the counts may be wrong, and are loaded again."""
        if data_version != self._data_version:
            self._counts.clear()
            self._data_version = data_version

    def known(self, device_nos: Iterable[int]) -> dict[int, int]:
        """The counts held for ``device_nos`` (the others must be loaded)."""
        counts = self._counts
        return {no: counts[no] for no in device_nos if no in counts}

    def put(self, device_no: int, queued: int) -> None:
        self._counts[device_no] = queued
        self._op.add(device_no)

    def put_all(self, queued: Mapping[int, int]) -> None:
        """:meth:`put` each count of ``queued`` (device_no -> count)."""
        self._counts.update(queued)
        self._op.update(queued)

    def lower(self, device_no: int, removed: int) -> None:
        """``removed`` envelopes left the inbox (never below zero; an unknown count stays unknown)."""
        if device_no in self._counts:
            self.put(device_no, max(0, self._counts[device_no] - removed))

    def operation_done(self) -> None:
        self._transaction |= self._op
        self._op.clear()

    def operation_failed(self) -> None:
        self._forget(self._op)

    def committed(self) -> None:
        self.operation_done()
        self._transaction.clear()

    def rolled_back(self) -> None:
        self.operation_done()
        self._forget(self._transaction)

    def _forget(self, device_nos: set[int]) -> None:
        for no in device_nos:
            self._counts.pop(no, None)
        device_nos.clear()

    def save(self, conn: Any) -> None:
        """Write the counts held into ``devices.queued`` in one transaction (when the writer stops cleanly), so
        the column is right for what reads it with the relay stopped: a previous version of the relay, or
        a copy (which counts again anyway). Revoked devices keep the 0 their revocation wrote."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.cursor().executemany(
                "UPDATE devices SET queued = ? WHERE device_no = ? AND revoked_at_ms IS NULL",
                [(queued, no) for no, queued in sorted(self._counts.items())],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def queue_counts(conn: Any) -> QueueCounts | None:
    """The counts the connection's writer keeps in memory, or None: ``devices.queued`` holds them."""
    counts: QueueCounts | None = getattr(conn, "queue_counts", None)
    return counts


def read_recipients(conn: Any, e: Engine, device_ids: Iterable[str]) -> dict[str, Recipient]:
    """The devices' rows, locked until commit where the engine locks rows (in device id order)."""
    rows = lock_devices(conn, e, device_ids, f"account_id, revoked_at_ms, queued, {e.inbox_counter or 0}, device_no")
    counts = queue_counts(conn)
    if counts is None:
        return {device: Recipient(row[0], row[1] is not None, row[2], row[3], row[4]) for device, row in rows.items()}
    queued = counts.known(row[4] for row in rows.values())
    missing = [row[4] for row in rows.values() if row[4] not in queued]
    if missing:
        loaded = dict.fromkeys(missing, 0)
        loaded.update(
            e.fetch_in(
                conn,
                "SELECT recipient_no, count(*) FROM inbox WHERE {one_of} GROUP BY recipient_no",
                (),
                "recipient_no",
                missing,
                "bigint",
            )
        )
        for no, count in loaded.items():
            counts.put(no, count)
        queued.update(loaded)
    return {
        device: Recipient(row[0], row[1] is not None, queued[row[4]], row[3], row[4]) for device, row in rows.items()
    }


def device_numbers(conn: Any, e: Engine, device_ids: Iterable[str]) -> dict[str, int]:
    """device id -> ``devices.device_no`` for the known ones among ``device_ids``."""
    rows = e.fetch_in(
        conn,
        "SELECT device_id, device_no FROM devices WHERE {one_of}",
        (),
        "device_id",
        sorted(set(device_ids)),
        "text",
    )
    return {row[0]: row[1] for row in rows}


def insert_envelopes(
    conn: Any,
    e: Engine,
    envelopes: Sequence[tuple[int, NewEnvelope | ReceivedEnvelope]],
    now_ms: int,
    numbers: Mapping[str, int] | None = None,
) -> list[tuple[int, int]]:
    """Insert (cursor, envelope) pairs into their recipients' inboxes in list order, so cursors follow it, and
    return each one's (recipient_no, seq). Where the engine assigns cursors (SQLite: one sequence, one writer)
    the given cursors are ignored and the next values of the sequence taken. ``numbers``: the recipients'
    ``device_no`` when the caller read them (else they are read here); every recipient must be a device."""
    if not envelopes:
        return []
    if numbers is None:
        numbers = device_numbers(conn, e, (env.recipient_device for _, env in envelopes))
    if e.inbox_counter is None:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'inbox'").fetchone()
        cursors: Iterable[int] = count_from((row[0] if row else 0) + 1)
    else:
        cursors = map(itemgetter(0), envelopes)
    rows = [
        (seq, numbers[env.recipient_device], env.envelope_id, now_ms, env.expires_at_ms, env.ciphertext)
        for seq, (_, env) in zip(cursors, envelopes, strict=False)
    ]
    e.insert_many(conn, "inbox", (("seq", "bigint"), *ENVELOPE_COLUMNS), rows)
    if e.expiry_buckets:
        _note_expiry_buckets(conn, rows)
    return [(row[1], row[0]) for row in rows]


def _note_expiry_buckets(conn: Any, rows: Sequence[Sequence[Any]]) -> None:
    """SQLite: widen each expiry hour's cursor range to the new rows (seq, …, expires_at_ms at index 4)."""
    # Cursors grow along ``rows``: an hour's range runs from its first row to its last.
    hours = {forget_bucket(expiry) for expiry in set(map(itemgetter(4), rows))}
    if len(hours) == 1:  # a batch sent with one TTL, the usual case: no Python per row
        ranges = {hours.pop(): (rows[0][0], rows[-1][0])}
    else:
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for row in rows:
            hour, seq = forget_bucket(row[4]), row[0]
            first.setdefault(hour, seq)
            last[hour] = seq
        ranges = {hour: (first[hour], last[hour]) for hour in first}
    conn.cursor().executemany(
        "INSERT INTO inbox_expiry_buckets (expiry_hour, first_seq, last_seq) VALUES (?, ?, ?)"
        " ON CONFLICT (expiry_hour) DO UPDATE SET first_seq = min(first_seq, excluded.first_seq),"
        " last_seq = max(last_seq, excluded.last_seq)",
        [(hour, low, high) for hour, (low, high) in sorted(ranges.items())],
    )


def grow_inboxes(conn: Any, e: Engine, inboxes: Mapping[str, InboxGrowth]) -> None:
    """Store the inboxes' new ``queued`` counts (and cursor counters) and wake their readers on commit."""
    counts = queue_counts(conn)
    if counts is not None:
        # The counts are kept in memory: no rows to update, so no lock order to keep.
        counts.put_all({inbox.device_no: inbox.queued for inbox in inboxes.values() if inbox.added})
        e.notify(conn, INBOX_CHANNEL, [device for device, inbox in inboxes.items() if inbox.added])
        return
    grown = sorted(device for device, inbox in inboxes.items() if inbox.added)
    if e.inbox_counter is None:
        e.update_many(
            conn, "devices", ("device_id", "text"), (("queued", "int"),), [(d, inboxes[d].queued) for d in grown]
        )
    else:
        e.update_many(
            conn,
            "devices",
            ("device_id", "text"),
            (("queued", "int"), (e.inbox_counter, "bigint")),
            [(d, inboxes[d].queued, inboxes[d].last_seq) for d in grown],
        )
    e.notify(conn, INBOX_CHANNEL, grown)


def read_earlier(conn: Any, e: Engine, keys: Mapping[bytes, bytes]) -> tuple[dict[bytes, EarlierSend], list[bytes]]:
    """What earlier sends stored for ``keys`` (key hash -> idempotency key), by idempotency key, and the
    hashes of pointers whose inbox row is gone (expired since the last sweep: the key is forgotten)."""
    hashes = list(keys)
    # 0008 rows hold only the keys of envelopes for other relays (and, below the compact floor, every key):
    # without federation the table is empty, and probing for one row costs less than looking up every key
    # (docs/performance.md, P2). An empty table gives no rows either way: a row committed concurrently after
    # the probe is the race a row committed after the lookup already was.
    rows = (
        e.fetch_in(
            conn,
            "SELECT key_hash, envelope_id, digest, sent_at_ms FROM idempotency_keys WHERE {one_of}",
            (),
            "key_hash",
            hashes,
            "bytea",
        )
        if not _no_keys_apart(conn)
        else []
    )
    earlier = {keys[bytes(row[0])]: EarlierSend(bytes(row[1]), bytes(row[2]), row[3]) for row in rows}
    dangling: list[bytes] = []
    pointed = e.fetch_in(
        conn,
        "SELECT r.key_hash, i.recipient_no, i.envelope_id, i.sent_at_ms, i.ciphertext"
        f" FROM idempotency_refs AS r LEFT JOIN inbox AS i ON {_POINTED_ROW} WHERE {{one_of}}",
        (),
        "r.key_hash",
        hashes,
        "bytea",
    )
    for hashed, recipient_no, envelope_id, sent_at_ms, ciphertext in pointed:
        if recipient_no is None:
            dangling.append(bytes(hashed))
            continue
        # A live row's digest is computed from its ciphertext; a tombstone's ciphertext is its digest.
        digest = content_digest(bytes(ciphertext)) if recipient_no > 0 else bytes(ciphertext)
        earlier[keys[bytes(hashed)]] = EarlierSend(bytes(envelope_id), digest, sent_at_ms, abs(recipient_no))
    return earlier, dangling


def store_envelopes(
    conn: Any,
    e: Engine,
    *,
    sender_device: str,
    envelopes: Sequence[NewEnvelope],
    now_ms: int,
    max_inbox: int,
    forget_at_ms: int,
    compact: bool,
) -> list[StoredEnvelope]:
    """See ``Store.store_envelopes``; ``compact``: the database is at the compact schema floor (module
    docstring). Raises ``RetryTransaction`` when a concurrent send (another replica) claimed one of the keys
    after they were read: the retry answers it as a duplicate."""
    if not envelopes:
        return []
    recipients = read_recipients(conn, e, (env.recipient_device for env in envelopes if not env.remote_relay))
    # Each key is hashed once per send: the lookups take hash -> key, the writes key -> hash.
    hashed = key_hashes(sender_device, [env.idempotency_key for env in envelopes])
    if compact and not any(env.remote_relay for env in envelopes) and _no_keys_apart(conn):
        results = _store_fresh(conn, e, envelopes, recipients, hashed, now_ms, max_inbox)
        if results is not None:
            return results
    earlier, dangling = read_earlier(conn, e, {h: key for key, h in hashed.items()})
    plan = plan_send(envelopes, recipients, earlier, now_ms, max_inbox)
    if dangling:
        e.execute_in(conn, "DELETE FROM idempotency_refs WHERE {one_of}", (), "key_hash", dangling, "bytea")
    placed = insert_envelopes(conn, e, plan.local, now_ms, {device: r.device_no for device, r in recipients.items()})
    where = {env.envelope_id: place for (_, env), place in zip(plan.local, placed, strict=True)}
    pointers = [env for env in plan.keys if compact and env.envelope_id in where]
    e.insert_new(
        conn,
        "idempotency_refs",
        _REF_COLUMNS,
        [(hashed[env.idempotency_key], *where[env.envelope_id]) for env in pointers],
        race="an idempotency key was claimed by a concurrent send",
    )
    bucket = forget_bucket(forget_at_ms)
    e.insert_new(
        conn,
        "idempotency_keys",
        _IDEMPOTENCY_COLUMNS,
        [
            (hashed[env.idempotency_key], env.envelope_id, stored_digest(env.idempotency_digest()), now_ms, bucket)
            for env in plan.keys
            if not (compact and env.envelope_id in where)
        ],
        race="an idempotency key was claimed by a concurrent send",
    )
    grow_inboxes(conn, e, plan.inboxes)
    insert_outbox(conn, e, plan.outbox, now_ms)
    return plan.results


def _no_keys_apart(conn: Any) -> bool:
    """Whether ``idempotency_keys`` (0008 rows: outbox keys, or keys from below the compact floor) is empty."""
    return conn.execute("SELECT 1 FROM idempotency_keys LIMIT 1").fetchone() is None


def _store_fresh(
    conn: Any,
    e: Engine,
    envelopes: Sequence[NewEnvelope],
    recipients: Mapping[str, Recipient],
    hashed: Mapping[bytes, bytes],
    now_ms: int,
    max_inbox: int,
) -> list[StoredEnvelope] | None:
    """The send of a batch whose keys are all new, written without reading the keys first; None (nothing
    written) when the batch is not that: the caller then reads the keys and plans again.

    Only for local envelopes in the compact schema with no 0008 row anywhere (``_no_keys_apart``), so a key
    used before can only be a pointer: the pointers are inserted with ``ON CONFLICT DO NOTHING`` after the
    inbox rows, and one that was not inserted (a retry, a reused key, a pointer whose row expired, or on
    PostgreSQL one committed concurrently) rolls the savepoint back. A plan that refuses the batch is not
    trusted either: a retry may name a recipient revoked since, or fill an inbox it was already counted in,
    and is answered as a duplicate, so the caller decides with the keys read. Retries and refusals cost one
    savepoint more than before; a fresh batch (the common case) saves the key lookup (docs/performance.md, P2).
    """
    try:
        plan = plan_send(envelopes, recipients, {}, now_ms, max_inbox)
    except TetherlessError:
        return None
    conn.execute("SAVEPOINT fresh_send")
    placed = insert_envelopes(conn, e, plan.local, now_ms, {device: r.device_no for device, r in recipients.items()})
    pointers = [(hashed[env.idempotency_key], *place) for (_, env), place in zip(plan.local, placed, strict=True)]
    if e.insert_many(conn, "idempotency_refs", _REF_COLUMNS, pointers, on_conflict="ON CONFLICT DO NOTHING") != len(
        pointers
    ):
        conn.execute("ROLLBACK TO fresh_send")
        conn.execute("RELEASE fresh_send")
        return None
    conn.execute("RELEASE fresh_send")
    grow_inboxes(conn, e, plan.inboxes)
    return plan.results


def insert_outbox(conn: Any, e: Engine, envelopes: Sequence[NewEnvelope], now_ms: int) -> None:
    """Queue envelopes for their relays, in order (inside the send's transaction, which claims their keys)."""
    e.insert_many(
        conn,
        "federation_outbox",
        _OUTBOX_COLUMNS,
        [
            (
                env.remote_relay,
                env.envelope_id,
                f"{env.recipient_device}.{env.recipient_account}@{env.remote_relay}",
                now_ms,
                env.expires_at_ms,
                env.ciphertext,
            )
            for env in envelopes
        ],
    )
    e.insert_many(
        conn,
        "federation_peers",
        (("peer", "text"),),
        [(peer,) for peer in sorted({env.remote_relay for env in envelopes})],
        on_conflict="ON CONFLICT DO NOTHING",
    )


def read_inbox(conn: Any, e: Engine, *, device_id: str, after: int, limit: int, now_ms: int) -> list[InboxRecord]:
    rows = conn.execute(
        e.q(
            "SELECT seq, envelope_id, sent_at_ms, expires_at_ms, ciphertext FROM inbox"
            f" WHERE recipient_no = {_DEVICE_NO} AND seq > ? AND expires_at_ms > ? ORDER BY seq LIMIT ?"
        ),
        (device_id, clamp(after), clamp(now_ms), max(0, clamp(limit))),
    ).fetchall()
    # Both drivers return BLOB/bytea as bytes, so the row tuples are the records' fields as they are: starmap
    # builds the records in C, with no Python code per row (the page read is P5's hot path).
    return list(starmap(InboxRecord, rows))


def _shrink(conn: Any, e: Engine, key: str, removed: Mapping[Any, int]) -> None:
    """Lower the devices' ``queued`` counts by what left their inboxes (never below zero); ``removed`` by
    ``key`` (``device_id`` or ``device_no``), updated in key order (one lock order on PostgreSQL). Where the
    writer keeps the counts (:class:`QueueCounts`), ``removed`` must be by ``device_no``."""
    counts = queue_counts(conn)
    if counts is not None:
        for device_no, n in removed.items():
            counts.lower(device_no, n)
        return
    conn.cursor().executemany(
        e.q(f"UPDATE devices SET queued = {e.greatest}(queued - ?, 0) WHERE {key} = ?"),
        [(n, device) for device, n in sorted(removed.items())],
    )


def acknowledge(
    conn: Any, e: Engine, *, device_id: str, up_to: int | None, envelope_ids: Sequence[bytes], compact: bool
) -> int:
    """See ``Store.acknowledge``; only ever touches ``device_id``'s own inbox. ``compact``: leave tombstones
    (module docstring) instead of deleting."""
    done = (
        f"UPDATE inbox SET recipient_no = -recipient_no, ciphertext = {e.content_digest}"
        if compact
        else "DELETE FROM inbox"
    )
    acknowledged = 0
    if up_to is not None:
        acknowledged += conn.execute(
            e.q(f"{done} WHERE recipient_no = {_DEVICE_NO} AND seq <= ?"), (device_id, clamp(up_to))
        ).rowcount
    acknowledged += e.execute_in(
        conn,
        f"{done} WHERE recipient_no = {_DEVICE_NO} AND {{one_of}}",
        (device_id,),
        "envelope_id",
        envelope_ids,
        "bytea",
    )
    if acknowledged and queue_counts(conn) is not None:
        device_no = conn.execute(e.q("SELECT device_no FROM devices WHERE device_id = ?"), (device_id,)).fetchone()
        _shrink(conn, e, "device_no", {device_no[0]: acknowledged})
    elif acknowledged:
        _shrink(conn, e, "device_id", {device_id: acknowledged})
    return acknowledged


def expire_inbox(conn: Any, e: Engine, now_ms: int) -> tuple[int, int]:
    """Delete expired envelopes and tombstones, and forgotten idempotency keys (0008 rows past their bucket,
    pointers whose row is gone); returns (envelopes, keys) deleted, tombstones not counted as envelopes."""
    gone: list[Any] = []
    # Dangling pointers cost a pass over idempotency_refs to find (they are keyed by hash): SQLite makes
    # it once per expiry hour that ended, so the writer thread is not held every sweep; a lookup treats a
    # dangling pointer as a forgotten key meanwhile. PostgreSQL (no buckets) makes it per sweep that
    # removed rows, on a pooled connection, not a single writer.
    sweep_pointers = False
    if e.expiry_buckets:
        # Every row of hour h lies in its bucket's cursor range; rows of other hours in it are kept by the
        # time condition. A bucket whose hour has ended is empty after its delete.
        for hour, first, last in conn.execute(
            "SELECT expiry_hour, first_seq, last_seq FROM inbox_expiry_buckets WHERE expiry_hour <= ?",
            (now_ms // FORGET_BUCKET_MS + 1,),
        ).fetchall():
            gone += conn.execute(
                "DELETE FROM inbox WHERE seq BETWEEN ? AND ? AND expires_at_ms <= ? RETURNING recipient_no",
                (first, last, now_ms),
            ).fetchall()
            if hour * FORGET_BUCKET_MS <= now_ms:
                conn.execute("DELETE FROM inbox_expiry_buckets WHERE expiry_hour = ?", (hour,))
                sweep_pointers = True
    else:
        gone = conn.execute(
            e.q("DELETE FROM inbox WHERE expires_at_ms <= ? RETURNING recipient_no"), (now_ms,)
        ).fetchall()
        sweep_pointers = bool(gone)
    per_device = Counter(row[0] for row in gone if row[0] > 0)
    if per_device:
        _shrink(conn, e, "device_no", per_device)
    keys: int = conn.execute(
        e.q("DELETE FROM idempotency_keys WHERE forget_hour <= ?"), (forgettable_buckets(now_ms),)
    ).rowcount
    if sweep_pointers:
        keys += conn.execute(
            f"DELETE FROM idempotency_refs AS r WHERE NOT EXISTS (SELECT 1 FROM inbox AS i WHERE {_POINTED_ROW})"
        ).rowcount
    return sum(per_device.values()), keys
