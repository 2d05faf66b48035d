"""Prekeys and enrolment offers (schema: migrations/0005_prekeys_enrolment.sql; rules in ``prekey_rules``).

An upload and a claim hold the target devices' rows (locked, sorted, on
PostgreSQL; SQLite's one writer serialises them anyway), so two claims of
one device never serve a one-time key twice and the per-pair limit counts
exactly, and concurrent uploads cannot both pass the key-id check. An offer
is inserted with ``ON CONFLICT DO NOTHING``; a proposal is attached under the
enrolment row's lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..base import (
    PREKEY_LAST_RESORT,
    PREKEY_MLKEM_ONE_TIME,
    PREKEY_SIGNED,
    PREKEY_X25519_ONE_TIME,
    ClaimedBundle,
    EnrolmentRecord,
    PrekeyState,
    StoredPrekey,
)
from ..engine import Engine, clamp
from ..prekey_rules import REPLACED_KINDS, check_key_id, check_one_time_counts, check_proposal, enrolment_used
from .accounts import lock_devices

_PREKEY_COLUMNS = "kind, key_id, public_key, created_at_ms, signature"
_ENROLMENT_COLUMNS = "lookup_id, offer, created_at_ms, expires_at_ms, proposal, proposer_device"


def _prekey(row: Sequence[Any]) -> StoredPrekey:
    return StoredPrekey(row[0], row[1], bytes(row[2]), row[3], bytes(row[4]))


def _lock_devices(conn: Any, e: Engine, device_ids: Sequence[str]) -> dict[str, tuple[str, bytes, int | None]]:
    """The devices' rows, locked (sorted) where the engine locks rows: device -> (account, box key, revoked at)."""
    rows = lock_devices(conn, e, device_ids, "account_id, box_key, revoked_at_ms")
    return {device: (row[0], bytes(row[1]), row[2]) for device, row in rows.items()}


# -- prekeys ----------------------------------------------------------------------------------------


def put_prekeys(
    conn: Any, e: Engine, *, device_id: str, prekeys: Sequence[StoredPrekey], max_one_time: int
) -> PrekeyState:
    """See ``Store.put_prekeys``."""
    _lock_devices(conn, e, [device_id])
    highest = dict(
        conn.execute(e.q("SELECT kind, max_key_id FROM prekey_ids WHERE device_id = ?"), (device_id,)).fetchall()
    )
    for key in prekeys:
        row = conn.execute(
            e.q(f"SELECT {_PREKEY_COLUMNS} FROM prekeys WHERE device_id = ? AND kind = ? AND key_id = ?"),
            (device_id, key.kind, key.key_id),
        ).fetchone()
        if not check_key_id(key, highest.get(key.kind), _prekey(row) if row else None):
            continue
        if key.kind in REPLACED_KINDS:
            conn.execute(e.q("DELETE FROM prekeys WHERE device_id = ? AND kind = ?"), (device_id, key.kind))
        conn.execute(
            e.q(f"INSERT INTO prekeys (device_id, {_PREKEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"),
            (device_id, key.kind, key.key_id, key.public_key, key.created_at_ms, key.signature),
        )
        highest[key.kind] = key.key_id
        conn.execute(
            e.q(
                "INSERT INTO prekey_ids (device_id, kind, max_key_id) VALUES (?, ?, ?)"
                " ON CONFLICT (device_id, kind) DO UPDATE SET max_key_id = excluded.max_key_id"
            ),
            (device_id, key.kind, key.key_id),
        )
    state = prekey_state(conn, e, device_id=device_id)
    check_one_time_counts(state, max_one_time)
    return state


def prekey_state(conn: Any, e: Engine, *, device_id: str) -> PrekeyState:
    rows = conn.execute(
        e.q("SELECT kind, count(*), max(key_id) FROM prekeys WHERE device_id = ? GROUP BY kind"), (device_id,)
    ).fetchall()
    by_kind = {row[0]: (row[1], row[2]) for row in rows}
    return PrekeyState(
        by_kind.get(PREKEY_X25519_ONE_TIME, (0, None))[0],
        by_kind.get(PREKEY_MLKEM_ONE_TIME, (0, None))[0],
        by_kind.get(PREKEY_SIGNED, (0, None))[1],
        by_kind.get(PREKEY_LAST_RESORT, (0, None))[1],
    )


def _first(conn: Any, e: Engine, device_id: str, kind: str) -> StoredPrekey | None:
    row = conn.execute(
        e.q(f"SELECT {_PREKEY_COLUMNS} FROM prekeys WHERE device_id = ? AND kind = ? ORDER BY key_id LIMIT 1"),
        (device_id, kind),
    ).fetchone()
    return _prekey(row) if row else None


