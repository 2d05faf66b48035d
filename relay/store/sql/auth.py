"""Authentication challenges and sessions (schema: migrations/0001_initial.sql)."""

from __future__ import annotations

from typing import Any

from ..base import ChallengeOutcome, ConsumedChallenge, SessionRecord
from ..engine import REVOCATION_CHANNEL, Engine


def put_challenge(conn: Any, e: Engine, *, nonce: bytes, device_id: str, expires_at_ms: int) -> None:
    conn.execute(
        e.q("INSERT INTO challenges (nonce, device_id, expires_at_ms) VALUES (?, ?, ?)"),
        (nonce, device_id, expires_at_ms),
    )


def consume_challenge(conn: Any, e: Engine, *, nonce: bytes, device_id: str, now_ms: int) -> ConsumedChallenge:
    """See ``Store.consume_challenge``. The row lock makes two replicas consuming one nonce serialise."""
    if not e.storable(device_id):
        return ConsumedChallenge(ChallengeOutcome.UNKNOWN)
    row = conn.execute(
        e.q("SELECT device_id, expires_at_ms, used_at_ms FROM challenges WHERE nonce = ?" + e.lock_rows), (nonce,)
    ).fetchone()
    if row is None or row[0] != device_id:
        return ConsumedChallenge(ChallengeOutcome.UNKNOWN)
    _, expires_at_ms, used_at_ms = row
    if used_at_ms is not None:
        return ConsumedChallenge(ChallengeOutcome.USED, expires_at_ms)
    conn.execute(e.q("UPDATE challenges SET used_at_ms = ? WHERE nonce = ?"), (now_ms, nonce))
    if expires_at_ms <= now_ms:
        return ConsumedChallenge(ChallengeOutcome.EXPIRED, expires_at_ms)
    return ConsumedChallenge(ChallengeOutcome.OK, expires_at_ms)


def create_session(
    conn: Any,
    e: Engine,
    *,
    token_hash: bytes,
    device_id: str,
    account_id: str,
    created_at_ms: int,
    expires_at_ms: int,
) -> None:
    conn.execute(
        e.q(
            "INSERT INTO sessions (token_hash, device_id, account_id, created_at_ms, expires_at_ms)"
            " VALUES (?, ?, ?, ?, ?)"
        ),
        (token_hash, device_id, account_id, created_at_ms, expires_at_ms),
    )


def get_session(conn: Any, e: Engine, *, token_hash: bytes) -> SessionRecord | None:
    row = conn.execute(
        e.q("SELECT device_id, account_id, expires_at_ms, revoked_at_ms FROM sessions WHERE token_hash = ?"),
        (token_hash,),
    ).fetchone()
    return SessionRecord(*row) if row else None


def revoke_sessions(conn: Any, e: Engine, *, device_id: str, token_hash: bytes | None, now_ms: int) -> int:
    """See ``Store.revoke_sessions``. Also the session part of revoking a device (sql/devices.py)."""
    sql, params = "device_id = ?", [now_ms, device_id]
    if token_hash is not None:
        sql, params = "token_hash = ? AND device_id = ?", [now_ms, token_hash, device_id]
    revoked: int = conn.execute(
        e.q(f"UPDATE sessions SET revoked_at_ms = ? WHERE {sql} AND revoked_at_ms IS NULL"), params
    ).rowcount
    # Every replica drops the device's cached sessions when (and only if) this commits. The device id, never a
    # token or its hash: any role that can connect to the database can LISTEN
    # (docs/decisions/0013-revocation-across-replicas.md).
    e.notify(conn, REVOCATION_CHANNEL, [device_id])
    return revoked


def expire_auth(conn: Any, e: Engine, now_ms: int) -> tuple[int, int]:
    """Delete expired challenges and sessions; returns how many of each."""
    challenges: int = conn.execute(e.q("DELETE FROM challenges WHERE expires_at_ms <= ?"), (now_ms,)).rowcount
    sessions: int = conn.execute(e.q("DELETE FROM sessions WHERE expires_at_ms <= ?"), (now_ms,)).rowcount
    return challenges, sessions
