"""Device-list append rules over what the store read (docs/crypto.md §3.3, §6), shared by both engines.

``sql/devices.py`` reads the account's head version and WebAuthn credentials
under the account's serialisation (SQLite: the writer thread; PostgreSQL: the
``accounts`` row lock) and calls :func:`check_append` before writing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocol.errors import ErrorCode, TetherlessError

from .base import DeviceListUpdate

PENDING = "pending"
ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class CredentialRow:
    """A stored WebAuthn credential of the account."""

    public_key: bytes
    rp_id: str
    sign_count: int
    status: str


def counter_ok(stored: int, new: int) -> bool:
    """docs/crypto.md §6: both zero (an authenticator without counters) or strictly increasing."""
    return (stored == 0 and new == 0) or new > stored


def check_append(head: int | None, credentials: Mapping[bytes, CredentialRow], update: DeviceListUpdate) -> None:
    """Raises when ``update`` may not be committed on an account whose head version is ``head`` (None:
    unknown account): ``unknown_account``, ``device_list_conflict`` (not on top of the head),
    ``webauthn_invalid`` (an added credential is not pending for the account with this key and rp id),
    ``webauthn_replayed`` (an assertion's counter is not above the stored one)."""
    if head is None:
        raise TetherlessError(ErrorCode.UNKNOWN_ACCOUNT, "no such account on this relay")
    if head != update.version - 1:
        raise TetherlessError(ErrorCode.DEVICE_LIST_CONFLICT, f"the head is version {head}; rebuild the change on it")
    for new in update.added_credentials:
        have = credentials.get(new.credential_id)
        if have is None or have.status != PENDING or have.public_key != new.public_key or have.rp_id != new.rp_id:
            raise TetherlessError(
                ErrorCode.WEBAUTHN_INVALID, "an added credential was not registered for this account with this key"
            )
    for use in update.assertions:
        have = credentials.get(use.credential_id)
        if not counter_ok(have.sign_count if have else 0, use.sign_count):
            raise TetherlessError(
                ErrorCode.WEBAUTHN_REPLAYED, "an assertion's sign counter is not above the stored one"
            )
