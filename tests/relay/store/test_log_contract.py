"""The account log's Store contract (docs/account-log.md §2, §14.4), on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.store import DeviceRecord, PostgresStore, SQLiteStore, Store
from relay.store.base import NewLogRecord, StoredLogRecord
from tests.relay.store.postgres_db import fresh_database

ACCOUNT = "a" * 32
OTHER = "b" * 32
DAY = 86_400_000
NO_QUOTA = 0
PAGE = 10_000
BIG = 1 << 30


@dataclass(frozen=True)
class Backend:
    name: str
    url: str = ""


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "postgres":
        with fresh_database() as url:
            yield Backend("postgres", url)
    else:
        yield Backend("sqlite")


@asynccontextmanager
async def open_store(backend: Backend, tmp_path: Path, pool_max: int = 4) -> AsyncIterator[Store]:
    """A store on the test's database; each call opens another instance (other connections) on it."""
    store: Store
    if backend.name == "postgres":
        store = await PostgresStore.open(backend.url, pool_min=1, pool_max=pool_max)
    else:
        store = await SQLiteStore.open(tmp_path)
    try:
        yield store
    finally:
        await store.close()


def rid(n: int) -> bytes:
    return n.to_bytes(16, "big")


def event(n: int, epoch: int = 1, body: bytes = b"ciphertext") -> NewLogRecord:
    return NewLogRecord(rid(n), "event", epoch, body)


def key(n: int, epoch: int, list_version: int = 1, body: bytes = b"key-record") -> NewLogRecord:
    return NewLogRecord(rid(n), "key", epoch, body, device_list_version=list_version)


def part(n: int, snapshot: bytes, body: bytes = b"part-bytes") -> NewLogRecord:
    return NewLogRecord(rid(n), "snapshot_part", 1, body, snapshot_id=snapshot)


def manifest(n: int, snapshot: bytes, covers: int, parts: int) -> NewLogRecord:
    return NewLogRecord(rid(n), "snapshot", 1, b"manifest", snapshot_id=snapshot, covers=covers, parts=parts)


async def with_account(store: Store, account: str = ACCOUNT, n: int = 1) -> None:
    """An account whose log has epoch 1 (a key record at position 1, ``rid(1000 + n)``)."""
    dev = DeviceRecord(f"{'d' * 31}{'cdefgh'[n]}", account, bytes([n]) * 32, bytes([n + 1]) * 32, 1)
    await store.create_account(account, dev, b"list", 1)
    outcome = await store.append_log(account, [key(1000 + n, 1)], 0, 1, NO_QUOTA)
    assert outcome.head == 1


async def everything(store: Store, account: str = ACCOUNT, full: bool = True) -> list[StoredLogRecord]:
    page = await store.read_log(account, 0, PAGE, BIG, full)
    return page.records


async def raises(code: ErrorCode, store: Store, *records: NewLogRecord, expected_head: int | None = None) -> None:
    """The append fails with ``code`` and leaves the log exactly as it was."""
    before = await store.read_log(ACCOUNT, 0, PAGE, BIG, True)
    with pytest.raises(TetherlessError) as info:
        await store.append_log(ACCOUNT, list(records), expected_head, 50, NO_QUOTA)
    assert info.value.code is code
    assert await store.read_log(ACCOUNT, 0, PAGE, BIG, True) == before


