"""Numbered migrations of ``state.db`` (protocol/client/store.py ``migrate``; docs/account-log.md §8).

``tests/fixtures/state_v1/home/state.db`` was written by the client code before migrations existed
(schema 1; ``tests/fixtures/state_v1/make.py`` shows how). Migration 2 must carry every row over — the history
with its sealed sender, direction and times, the outbox, the per-peer ``pair_seq`` counters, the device-list
marks — leave no peer or sender name in the clear, and run in one transaction.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from protocol.client import store as store_module
from protocol.client.chains import MARK_TABLE, load_mark, save_mark
from protocol.client.localdb import LocalDB, TamperedRowError
from protocol.client.sessions import T_TRANSCRIPT
from protocol.client.store import (
    GUARDED_SETS,
    MIGRATIONS,
    SCHEMA_VERSION,
    ClientStore,
    Migration,
    StateTooNewError,
    migrate,
    schema_version,
)
from protocol.errors import LocalErrorCode

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "state_v1" / "home" / "state.db"
DEK = bytes(range(32))  # tests/fixtures/state_v1/make.py


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    shutil.copyfile(FIXTURE, home / "state.db")
    (home / "state.db").chmod(0o600)
    return home


def _on_disk(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("state.db"))


def test_the_fixture_is_schema_1_with_names_in_the_clear(home: Path) -> None:
    raw = _on_disk(home)
    assert b"devbob" in raw  # history_messages.sender_device
    assert b"acctbob@relay.example" in raw  # device_marks key
    assert sqlite3.connect(home / "state.db").execute("PRAGMA user_version").fetchone() == (0,)


def test_migration_2_keeps_every_row_and_seals_the_metadata(home: Path) -> None:
    store = ClientStore(LocalDB.open(home, DEK))  # opening migrates
    assert schema_version(store.db) == SCHEMA_VERSION == len(MIGRATIONS)
    history = store.history()
    assert [(m.msg_key[:1], m.direction, m.sender_device, m.pair_seq, m.log_position) for m in history] == [
        (b"\x01", "sent", "devalice", 1, 4),
        (b"\x02", "received", "devbob", 1, 5),
        (b"\x03", "received", "devbob", 3, None),
    ]
    assert [m.sent_at_ms for m in history] == [1_700_000_000_000, 1_700_000_001_002, 1_700_000_001_003]
    assert [m.relay_sent_at_ms for m in history] == [1_700_000_000_500, 1_700_000_002_002, 1_700_000_002_003]
    assert [m.body for m in history] == [b"hello bob", b"from bob 2", b"from bob 3"]
    assert [m.writer for m in history] == [None, "devalice", "devalice"]
    assert store.held() == [(b"\x03" * 16, "devbob", 3, 7, 1_700_000_000_000)]
    assert not store.has_predecessors("devbob", 3)
    assert store.ack_point() == 5  # the pending record (cursor 6) still holds the ack back
    assert [p.plaintext for p in store.pending()] == [b"pending plaintext"]
    assert store.epoch_key(1) == b"e" * 32
    first, second = store.outbox(("queued",))
    assert (first.body, first.attempts, first.next_attempt_at_ms, first.created_at_ms) == (
        b"hello bob",
        1,
        42,
        1_700_000_000_000,
    )
    assert first.last_error == "prekeys_unavailable: no prekey bundle for devbob.acctbob@relay.example"
    assert (second.body, second.last_error, second.sent_at_ms) == (b"second", "", 1_700_000_000_000)
    assert store.envelopes(first.local_id) == [
        (0, "devbob.acctbob@relay.example", b"i" * 16, b"ciphertext-1", b"a" * 16, 1_700_000_000_400)
    ]
    # Still unique per (sender device, message uid): the same message seen again merges.
    again = history[1]
    assert not store.upsert_message(
        msg_key=b"\x0f" * 16, message_uid=again.message_uid, sender_device="devbob", direction="received",
        pair_seq=1, sent_at_ms=again.sent_at_ms, relay_sent_at_ms=again.relay_sent_at_ms, via="log",
        sender=again.sender, recipients=again.recipients, content_type="text/plain", body=again.body,
    )  # fmt: skip
    # The pair_seq counter was renamed to its keyed hash: the next message to bob is number 3, not 1.
    entry = store.enqueue("devbob.acctbob@relay.example", "text/plain", b"third", peer="acctbob@relay.example")
    assert entry.pair_seq == 3
    assert load_mark(store.db, "acctbob", "relay.example") == (3, b"h" * 32)
    assert load_mark(store.db, "acctalice", "relay.example") == (2, b"a" * 32)
    assert all(isinstance(k, bytes) for k in store.db.keys(MARK_TABLE))
    for table in GUARDED_SETS:
        store.db.check_members(table)
    assert len(store.db.keys(T_TRANSCRIPT)) == 2
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = _on_disk(home)
    for name in (b"devbob", b"devalice", b"acctbob", b"acctalice", b"relay.example"):
        assert name not in raw, name
    counters = [r[0] for r in store.db.execute("SELECT name FROM log_counters")]
    assert [c for c in counters if c.startswith("pair_seq:")] != []
    assert store.db.execute("SELECT name FROM sqlite_master WHERE name = 'history_messages_1'").fetchone() is None
    # What stays clear is what account-log.md §8 lists: no times or errors in the outbox, no sync times.
    outbox_columns = {r[1] for r in store.db.execute("PRAGMA table_info(outbox_entries)")}
    assert not outbox_columns & {"created_at_ms", "sent_at_ms", "next_attempt_at_ms", "last_error"}
    assert store.db.execute("SELECT count(*) FROM log_cursors WHERE updated_at_ms IS NOT NULL").fetchone() == (0,)
    # Reopening runs nothing more.
    assert migrate(store.db) == 0


def test_a_failing_migration_changes_nothing(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All steps and the version move in one transaction: a crash inside step 2 leaves the schema-1 file."""

    def broken(db: LocalDB) -> None:
        MIGRATIONS[1].apply(db)  # the whole real step, then a failure before the commit
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    monkeypatch.setattr(store_module, "MIGRATIONS", (MIGRATIONS[0], Migration(2, "broken", broken)))
    db = LocalDB.open(home, DEK)
    with pytest.raises(TamperedRowError, match=r"migration 2 .* failed and changed nothing"):
        migrate(db)
    assert schema_version(db) == 0
    columns = {r[1] for r in db.execute("PRAGMA table_info(history_messages)")}
    assert "sender_device" in columns
    assert isinstance(db.keys(MARK_TABLE)[0], str)
    monkeypatch.undo()
    assert migrate(db) == len(MIGRATIONS)  # the next open migrates for real
    assert load_mark(db, "acctbob", "relay.example") == (3, b"h" * 32)


