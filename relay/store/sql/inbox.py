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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..base import InboxRecord, NewEnvelope, ReceivedEnvelope, StoredEnvelope
from ..engine import INBOX_CHANNEL, Engine, clamp
from ..inbox_rules import (
    EarlierSend,
    InboxGrowth,
    Recipient,
    forget_bucket,
    forgettable_buckets,
    key_hash,
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
_DEVICE_NO = "(SELECT device_no FROM devices WHERE device_id = ?)"


def read_recipients(conn: Any, e: Engine, device_ids: Iterable[str]) -> dict[str, Recipient]:
    """The devices' rows, locked until commit where the engine locks rows (in device id order)."""
    rows = lock_devices(conn, e, device_ids, f"account_id, revoked_at_ms, queued, {e.inbox_counter or 0}, device_no")
    return {device: Recipient(row[0], row[1] is not None, row[2], row[3], row[4]) for device, row in rows.items()}


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
) -> None:
    """Insert (cursor, envelope) pairs into their recipients' inboxes in list order, so cursors follow it; the
    cursor is written only where the engine takes cursors from ``devices``. ``numbers``: the recipients'
    ``device_no`` when the caller read them (else they are read here); every recipient must be a device."""
    if numbers is None:
        numbers = device_numbers(conn, e, (env.recipient_device for _, env in envelopes))
    rows = [
        (seq, numbers[env.recipient_device], env.envelope_id, now_ms, env.expires_at_ms, env.ciphertext)
        for seq, env in envelopes
    ]
    if e.inbox_counter is None:
        e.insert_many(conn, "inbox", ENVELOPE_COLUMNS, [row[1:] for row in rows])
    else:
        e.insert_many(conn, "inbox", (("seq", "bigint"), *ENVELOPE_COLUMNS), rows)


def grow_inboxes(conn: Any, e: Engine, inboxes: Mapping[str, InboxGrowth]) -> None:
    """Store the inboxes' new ``queued`` counts (and cursor counters) and wake their readers on commit."""
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


def store_envelopes(
    conn: Any,
    e: Engine,
    *,
    sender_device: str,
    envelopes: Sequence[NewEnvelope],
    now_ms: int,
    max_inbox: int,
    forget_at_ms: int,
) -> list[StoredEnvelope]:
    """See ``Store.store_envelopes``. Raises ``RetryTransaction`` when a concurrent send (another
    replica) claimed one of the keys after they were read: the retry answers it as a duplicate."""
    if not envelopes:
        return []
    recipients = read_recipients(conn, e, (env.recipient_device for env in envelopes if not env.remote_relay))
    keys = {key_hash(sender_device, env.idempotency_key): env.idempotency_key for env in envelopes}
    rows = e.fetch_in(
        conn,
        "SELECT key_hash, envelope_id, digest, sent_at_ms FROM idempotency_keys WHERE {one_of}",
        (),
        "key_hash",
        list(keys),
        "bytea",
    )
    earlier = {keys[bytes(row[0])]: EarlierSend(bytes(row[1]), bytes(row[2]), row[3]) for row in rows}
    plan = plan_send(envelopes, recipients, earlier, now_ms, max_inbox)
    bucket = forget_bucket(forget_at_ms)
    e.insert_new(
        conn,
        "idempotency_keys",
        _IDEMPOTENCY_COLUMNS,
        [
            (key_hash(sender_device, env.idempotency_key), env.envelope_id, stored_digest(env.digest), now_ms, bucket)
            for env in plan.keys
        ],
        race="an idempotency key was claimed by a concurrent send",
    )
    insert_envelopes(conn, e, plan.local, now_ms, {device: r.device_no for device, r in recipients.items()})
    grow_inboxes(conn, e, plan.inboxes)
    insert_outbox(conn, e, plan.outbox, now_ms)
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
    return [InboxRecord(row[0], bytes(row[1]), row[2], row[3], bytes(row[4])) for row in rows]


def _shrink(conn: Any, e: Engine, key: str, counts: Mapping[Any, int]) -> None:
    """Lower the devices' ``queued`` counts by what was deleted (never below zero); ``counts`` by ``key``
    (``device_id`` or ``device_no``), updated in key order (one lock order on PostgreSQL)."""
    conn.cursor().executemany(
        e.q(f"UPDATE devices SET queued = {e.greatest}(queued - ?, 0) WHERE {key} = ?"),
        [(n, device) for device, n in sorted(counts.items())],
    )


def acknowledge(conn: Any, e: Engine, *, device_id: str, up_to: int | None, envelope_ids: Sequence[bytes]) -> int:
    """See ``Store.acknowledge``; only ever deletes from ``device_id``'s own inbox."""
    deleted = 0
    if up_to is not None:
        deleted += conn.execute(
            e.q(f"DELETE FROM inbox WHERE recipient_no = {_DEVICE_NO} AND seq <= ?"), (device_id, clamp(up_to))
        ).rowcount
    deleted += e.execute_in(
        conn,
        f"DELETE FROM inbox WHERE recipient_no = {_DEVICE_NO} AND {{one_of}}",
        (device_id,),
        "envelope_id",
        envelope_ids,
        "bytea",
    )
    if deleted:
        _shrink(conn, e, "device_id", {device_id: deleted})
    return deleted


def expire_inbox(conn: Any, e: Engine, now_ms: int) -> tuple[int, int]:
    """Delete expired envelopes and forgotten idempotency keys; returns how many of each."""
    gone = conn.execute(e.q("DELETE FROM inbox WHERE expires_at_ms <= ? RETURNING recipient_no"), (now_ms,)).fetchall()
    per_device = Counter(row[0] for row in gone)
    if per_device:
        _shrink(conn, e, "device_no", per_device)
    keys: int = conn.execute(
        e.q("DELETE FROM idempotency_keys WHERE forget_hour <= ?"), (forgettable_buckets(now_ms),)
    ).rowcount
    return len(gone), keys
