"""Federation: the outbox to other relays and envelopes received from them (schema: migrations/0002_federation.sql;
leases: 0007; failed rows: 0010).

Between replicas, correctness comes from the database: the (origin, envelope
id) and (origin, nonce) primary keys, and the recipients' ``devices`` rows
locked (sorted) while received envelopes take their cursors, like local sends.
Sending is spread by peer: a replica sends a peer's outbox only while it
holds that peer's lease (``federation_leases``), so two replicas do not send
the same rows; a killed holder's lease expires and another replica takes it.

An outbox row is queued (``failed_at_ms = 0``) or failed for good (``failed_at_ms > 0``, ``failure`` says why):
failed rows are never in a batch nor counted as queued, and stay for the operator until they expire.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..base import OutboxRecord, PeerState, ReceivedEnvelope, ReceivedOutcome
from ..engine import Engine, clamp
from ..inbox_rules import plan_received
from .inbox import grow_inboxes, insert_envelopes, read_recipients

_PEER_COLUMNS = (
    "failures",
    "next_attempt_at_ms",
    "last_attempt_at_ms",
    "last_success_at_ms",
    "last_error",
    "delivered",
)
_RECEIVED_COLUMNS = (("origin", "text"), ("envelope_id", "bytea"), ("forget_at_ms", "bigint"))


def _peer_state(peer: str, queued: int, row: Sequence[Any] | None, failed: int = 0) -> PeerState:
    if row is None:
        return PeerState(peer, queued, 0, 0, None, None, "", 0, failed)
    failures, next_at, last_attempt, last_success, last_error, delivered = row
    return PeerState(peer, queued, failures, next_at, last_attempt, last_success, last_error, delivered, failed)


def due_peers(conn: Any, e: Engine, *, now_ms: int) -> list[PeerState]:
    rows = conn.execute(
        e.q(
            f"SELECT o.peer, o.queued, {', '.join('p.' + c for c in _PEER_COLUMNS)}"
            " FROM (SELECT peer, count(*) AS queued FROM federation_outbox"
            " WHERE expires_at_ms > ? AND failed_at_ms = 0 GROUP BY peer) o"
            " LEFT JOIN federation_peers p ON p.peer = o.peer ORDER BY o.peer"
        ),
        (clamp(now_ms),),
    ).fetchall()
    return [_peer_state(row[0], row[1], None if row[2] is None else row[2:]) for row in rows]


def outbox_batch(conn: Any, e: Engine, *, peer: str, now_ms: int, limit: int) -> list[OutboxRecord]:
    rows = conn.execute(
        e.q(
            "SELECT seq, peer, envelope_id, recipient, sent_at_ms, expires_at_ms, ciphertext, attempts"
            " FROM federation_outbox WHERE peer = ? AND not_before_ms <= ? AND expires_at_ms > ? AND failed_at_ms = 0"
            " ORDER BY seq LIMIT ?"
        ),
        (peer, clamp(now_ms), clamp(now_ms), limit),
    ).fetchall()
    return [OutboxRecord(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], bytes(r[6]), r[7]) for r in rows]


def outbox_settle(
    conn: Any,
    e: Engine,
    *,
    peer: str,
    done: Sequence[int],
    deferred: Sequence[int],
    deferred_until_ms: int,
    now_ms: int,
) -> None:
    deleted = e.execute_in(
        conn, "DELETE FROM federation_outbox WHERE peer = ? AND {one_of}", (peer,), "seq", done, "bigint"
    )
    e.execute_in(
        conn,
        "UPDATE federation_outbox SET attempts = attempts + 1, not_before_ms = ? WHERE peer = ? AND {one_of}",
        (deferred_until_ms, peer),
        "seq",
        deferred,
        "bigint",
    )
    conn.execute(
        e.q(
            "INSERT INTO federation_peers (peer, last_attempt_at_ms, last_success_at_ms, delivered)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (peer) DO UPDATE SET failures = 0, next_attempt_at_ms = 0,"
            " last_attempt_at_ms = excluded.last_attempt_at_ms, last_success_at_ms = excluded.last_success_at_ms,"
            " last_error = '', delivered = federation_peers.delivered + excluded.delivered"
        ),
        (peer, now_ms, now_ms, deleted),
    )


def peer_failed(
    conn: Any, e: Engine, *, peer: str, error: str, failures: int, next_attempt_at_ms: int, now_ms: int
) -> None:
    conn.execute(
        e.q(
            "INSERT INTO federation_peers (peer, failures, next_attempt_at_ms, last_attempt_at_ms, last_error)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (peer) DO UPDATE SET failures = excluded.failures,"
            " next_attempt_at_ms = excluded.next_attempt_at_ms, last_attempt_at_ms = excluded.last_attempt_at_ms,"
            " last_error = excluded.last_error"
        ),
        (peer, failures, next_attempt_at_ms, now_ms, error[:500]),
    )


def outbox_fail(conn: Any, e: Engine, *, peer: str, seqs: Sequence[int], reason: str, now_ms: int) -> None:
    """See ``Store.federation_outbox_fail``: the rows end failed, the peer's backoff is reset (nothing waits)."""
    e.execute_in(
        conn,
        "UPDATE federation_outbox SET failed_at_ms = ?, failure = ?, attempts = attempts + 1"
        " WHERE peer = ? AND failed_at_ms = 0 AND {one_of}",
        (max(now_ms, 1), reason[:500], peer),
        "seq",
        seqs,
        "bigint",
    )
    conn.execute(
        e.q(
            "INSERT INTO federation_peers (peer, last_attempt_at_ms, last_error) VALUES (?, ?, ?)"
            " ON CONFLICT (peer) DO UPDATE SET failures = 0, next_attempt_at_ms = 0,"
            " last_attempt_at_ms = excluded.last_attempt_at_ms, last_error = excluded.last_error"
        ),
        (peer, now_ms, reason[:500]),
    )


