"""Prekey and enrolment rules shared by both backends, so SQLite and PostgreSQL cannot disagree on them.

The backends read the rows under their serialisation (SQLite: the writer
thread; PostgreSQL: row locks) and call these to decide.
"""

from __future__ import annotations

from protocol.errors import ErrorCode, TetherlessError

from .base import (
    PREKEY_LAST_RESORT,
    PREKEY_MLKEM_ONE_TIME,
    PREKEY_SIGNED,
    PREKEY_X25519_ONE_TIME,
    EnrolmentRecord,
    PrekeyState,
    StoredPrekey,
)

REPLACED_KINDS = (PREKEY_SIGNED, PREKEY_LAST_RESORT)
ONE_TIME_KINDS = (PREKEY_X25519_ONE_TIME, PREKEY_MLKEM_ONE_TIME)


def check_key_id(key: StoredPrekey, max_key_id: int | None, stored: StoredPrekey | None) -> bool:
    """Whether ``key`` must be written: False for a retried upload of a stored key.

    Raises ``prekey_invalid`` when its id is at or below the highest id ever
    stored for the (device, kind) and it is not that very key.
    """
    if max_key_id is None or key.key_id > max_key_id:
        return True
    if stored == key:
        return False
    raise TetherlessError(
        ErrorCode.PREKEY_INVALID, f"{key.kind} key id {key.key_id} reused (ids must increase; highest {max_key_id})"
    )


def check_one_time_counts(state: PrekeyState, max_one_time: int) -> None:
    """Raises ``invalid_field`` when more than ``max_one_time`` keys of a one-time kind would be stored."""
    for kind, count in ((PREKEY_X25519_ONE_TIME, state.x25519_one_time), (PREKEY_MLKEM_ONE_TIME, state.mlkem_one_time)):
        if count > max_one_time:
            raise TetherlessError(
                ErrorCode.INVALID_FIELD, f"one_time: at most {max_one_time} {kind} keys are stored (would be {count})"
            )


def check_proposal(record: EnrolmentRecord | None, proposal: bytes, proposer_device: str, now_ms: int) -> None:
    """The rules of ``Store.put_enrolment_proposal`` over the stored row."""
    if record is None:
        raise TetherlessError(ErrorCode.ENROLMENT_UNKNOWN, "no enrolment offer under this link code")
    if record.expires_at_ms <= now_ms:
        raise TetherlessError(ErrorCode.ENROLMENT_EXPIRED, "the enrolment offer expired; show a new code")
    if record.proposal is not None and (record.proposal, record.proposer_device) != (proposal, proposer_device):
        raise TetherlessError(ErrorCode.ENROLMENT_USED, "another device already answered this link code")


def enrolment_used() -> TetherlessError:
    return TetherlessError(ErrorCode.ENROLMENT_USED, "this link code was already used; show a new one")
