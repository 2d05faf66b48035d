"""The send path's shortcuts (docs/performance.md, "P2, second round") answer exactly as the full path:

- a batch is first written without reading its keys (``sql/inbox._store_fresh``); a key used before, a plan
  that would refuse, or a pointer that cannot be inserted falls back to reading the keys, and nothing the
  first attempt wrote survives;
- SQLite's writer keeps the inboxes' ``queued`` counts in memory (``sql/inbox.QueueCounts``): they follow
  its savepoints and transactions, are loaded again after a restart, and are dropped when another
  connection commits to the file.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import msgspec
import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.store import NewEnvelope, SQLiteStore, StoredEnvelope
from relay.store.base import envelope_digest
from relay.store.engine import SQLITE
from relay.store.postgres import copy_from_sqlite
from relay.store.sql import inbox
from relay.store.sql.inbox import QueueCounts
from relay.store.sqlite import DB_FILE
from tests.relay.store import test_store_contract as contract
from tests.relay.store.postgres_db import fresh_database
from tests.relay.store.test_store_contract import FOREVER, Backend, device, envelope, open_store, with_devices

backend = contract.backend  # the contract's fixture: every test runs on SQLite and PostgreSQL (both floors)


async def test_retries_in_a_full_inbox_are_duplicates_and_a_refused_batch_leaves_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    async with open_store(backend, tmp_path) as store:
        a, b = device(1), device(2, "e" * 32)
        await with_devices(store, a, b)
        first = await store.store_envelopes("s", [envelope(a, b"full-0001"), envelope(a, b"full-0002")], 10, 2, FOREVER)
        # The inbox is full: a plan without the keys would refuse, the retry is answered with the originals.
        again = await store.store_envelopes("s", [envelope(a, b"full-0001"), envelope(a, b"full-0002")], 20, 2, FOREVER)
        assert again == [StoredEnvelope(r.envelope_id, 10, True, a.device_id) for r in first]
        # With room in the inbox the first attempt writes the rows, its pointers conflict, and the
        # savepoint takes the rows back: the retry adds nothing.
        assert await store.store_envelopes("s", [envelope(a, b"full-0002")], 25, 9, FOREVER) == again[1:]
        assert [r.envelope_id for r in await store.read_inbox(a.device_id, 0, 10, 0)] == [r.envelope_id for r in first]
        # A fresh envelope for ``b`` is written before the reused key's pointer is refused: the conflict
        # rolls the whole batch back, and b's inbox stays empty.
        with pytest.raises(TetherlessError) as reused:
            await store.store_envelopes(
                "s", [envelope(b, b"fresh-001"), envelope(a, b"full-0001", b"another")], 30, 2, FOREVER
            )
        assert reused.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
        assert await store.read_inbox(b.device_id, 0, 10, 0) == []
        # Half retried, half fresh, with one place left in b's inbox: both answers in one batch.
        mixed = await store.store_envelopes("s", [envelope(a, b"full-0002"), envelope(b, b"fresh-001")], 40, 1, FOREVER)
        assert mixed[0] == StoredEnvelope(first[1].envelope_id, 10, True, a.device_id)
        assert not mixed[1].duplicate
        assert [r.envelope_id for r in await store.read_inbox(b.device_id, 0, 10, 0)] == [mixed[1].envelope_id]
        with pytest.raises(TetherlessError) as full:
            await store.store_envelopes("s", [envelope(b, b"fresh-002")], 50, 1, FOREVER)
        assert full.value.code is ErrorCode.INBOX_FULL


async def test_sqlite_counts_follow_a_rolled_back_operation_and_a_restart(tmp_path: Path) -> None:
    a = device(1)
    async with open_store(Backend("sqlite"), tmp_path) as store:
        assert isinstance(store, SQLiteStore)
        await with_devices(store, a)

        def send_then_fail(conn: object) -> None:
            inbox.store_envelopes(
                conn,
                SQLITE,
                sender_device="s",
                envelopes=[envelope(a, b"lost-001"), envelope(a, b"lost-002")],
                now_ms=1,
                max_inbox=2,
                forget_at_ms=FOREVER,
                compact=True,
            )
            raise RuntimeError("the operation fails after its send")

        with pytest.raises(RuntimeError):
            await store._write(send_then_fail)
        # The rolled-back send counted two envelopes; the inbox holds none, so two still fit.
        kept = await store.store_envelopes("s", [envelope(a, b"kept-001"), envelope(a, b"kept-002")], 2, 2, FOREVER)
        assert not any(r.duplicate for r in kept)
    async with open_store(Backend("sqlite"), tmp_path) as store:
        # After a restart the count is loaded from the inbox: full.
        with pytest.raises(TetherlessError) as full:
            await store.store_envelopes("s", [envelope(a, b"over-001")], 3, 2, FOREVER)
        assert full.value.code is ErrorCode.INBOX_FULL
        assert await store.acknowledge(a.device_id, None, [kept[0].envelope_id]) == 1
        assert not (await store.store_envelopes("s", [envelope(a, b"over-001")], 4, 2, FOREVER))[0].duplicate


async def test_sqlite_counts_are_dropped_when_another_connection_commits(tmp_path: Path) -> None:
    a = device(1)
    async with open_store(Backend("sqlite"), tmp_path) as one, open_store(Backend("sqlite"), tmp_path) as two:
        await with_devices(one, a)
        await one.store_envelopes("s", [envelope(a, b"one-0001")], 1, 3, FOREVER)  # one counts 1
        await two.store_envelopes("s", [envelope(a, b"two-0001"), envelope(a, b"two-0002")], 2, 3, FOREVER)
        # one's count of 1 is stale: the file holds 3.
        with pytest.raises(TetherlessError) as full:
            await one.store_envelopes("s", [envelope(a, b"one-0002")], 3, 3, FOREVER)
        assert full.value.code is ErrorCode.INBOX_FULL


def test_counts_changed_by_a_transaction_that_does_not_commit_are_forgotten() -> None:
    counts = QueueCounts()
    counts.begin(1)
    counts.put(1, 5)
    counts.operation_done()
    counts.committed()
    counts.begin(1)
    counts.put(1, 6)
    counts.put(2, 1)
    counts.operation_done()
    counts.lower(1, 10)  # never below zero
    assert counts.known([1, 2]) == {1: 0, 2: 1}
    counts.operation_failed()
    assert counts.known([1, 2]) == {2: 1}  # the failed operation's count of device 1 is loaded again
    counts.rolled_back()
    assert counts.known([1, 2]) == {}
    counts.put(3, 4)
    counts.committed()
    counts.begin(1)
    assert counts.known([3]) == {3: 4}
    counts.begin(2)  # another connection committed
    assert counts.known([3]) == {}


async def test_a_copy_into_postgresql_counts_the_queued_envelopes(tmp_path: Path) -> None:
    """SQLite's column ``devices.queued`` is not kept (the writer counts in memory): the copy counts the rows."""
    a = device(1)
    async with open_store(Backend("sqlite"), tmp_path) as store:
        await with_devices(store, a)
        await store.store_envelopes("s", [envelope(a, b"copied-1"), envelope(a, b"copied-2")], 1, 3, FOREVER)
    with fresh_database() as url:
        await trio.to_thread.run_sync(copy_from_sqlite, tmp_path / DB_FILE, url)
        async with open_store(Backend("postgres", url), tmp_path) as pg:
            await pg.store_envelopes("s", [envelope(a, b"copied-3")], 2, 3, FOREVER)
            with pytest.raises(TetherlessError) as full:
                await pg.store_envelopes("s", [envelope(a, b"copied-4")], 3, 3, FOREVER)
            assert full.value.code is ErrorCode.INBOX_FULL