def peer_states(conn: Any, e: Engine) -> list[PeerState]:
    counts: dict[str, tuple[int, int]] = {
        peer: (queued, failed)
        for peer, queued, failed in conn.execute(
            "SELECT peer, sum(CASE WHEN failed_at_ms = 0 THEN 1 ELSE 0 END),"
            " sum(CASE WHEN failed_at_ms = 0 THEN 0 ELSE 1 END) FROM federation_outbox GROUP BY peer"
        ).fetchall()
    }
    rows = {row[0]: row[1:] for row in conn.execute(f"SELECT peer, {', '.join(_PEER_COLUMNS)} FROM federation_peers")}
    return [
        _peer_state(peer, int(counts.get(peer, (0, 0))[0]), rows.get(peer), int(counts.get(peer, (0, 0))[1]))
        for peer in sorted(set(counts) | set(rows))
    ]


def retry_now(conn: Any, e: Engine, *, peer: str | None) -> int:
    params: tuple[str, ...] = ()
    outbox = peers = ""  # every peer
    if peer is not None:
        outbox, peers, params = " AND peer = ?", " WHERE peer = ?", (peer,)
    # Failed rows too: the operator retries after fixing what failed them (a DNS name registered, a peer's policy).
    conn.execute(
        e.q(
            "UPDATE federation_outbox SET not_before_ms = 0, failed_at_ms = 0, failure = ''"
            " WHERE (not_before_ms > 0 OR failed_at_ms > 0)" + outbox
        ),
        params,
    )
    affected: int = conn.execute(e.q("UPDATE federation_peers SET next_attempt_at_ms = 0" + peers), params).rowcount
    return affected


def take_lease(conn: Any, e: Engine, *, peer: str, holder: str, now_ms: int, lease_ms: int) -> bool:
    """See ``Store.federation_take_lease``. The upsert's condition is checked on the row as locked by the
    conflict, so of two replicas racing for one lease the second sees the first's holder and gets nothing."""
    taken: int = conn.execute(
        e.q(
            "INSERT INTO federation_leases (peer, holder, expires_at_ms) VALUES (?, ?, ?)"
            " ON CONFLICT (peer) DO UPDATE SET holder = excluded.holder, expires_at_ms = excluded.expires_at_ms"
            " WHERE federation_leases.holder = excluded.holder OR federation_leases.expires_at_ms <= ?"
        ),
        (peer, holder, clamp(now_ms + lease_ms), clamp(now_ms)),
    ).rowcount
    return taken == 1


def release_leases(conn: Any, e: Engine, *, holder: str) -> None:
    conn.execute(e.q("DELETE FROM federation_leases WHERE holder = ?"), (holder,))


def remember_nonce(conn: Any, e: Engine, *, origin: str, nonce: str, forget_at_ms: int) -> bool:
    inserted: int = conn.execute(
        e.q("INSERT INTO federation_nonces (origin, nonce, forget_at_ms) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"),
        (origin, nonce, clamp(forget_at_ms)),
    ).rowcount
    return inserted == 1


def store_received(
    conn: Any,
    e: Engine,
    *,
    origin: str,
    envelopes: Sequence[ReceivedEnvelope],
    now_ms: int,
    max_inbox: int,
    forget_at_ms: int,
) -> list[tuple[ReceivedOutcome, str]]:
    """See ``Store.federation_store_received``; decided by :func:`relay.store.inbox_rules.plan_received`.

    Raises ``RetryTransaction`` when a concurrent delivery (another
    replica) stored one of the ids after they were read.
    """
    recipients = read_recipients(conn, e, (env.recipient_device for env in envelopes))
    ids = list(dict.fromkeys(env.origin_envelope_id for env in envelopes))
    rows = e.fetch_in(
        conn,
        "SELECT envelope_id FROM federation_received WHERE origin = ? AND {one_of}",
        (origin,),
        "envelope_id",
        ids,
        "bytea",
    )
    seen = {bytes(row[0]) for row in rows}
    plan = plan_received(envelopes, recipients, seen, max_inbox)
    forget = clamp(forget_at_ms)
    e.insert_new(
        conn,
        "federation_received",
        _RECEIVED_COLUMNS,
        [(origin, env.origin_envelope_id, max(forget, env.expires_at_ms)) for _, env in plan.stored],
        race="an envelope was received concurrently",
    )
    insert_envelopes(conn, e, plan.stored, now_ms)
    grow_inboxes(conn, e, plan.inboxes)
    return plan.results


def expire_federation(conn: Any, e: Engine, now_ms: int) -> int:
    """Delete expired outbox envelopes, forgotten dedup ids and nonces; returns how many rows."""
    removed: int = conn.execute(e.q("DELETE FROM federation_outbox WHERE expires_at_ms <= ?"), (now_ms,)).rowcount
    removed += conn.execute(e.q("DELETE FROM federation_received WHERE forget_at_ms <= ?"), (now_ms,)).rowcount
    removed += conn.execute(e.q("DELETE FROM federation_nonces WHERE forget_at_ms <= ?"), (now_ms,)).rowcount
    return removed
