"""The SQL of federation for :class:`relay.store.postgres.PostgresStore` (schema: migrations/postgres/0002).

Plain functions over a connection, run by the store inside its one
transaction per call. Correctness between replicas comes from the
database: (origin, envelope id) and (origin, nonce) primary keys with
``ON CONFLICT DO NOTHING``, and recipients' ``devices`` rows locked (sorted)
while federated envelopes take their cursors, like local sends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from .base import NewEnvelope, OutboxRecord, PeerState, ReceivedEnvelope, ReceivedOutcome

Conn = psycopg.Connection[Any]
_PEER_COLUMNS = "failures, next_attempt_at_ms, last_attempt_at_ms, last_success_at_ms, last_error, delivered"


def insert_outbox(conn: Conn, envelopes: Sequence[NewEnvelope], now_ms: int) -> None:
    """Queue envelopes for their relays (inside store_envelopes' transaction; idempotency rows are claimed there)."""
    if not envelopes:
        return
    conn.execute(
        "INSERT INTO federation_outbox (peer, envelope_id, recipient, sent_at_ms, expires_at_ms, ciphertext)"
        " SELECT p, e, r, %s, x, c FROM unnest(%s::text[], %s::bytea[], %s::text[], %s::bigint[], %s::bytea[])"
        " AS t(p, e, r, x, c)",
        (
            now_ms,
            [env.remote_relay for env in envelopes],
            [env.envelope_id for env in envelopes],
            [f"{env.recipient_device}.{env.recipient_account}@{env.remote_relay}" for env in envelopes],
            [env.expires_at_ms for env in envelopes],
            [env.ciphertext for env in envelopes],
        ),
    )
    conn.execute(
        "INSERT INTO federation_peers (peer) SELECT DISTINCT unnest(%s::text[]) ON CONFLICT DO NOTHING",
        (sorted({env.remote_relay for env in envelopes}),),
    )


def _peer_state(peer: str, queued: int, row: Sequence[Any] | None) -> PeerState:
    if row is None:
        return PeerState(peer, queued, 0, 0, None, None, "", 0)
    failures, next_at, last_attempt, last_success, last_error, delivered = row
    return PeerState(peer, queued, failures, next_at, last_attempt, last_success, last_error, delivered)


def due_peers(conn: Conn, now_ms: int) -> list[PeerState]:
    rows = conn.execute(
        f"SELECT o.peer, o.queued, {', '.join('p.' + c.strip() for c in _PEER_COLUMNS.split(','))}"
        " FROM (SELECT peer, count(*) AS queued FROM federation_outbox WHERE expires_at_ms > %s GROUP BY peer) o"
        " LEFT JOIN federation_peers p ON p.peer = o.peer ORDER BY o.peer",
        (now_ms,),
    ).fetchall()
    return [_peer_state(row[0], row[1], None if row[2] is None else row[2:]) for row in rows]


def outbox_batch(conn: Conn, peer: str, now_ms: int, limit: int) -> list[OutboxRecord]:
    rows = conn.execute(
        "SELECT seq, peer, envelope_id, recipient, sent_at_ms, expires_at_ms, ciphertext, attempts"
        " FROM federation_outbox WHERE peer = %s AND not_before_ms <= %s AND expires_at_ms > %s"
        " ORDER BY seq LIMIT %s",
        (peer, now_ms, now_ms, limit),
    ).fetchall()
    return [OutboxRecord(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], bytes(r[6]), r[7]) for r in rows]


def outbox_settle(
    conn: Conn, peer: str, done: Sequence[int], deferred: Sequence[int], deferred_until_ms: int, now_ms: int
) -> None:
    deleted = conn.execute(
        "DELETE FROM federation_outbox WHERE peer = %s AND seq = ANY(%s::bigint[])", (peer, list(done))
    ).rowcount
    conn.execute(
        "UPDATE federation_outbox SET attempts = attempts + 1, not_before_ms = %s"
        " WHERE peer = %s AND seq = ANY(%s::bigint[])",
        (deferred_until_ms, peer, list(deferred)),
    )
    conn.execute(
        "INSERT INTO federation_peers (peer, last_attempt_at_ms, last_success_at_ms, delivered)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT (peer) DO UPDATE SET failures = 0, next_attempt_at_ms = 0,"
        " last_attempt_at_ms = EXCLUDED.last_attempt_at_ms, last_success_at_ms = EXCLUDED.last_success_at_ms,"
        " last_error = '', delivered = federation_peers.delivered + EXCLUDED.delivered",
        (peer, now_ms, now_ms, deleted),
    )


def peer_failed(conn: Conn, peer: str, error: str, failures: int, next_attempt_at_ms: int, now_ms: int) -> None:
    conn.execute(
        "INSERT INTO federation_peers (peer, failures, next_attempt_at_ms, last_attempt_at_ms, last_error)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (peer) DO UPDATE SET failures = EXCLUDED.failures,"
        " next_attempt_at_ms = EXCLUDED.next_attempt_at_ms, last_attempt_at_ms = EXCLUDED.last_attempt_at_ms,"
        " last_error = EXCLUDED.last_error",
        (peer, failures, next_attempt_at_ms, now_ms, error[:500]),
    )


