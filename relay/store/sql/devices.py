"""Device lists v2, revocation and WebAuthn (schema: migrations/0003_device_lists_v2.sql, 0004_webauthn.sql).

Concurrent appends to one account serialise on its ``accounts`` row
(:attr:`Engine.lock_rows` on PostgreSQL; SQLite's one writer): the second
sees the new head and gets ``device_list_conflict`` (the ``device_lists``
primary key backs this up), and WebAuthn counters are read and written under
the same lock, so they never go back.
"""

from __future__ import annotations

from typing import Any

from protocol.errors import ErrorCode, TetherlessError

from ..base import (
    ChallengeOutcome,
    DeviceListCommitted,
    DeviceListHead,
    DeviceListUpdate,
    DeviceStreamState,
    NewCredential,
    StoredCredential,
)
from ..device_rules import ACTIVE, PENDING, CredentialRow, check_append
from ..engine import INBOX_CHANNEL, Engine
from . import auth, log, prekeys


def device_list_head(conn: Any, e: Engine, *, account_id: str) -> DeviceListHead | None:
    if not e.storable(account_id):
        return None
    row = conn.execute(
        e.q(
            "SELECT d.version, d.signed FROM accounts a JOIN device_lists d"
            " ON d.account_id = a.account_id AND d.version = a.list_version WHERE a.account_id = ?"
        ),
        (account_id,),
    ).fetchone()
    if row is None:
        return None
    removed = conn.execute(
        e.q("SELECT device_id FROM devices WHERE account_id = ? AND revoked_at_ms IS NOT NULL"), (account_id,)
    ).fetchall()
    return DeviceListHead(row[0], bytes(row[1]), frozenset(r[0] for r in removed))


def revoke_device(conn: Any, e: Engine, device_id: str, version: int, now_ms: int) -> int:
    """Revocation effects on the relay (crypto.md §4) inside the caller's transaction; returns envelopes deleted."""
    conn.execute(
        e.q("UPDATE devices SET revoked_at_ms = ?, revoked_in_version = ?, queued = 0 WHERE device_id = ?"),
        (now_ms, version, device_id),
    )
    # Sessions are marked revoked rather than deleted so that a surviving token is
    # answered device_revoked, not invalid_token; the expiry sweep deletes them.
    auth.revoke_sessions(conn, e, device_id=device_id, token_hash=None, now_ms=now_ms)
    # Tombstones, as an acknowledgement leaves them (sql/inbox.py): the ciphertext is gone, and a retry of a
    # send to the device still answers its original result until the envelope's expiry. Invisible to the
    # previous version's reads too (rolling upgrades, docs/decisions/0009-compact-idempotency.md).
    deleted: int = conn.execute(
        e.q(
            f"UPDATE inbox SET recipient_no = -recipient_no, ciphertext = {e.content_digest}"
            " WHERE recipient_no = (SELECT device_no FROM devices WHERE device_id = ?)"
        ),
        (device_id,),
    ).rowcount
    conn.execute(e.q("DELETE FROM challenges WHERE device_id = ?"), (device_id,))
    conn.execute(e.q("DELETE FROM webauthn_registrations WHERE device_id = ?"), (device_id,))
    prekeys.delete_device_prekeys(conn, e, device_id=device_id)  # migration 0005
    return deleted


def append_device_list(conn: Any, e: Engine, *, update: DeviceListUpdate, now_ms: int) -> DeviceListCommitted:
    row = conn.execute(
        e.q("SELECT list_version FROM accounts WHERE account_id = ?" + e.lock_rows), (update.account_id,)
    ).fetchone()
    stored = {
        bytes(r[0]): CredentialRow(bytes(r[1]), r[2], r[3], r[4])
        for r in conn.execute(
            e.q(
                "SELECT credential_id, public_key, rp_id, sign_count, status FROM webauthn_credentials"
                " WHERE account_id = ?"
            ),
            (update.account_id,),
        )
    }
    check_append(row[0] if row else None, stored, update)
    conn.execute(
        e.q("INSERT INTO device_lists (account_id, version, signed, stored_at_ms) VALUES (?, ?, ?, ?)"),
        (update.account_id, update.version, update.signed, now_ms),
    )
    conn.execute(e.q("UPDATE accounts SET list_version = ? WHERE account_id = ?"), (update.version, update.account_id))
    for dev in update.added:
        added = conn.execute(
            e.q(
                "INSERT INTO devices"
                " (device_no, device_id, account_id, sign_key, box_key, created_at_ms, added_in_version)"
                f" VALUES ({e.next_device_no}, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING 1"
            ),
            (dev.device_id, update.account_id, dev.sign_key, dev.box_key, now_ms, update.version),
        ).fetchall()
        if not added:
            raise TetherlessError(ErrorCode.INVALID_DEVICE_LIST, f"device {dev.device_id} is already known here")
    deleted = 0
    for device_id in sorted(update.removed):  # one lock order on PostgreSQL
        deleted += revoke_device(conn, e, device_id, update.version, now_ms)
    if update.removed:  # the account log's rekey rule commits with the revocation (docs/account-log.md §5)
        log.note_revocation(conn, e, update.account_id, update.version)
    for new in update.added_credentials:
        conn.execute(
            e.q("UPDATE webauthn_credentials SET status = ? WHERE account_id = ? AND credential_id = ?"),
            (ACTIVE, update.account_id, new.credential_id),
        )
    for use in update.assertions:
        conn.execute(
            e.q(
                "INSERT INTO webauthn_credentials (account_id, credential_id, public_key, rp_id, sign_count, status,"
                " registered_by, registered_at_ms) VALUES (?, ?, ?, ?, ?, ?, '', ?)"
                " ON CONFLICT (account_id, credential_id) DO UPDATE SET sign_count = excluded.sign_count"
            ),
            (update.account_id, use.credential_id, use.public_key, use.rp_id, use.sign_count, ACTIVE, now_ms),
        )
    for credential_id in update.removed_credentials:
        conn.execute(
            e.q("DELETE FROM webauthn_credentials WHERE account_id = ? AND credential_id = ?"),
            (update.account_id, credential_id),
        )
    devices = [
        r[0]
        for r in conn.execute(
            e.q("SELECT device_id FROM devices WHERE account_id = ? ORDER BY device_id"), (update.account_id,)
        )
    ]
    # Every device of the account (revoked ones too) wakes, in every process, on commit only.
    e.notify(conn, INBOX_CHANNEL, devices)
    return DeviceListCommitted(devices=devices, revoked=list(update.removed), envelopes_deleted=deleted)