def _take_one_time(
    conn: Any, e: Engine, claimer: str, device_id: str, kind: str, now_ms: int, limit: int, window_ms: int
) -> StoredPrekey | None:
    """The lowest-id one-time key of ``kind``, deleted, unless ``claimer`` reached its limit (device row held)."""
    served = conn.execute(
        e.q(
            "SELECT count(*) FROM prekey_claims"
            " WHERE claimer_account = ? AND device_id = ? AND kind = ? AND claimed_at_ms > ?"
        ),
        (claimer, device_id, kind, now_ms - window_ms),
    ).fetchone()[0]
    if served >= limit:
        return None
    key = _first(conn, e, device_id, kind)
    if key is None:
        return None
    conn.execute(
        e.q("DELETE FROM prekeys WHERE device_id = ? AND kind = ? AND key_id = ?"), (device_id, kind, key.key_id)
    )
    conn.execute(
        e.q(
            "INSERT INTO prekey_claims (claimer_account, device_id, kind, claimed_at_ms, forget_at_ms)"
            " VALUES (?, ?, ?, ?, ?)"
        ),
        (claimer, device_id, kind, now_ms, now_ms + window_ms),
    )
    return key


def claim_prekeys(
    conn: Any,
    e: Engine,
    *,
    claimer_account: str,
    targets: Sequence[tuple[str, str]],
    now_ms: int,
    one_time_limit: int,
    window_ms: int,
) -> list[ClaimedBundle | None]:
    """See ``Store.claim_prekeys``."""
    now_ms = clamp(now_ms)
    devices = _lock_devices(conn, e, [device_id for _, device_id in targets])
    bundles: list[ClaimedBundle | None] = []
    for account_id, device_id in targets:
        device = devices.get(device_id)
        usable = device is not None and device[0] == account_id and device[2] is None
        signed = _first(conn, e, device_id, PREKEY_SIGNED) if usable else None
        if device is None or signed is None:
            bundles.append(None)
            continue
        pq = _take_one_time(
            conn, e, claimer_account, device_id, PREKEY_MLKEM_ONE_TIME, now_ms, one_time_limit, window_ms
        )
        pq = pq or _first(conn, e, device_id, PREKEY_LAST_RESORT)
        if pq is None:
            bundles.append(None)
            continue
        one_time = _take_one_time(
            conn, e, claimer_account, device_id, PREKEY_X25519_ONE_TIME, now_ms, one_time_limit, window_ms
        )
        bundles.append(ClaimedBundle(device_id, device[0], device[1], signed, pq, one_time))
    return bundles


def delete_device_prekeys(conn: Any, e: Engine, *, device_id: str) -> int:
    """Delete every prekey of ``device_id``; callable inside any write transaction (revocation)."""
    deleted: int = conn.execute(e.q("DELETE FROM prekeys WHERE device_id = ?"), (device_id,)).rowcount
    conn.execute(e.q("DELETE FROM prekey_ids WHERE device_id = ?"), (device_id,))
    return deleted


# -- enrolments -------------------------------------------------------------------------------------


def _enrolment(row: Sequence[Any]) -> EnrolmentRecord:
    proposal = bytes(row[4]) if row[4] is not None else None
    return EnrolmentRecord(bytes(row[0]), bytes(row[1]), row[2], row[3], proposal, row[5])


def create_enrolment(
    conn: Any,
    e: Engine,
    *,
    lookup_id: bytes,
    offer: bytes,
    created_at_ms: int,
    expires_at_ms: int,
    forget_at_ms: int,
) -> None:
    inserted = conn.execute(
        e.q(
            "INSERT INTO enrolments (lookup_id, offer, created_at_ms, expires_at_ms, forget_at_ms)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (lookup_id) DO NOTHING"
        ),
        (lookup_id, offer, created_at_ms, clamp(expires_at_ms), clamp(forget_at_ms)),
    ).rowcount
    if not inserted:
        raise enrolment_used()


def get_enrolment(conn: Any, e: Engine, *, lookup_id: bytes, lock: bool = False) -> EnrolmentRecord | None:
    row = conn.execute(
        e.q(f"SELECT {_ENROLMENT_COLUMNS} FROM enrolments WHERE lookup_id = ?" + (e.lock_rows if lock else "")),
        (lookup_id,),
    ).fetchone()
    return _enrolment(row) if row else None


def put_enrolment_proposal(
    conn: Any, e: Engine, *, lookup_id: bytes, proposal: bytes, proposer_device: str, now_ms: int
) -> EnrolmentRecord:
    """See ``Store.put_enrolment_proposal``."""
    now_ms = clamp(now_ms)
    record = get_enrolment(conn, e, lookup_id=lookup_id, lock=True)
    check_proposal(record, proposal, proposer_device, now_ms)
    assert record is not None
    if record.proposal is None:
        conn.execute(
            e.q("UPDATE enrolments SET proposal = ?, proposer_device = ?, proposed_at_ms = ? WHERE lookup_id = ?"),
            (proposal, proposer_device, now_ms, lookup_id),
        )
    return EnrolmentRecord(
        record.lookup_id, record.offer, record.created_at_ms, record.expires_at_ms, proposal, proposer_device
    )


def expire_prekeys_and_enrolments(conn: Any, e: Engine, now_ms: int) -> int:
    """Forget old claim records and enrolment rows; returns offers forgotten that never got a proposal."""
    conn.execute(e.q("DELETE FROM prekey_claims WHERE forget_at_ms <= ?"), (now_ms,))
    unanswered: int = conn.execute(
        e.q("DELETE FROM enrolments WHERE forget_at_ms <= ? AND proposal IS NULL"), (now_ms,)
    ).rowcount
    conn.execute(e.q("DELETE FROM enrolments WHERE forget_at_ms <= ?"), (now_ms,))
    return unanswered