async def test_dense_positions_from_one(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        empty = await store.read_log(ACCOUNT, 0, 10, BIG, False)
        assert (empty.records, empty.head, empty.horizon, empty.snapshot) == ([], 0, 0, None)
        await with_account(store)
        first = await store.append_log(ACCOUNT, [event(1), event(2), event(3)], None, 10, NO_QUOTA)
        assert first.head == 4
        assert [(r.position, r.duplicate) for r in first.results] == [(2, False), (3, False), (4, False)]
        second = await store.append_log(ACCOUNT, [event(4)], 4, 11, NO_QUOTA)
        assert [r.position for r in second.results] == [5]
        records = await everything(store)
        assert [r.position for r in records] == [1, 2, 3, 4, 5]
        assert [r.record_id for r in records[1:]] == [rid(1), rid(2), rid(3), rid(4)]  # request order
        assert records[1].kind == "event"
        assert records[1].committed_at_ms == 10
        assert records[1].size == 10
        assert records[0].kind == "key"
        assert records[0].device_list_version == 1
        page = await store.read_log(ACCOUNT, 2, 2, BIG, False)
        assert ([r.position for r in page.records], page.head) == ([3, 4], 5)
        header = await store.read_log(ACCOUNT, 0, 0, BIG, False)
        assert (header.records, header.head) == ([], 5)


async def test_logs_of_two_accounts_are_separate(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_account(store, ACCOUNT, 1)
        await with_account(store, OTHER, 2)
        await store.append_log(ACCOUNT, [event(1)], None, 10, NO_QUOTA)
        other = await store.append_log(OTHER, [event(1), event(2)], None, 10, NO_QUOTA)  # same id, other account
        assert [(r.position, r.duplicate) for r in other.results] == [(2, False), (3, False)]
        assert [r.position for r in await everything(store, ACCOUNT)] == [1, 2]
        assert [r.record_id for r in await everything(store, OTHER)] == [rid(1002), rid(1), rid(2)]


async def test_mixed_batch_reports_duplicates_with_original_positions(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_account(store)
        await store.append_log(ACCOUNT, [event(1), event(2)], None, 10, NO_QUOTA)
        # A later copy of a record with other bytes: the first write wins; the relay never compares.
        mixed = await store.append_log(ACCOUNT, [event(2, body=b"other"), event(3), event(1)], None, 20, NO_QUOTA)
        assert mixed.head == 4
        assert [(r.record_id, r.position, r.duplicate) for r in mixed.results] == [
            (rid(2), 3, True),
            (rid(3), 4, False),
            (rid(1), 2, True),
        ]
        records = await everything(store)
        assert [r.position for r in records] == [1, 2, 3, 4]
        assert records[2].ciphertext == b"ciphertext"


async def test_all_duplicate_batch_ignores_a_stale_expected_head(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_account(store)
        await store.append_log(ACCOUNT, [event(1), event(2)], 1, 10, NO_QUOTA)
        await store.append_log(ACCOUNT, [event(3)], None, 11, NO_QUOTA)
        retry = await store.append_log(ACCOUNT, [event(1), event(2)], 1, 12, NO_QUOTA)  # head is 4 now
        assert retry.head == 4
        assert [(r.position, r.duplicate) for r in retry.results] == [(2, True), (3, True)]


async def test_mixed_batch_with_stale_head_conflicts_and_stores_nothing(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_account(store)
        await store.append_log(ACCOUNT, [event(1), event(2)], None, 10, NO_QUOTA)
        before = await everything(store)
        with pytest.raises(TetherlessError) as info:
            await store.append_log(ACCOUNT, [event(1), event(9)], 1, 11, NO_QUOTA)
        assert info.value.code is ErrorCode.LOG_CONFLICT
        assert info.value.head == 3
        assert await everything(store) == before
        await raises(ErrorCode.LOG_CONFLICT, store, event(9), expected_head=4)  # ahead of the head
        ok = await store.append_log(ACCOUNT, [event(9)], 3, 12, NO_QUOTA)
        assert ok.results[0].position == 4


async def test_epoch_rules(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        dev = DeviceRecord("d" * 32, ACCOUNT, b"s" * 32, b"b" * 32, 1)
        await store.create_account(ACCOUNT, dev, b"list", 1)
        with pytest.raises(TetherlessError) as info:
            await store.append_log(ACCOUNT, [event(1)], None, 5, NO_QUOTA)  # no epoch exists yet
        assert (info.value.code, info.value.epoch) == (ErrorCode.LOG_EPOCH_STALE, 0)
        await raises(ErrorCode.LOG_EPOCH_STALE, store, key(2, 2), expected_head=0)  # must be epoch 1
        assert (await store.append_log(ACCOUNT, [key(2, 1)], 0, 5, NO_QUOTA)).head == 1
        await store.append_log(ACCOUNT, [event(3)], None, 6, NO_QUOTA)
        with pytest.raises(TetherlessError) as info:
            await store.append_log(ACCOUNT, [event(4, epoch=2)], None, 7, NO_QUOTA)  # an epoch that does not exist
        assert (info.value.code, info.value.epoch) == (ErrorCode.LOG_EPOCH_STALE, 1)
        await raises(ErrorCode.LOG_EPOCH_STALE, store, key(4, 3), expected_head=2)  # skips an epoch
        await store.append_log(ACCOUNT, [key(4, 1, list_version=2)], 2, 8, NO_QUOTA)  # grant-only: same epoch
        # A new epoch and its first records may share one batch.
        both = await store.append_log(ACCOUNT, [key(5, 2, 2), event(6, epoch=2)], 3, 9, NO_QUOTA)
        assert both.head == 5
        with pytest.raises(TetherlessError) as info:
            await store.append_log(ACCOUNT, [event(7, epoch=1)], None, 10, NO_QUOTA)  # below the current epoch
        assert (info.value.code, info.value.epoch) == (ErrorCode.LOG_EPOCH_STALE, 2)
        # Device list version 3 revokes a device: only a key record for a new epoch naming version >= 3 goes in.
        await store.note_revocation(ACCOUNT, 3)
        await store.note_revocation(ACCOUNT, 2)  # never lowers it
        await raises(ErrorCode.LOG_REKEY_REQUIRED, store, event(7, epoch=2))
        await raises(ErrorCode.LOG_REKEY_REQUIRED, store, key(7, 2, 3), expected_head=5)  # grant-only is not enough
        await raises(ErrorCode.LOG_REKEY_REQUIRED, store, key(7, 3, 2), expected_head=5)  # names an old list
        await store.append_log(ACCOUNT, [key(7, 3, 3)], 5, 11, NO_QUOTA)
        assert (await store.append_log(ACCOUNT, [event(8, epoch=3)], None, 12, NO_QUOTA)).head == 7


async def test_snapshot_rules(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_account(store)
        s1, s2 = b"S" * 16, b"T" * 16
        await store.append_log(ACCOUNT, [event(1), event(2)], None, 10, NO_QUOTA)
        await raises(ErrorCode.SNAPSHOT_INCOMPLETE, store, manifest(9, s1, 3, 2))  # no parts at all
        await store.append_log(ACCOUNT, [part(3, s1, b"A" * 100)], None, 11, NO_QUOTA)
        await raises(ErrorCode.SNAPSHOT_INCOMPLETE, store, manifest(9, s1, 3, 2))  # one of two
        await raises(ErrorCode.INVALID_FIELD, store, part(4, s1), manifest(9, s1, 6, 2))  # covers above the head
        assert await store.log_snapshot(ACCOUNT) is None
        done = await store.append_log(ACCOUNT, [part(4, s1, b"B" * 50), manifest(5, s1, 3, 2)], None, 12, NO_QUOTA)
        assert done.head == 6
        ref = await store.log_snapshot(ACCOUNT)
        assert ref is not None
        assert (ref.snapshot_id, ref.position, ref.covers, ref.parts, ref.epoch, ref.committed_at_ms) == (
            s1,
            6,
            3,
            2,
            1,
            12,
        )
        await raises(ErrorCode.SNAPSHOT_INCOMPLETE, store, part(6, s1), manifest(7, s1, 3, 2))  # three parts now
        # Stubbed pages carry every position, with sizes; parts=full returns the bytes.
        stub = await store.read_log(ACCOUNT, 0, PAGE, BIG, False)
        assert [r.position for r in stub.records] == [1, 2, 3, 4, 5, 6]
        assert [(r.ciphertext, r.size) for r in stub.records[3:5]] == [(b"", 100), (b"", 50)]
        assert stub.records[5].ciphertext == b"manifest"
        assert stub.snapshot == ref
        full = await store.read_log(ACCOUNT, 0, PAGE, BIG, True)
        assert [r.ciphertext for r in full.records[3:5]] == [b"A" * 100, b"B" * 50]
        parts = await store.read_snapshot_parts(ACCOUNT, s1, 0, PAGE, BIG)
        assert [(r.position, r.ciphertext) for r in parts.records] == [(4, b"A" * 100), (5, b"B" * 50)]
        assert [r.position for r in (await store.read_snapshot_parts(ACCOUNT, s1, 4, PAGE, BIG)).records] == [5]
        with pytest.raises(TetherlessError) as info:
            await store.read_snapshot_parts(ACCOUNT, s2, 0, PAGE, BIG)
        assert info.value.code is ErrorCode.NO_SNAPSHOT
        # A newer snapshot (larger covers) becomes the newest; the old one is no longer served.
        await store.append_log(ACCOUNT, [part(10, s2), manifest(11, s2, 6, 1)], None, 13, NO_QUOTA)
        newest = await store.log_snapshot(ACCOUNT)
        assert newest is not None
        assert (newest.snapshot_id, newest.position) == (s2, 8)
        with pytest.raises(TetherlessError) as info:
            await store.read_snapshot_parts(ACCOUNT, s1, 0, PAGE, BIG)
        assert info.value.code is ErrorCode.NO_SNAPSHOT


async def test_pages_respect_the_byte_limit_but_hold_one_record(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_account(store)
        big = b"x" * 1000
        await store.append_log(ACCOUNT, [event(i, body=big) for i in range(1, 6)], None, 10, NO_QUOTA)
        await store.append_log(ACCOUNT, [part(6, b"S" * 16, big), part(7, b"S" * 16, big)], None, 10, NO_QUOTA)
        page = await store.read_log(ACCOUNT, 1, 100, 2500, False)
        assert [r.position for r in page.records] == [2, 3]
        page = await store.read_log(ACCOUNT, 1, 100, 10, False)
        assert [r.position for r in page.records] == [2]  # above the limit alone: still one record
        # Stubbed parts cost nothing against the limit; full ones do.
        assert [r.position for r in (await store.read_log(ACCOUNT, 5, 100, 1500, False)).records] == [6, 7, 8]
        assert [r.position for r in (await store.read_log(ACCOUNT, 5, 100, 1500, True)).records] == [6]


async def test_quota_is_exact_under_eight_concurrent_writers(backend: Backend, tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_store(backend, tmp_path))
        await with_account(first)  # key record: 10 bytes
        writers = [await stack.enter_async_context(open_store(backend, tmp_path, 2)) for _ in range(8)]
        stored: list[int] = []
        refused: list[int] = []
        codes: set[ErrorCode] = set()

        async def writer(index: int, store: Store) -> None:
            for j in range(20):
                try:
                    await store.append_log(ACCOUNT, [event(index * 100 + j)], None, 10, 1000)
                    stored.append(index)
                except TetherlessError as exc:
                    refused.append(index)
                    codes.add(exc.code)

        async with trio.open_nursery() as nursery:
            for index, store in enumerate(writers):
                nursery.start_soon(writer, index, store)
        assert len(stored) == 99  # 10 + 99 * 10 = 1000 bytes exactly
        assert len(refused) == 160 - 99
        assert codes == {ErrorCode.LOG_QUOTA}
        records = await everything(first)
        assert [r.position for r in records] == list(range(1, 101))
        assert sum(r.size for r in records) == 1000


async def test_concurrent_appends_are_visible_in_position_order(backend: Backend, tmp_path: Path) -> None:
    """L1/L2/L3/L5: 8 writers on their own connections append at once while a reader follows with after=last.

    The reader must see every position exactly once, never p+1 before p, and nothing may later appear at a
    position it already passed; every record is stored once, batches at consecutive positions in order.
    """
    writers_n, appends, rng = 8, 30, random.Random(7)
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_store(backend, tmp_path))
        await with_account(first)
        reader = await stack.enter_async_context(open_store(backend, tmp_path, 2))
        writers = [await stack.enter_async_context(open_store(backend, tmp_path, 2)) for _ in range(writers_n)]
        seen: list[StoredLogRecord] = []
        batches: dict[bytes, list[int]] = {}
        done = trio.Event()

        async def writer(index: int, store: Store) -> None:
            for j in range(appends):
                size = rng.choice((1, 1, 3))
                ids = [index * 10_000 + j * 10 + k for k in range(size)]
                batch = [event(n) for n in ids]
                if j % 5 == 4:  # a retry of an earlier append: stores nothing new
                    batch = [event(index * 10_000 + (j - 1) * 10)]
                outcome = await store.append_log(ACCOUNT, batch, None, 10, NO_QUOTA)
                positions = [r.position for r in outcome.results]
                if j % 5 != 4:
                    assert positions == list(range(positions[0], positions[0] + len(batch)))
                    assert not any(r.duplicate for r in outcome.results)
                    batches[rid(ids[0])] = positions
                else:
                    assert outcome.results[0].duplicate

        async def follow() -> None:
            cursor = 1
            while True:
                finished = done.is_set()
                page = await reader.read_log(ACCOUNT, cursor, 50, BIG, True)
                for record in page.records:
                    assert record.position == cursor + 1, f"saw {record.position} right after {cursor}"
                    cursor = record.position
                    seen.append(record)
                assert page.head >= cursor
                if finished and not page.records:
                    return
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            async with trio.open_nursery() as inner:
                for index, store in enumerate(writers):
                    inner.start_soon(writer, index, store)
            done.set()
        final = await everything(first)
        assert final[1:] == seen  # nothing appeared later at a position the reader had passed
        ids = [r.record_id for r in final]
        assert len(ids) == len(set(ids))
        expected = 1 + sum(len(p) for p in batches.values())
        assert [r.position for r in final] == list(range(1, expected + 1))
        by_id = {r.record_id: r.position for r in final}
        for first_id, positions in batches.items():
            assert by_id[first_id] == positions[0]


async def test_retention_keeps_newest_snapshot_and_key_records(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_account(store)  # key record at t=1
        snap = b"S" * 16
        t0 = 10 * DAY
        await store.append_log(ACCOUNT, [event(1), event(2)], None, t0, NO_QUOTA)  # 2, 3
        await store.append_log(ACCOUNT, [part(3, snap), manifest(4, snap, 3, 1)], None, t0, NO_QUOTA)  # 4, 5
        await store.append_log(ACCOUNT, [event(5)], None, t0 + DAY, NO_QUOTA)  # 6
        await store.append_log(ACCOUNT, [key(6, 1, 1)], 6, t0 + DAY, NO_QUOTA)  # 7, grant-only
        await store.append_log(ACCOUNT, [event(7)], None, t0 + 3 * DAY, NO_QUOTA)  # 8
        assert (await store.get_log_retention(ACCOUNT)).days is None
        report = await store.sweep_log(t0 + 4 * DAY, 1000)  # forever: nothing goes
        assert (report.deleted, report.emptied) == (0, 0)
        retention = await store.set_log_retention(ACCOUNT, 2, t0 + 4 * DAY)
        assert (retention.days, retention.horizon, retention.updated_at_ms) == (2, 0, t0 + 4 * DAY)
        report = await store.sweep_log(t0 + 4 * DAY, 1000)  # older than t0 + 2 days goes
        assert (report.deleted, report.more) == (3, False)
        page = await store.read_log(ACCOUNT, 0, PAGE, BIG, True)
        assert [r.position for r in page.records] == [1, 4, 5, 7, 8]
        assert page.horizon == 7
        assert page.head == 8
        assert page.snapshot is not None
        assert page.snapshot.position == 5
        assert (await store.get_log_retention(ACCOUNT)).horizon == 7
        assert (await store.sweep_log(t0 + 4 * DAY, 1000)).deleted == 0  # idempotent
        # The usage went down by exactly the deleted bytes: 10 (key) + 10 + 10 (part, manifest) + 10 + 10 left.
        await store.append_log(ACCOUNT, [event(8, body=b"y" * 50)], None, t0 + 4 * DAY, 100)
        with pytest.raises(TetherlessError) as info:
            await store.append_log(ACCOUNT, [event(9)], None, t0 + 4 * DAY, 100)
        assert info.value.code is ErrorCode.LOG_QUOTA
        # In batches: a small batch reports that more is due.
        await store.set_log_retention(ACCOUNT, 1, t0 + 4 * DAY)
        step = await store.sweep_log(t0 + 10 * DAY, 1)
        assert step.more


async def test_superseded_and_abandoned_snapshots_are_emptied(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_account(store)
        old, new, lost = b"O" * 16, b"N" * 16, b"L" * 16
        t0 = 10 * DAY
        await store.append_log(ACCOUNT, [event(1)], None, t0, NO_QUOTA)  # 2
        await store.append_log(ACCOUNT, [part(2, old), manifest(3, old, 2, 1)], None, t0, NO_QUOTA)  # 3, 4
        await store.append_log(ACCOUNT, [part(4, lost)], None, t0 + DAY, NO_QUOTA)  # 5: never completed
        await store.append_log(ACCOUNT, [part(5, new), manifest(6, new, 5, 1)], None, t0 + DAY, NO_QUOTA)  # 6, 7
        before = await everything(store)
        assert (await store.sweep_log(t0 + DAY + 1, 1000)).emptied == 0  # within both grace periods
        report = await store.sweep_log(t0 + 2 * DAY + 1, 1000)
        assert (report.deleted, report.emptied) == (0, 1)  # the abandoned part (24 h)
        report = await store.sweep_log(t0 + 9 * DAY, 1000)  # superseded for more than 7 days
        assert (report.deleted, report.emptied) == (0, 2)
        after = await everything(store)
        assert [r.position for r in after] == [r.position for r in before]  # positions stay dense
        assert [(r.position, r.size, r.ciphertext) for r in after if r.size == 0] == [
            (3, 0, b""),
            (4, 0, b""),
            (5, 0, b""),
        ]
        assert [r.ciphertext for r in after[5:]] == [b"part-bytes", b"manifest"]
        ref = await store.log_snapshot(ACCOUNT)
        assert ref is not None
        assert ref.snapshot_id == new
        # An emptied part no longer counts towards a manifest.
        await raises(ErrorCode.SNAPSHOT_INCOMPLETE, store, manifest(9, lost, 5, 1))


async def test_migrate_preserves_heads_and_positions(tmp_path: Path) -> None:
    from relay.store.postgres import copy_from_sqlite

    store = await SQLiteStore.open(tmp_path)
    try:
        await with_account(store)
        await store.append_log(ACCOUNT, [event(1), part(2, b"S" * 16), manifest(3, b"S" * 16, 2, 1)], None, 5, 0)
        await store.set_log_retention(ACCOUNT, 30, 6)
        want = await store.read_log(ACCOUNT, 0, PAGE, BIG, True)
    finally:
        await store.close()
    with fresh_database() as url:
        report = await trio.to_thread.run_sync(copy_from_sqlite, tmp_path / "relay.sqlite3", url)
        assert {t.table: t.rows for t in report}["log_records"] == 4
        pg = await PostgresStore.open(url, pool_min=1, pool_max=2)
        try:
            assert await pg.read_log(ACCOUNT, 0, PAGE, BIG, True) == want
            assert (await pg.get_log_retention(ACCOUNT)).days == 30
            more = await pg.append_log(ACCOUNT, [event(1), event(7)], None, 9, 0)
            assert [(r.position, r.duplicate) for r in more.results] == [(2, True), (5, False)]
        finally:
            await pg.close()
