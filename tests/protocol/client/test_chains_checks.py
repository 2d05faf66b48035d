"""The client's device-list checks in protocol/client/chains.py, as mutation testing holds them (docs/security.md
"Mutation testing"): the mark is never replaced at the same version, and the errors carry exactly what they say."""

from __future__ import annotations

from pathlib import Path

from protocol.client.chains import DeviceListRejectedError, DeviceRevokedError, load_mark, save_mark
from protocol.client.localdb import LocalDB
from protocol.client.store import migrate
from protocol.errors import ErrorCode, TetherlessError


def test_a_mark_at_the_same_version_is_not_replaced(tmp_path: Path) -> None:
    """Once (3, h3) is the mark, a second list hash at version 3 is a fork the next chain check must see
    (crypto.md §3.5); saving it must not move the mark to the relay's other branch."""
    db = LocalDB.open(tmp_path / "home", b"k" * 32)
    migrate(db)
    save_mark(db, "acct", "relay.example", (3, b"h3"))
    save_mark(db, "acct", "relay.example", (3, b"other branch"))
    assert load_mark(db, "acct", "relay.example") == (3, b"h3")


def test_rejected_error_keeps_the_account_and_the_cause() -> None:
    cause = TetherlessError(ErrorCode.POLICY_NOT_MET, "2 of 3 approvals")
    rejected = DeviceListRejectedError("acct@relay", cause)
    assert rejected.account == "acct@relay"
    assert rejected.cause is cause
    assert rejected.code is ErrorCode.POLICY_NOT_MET


def test_revoked_error_says_exactly_what_happened() -> None:
    revoked = DeviceRevokedError("dev", "acct@relay", 7)
    assert revoked.code is ErrorCode.DEVICE_REVOKED
    assert revoked.detail == (
        "this device (dev) was removed from the device list of acct@relay (version 7); it is revoked and stops here"
    )