def test_a_new_file_gets_every_step_and_a_newer_one_is_refused(tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path / "home", DEK)
    assert migrate(db) == len(MIGRATIONS)
    save_mark(db, "acct", "relay.example", (1, b"h"))
    db.execute("PRAGMA user_version = 99")
    with pytest.raises(StateTooNewError, match="schema 99") as err:
        migrate(db)
    assert err.value.code is LocalErrorCode.LOCAL_STATE_TOO_NEW


def test_a_version_put_back_does_not_rerun_a_migration_silently(home: Path) -> None:
    """Setting ``user_version`` back (the file is the attacker's) makes step 2 meet a layout it does not know:
    a clear refusal, and nothing changes."""
    db = LocalDB.open(home, DEK)
    migrate(db)
    db.execute("PRAGMA user_version = 1")
    with pytest.raises(TamperedRowError, match="migration 2"):
        migrate(db)
    assert schema_version(db) == 1


# What the client up to schema 3 created on first use (protocol/client/engine/snapshots.py ``ensure_tables``): kept
# here verbatim, as the layout an existing home can hold, so that migration 4 is checked against it.
_SNAPSHOT_TABLES_ON_DEMAND = """
CREATE TABLE IF NOT EXISTS log_snapshot_writes (
  snapshot_id BLOB PRIMARY KEY, covers INTEGER NOT NULL, since_ms INTEGER NOT NULL, created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS log_snapshot_loads (
  snapshot_id BLOB PRIMARY KEY, position INTEGER NOT NULL, covers INTEGER NOT NULL, parts INTEGER NOT NULL,
  epoch INTEGER NOT NULL, loaded_at_ms INTEGER, messages INTEGER
);
CREATE TABLE IF NOT EXISTS log_snapshot_keys (
  position INTEGER PRIMARY KEY, record_id BLOB NOT NULL, epoch INTEGER NOT NULL,
  device_list_version INTEGER NOT NULL, committed_at_ms INTEGER NOT NULL, ciphertext BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS history_gaps (
  after INTEGER PRIMARY KEY, upto INTEGER NOT NULL, noted_at_ms INTEGER NOT NULL
);
"""
_SNAPSHOT_ROWS = {
    "log_snapshot_writes": (b"w" * 16, 40, 0, 1_700_000_000_000),
    "log_snapshot_loads": (b"s" * 16, 30, 29, 2, 1, 1_700_000_000_001, 5),
    "log_snapshot_keys": (3, b"k" * 16, 1, 1, 1_700_000_000_002, b"ciphertext"),
    "history_gaps": (0, 7, 1_700_000_000_003),
}


