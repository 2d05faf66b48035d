"""The SQL of federation for :class:`relay.store.sqlite.SQLiteStore` (schema: migrations/0002_federation.sql).

Plain functions over a connection: the store runs readers on a reader
connection and writers inside the group-commit writer's transaction (each
in its own SAVEPOINT), exactly like its other operations.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from .base import NewEnvelope, OutboxRecord, PeerState, ReceivedEnvelope, ReceivedOutcome

_PEER_COLUMNS = "failures, next_attempt_at_ms, last_attempt_at_ms, last_success_at_ms, last_error, delivered"
_CHUNK = 500


def insert_outbox(
    conn: sqlite3.Connection, sender_device: str, env: NewEnvelope, now_ms: int, forget_at_ms: int
) -> None:
    """Queue ``env`` for its relay and remember its idempotency key (inside store_envelopes' transaction)."""
    recipient = f"{env.recipient_device}.{env.recipient_account}@{env.remote_relay}"
    conn.execute(
        "INSERT INTO federation_outbox (peer, envelope_id, recipient, sent_at_ms, expires_at_ms, ciphertext)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (env.remote_relay, env.envelope_id, recipient, now_ms, env.expires_at_ms, env.ciphertext),
    )
    conn.execute(
        "INSERT INTO idempotency (sender, idem_key, envelope_id, digest, sent_at_ms, forget_at_ms)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (sender_device, env.idempotency_key, env.envelope_id, env.digest, now_ms, forget_at_ms),
    )
    conn.execute("INSERT OR IGNORE INTO federation_peers (peer) VALUES (?)", (env.remote_relay,))


def _peer_state(peer: str, queued: int, row: Sequence[Any] | None) -> PeerState:
    if row is None:
        return PeerState(peer, queued, 0, 0, None, None, "", 0)
    failures, next_at, last_attempt, last_success, last_error, delivered = row
    return PeerState(peer, queued, failures, next_at, last_attempt, last_success, last_error, delivered)


def due_peers(conn: sqlite3.Connection, *, now_ms: int) -> list[PeerState]:
    rows = conn.execute(
        f"SELECT o.peer, o.queued, {', '.join('p.' + c.strip() for c in _PEER_COLUMNS.split(','))}"
        " FROM (SELECT peer, count(*) AS queued FROM federation_outbox WHERE expires_at_ms > ? GROUP BY peer) o"
        " LEFT JOIN federation_peers p ON p.peer = o.peer ORDER BY o.peer",
        (now_ms,),
    ).fetchall()
    return [_peer_state(row[0], row[1], None if row[2] is None else row[2:]) for row in rows]


def outbox_batch(conn: sqlite3.Connection, *, peer: str, now_ms: int, limit: int) -> list[OutboxRecord]:
    rows = conn.execute(
        "SELECT seq, peer, envelope_id, recipient, sent_at_ms, expires_at_ms, ciphertext, attempts"
        " FROM federation_outbox WHERE peer = ? AND not_before_ms <= ? AND expires_at_ms > ? ORDER BY seq LIMIT ?",
        (peer, now_ms, now_ms, limit),
    ).fetchall()
    return [OutboxRecord(*row) for row in rows]


def outbox_settle(
    conn: sqlite3.Connection,
    *,
    peer: str,
    done: Sequence[int],
    deferred: Sequence[int],
    deferred_until_ms: int,
    now_ms: int,
) -> None:
    deleted = 0
    for start in range(0, len(done), _CHUNK):
        chunk = list(done[start : start + _CHUNK])
        marks = ",".join("?" * len(chunk))
        deleted += conn.execute(
            f"DELETE FROM federation_outbox WHERE peer = ? AND seq IN ({marks})", (peer, *chunk)
        ).rowcount
    for start in range(0, len(deferred), _CHUNK):
        chunk = list(deferred[start : start + _CHUNK])
        marks = ",".join("?" * len(chunk))
        conn.execute(
            f"UPDATE federation_outbox SET attempts = attempts + 1, not_before_ms = ?"
            f" WHERE peer = ? AND seq IN ({marks})",
            (deferred_until_ms, peer, *chunk),
        )
    conn.execute("INSERT OR IGNORE INTO federation_peers (peer) VALUES (?)", (peer,))
    conn.execute(
        "UPDATE federation_peers SET failures = 0, next_attempt_at_ms = 0, last_attempt_at_ms = ?,"
        " last_success_at_ms = ?, last_error = '', delivered = delivered + ? WHERE peer = ?",
        (now_ms, now_ms, deleted, peer),
    )


def peer_failed(
    conn: sqlite3.Connection, *, peer: str, error: str, failures: int, next_attempt_at_ms: int, now_ms: int
) -> None:
    conn.execute("INSERT OR IGNORE INTO federation_peers (peer) VALUES (?)", (peer,))
    conn.execute(
        "UPDATE federation_peers SET failures = ?, next_attempt_at_ms = ?, last_attempt_at_ms = ?, last_error = ?"
        " WHERE peer = ?",
        (failures, next_attempt_at_ms, now_ms, error[:500], peer),
    )


def peer_states(conn: sqlite3.Connection) -> list[PeerState]:
    queued = dict(conn.execute("SELECT peer, count(*) FROM federation_outbox GROUP BY peer").fetchall())
    rows = {row[0]: row[1:] for row in conn.execute(f"SELECT peer, {_PEER_COLUMNS} FROM federation_peers")}
    return [_peer_state(peer, queued.get(peer, 0), rows.get(peer)) for peer in sorted(set(queued) | set(rows))]


def retry_now(conn: sqlite3.Connection, *, peer: str | None) -> int:
    if peer is None:
        conn.execute("UPDATE federation_outbox SET not_before_ms = 0 WHERE not_before_ms > 0")
        return conn.execute("UPDATE federation_peers SET next_attempt_at_ms = 0").rowcount
    conn.execute("UPDATE federation_outbox SET not_before_ms = 0 WHERE peer = ? AND not_before_ms > 0", (peer,))
    return conn.execute("UPDATE federation_peers SET next_attempt_at_ms = 0 WHERE peer = ?", (peer,)).rowcount


def remember_nonce(conn: sqlite3.Connection, *, origin: str, nonce: str, forget_at_ms: int) -> bool:
    cur = conn.execute(
        "INSERT OR IGNORE INTO federation_nonces (origin, nonce, forget_at_ms) VALUES (?, ?, ?)",
        (origin, nonce, forget_at_ms),
    )
    return cur.rowcount == 1


def store_received(
    conn: sqlite3.Connection,
    *,
    origin: str,
    envelopes: Sequence[ReceivedEnvelope],
    now_ms: int,
    max_inbox: int,
    forget_at_ms: int,
) -> list[tuple[ReceivedOutcome, str]]:
    results: list[tuple[ReceivedOutcome, str]] = []
    # device -> queued count as this batch changes it (or the outcome refusing every envelope to it)
    queued: dict[str, int | ReceivedOutcome] = {}
    added: dict[str, int] = {}
    for env in envelopes:
        seen = conn.execute(
            "SELECT 1 FROM federation_received WHERE origin = ? AND envelope_id = ?", (origin, env.origin_envelope_id)
        ).fetchone()
        if seen:
            results.append((ReceivedOutcome.DUPLICATE, env.recipient_device))
            continue
        if env.recipient_device not in queued:
            dev = conn.execute(
                "SELECT account_id, revoked_at_ms, queued FROM devices WHERE device_id = ?", (env.recipient_device,)
            ).fetchone()
            if dev is None or dev[0] != env.recipient_account:
                queued[env.recipient_device] = ReceivedOutcome.UNKNOWN_RECIPIENT
            else:
                queued[env.recipient_device] = ReceivedOutcome.RECIPIENT_REVOKED if dev[1] is not None else dev[2]
        count = queued[env.recipient_device]
        if isinstance(count, ReceivedOutcome):
            results.append((count, env.recipient_device))
            continue
        if count >= max_inbox:
            results.append((ReceivedOutcome.INBOX_FULL, env.recipient_device))
            continue
        queued[env.recipient_device] = count + 1
        added[env.recipient_device] = added.get(env.recipient_device, 0) + 1
        conn.execute(
            "INSERT INTO envelopes (recipient, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
            " VALUES (?, ?, ?, ?, ?)",
            (env.recipient_device, env.envelope_id, now_ms, env.expires_at_ms, env.ciphertext),
        )
        conn.execute(
            "INSERT INTO federation_received (origin, envelope_id, forget_at_ms) VALUES (?, ?, ?)",
            (origin, env.origin_envelope_id, max(forget_at_ms, env.expires_at_ms)),
        )
        results.append((ReceivedOutcome.STORED, env.recipient_device))
    conn.executemany("UPDATE devices SET queued = queued + ? WHERE device_id = ?", [(n, d) for d, n in added.items()])
    return results


def expire_federation(conn: sqlite3.Connection, now_ms: int) -> int:
    """Delete expired outbox envelopes, forgotten dedup ids and nonces; returns how many rows."""
    removed = conn.execute("DELETE FROM federation_outbox WHERE expires_at_ms <= ?", (now_ms,)).rowcount
    removed += conn.execute("DELETE FROM federation_received WHERE forget_at_ms <= ?", (now_ms,)).rowcount
    removed += conn.execute("DELETE FROM federation_nonces WHERE forget_at_ms <= ?", (now_ms,)).rowcount
    return removed
