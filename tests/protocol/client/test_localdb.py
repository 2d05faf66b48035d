"""The sealed local database (protocol/client/localdb.py, crypto.md §13)."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import msgspec
import pytest

from protocol.client import localdb
from protocol.client.localdb import DB_FILE, LocalDB, LocalDBError, TamperedRowError
from protocol.signing import layout

DEK = bytes(range(32))


class Thing(msgspec.Struct):
    name: str
    count: int


@pytest.fixture
def db(tmp_path: Path) -> LocalDB:
    return LocalDB.open(tmp_path / "home", DEK)


def raw(db: LocalDB, table: str, key: object) -> bytes:
    row = db.execute(f'SELECT value FROM "{table}" WHERE key = ?', (key,)).fetchone()
    assert row is not None
    return bytes(row[0])


def test_files_are_private_and_durable(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        db = LocalDB.open(tmp_path / "home", DEK)
        db.put("session_state", "peer", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700
    for path in (tmp_path / "home").iterdir():  # state.db, -wal, -shm
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_refuses_a_readable_database(tmp_path: Path) -> None:
    LocalDB.open(tmp_path / "home", DEK).close()
    (tmp_path / "home" / DB_FILE).chmod(0o644)
    with pytest.raises(LocalDBError, match="chmod 600"):
        LocalDB.open(tmp_path / "home", DEK)


def test_seal_and_open_round_trip(db: LocalDB) -> None:
    blob = db.seal("session_state", "peer-1", b"secret value")
    assert b"secret value" not in blob
    assert len(blob) == 24 + len(b"secret value") + 16
    assert db.open("session_state", "peer-1", blob) == b"secret value"
    assert db.unseal("session_state", "peer-1", blob) == b"secret value"
    # Fresh nonce every time.
    assert db.seal("session_state", "peer-1", b"secret value") != blob


def test_pure_seal_uses_the_spec_associated_data() -> None:
    import nacl.bindings

    nonce = b"n" * 24
    blob = localdb.seal_value(DEK, "log_records", (b"\x01", 7), b"v", nonce)
    ad = layout("local-row", "log_records", b"\x01", 7)
    assert blob == nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(b"v", ad, nonce, DEK)
    assert localdb.row_ad("t", "k") == layout("local-row", "t", "k")


def test_tampered_blob_fails(db: LocalDB) -> None:
    blob = bytearray(db.seal("session_state", "peer", b"value"))
    for index in (0, 23, 24, len(blob) - 1):
        changed = bytearray(blob)
        changed[index] ^= 0x80
        with pytest.raises(TamperedRowError, match="does not decrypt"):
            db.open("session_state", "peer", bytes(changed))
    with pytest.raises(TamperedRowError, match="truncated"):
        db.open("session_state", "peer", bytes(blob[:30]))


def test_blob_moved_to_another_row_fails(db: LocalDB) -> None:
    db.put("session_state", "alice", b"alice's ratchet")
    db.put("session_state", "bob", b"bob's ratchet")
    # Swap the stored blobs directly in SQLite, as someone with the file could.
    alice_blob = raw(db, "session_state", "alice")
    db.execute('UPDATE "session_state" SET value = ? WHERE key = ?', (alice_blob, "bob"))
    assert db.get("session_state", "alice") == b"alice's ratchet"
    with pytest.raises(TamperedRowError, match="session_state/bob"):
        db.get("session_state", "bob")
    # Same key, other table.
    db.execute('CREATE TABLE "log_state" (key PRIMARY KEY NOT NULL, value BLOB NOT NULL)')
    db.execute('INSERT INTO "log_state" VALUES (?, ?)', ("alice", alice_blob))
    with pytest.raises(TamperedRowError):
        db.get("log_state", "alice")


def test_key_types_are_distinct(db: LocalDB) -> None:
    db.put("session_x", "1", b"text key")
    db.put("session_x", 1, b"int key")
    db.put("session_x", b"1", b"bytes key")
    assert db.get("session_x", "1") == b"text key"
    assert db.get("session_x", 1) == b"int key"
    assert db.get("session_x", b"1") == b"bytes key"
    blob = db.seal("session_x", 1, b"v")
    with pytest.raises(TamperedRowError):
        db.open("session_x", "1", blob)


def test_wrong_dek_fails(tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path / "home", DEK)
    db.put("outbox_pending", b"id", b"ciphertext")
    db.close()
    other = LocalDB.open(tmp_path / "home", bytes(32))
    with pytest.raises(TamperedRowError, match="another key"):
        other.get("outbox_pending", b"id")
    with pytest.raises(ValueError, match="32 bytes"):
        LocalDB.open(tmp_path / "home", b"short")


def test_transaction_commits_or_rolls_back(tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path / "home", DEK)
    with db.transaction():
        db.put("history_messages", 1, b"one")
        db.put("history_messages", 2, b"two")

    def crash() -> None:
        with db.transaction():
            db.put("history_messages", 3, b"three")
            db.delete("history_messages", 1)
            raise RuntimeError("crash")

    def inner() -> None:
        with db.transaction():
            db.put("history_messages", 5, b"five")
            raise RuntimeError("inner")

    with pytest.raises(RuntimeError):
        crash()
    assert db.keys("history_messages") == [1, 2]
    # Nested: an inner failure rolls back only the inner part.
    with db.transaction():
        db.put("history_messages", 4, b"four")
        with pytest.raises(RuntimeError):
            inner()
    assert db.keys("history_messages") == [1, 2, 4]
    db.close()
    # Committed means on disk: a fresh connection sees it.
    again = LocalDB.open(tmp_path / "home", DEK)
    assert list(again.items("history_messages")) == [(1, b"one"), (2, b"two"), (4, b"four")]


def test_uncommitted_transaction_is_invisible_to_other_connections(tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path / "home", DEK)
    db.put("log_head", "k", b"old")
    with db.transaction():
        db.put("log_head", "k", b"new")
        other = sqlite3.connect(tmp_path / "home" / DB_FILE)
        row = other.execute('SELECT value FROM "log_head" WHERE key = ?', ("k",)).fetchone()
        other.close()
        assert db.unseal("log_head", "k", row[0]) == b"old"
    assert db.get("log_head", "k") == b"new"


def test_struct_helpers(db: LocalDB) -> None:
    db.put_struct("device_marks", "acct", Thing(name="n", count=3))
    assert db.get_struct("device_marks", "acct", Thing) == Thing(name="n", count=3)
    assert db.get_struct("device_marks", "missing", Thing) is None
    db.put("device_marks", "junk", b"\xc1")
    with pytest.raises(LocalDBError, match="not a Thing"):
        db.get_struct("device_marks", "junk", Thing)
    assert db.delete("device_marks", "acct") is True
    assert db.delete("device_marks", "acct") is False


def test_own_tables_through_sqlite_utils(db: LocalDB) -> None:
    db.db.table("session_skipped").insert_all(
        [{"peer": "p", "n": i, "key": db.seal("session_skipped", ("p", i), bytes([i]) * 32)} for i in range(3)],
        pk=("peer", "n"),
    )
    rows = list(db.db.table("session_skipped").rows)
    assert [db.open("session_skipped", (r["peer"], r["n"]), r["key"])[0] for r in rows] == [0, 1, 2]


def test_bad_table_names_are_refused(db: LocalDB) -> None:
    with pytest.raises(ValueError, match="table name"):
        db.put('x"; DROP TABLE y; --', "k", b"v")


def test_repr_hides_the_dek(db: LocalDB) -> None:
    assert DEK.hex() not in repr(db)
    assert str(DEK) not in repr(db)
