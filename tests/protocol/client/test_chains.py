"""Device-list high-water marks in the local database (protocol/client/chains.py, crypto.md §3.5)."""

from __future__ import annotations

from pathlib import Path

from protocol.client.chains import MARK_TABLE, DeviceListRejectedError, DeviceRevokedError, load_mark, save_mark
from protocol.client.localdb import LocalDB
from protocol.errors import ErrorCode, TetherlessError


def test_marks_persist_per_account_and_relay_and_never_go_down(tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path / "home", b"k" * 32)
    assert load_mark(db, "acct", "relay.example") is None
    save_mark(db, "acct", "Relay.Example", (3, b"h3"))
    save_mark(db, "acct", "relay.example", (2, b"h2"))  # lower: ignored
    assert load_mark(db, "acct", "relay.example") == (3, b"h3")
    assert load_mark(db, "acct", "other.example") is None
    save_mark(db, "acct", "relay.example", (4, b"h4"))
    db.close()
    again = LocalDB.open(tmp_path / "home", b"k" * 32)
    assert load_mark(again, "acct", "relay.example") == (4, b"h4")
    assert again.keys(MARK_TABLE) == ["acct@relay.example"]
    assert load_mark(None, "acct", "relay.example") is None
    save_mark(None, "acct", "relay.example", (1, b"h1"))  # no database: nothing to do


def test_error_messages_name_the_account_and_reason() -> None:
    cause = TetherlessError(ErrorCode.BAD_SIGNATURE, "signature by x, not a device of P or L")
    rejected = DeviceListRejectedError("acct@relay", cause)
    assert rejected.code is ErrorCode.BAD_SIGNATURE
    assert rejected.detail == "device list of acct@relay rejected: signature by x, not a device of P or L"
    revoked = DeviceRevokedError("dev", "acct@relay", 7)
    assert revoked.code is ErrorCode.DEVICE_REVOKED
    assert "revoked" in revoked.detail
    assert "version 7" in revoked.detail
