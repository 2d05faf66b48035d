"""A page of log records is applied in one local transaction (account-log.md §10 "Read", §14.5).

The engine checks every record on its own and batches only the bookkeeping
(epoch keys opened once per page, counters kept in memory for the page, the
cursor written once). These tests pin what must not change with the batching:
a failure in the middle of a page leaves the store and the cursor exactly as
before it, and a page applied at once ends in the same state as its records
applied one by one.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from protocol import log
from protocol.client.localdb import LocalDB, TamperedRowError
from protocol.client.store import ClientStore, EpochInfo, HistoryMessage
from protocol.messages import LogRecord
from tests.support.engines import offline_engine

ACCOUNT = "a" * 32
WRITER = "e" * 32  # a sibling device of this account that wrote the records
SENDER = f"{'f' * 32}.{'b' * 32}@relay.test"
EPOCH_KEY = bytes(range(32))


class Account:
    """One device's engine (no relay: the pages are given to it) and the sibling that signs the records."""

    def __init__(self, home: Path) -> None:
        self.received: list[HistoryMessage] = []
        self.engine = offline_engine(
            home, ACCOUNT, on_message=lambda message, _cursor, _id: self.received.append(message)
        )
        self.writer = nacl.signing.SigningKey(b"w" * 32)
        store = self.engine.store
        store.put_epoch_key(1, EPOCH_KEY, b"test")
        store.put_epoch_info(
            EpochInfo(
                epoch=1,
                record_format=2,
                position=1,
                list_version=1,
                created_at_ms=0,
                writers={WRITER: bytes(self.writer.verify_key)},
            )
        )

    @property
    def store(self) -> ClientStore:
        return self.engine.store

    def record(self, position: int, seq: int, *, epoch: int = 1, uid: bytes | None = None) -> LogRecord:
        """Record ``seq`` of the sibling: a message it received, signed and sealed as a v2 record."""
        uid = uid or seq.to_bytes(16, "big")
        plaintext = log.LogPlaintext(
            writer_device=WRITER,
            writer_seq=seq,
            created_at_ms=1_000 + seq,
            body=log.MessageReceived(
                message_uid=uid,
                sender=SENDER,
                sender_sign_key=b"",
                recipient=f"{WRITER}.{ACCOUNT}@relay.test",
                pair_seq=seq,
                sent_at_ms=2_000 + seq,
                relay_sent_at_ms=3_000 + seq,
                content_type="text/plain",
                body=f"message {seq}".encode(),
            ),
        )
        record_id = log.message_record_id(ACCOUNT, SENDER, uid)
        nonce = os.urandom(24)
        ciphertext = log.seal_signed_record(
            EPOCH_KEY, plaintext, self.writer, account_id=ACCOUNT, record_id=record_id, epoch=epoch, nonce=nonce
        )
        return LogRecord(
            position=position,
            record_id=record_id,
            kind="event",
            epoch=epoch,
            committed_at_ms=1,
            ciphertext=ciphertext,
            size=len(ciphertext),
        )

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table of state.db (sealed values compare as stored bytes)."""
        db = self.store.db
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: sorted(db.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}

    def counters(self) -> dict[str, int]:
        return {name: value for name, value in self.store.db.execute("SELECT name, value FROM log_counters")}


def page(account: Account, first_seq: int, count: int) -> list[LogRecord]:
    # Position 1 is the epoch's key record (applied separately, by _apply_keys).
    return [account.record(seq + 1, seq) for seq in range(first_seq, first_seq + count)]


def test_a_failure_in_the_middle_of_a_page_leaves_store_and_cursor_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = Account(tmp_path)
    account.engine.log.apply_records(page(account, 1, 3))  # an earlier page, committed
    before = account.dump()
    assert account.store.cursor("log") == 4

    records = page(account, 4, 5)
    upsert = account.store.upsert_message
    calls = 0

    def failing_upsert(**fields: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:  # two records of the page are written, counters moved, the third fails
            raise sqlite3.OperationalError("disk I/O error")
        return upsert(**fields)

    monkeypatch.setattr(account.store, "upsert_message", failing_upsert)
    with pytest.raises(sqlite3.OperationalError):
        account.engine.log.apply_records(records)
    assert account.dump() == before
    assert account.store.cursor("log") == 4
    assert account.store.counter(f"writer_hw:{WRITER}") == 3  # not the in-memory value of the failed page
    assert [m.pair_seq for m in account.received] == [1, 2, 3]  # nothing announced from the failed page

    monkeypatch.undo()
    assert account.engine.log.apply_records(records) == []
    assert account.store.cursor("log") == 9
    assert [m.pair_seq for m in account.store.history()] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [m.pair_seq for m in account.received] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_tampered_row_met_mid_page_rolls_the_whole_page_back(tmp_path: Path) -> None:
    account = Account(tmp_path)
    records = page(account, 1, 4)
    account.engine.log.apply_records(records[:1])
    # The writer column of message 1 moved under the row of message 3: opening it there must fail.
    db = account.store.db
    db.execute(
        'INSERT INTO "history_writers" (key, value) SELECT ?, value FROM "history_writers" WHERE key = ?',
        (records[2].record_id, records[0].record_id),
    )
    before = account.dump()
    with pytest.raises(TamperedRowError):
        account.engine.log.apply_records(records[1:])
    assert account.dump() == before
    assert account.store.cursor("log") == 2


def test_a_page_at_once_ends_like_its_records_one_by_one(tmp_path: Path) -> None:
    at_once, one_by_one = Account(tmp_path / "a"), Account(tmp_path / "b")
    records = page(at_once, 1, 6)
    at_once.engine.log.apply_records(records)
    for record in records:
        one_by_one.engine.log.apply_records([record])
    assert at_once.counters() == one_by_one.counters()
    assert at_once.counters()[f"writer_hw:{WRITER}"] == 6
    assert at_once.counters()["epoch_records:1"] == 6
    assert at_once.store.cursor("log") == one_by_one.store.cursor("log") == 7
    assert at_once.store.history() == one_by_one.store.history()
    # The per-record checks still run inside a page: another record under an earlier writer_seq is refused.
    stale = at_once.record(8, 2, uid=b"r" * 16)
    assert at_once.engine.log.apply_records([stale]) == []
    assert at_once.engine.rejected == 1
    assert at_once.store.cursor("log") == 8
    assert at_once.store.message_count() == 6


def test_a_record_without_its_epoch_key_stops_the_cursor_before_it(tmp_path: Path) -> None:
    account = Account(tmp_path)
    records = [*page(account, 1, 2), account.record(4, 3, epoch=2), account.record(5, 4)]
    waiting = account.engine.log.apply_records(records)
    assert [r.position for r in waiting] == [4, 5]
    assert account.store.cursor("log") == 3
    assert [m.pair_seq for m in account.received] == [1, 2]  # what was applied is announced


def test_counters_read_in_a_page_follow_a_rolled_back_savepoint(tmp_path: Path) -> None:
    store = Account(tmp_path).store

    def advance_then_fail() -> None:
        with store.transaction():
            store.advance_counter("local_seq", 5)
            assert store.counter("local_seq") == 5
            raise RuntimeError("rolled back")

    with store.page():
        assert store.counter("local_seq") == 0
        with pytest.raises(RuntimeError):
            advance_then_fail()
        assert store.counter("local_seq") == 0
        assert store.next_counter("local_seq") == 1
    assert store.counter("local_seq") == 1


def test_columns_sealed_together_open_only_in_their_own_column_and_row(tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path, os.urandom(32))
    sealed = db.seal_columns("history_messages", b"row-1", {"sender": b"alice", "body": b"hello"})
    assert db.open_column("history_messages", b"row-1", "sender", sealed["sender"]) == b"alice"
    assert db.open_column("history_messages", b"row-1", "body", sealed["body"]) == b"hello"
    assert sealed["sender"][:24] != sealed["body"][:24]  # a nonce per column
    with pytest.raises(TamperedRowError):
        db.open_column("history_messages", b"row-1", "body", sealed["sender"])
    with pytest.raises(TamperedRowError):
        db.open_column("history_messages", b"row-2", "sender", sealed["sender"])
    with pytest.raises(TamperedRowError):
        db.open_column("outbox_entries", b"row-1", "sender", sealed["sender"])
