"""The SQL of prekeys and enrolments for :class:`relay.store.postgres.PostgresStore`
(schema: migrations/postgres/0005_prekeys_enrolment.sql).

Plain functions over a connection, run by the store inside its one
transaction per call. Between replicas, correctness comes from row locks:
an upload and a claim lock the target devices' ``devices`` rows (sorted, like
sends, so they never deadlock each other), so two claims of one device
serialise — a one-time key is served once, and the per-pair limit counts
exactly — and concurrent uploads cannot both pass the key-id check. An offer
is inserted with ``ON CONFLICT DO NOTHING`` and a proposal attached under
the enrolment row's lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

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
    REPLACED_KINDS,
    check_key_id,
    check_one_time_counts,
    check_proposal,
    enrolment_used,
)

Conn = psycopg.Connection[Any]
_PREKEY_COLUMNS = "kind, key_id, public_key, created_at_ms, signature"


def _prekey(row: Sequence[Any]) -> StoredPrekey:
    return StoredPrekey(row[0], row[1], bytes(row[2]), row[3], bytes(row[4]))


def _lock_devices(conn: Conn, device_ids: Sequence[str]) -> dict[str, tuple[str, bytes, int | None]]:
    """Lock the devices' rows (sorted); returns device -> (account, box key, revoked at)."""
    rows = conn.execute(
        "SELECT device_id, account_id, box_key, revoked_at_ms FROM devices"
        " WHERE device_id = ANY(%s::text[]) ORDER BY device_id FOR UPDATE",
        (sorted(set(device_ids)),),
    ).fetchall()
    return {row[0]: (row[1], bytes(row[2]), row[3]) for row in rows}


# -- prekeys ----------------------------------------------------------------------------------------


def put_prekeys(conn: Conn, device_id: str, prekeys: Sequence[StoredPrekey], max_one_time: int) -> PrekeyState:
    _lock_devices(conn, [device_id])
    highest = dict(
        conn.execute("SELECT kind, max_key_id FROM prekey_ids WHERE device_id = %s", (device_id,)).fetchall()
    )
    for key in prekeys:
        row = conn.execute(
            f"SELECT {_PREKEY_COLUMNS} FROM prekeys WHERE device_id = %s AND kind = %s AND key_id = %s",
            (device_id, key.kind, key.key_id),
        ).fetchone()
        if not check_key_id(key, highest.get(key.kind), _prekey(row) if row else None):
            continue
        if key.kind in REPLACED_KINDS:
            conn.execute("DELETE FROM prekeys WHERE device_id = %s AND kind = %s", (device_id, key.kind))
        conn.execute(
            f"INSERT INTO prekeys (device_id, {_PREKEY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)",
            (device_id, key.kind, key.key_id, key.public_key, key.created_at_ms, key.signature),
        )
        highest[key.kind] = key.key_id
        conn.execute(
            "INSERT INTO prekey_ids (device_id, kind, max_key_id) VALUES (%s, %s, %s)"
            " ON CONFLICT (device_id, kind) DO UPDATE SET max_key_id = excluded.max_key_id",
            (device_id, key.kind, key.key_id),
        )
    state = prekey_state(conn, device_id)
    check_one_time_counts(state, max_one_time)
    return state


def prekey_state(conn: Conn, device_id: str) -> PrekeyState:
    rows = conn.execute(
        "SELECT kind, count(*), max(key_id) FROM prekeys WHERE device_id = %s GROUP BY kind", (device_id,)
    ).fetchall()
    by_kind = {row[0]: (row[1], row[2]) for row in rows}
    return PrekeyState(
        by_kind.get(PREKEY_X25519_ONE_TIME, (0, None))[0],
        by_kind.get(PREKEY_MLKEM_ONE_TIME, (0, None))[0],
        by_kind.get(PREKEY_SIGNED, (0, None))[1],
        by_kind.get(PREKEY_LAST_RESORT, (0, None))[1],
    )


def _first(conn: Conn, device_id: str, kind: str) -> StoredPrekey | None:
    row = conn.execute(
        f"SELECT {_PREKEY_COLUMNS} FROM prekeys WHERE device_id = %s AND kind = %s ORDER BY key_id LIMIT 1",
        (device_id, kind),
    ).fetchone()
    return _prekey(row) if row else None