def peer_states(conn: Conn) -> list[PeerState]:
    queued = dict(conn.execute("SELECT peer, count(*) FROM federation_outbox GROUP BY peer").fetchall())
    rows = {row[0]: row[1:] for row in conn.execute(f"SELECT peer, {_PEER_COLUMNS} FROM federation_peers")}
    return [_peer_state(peer, queued.get(peer, 0), rows.get(peer)) for peer in sorted(set(queued) | set(rows))]


def retry_now(conn: Conn, peer: str | None) -> int:
    conn.execute(
        "UPDATE federation_outbox SET not_before_ms = 0 WHERE not_before_ms > 0 AND (%s::text IS NULL OR peer = %s)",
        (peer, peer),
    )
    return conn.execute(
        "UPDATE federation_peers SET next_attempt_at_ms = 0 WHERE %s::text IS NULL OR peer = %s", (peer, peer)
    ).rowcount


def remember_nonce(conn: Conn, origin: str, nonce: str, forget_at_ms: int) -> bool:
    row = conn.execute(
        "INSERT INTO federation_nonces (origin, nonce, forget_at_ms) VALUES (%s, %s, %s)"
        " ON CONFLICT DO NOTHING RETURNING 1",
        (origin, nonce, forget_at_ms),
    ).fetchone()
    return row is not None


def store_received(
    conn: Conn,
    origin: str,
    envelopes: Sequence[ReceivedEnvelope],
    now_ms: int,
    max_inbox: int,
    forget_at_ms: int,
) -> tuple[list[tuple[ReceivedOutcome, str]], list[str]]:
    """The outcomes, and the devices whose inbox grew (to notify after commit; pg_notify is sent here)."""
    recipients = sorted({env.recipient_device for env in envelopes})
    locked = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT device_id, account_id, revoked_at_ms, queued, last_seq FROM devices"
            " WHERE device_id = ANY(%s::text[]) ORDER BY device_id FOR UPDATE",
            (recipients,),
        )
    }
    results: list[tuple[ReceivedOutcome, str]] = []
    counters: dict[str, list[int]] = {}
    fresh: list[tuple[int, ReceivedEnvelope]] = []
    for env in envelopes:
        dev = locked.get(env.recipient_device)
        if dev is None or dev[0] != env.recipient_account:
            results.append((ReceivedOutcome.UNKNOWN_RECIPIENT, env.recipient_device))
            continue
        if dev[1] is not None:
            results.append((ReceivedOutcome.RECIPIENT_REVOKED, env.recipient_device))
            continue
        counter = counters.setdefault(env.recipient_device, [dev[2], dev[3]])
        if counter[0] >= max_inbox:
            results.append((ReceivedOutcome.INBOX_FULL, env.recipient_device))
            continue
        claimed = conn.execute(
            "INSERT INTO federation_received (origin, envelope_id, forget_at_ms) VALUES (%s, %s, %s)"
            " ON CONFLICT DO NOTHING RETURNING 1",
            (origin, env.origin_envelope_id, max(forget_at_ms, env.expires_at_ms)),
        ).fetchone()
        if claimed is None:
            results.append((ReceivedOutcome.DUPLICATE, env.recipient_device))
            continue
        counter[0] += 1
        counter[1] += 1
        fresh.append((counter[1], env))
        results.append((ReceivedOutcome.STORED, env.recipient_device))
    if fresh:
        conn.execute(
            "INSERT INTO envelopes (recipient, seq, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
            " SELECT r, s, e, %s, x, c FROM unnest("
            "%s::text[], %s::bigint[], %s::bytea[], %s::bigint[], %s::bytea[]) AS t(r, s, e, x, c)",
            (
                now_ms,
                [e.recipient_device for _, e in fresh],
                [s for s, _ in fresh],
                [e.envelope_id for _, e in fresh],
                [e.expires_at_ms for _, e in fresh],
                [e.ciphertext for _, e in fresh],
            ),
        )
    grown = sorted(d for d in counters if any(e.recipient_device == d for _, e in fresh))
    if grown:
        conn.execute(
            "UPDATE devices SET queued = t.q, last_seq = t.s"
            " FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS t(d, q, s) WHERE device_id = t.d",
            (grown, [counters[d][0] for d in grown], [counters[d][1] for d in grown]),
        )
    return results, grown


def expire_federation(conn: Conn, now_ms: int) -> int:
    removed = conn.execute("DELETE FROM federation_outbox WHERE expires_at_ms <= %s", (now_ms,)).rowcount
    removed += conn.execute("DELETE FROM federation_received WHERE forget_at_ms <= %s", (now_ms,)).rowcount
    removed += conn.execute("DELETE FROM federation_nonces WHERE forget_at_ms <= %s", (now_ms,)).rowcount
    return removed