async def test_a_clean_stop_writes_the_sqlite_counts_back_to_the_column(tmp_path: Path) -> None:
    """For what reads ``devices.queued`` with the relay stopped (a previous version of the relay)."""
    a, b = device(1), device(2, "e" * 32)
    async with open_store(Backend("sqlite"), tmp_path) as store:
        await with_devices(store, a, b)
        sent = await store.store_envelopes("s", [envelope(a, b"saved-01"), envelope(a, b"saved-02")], 1, 9, FOREVER)
        await store.store_envelopes("s", [envelope(b, b"saved-03")], 1, 9, FOREVER)
        assert await store.acknowledge(a.device_id, None, [sent[0].envelope_id]) == 1
    conn = sqlite3.connect(tmp_path / DB_FILE)
    try:
        queued = dict(conn.execute("SELECT device_id, queued FROM devices").fetchall())
    finally:
        conn.close()
    assert queued == {a.device_id: 1, b.device_id: 1}


@pytest.mark.parametrize("remote", [False, True], ids=["local", "outbox"])
async def test_a_digest_left_to_the_store_tells_a_retry_from_a_reused_key(
    backend: Backend, tmp_path: Path, remote: bool
) -> None:
    """The service gives no digest (``NewEnvelope.idempotency_digest`` computes it from the address text and
    the ciphertext when a key is stored apart: envelopes for other relays, or every key below the compact
    floor); a retry is still a duplicate and a reused key still a conflict, whichever row holds the key."""
    async with open_store(backend, tmp_path) as store:
        a = device(1)
        await with_devices(store, a)
        relay = "other.example" if remote else ""
        text = f"{a.device_id}.{a.account_id}@{relay or 'relay.test'}"

        def lazy(key: bytes, body: bytes, address: str = text) -> NewEnvelope:
            return NewEnvelope(a.device_id, a.account_id, key, os.urandom(16), FOREVER, body, relay, address)

        assert lazy(b"k", b"ct").idempotency_digest() == envelope_digest(text, b"ct")
        assert msgspec.structs.replace(lazy(b"k", b"ct"), digest=b"given").idempotency_digest() == b"given"
        first = await store.store_envelopes("s", [lazy(b"lazy-0001", b"body")], 10, 5, FOREVER)
        again = await store.store_envelopes("s", [lazy(b"lazy-0001", b"body")], 20, 5, FOREVER)
        assert again == [StoredEnvelope(first[0].envelope_id, 10, True, a.device_id)]
        with pytest.raises(TetherlessError) as reused:
            await store.store_envelopes("s", [lazy(b"lazy-0001", b"other body")], 30, 5, FOREVER)
        assert reused.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