def _take_one_time(
    conn: Conn, claimer: str, device_id: str, kind: str, now_ms: int, limit: int, window_ms: int
) -> StoredPrekey | None:
    served = conn.execute(
        "SELECT count(*) FROM prekey_claims"
        " WHERE claimer_account = %s AND device_id = %s AND kind = %s AND claimed_at_ms > %s",
        (claimer, device_id, kind, now_ms - window_ms),
    ).fetchone()
    if served is None or served[0] >= limit:
        return None
    row = conn.execute(
        "DELETE FROM prekeys WHERE (device_id, kind, key_id) = ("
        " SELECT device_id, kind, key_id FROM prekeys WHERE device_id = %s AND kind = %s ORDER BY key_id LIMIT 1)"
        f" RETURNING {_PREKEY_COLUMNS}",
        (device_id, kind),
    ).fetchone()
    if row is None:
        return None
    conn.execute(
        "INSERT INTO prekey_claims (claimer_account, device_id, kind, claimed_at_ms, forget_at_ms)"
        " VALUES (%s, %s, %s, %s, %s)",
        (claimer, device_id, kind, now_ms, now_ms + window_ms),
    )
    return _prekey(row)


def claim_prekeys(
    conn: Conn,
    claimer_account: str,
    targets: Sequence[tuple[str, str]],
    now_ms: int,
    one_time_limit: int,
    window_ms: int,
) -> list[ClaimedBundle | None]:
    devices = _lock_devices(conn, [device_id for _, device_id in targets])
    bundles: list[ClaimedBundle | None] = []
    for account_id, device_id in targets:
        device = devices.get(device_id)
        usable = device is not None and device[0] == account_id and device[2] is None
        signed = _first(conn, device_id, PREKEY_SIGNED) if usable else None
        if device is None or signed is None:
            bundles.append(None)
            continue
        pq = _take_one_time(conn, claimer_account, device_id, PREKEY_MLKEM_ONE_TIME, now_ms, one_time_limit, window_ms)
        pq = pq or _first(conn, device_id, PREKEY_LAST_RESORT)
        if pq is None:
            bundles.append(None)
            continue
        one_time = _take_one_time(
            conn, claimer_account, device_id, PREKEY_X25519_ONE_TIME, now_ms, one_time_limit, window_ms
        )
        bundles.append(ClaimedBundle(device_id, device[0], device[1], signed, pq, one_time))
    return bundles


def delete_device_prekeys(conn: Conn, device_id: str) -> int:
    """Delete every prekey of ``device_id``; callable inside any transaction (revocation)."""
    deleted = conn.execute("DELETE FROM prekeys WHERE device_id = %s", (device_id,)).rowcount
    conn.execute("DELETE FROM prekey_ids WHERE device_id = %s", (device_id,))
    return deleted


# -- enrolments -------------------------------------------------------------------------------------

_ENROLMENT_COLUMNS = "lookup_id, offer, created_at_ms, expires_at_ms, proposal, proposer_device"


def _enrolment(row: Sequence[Any]) -> EnrolmentRecord:
    proposal = bytes(row[4]) if row[4] is not None else None
    return EnrolmentRecord(bytes(row[0]), bytes(row[1]), row[2], row[3], proposal, row[5])


def create_enrolment(
    conn: Conn, lookup_id: bytes, offer: bytes, created_at_ms: int, expires_at_ms: int, forget_at_ms: int
) -> None:
    inserted = conn.execute(
        "INSERT INTO enrolments (lookup_id, offer, created_at_ms, expires_at_ms, forget_at_ms)"
        " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (lookup_id) DO NOTHING RETURNING 1",
        (lookup_id, offer, created_at_ms, expires_at_ms, forget_at_ms),
    ).fetchone()
    if inserted is None:
        raise enrolment_used()


def get_enrolment(conn: Conn, lookup_id: bytes, *, lock: bool = False) -> EnrolmentRecord | None:
    row = conn.execute(
        f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments WHERE lookup_id = %s" + (" FOR UPDATE" if lock else ""),
        (lookup_id,),
    ).fetchone()
    return _enrolment(row) if row else None


def put_enrolment_proposal(
    conn: Conn, lookup_id: bytes, proposal: bytes, proposer_device: str, now_ms: int
) -> EnrolmentRecord:
    record = get_enrolment(conn, lookup_id, lock=True)
    check_proposal(record, proposal, proposer_device, now_ms)
    assert record is not None
    if record.proposal is None:
        conn.execute(
            "UPDATE enrolments SET proposal = %s, proposer_device = %s, proposed_at_ms = %s WHERE lookup_id = %s",
            (proposal, proposer_device, now_ms, lookup_id),
        )
    return EnrolmentRecord(
        record.lookup_id, record.offer, record.created_at_ms, record.expires_at_ms, proposal, proposer_device
    )


def expire_prekeys_and_enrolments(conn: Conn, now_ms: int) -> int:
    """Forget old claim records and enrolment rows; returns offers forgotten that never got a proposal."""
    conn.execute("DELETE FROM prekey_claims WHERE forget_at_ms <= %s", (now_ms,))
    rows = conn.execute(
        "DELETE FROM enrolments WHERE forget_at_ms <= %s RETURNING proposal IS NULL", (now_ms,)
    ).fetchall()
    return sum(1 for (unanswered,) in rows if unanswered)
