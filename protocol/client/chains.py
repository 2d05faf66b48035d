"""Client-side device-list state: high-water marks and the errors of chain verification (crypto.md §3.5).

A client keeps, durably per account, the **high-water mark** ``(version,
list_hash)`` of the highest version it verified, in the local database table
``device_marks``, keyed by a keyed hash of ``(account_id, relay)``
(:meth:`LocalDB.blind`: a stolen disk does not say whose lists this device
checked). The table is a guarded set (crypto.md §13.3): a deleted mark is
reported as tampering, never taken for "never verified" (which would trust
whatever list the relay serves next). Every later chain must contain
that exact pair and must not end below it (``protocol.device_list.verify_chain``
raises ``DeviceListForkError`` / ``DeviceListRollbackError``); a chain that
fails any check is reported as :class:`DeviceListRejectedError` and none of
the account's keys are used.

A device that finds itself missing from its own account's verified list was
revoked (crypto.md §4): :class:`DeviceRevokedError`; it stops.
"""

from __future__ import annotations

import msgspec

from ..errors import ErrorCode, TetherlessError
from .localdb import LocalDB
from .store import MARK_TABLE, migrate


class DeviceMark(msgspec.Struct, frozen=True):
    """The highest verified version of one account's device list and its ``list_hash``."""

    version: int
    list_hash: bytes


class DeviceListRejectedError(TetherlessError):
    """A device list served by a relay did not verify; the message names the account and the reason.

    ``code`` is that of the failed check (``invalid_device_list``,
    ``bad_signature``, ``policy_not_met``, ``webauthn_invalid``, ``webauthn_replayed``).
    """

    def __init__(self, account: str, cause: TetherlessError) -> None:
        super().__init__(cause.code, f"device list of {account} rejected: {cause.detail}")
        self.account = account
        self.cause = cause


class DeviceRevokedError(TetherlessError):
    """This device is no longer in its account's verified device list: it was revoked (crypto.md §4)."""

    def __init__(self, device_id: str, account: str, version: int) -> None:
        super().__init__(
            ErrorCode.DEVICE_REVOKED,
            f"this device ({device_id}) was removed from the device list of {account} (version {version}); "
            "it is revoked and stops here",
        )


def mark_key(db: LocalDB, account_id: str, relay: str) -> bytes:
    """The row key of an account's mark: a keyed hash (relay names compare case-insensitively)."""
    return db.blind("device-mark", account_id, relay.lower())


def load_mark(db: LocalDB | None, account_id: str, relay: str) -> tuple[int, bytes] | None:
    """The stored high-water mark of an account (None: never verified, or no local database).

    Checks the whole set of marks first: raises :class:`~protocol.client.localdb.TamperedRowError` when a
    mark row was deleted (or put back) outside tetherless, and for a mark that does not open. Reads only.
    """
    if db is None:
        return None
    migrate(db)  # a database handed to the SDK directly may predate the guard (no-op when current)
    db.check_members(MARK_TABLE)
    mark = db.get_struct(MARK_TABLE, mark_key(db, account_id, relay), DeviceMark)
    return None if mark is None else (mark.version, mark.list_hash)


def save_mark(db: LocalDB | None, account_id: str, relay: str, mark: tuple[int, bytes]) -> None:
    """Durably raise an account's high-water mark (never lowers it). Idempotent; one transaction. Raises
    what :func:`load_mark` raises."""
    if db is None:
        return
    with db.transaction():
        current = load_mark(db, account_id, relay)
        if current is None or mark[0] > current[0]:
            value = msgspec.msgpack.encode(DeviceMark(version=mark[0], list_hash=mark[1]))
            db.put_member(MARK_TABLE, mark_key(db, account_id, relay), value)


__all__ = [
    "MARK_TABLE",
    "DeviceListRejectedError",
    "DeviceMark",
    "DeviceRevokedError",
    "load_mark",
    "mark_key",
    "save_mark",
]