def device_stream_state(conn: Any, e: Engine, *, device_id: str) -> DeviceStreamState | None:
    row = conn.execute(
        e.q(
            "SELECT d.account_id, d.revoked_at_ms, a.list_version FROM devices d"
            " JOIN accounts a ON a.account_id = d.account_id WHERE d.device_id = ?"
        ),
        (device_id,),
    ).fetchone()
    return DeviceStreamState(row[0], row[1] is not None, row[2]) if row else None


def put_registration(
    conn: Any, e: Engine, *, challenge: bytes, account_id: str, device_id: str, expires_at_ms: int
) -> None:
    conn.execute(
        e.q("INSERT INTO webauthn_registrations (challenge, account_id, device_id, expires_at_ms) VALUES (?, ?, ?, ?)"),
        (challenge, account_id, device_id, expires_at_ms),
    )


def consume_registration(
    conn: Any, e: Engine, *, challenge: bytes, account_id: str, device_id: str, now_ms: int
) -> ChallengeOutcome:
    row = conn.execute(
        e.q(
            "SELECT account_id, device_id, expires_at_ms, used_at_ms FROM webauthn_registrations WHERE challenge = ?"
            + e.lock_rows
        ),
        (challenge,),
    ).fetchone()
    if row is None or (row[0], row[1]) != (account_id, device_id):
        return ChallengeOutcome.UNKNOWN
    if row[3] is not None:
        return ChallengeOutcome.USED
    conn.execute(e.q("UPDATE webauthn_registrations SET used_at_ms = ? WHERE challenge = ?"), (now_ms, challenge))
    return ChallengeOutcome.EXPIRED if row[2] <= now_ms else ChallengeOutcome.OK


def put_credential(
    conn: Any,
    e: Engine,
    *,
    account_id: str,
    device_id: str,
    credential: NewCredential,
    sign_count: int,
    now_ms: int,
) -> None:
    row = conn.execute(
        e.q("SELECT status FROM webauthn_credentials WHERE account_id = ? AND credential_id = ?" + e.lock_rows),
        (account_id, credential.credential_id),
    ).fetchone()
    if row is not None and row[0] != PENDING:
        raise TetherlessError(ErrorCode.WEBAUTHN_INVALID, "this credential is already in the account's device list")
    conn.execute(
        e.q(
            "INSERT INTO webauthn_credentials (account_id, credential_id, public_key, rp_id, sign_count,"
            " status, registered_by, registered_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (account_id, credential_id) DO UPDATE SET public_key = excluded.public_key,"
            " rp_id = excluded.rp_id, sign_count = excluded.sign_count, status = excluded.status,"
            " registered_by = excluded.registered_by, registered_at_ms = excluded.registered_at_ms"
        ),
        (
            account_id,
            credential.credential_id,
            credential.public_key,
            credential.rp_id,
            sign_count,
            PENDING,
            device_id,
            now_ms,
        ),
    )


def credentials(conn: Any, e: Engine, *, account_id: str) -> list[StoredCredential]:
    rows = conn.execute(
        e.q(
            "SELECT credential_id, public_key, rp_id, sign_count, status, registered_by FROM webauthn_credentials"
            " WHERE account_id = ? ORDER BY credential_id"
        ),
        (account_id,),
    ).fetchall()
    return [StoredCredential(bytes(r[0]), bytes(r[1]), r[2], r[3], r[4], r[5]) for r in rows]


def expire_devices(conn: Any, e: Engine, now_ms: int) -> int:
    """Delete expired WebAuthn registration ceremonies; returns how many."""
    expired: int = conn.execute(e.q("DELETE FROM webauthn_registrations WHERE expires_at_ms <= ?"), (now_ms,)).rowcount
    return expired