def _tables(db: LocalDB) -> dict[str, list[tuple[object, ...]]]:
    return {t: [tuple(r) for r in db.execute(f"SELECT * FROM {t}")] for t in store_module.SNAPSHOT_TABLES}


def _schema_3_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, synced: bool) -> LocalDB:
    """A home made by the client at schema 3; ``synced``: a sync or a snapshot already created the tables."""
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:3])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", 3)
    old = LocalDB.open(tmp_path / "home", DEK)
    assert migrate(old) == 3
    if synced:
        with old.transaction():
            for statement in _SNAPSHOT_TABLES_ON_DEMAND.split(";"):
                if statement.strip():
                    old.execute(statement)
            for table, row in _SNAPSHOT_ROWS.items():
                old.execute(f"INSERT INTO {table} VALUES ({', '.join('?' for _ in row)})", row)
    old.close()
    monkeypatch.undo()
    return LocalDB.open(tmp_path / "home", DEK)


def test_migration_4_creates_the_snapshot_tables_in_a_schema_3_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = _schema_3_home(tmp_path, monkeypatch, synced=False)
    marks = ", ".join("?" for _ in store_module.SNAPSHOT_TABLES)
    query = f"SELECT name FROM sqlite_master WHERE name IN ({marks})"
    assert db.execute(query, store_module.SNAPSHOT_TABLES).fetchall() == []
    assert migrate(db) == SCHEMA_VERSION - 3
    assert schema_version(db) == SCHEMA_VERSION
    assert _tables(db) == {t: [] for t in store_module.SNAPSHOT_TABLES}


def test_migration_4_keeps_the_tables_and_rows_a_schema_3_client_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Homes that synced before migration 4 created the tables on demand: the step accepts them and keeps every
    row (``IF NOT EXISTS``), and running it again after the version is put back changes nothing either."""
    db = _schema_3_home(tmp_path, monkeypatch, synced=True)
    before = _tables(db)
    assert all(before.values())
    assert migrate(db) == SCHEMA_VERSION - 3
    assert schema_version(db) == SCHEMA_VERSION
    assert _tables(db) == before
    db.execute("PRAGMA user_version = 3")
    assert migrate(db) == SCHEMA_VERSION - 3
    assert _tables(db) == before
