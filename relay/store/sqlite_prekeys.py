"""The SQL of prekeys and enrolments for :class:`relay.store.sqlite.SQLiteStore`
(schema: migrations/0005_prekeys_enrolment.sql).

Plain functions over a connection, like ``sqlite_federation.py``: readers run
on a reader connection, writers inside the group-commit writer's transaction
(each in its own SAVEPOINT, so an error rolls back that operation alone).
The one writer serialises claims, so no key is ever served twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from .base import (
    PREKEY_LAST_RESORT,
    PREKEY_MLKEM_ONE_TIME,
    PREKEY_SIGNED,
    PREKEY_X25519_ONE_TIME,
    ClaimedBundle,
    EnrolmentRecord,
    PrekeyState,
    StoredPrekey,
)
from .prekey_rules import (
    ONE_TIME_KINDS,
    REPLACED_KINDS,
    check_key_id,
    check_one_time_counts,
    check_proposal,
    enrolment_used,
)

_PREKEY_COLUMNS = "kind, key_id, public_key, created_at_ms, signature"


# -- prekeys ----------------------------------------------------------------------------------------


def put_prekeys(
    conn: sqlite3.Connection, *, device_id: str, prekeys: Sequence[StoredPrekey], max_one_time: int
) -> PrekeyState:
    for key in prekeys:
        row = conn.execute(
            "SELECT max_key_id FROM prekey_ids WHERE device_id = ? AND kind = ?", (device_id, key.kind)
        ).fetchone()
        stored = conn.execute(
            f"SELECT {_PREKEY_COLUMNS} FROM prekeys WHERE device_id = ? AND kind = ? AND key_id = ?",
            (device_id, key.kind, key.key_id),
        ).fetchone()
        if not check_key_id(key, row[0] if row else None, StoredPrekey(*stored) if stored else None):
            continue
        if key.kind in REPLACED_KINDS:
            conn.execute("DELETE FROM prekeys WHERE device_id = ? AND kind = ?", (device_id, key.kind))
        conn.execute(
            f"INSERT INTO prekeys (device_id, {_PREKEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
            (device_id, key.kind, key.key_id, key.public_key, key.created_at_ms, key.signature),
        )
        conn.execute(
            "INSERT INTO prekey_ids (device_id, kind, max_key_id) VALUES (?, ?, ?)"
            " ON CONFLICT (device_id, kind) DO UPDATE SET max_key_id = excluded.max_key_id",
            (device_id, key.kind, key.key_id),
        )
    state = prekey_state(conn, device_id=device_id)
    check_one_time_counts(state, max_one_time)
    return state


def prekey_state(conn: sqlite3.Connection, *, device_id: str) -> PrekeyState:
    counts = dict(
        conn.execute(
            "SELECT kind, count(*) FROM prekeys WHERE device_id = ? AND kind IN (?, ?) GROUP BY kind",
            (device_id, *ONE_TIME_KINDS),
        ).fetchall()
    )
    current = dict(
        conn.execute(
            "SELECT kind, max(key_id) FROM prekeys WHERE device_id = ? AND kind IN (?, ?) GROUP BY kind",
            (device_id, *REPLACED_KINDS),
        ).fetchall()
    )
    return PrekeyState(
        counts.get(PREKEY_X25519_ONE_TIME, 0),
        counts.get(PREKEY_MLKEM_ONE_TIME, 0),
        current.get(PREKEY_SIGNED),
        current.get(PREKEY_LAST_RESORT),
    )


def _first(conn: sqlite3.Connection, device_id: str, kind: str) -> StoredPrekey | None:
    row = conn.execute(
        f"SELECT {_PREKEY_COLUMNS} FROM prekeys WHERE device_id = ? AND kind = ? ORDER BY key_id LIMIT 1",
        (device_id, kind),
    ).fetchone()
    return StoredPrekey(*row) if row else None


def _take_one_time(
    conn: sqlite3.Connection, claimer: str, device_id: str, kind: str, now_ms: int, limit: int, window_ms: int
) -> StoredPrekey | None:
    served = conn.execute(
        "SELECT count(*) FROM prekey_claims"
        " WHERE claimer_account = ? AND device_id = ? AND kind = ? AND claimed_at_ms > ?",
        (claimer, device_id, kind, now_ms - window_ms),
    ).fetchone()[0]
    if served >= limit:
        return None
    key = _first(conn, device_id, kind)
    if key is None:
        return None
    conn.execute("DELETE FROM prekeys WHERE device_id = ? AND kind = ? AND key_id = ?", (device_id, kind, key.key_id))
    conn.execute(
        "INSERT INTO prekey_claims (claimer_account, device_id, kind, claimed_at_ms, forget_at_ms)"
        " VALUES (?, ?, ?, ?, ?)",
        (claimer, device_id, kind, now_ms, now_ms + window_ms),
    )
    return key


def claim_prekeys(
    conn: sqlite3.Connection,
    *,
    claimer_account: str,
    targets: Sequence[tuple[str, str]],
    now_ms: int,
    one_time_limit: int,
    window_ms: int,
) -> list[ClaimedBundle | None]:
    bundles: list[ClaimedBundle | None] = []
    for account_id, device_id in targets:
        device = conn.execute(
            "SELECT account_id, box_key, revoked_at_ms FROM devices WHERE device_id = ?", (device_id,)
        ).fetchone()
        usable = device is not None and device[0] == account_id and device[2] is None
        signed = _first(conn, device_id, PREKEY_SIGNED) if usable else None
        last_resort = _first(conn, device_id, PREKEY_LAST_RESORT) if signed is not None else None
        if device is None or signed is None:
            bundles.append(None)
            continue
        pq = _take_one_time(conn, claimer_account, device_id, PREKEY_MLKEM_ONE_TIME, now_ms, one_time_limit, window_ms)
        pq = pq or last_resort
        if pq is None:
            bundles.append(None)
            continue
        one_time = _take_one_time(
            conn, claimer_account, device_id, PREKEY_X25519_ONE_TIME, now_ms, one_time_limit, window_ms
        )
        bundles.append(ClaimedBundle(device_id, device[0], device[1], signed, pq, one_time))
    return bundles


def delete_device_prekeys(conn: sqlite3.Connection, device_id: str) -> int:
    """Delete every prekey of ``device_id``; callable inside any write transaction (revocation)."""
    deleted = conn.execute("DELETE FROM prekeys WHERE device_id = ?", (device_id,)).rowcount
    conn.execute("DELETE FROM prekey_ids WHERE device_id = ?", (device_id,))
    return deleted


# -- enrolments -------------------------------------------------------------------------------------

_ENROLMENT_COLUMNS = "lookup_id, offer, created_at_ms, expires_at_ms, proposal, proposer_device"


def create_enrolment(
    conn: sqlite3.Connection,
    *,
    lookup_id: bytes,
    offer: bytes,
    created_at_ms: int,
    expires_at_ms: int,
    forget_at_ms: int,
) -> None:
    inserted = conn.execute(
        "INSERT INTO enrolments (lookup_id, offer, created_at_ms, expires_at_ms, forget_at_ms)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (lookup_id) DO NOTHING",
        (lookup_id, offer, created_at_ms, expires_at_ms, forget_at_ms),
    ).rowcount
    if not inserted:
        raise enrolment_used()


def get_enrolment(conn: sqlite3.Connection, *, lookup_id: bytes) -> EnrolmentRecord | None:
    row = conn.execute(f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments WHERE lookup_id = ?", (lookup_id,)).fetchone()
    return EnrolmentRecord(*row) if row else None


def put_enrolment_proposal(
    conn: sqlite3.Connection, *, lookup_id: bytes, proposal: bytes, proposer_device: str, now_ms: int
) -> EnrolmentRecord:
    record = get_enrolment(conn, lookup_id=lookup_id)
    check_proposal(record, proposal, proposer_device, now_ms)
    assert record is not None
    if record.proposal is None:
        conn.execute(
            "UPDATE enrolments SET proposal = ?, proposer_device = ?, proposed_at_ms = ? WHERE lookup_id = ?",
            (proposal, proposer_device, now_ms, lookup_id),
        )
    return EnrolmentRecord(
        record.lookup_id, record.offer, record.created_at_ms, record.expires_at_ms, proposal, proposer_device
    )


def expire_prekeys_and_enrolments(conn: sqlite3.Connection, now_ms: int) -> int:
    """Forget old claim records and enrolment rows; returns offers forgotten that never got a proposal."""
    conn.execute("DELETE FROM prekey_claims WHERE forget_at_ms <= ?", (now_ms,))
    unanswered = conn.execute("DELETE FROM enrolments WHERE forget_at_ms <= ? AND proposal IS NULL", (now_ms,)).rowcount
    conn.execute("DELETE FROM enrolments WHERE forget_at_ms <= ?", (now_ms,))
    return unanswered
