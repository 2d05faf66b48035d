"""Device-list high-water marks in the local database (protocol/client/chains.py, crypto.md §3.5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.client.chains import (
    MARK_TABLE,
    DeviceListRejectedError,
    DeviceRevokedError,
    load_mark,
    mark_key,
    save_mark,
)
from protocol.client.localdb import LocalDB, TamperedRowError
from protocol.client.store import migrate
from protocol.errors import ErrorCode, LocalErrorCode, TetherlessError


def _open(home: Path) -> LocalDB:
    db = LocalDB.open(home, b"k" * 32)
    migrate(db)
    return db


def test_marks_persist_per_account_and_relay_and_never_go_down(tmp_path: Path) -> None:
    db = _open(tmp_path / "home")
    assert load_mark(db, "acct", "relay.example") is None
    save_mark(db, "acct", "Relay.Example", (3, b"h3"))
    save_mark(db, "acct", "relay.example", (2, b"h2"))  # lower: ignored
    assert load_mark(db, "acct", "relay.example") == (3, b"h3")
    assert load_mark(db, "acct", "other.example") is None
    save_mark(db, "acct", "relay.example", (4, b"h4"))
    db.close()
    again = _open(tmp_path / "home")
    assert load_mark(again, "acct", "relay.example") == (4, b"h4")
    # The row key is a keyed hash: the file does not name the account (crypto.md §13.3).
    assert again.keys(MARK_TABLE) == [mark_key(again, "acct", "relay.example")]
    assert b"acct" not in (tmp_path / "home" / "state.db").read_bytes()
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


def test_a_deleted_mark_is_tampering_not_a_first_sight(tmp_path: Path) -> None:
    """Without the guard, a deleted mark reads as "never verified" and the next list the relay serves is
    trusted on first use; with it, the client refuses (crypto.md §13.3)."""
    db = _open(tmp_path / "home")
    save_mark(db, "acct", "relay.example", (3, b"h3"))
    save_mark(db, "other", "relay.example", (1, b"h1"))
    db.execute(f'DELETE FROM "{MARK_TABLE}" WHERE key = ?', (mark_key(db, "acct", "relay.example"),))
    with pytest.raises(TamperedRowError, match=r"local state tampered: device_marks .* holds 1 rows where") as err:
        load_mark(db, "acct", "relay.example")
    assert err.value.code is LocalErrorCode.LOCAL_STATE_TAMPERED
    with pytest.raises(TamperedRowError):
        load_mark(db, "other", "relay.example")  # every account: the set is checked, not one row
    with pytest.raises(TamperedRowError):
        save_mark(db, "acct", "relay.example", (1, b"h1"))


def test_the_guard_row_and_the_index_key_cannot_be_deleted_either(tmp_path: Path) -> None:
    db = _open(tmp_path / "home")
    save_mark(db, "acct", "relay.example", (3, b"h3"))
    db.execute("DELETE FROM local_meta WHERE key = 'set:device_marks'")
    with pytest.raises(TamperedRowError, match="guard row of device_marks"):
        load_mark(db, "acct", "relay.example")
    db.close()
    db = _open(tmp_path / "other")
    save_mark(db, "acct", "relay.example", (3, b"h3"))
    db.execute("DELETE FROM local_meta WHERE key = 'index_key'")
    db.close()
    db = _open(tmp_path / "other")  # not re-created at open: only a migration creates it
    with pytest.raises(TamperedRowError, match="index key"):
        load_mark(db, "acct", "relay.example")


def test_a_database_handed_over_unmigrated_is_migrated_not_called_tampered(tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path / "home", b"k" * 32)  # as an SDK user might pass it to RelayClient(local_db=…)
    assert load_mark(db, "acct", "relay.example") is None
    save_mark(db, "acct", "relay.example", (1, b"h1"))
    assert load_mark(db, "acct", "relay.example") == (1, b"h1")
