"""The media blob part of the Store contract (migration 0011), on every backend (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.store import PostgresStore, SQLiteStore, Store
from relay.store.base import BlobTrash, NewBlobUpload
from relay.store.postgres import copy_from_sqlite
from relay.store.sqlite import DB_FILE
from tests.relay.store import test_store_contract as contract
from tests.relay.store.postgres_db import fresh_database
from tests.relay.store.test_store_contract import Backend, device, open_store, with_devices

backend = contract.backend  # the contract's fixture: every test runs on SQLite and PostgreSQL

ALICE = device(1, "a" * 32)
BOB = device(2, "b" * 32)
DAY_MS = 86_400_000
TTL_MS = 30 * DAY_MS


def upload(n: int, owner=ALICE, length: int = 100, sha: bytes | None = None, cap: bytes | None = None) -> NewBlobUpload:
    return NewBlobUpload(
        upload_id=f"{n:032x}",
        account_id=owner.account_id,
        device_id=owner.device_id,
        length=length,
        sha256=sha,
        capability_hash=cap,
        created_at_ms=1000,
        expires_at_ms=1000 + DAY_MS,
    )


def digest(tag: bytes) -> bytes:
    return hashlib.sha256(tag).digest()


async def stored(
    store: Store, n: int, owner=ALICE, length: int = 100, tag: bytes = b"x", cap: bytes | None = None
) -> str:
    """An upload created, fully appended and finished: returns its blob id."""
    new = upload(n, owner, length, digest(tag), cap)
    assert (await store.create_blob_upload(new, 0, 1000 + TTL_MS)).blob_id is None
    assert await store.lease_blob_upload(new.upload_id, 0, "h", 1000, 2000)
    assert await store.commit_blob_append(new.upload_id, "h", 0, length, "state-full")
    blob_id = await store.finish_blob_upload(new.upload_id, digest(tag), 1000 + TTL_MS, 1000)
    assert blob_id is not None
    return blob_id


async def test_an_upload_goes_from_creation_to_a_blob(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_devices(store, ALICE)
        new = upload(1, sha=digest(b"x"), cap=digest(b"cap"))
        record = await store.create_blob_upload(new, 0, 1000 + TTL_MS)
        assert (record.offset, record.storage_state, record.blob_id) == (0, "", None)
        await store.set_blob_upload_state(new.upload_id, "s0")
        assert await store.get_blob_upload(new.upload_id) == record.__class__(
            new.upload_id, ALICE.account_id, ALICE.device_id, 100, 0, digest(b"x"), digest(b"cap"), "s0", 1000,
            1000 + DAY_MS, None,
        )  # fmt: skip
        assert await store.blob_usage(ALICE.account_id) == 100  # the declared length counts at once
        assert await store.lease_blob_upload(new.upload_id, 0, "h1", 1000, 5000)
        assert await store.commit_blob_append(new.upload_id, "h1", 0, 60, "s60")
        assert await store.finish_blob_upload(new.upload_id, digest(b"x"), 1000 + TTL_MS, 1000) is None  # 60 of 100
        assert await store.lease_blob_upload(new.upload_id, 60, "h2", 1000, 5000)
        assert await store.commit_blob_append(new.upload_id, "h2", 60, 100, "s100")
        blob_id = await store.finish_blob_upload(new.upload_id, digest(b"x"), 1000 + TTL_MS, 1000)
        assert blob_id == new.upload_id
        # idempotent: a retry answers the same blob
        assert await store.finish_blob_upload(new.upload_id, digest(b"x"), 1000 + TTL_MS, 1000) == blob_id
        blob = await store.get_blob(blob_id)
        assert blob is not None
        assert (blob.account_id, blob.sha256, blob.length, blob.storage_key) == (
            ALICE.account_id,
            digest(b"x"),
            100,
            blob_id,
        )
        assert blob.capability_hashes == (digest(b"cap"),)
        finished = await store.get_blob_upload(new.upload_id)
        assert finished is not None
        assert (finished.offset, finished.blob_id) == (100, blob_id)
        assert await store.blob_usage(ALICE.account_id) == 100  # the blob now, not the upload as well
        assert await store.blob_stored_bytes() == 100
        assert await store.blob_trash(10) == []


async def test_quota_counts_blobs_and_unfinished_uploads_and_refusal_stores_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_devices(store, ALICE, BOB)
        await stored(store, 1, length=400)
        await store.create_blob_upload(upload(2, length=500), 1000, 1000 + TTL_MS)
        assert await store.blob_usage(ALICE.account_id) == 900
        with pytest.raises(TetherlessError) as raised:
            await store.create_blob_upload(upload(3, length=101), 1000, 1000 + TTL_MS)
        assert raised.value.code is ErrorCode.BLOB_QUOTA_EXCEEDED
        assert await store.get_blob_upload(upload(3).upload_id) is None
        assert await store.blob_usage(ALICE.account_id) == 900
        # exactly up to the quota is fine; another account has its own
        await store.create_blob_upload(upload(4, length=100), 1000, 1000 + TTL_MS)
        await store.create_blob_upload(upload(5, BOB, length=1000), 1000, 1000 + TTL_MS)
        # 0: no quota
        await store.create_blob_upload(upload(6, length=10**12), 0, 1000 + TTL_MS)


async def test_a_stored_digest_dedups_within_the_account_only(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_devices(store, ALICE, BOB)
        blob_id = await stored(store, 1, tag=b"same", cap=digest(b"cap1"))
        twin = await store.create_blob_upload(
            upload(2, sha=digest(b"same"), cap=digest(b"cap2")), 0, 1000 + TTL_MS + DAY_MS
        )
        assert (twin.offset, twin.blob_id) == (100, blob_id)  # born complete
        blob = await store.get_blob(blob_id)
        assert blob is not None
        assert sorted(blob.capability_hashes) == sorted([digest(b"cap1"), digest(b"cap2")])
        assert blob.expires_at_ms == 1000 + TTL_MS + DAY_MS  # the newer reference keeps it longer
        assert await store.blob_usage(ALICE.account_id) == 100
        # another account declaring the same digest gets an upload of its own (no cross-account answer)
        other = await store.create_blob_upload(upload(3, BOB, sha=digest(b"same")), 0, 1000 + TTL_MS)
        assert (other.offset, other.blob_id) == (0, None)


async def test_finishing_a_digest_stored_meanwhile_joins_it_and_trashes_the_copy(
    backend: Backend, tmp_path: Path
) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_devices(store, ALICE)
        new = upload(2, sha=None, cap=digest(b"cap2"))  # a generic tus client declares no digest
        await store.create_blob_upload(new, 0, 1000 + TTL_MS)
        blob_id = await stored(store, 1, tag=b"same")
        assert await store.lease_blob_upload(new.upload_id, 0, "h", 1000, 2000)
        assert await store.commit_blob_append(new.upload_id, "h", 0, 100, "s")
        assert await store.finish_blob_upload(new.upload_id, digest(b"same"), 1000 + TTL_MS, 1000) == blob_id
        blob = await store.get_blob(blob_id)
        assert blob is not None
        assert digest(b"cap2") in blob.capability_hashes
        assert await store.blob_trash(10) == [BlobTrash(new.upload_id, None)]
        assert await store.blob_stored_bytes() == 100


async def test_one_appender_at_a_time_and_only_at_the_committed_offset(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_devices(store, ALICE)
        new = upload(1)
        await store.create_blob_upload(new, 0, 1000 + TTL_MS)
        key = new.upload_id
        assert not await store.lease_blob_upload(key, 5, "h1", 1000, 5000)  # not the committed offset
        assert await store.lease_blob_upload(key, 0, "h1", 1000, 5000)
        assert not await store.lease_blob_upload(key, 0, "h2", 4999, 9000)  # held
        assert await store.lease_blob_upload(key, 0, "h1", 2000, 6000)  # renewed by its holder
        assert not await store.commit_blob_append(key, "h2", 0, 10, "s")  # h2 holds nothing
        assert await store.lease_blob_upload(key, 0, "h2", 6000, 9000)  # h1's lease lapsed: taken over
        assert not await store.commit_blob_append(key, "h1", 0, 10, "s")  # the stale holder commits nothing
        assert await store.commit_blob_append(key, "h2", 0, 10, "s10")
        assert not await store.commit_blob_append(key, "h2", 0, 20, "s")  # released by the commit; offset moved
        await store.release_blob_lease(key, "nobody")
        assert await store.lease_blob_upload(key, 10, "h3", 6000, 9000)
        await store.release_blob_lease(key, "h3")
        assert await store.lease_blob_upload(key, 10, "h4", 6000, 9000)  # released: free at once
        record = await store.get_blob_upload(key)
        assert record is not None
        assert (record.offset, record.storage_state) == (10, "s10")


async def test_racing_appenders_one_wins(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_devices(store, ALICE)
        await store.create_blob_upload(upload(1), 0, 1000 + TTL_MS)
        wins: list[bool] = []

        async def take(holder: str) -> None:
            wins.append(await store.lease_blob_upload(upload(1).upload_id, 0, holder, 1000, 9000))

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(take, f"h{i}")
        assert sorted(wins) == [False] * 7 + [True]


async def test_termination_and_deletion_send_storage_to_the_trash(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_devices(store, ALICE, BOB)
        new = upload(1)
        await store.create_blob_upload(new, 0, 1000 + TTL_MS)
        await store.set_blob_upload_state(new.upload_id, "multipart-1")
        assert await store.discard_blob_upload(new.upload_id, False, 1000)
        assert not await store.discard_blob_upload(new.upload_id, False, 1000)  # idempotent
        assert await store.get_blob_upload(new.upload_id) is None
        assert await store.blob_usage(ALICE.account_id) == 0
        blob_id = await stored(store, 2)
        assert await store.discard_blob_upload(blob_id, False, 1000)  # a finished upload's row goes, its blob stays
        assert await store.get_blob(blob_id) is not None
        assert not await store.delete_blob(blob_id, BOB.account_id, 1000)  # not Bob's
        assert await store.delete_blob(blob_id, ALICE.account_id, 1000)
        assert not await store.delete_blob(blob_id, ALICE.account_id, 1000)
        assert await store.get_blob(blob_id) is None
        assert sorted(await store.blob_trash(10), key=lambda t: t.storage_key) == [
            BlobTrash(new.upload_id, "multipart-1"),
            BlobTrash(blob_id, None),
        ]
        await store.forget_blob_trash([new.upload_id, blob_id])
        await store.forget_blob_trash([new.upload_id])  # idempotent
        assert await store.blob_trash(10) == []
        assert await store.blob_usage(ALICE.account_id) == 0


async def test_the_collector_drops_what_expired_in_batches(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await with_devices(store, ALICE)
        for n in range(1, 4):
            await store.create_blob_upload(upload(n), 0, 1000 + TTL_MS)  # unfinished, expire at 1000 + DAY_MS
        finished = await stored(store, 9)  # its upload row expires too, its blob lives on
        report = await store.collect_blobs(1000 + DAY_MS - 1, 2)
        assert (report.uploads, report.blobs, report.more) == (0, 0, False)
        report = await store.collect_blobs(1000 + DAY_MS, 2)
        assert report.more
        assert report.uploads + report.blobs <= 2
        while report.more:
            report = await store.collect_blobs(1000 + DAY_MS, 2)
        assert [await store.get_blob_upload(upload(n).upload_id) for n in (1, 2, 3, 9)] == [None] * 4
        assert await store.get_blob(finished) is not None
        assert sorted(t.storage_key for t in await store.blob_trash(10)) == [upload(n).upload_id for n in (1, 2, 3)]
        report = await store.collect_blobs(1000 + TTL_MS, 10)
        assert (report.uploads, report.blobs, report.trash) == (0, 1, (BlobTrash(finished, None),))
        assert await store.get_blob(finished) is None
        assert await store.blob_stored_bytes() == 0


async def test_collectors_racing_on_two_instances_count_each_row_once(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as first, open_store(backend, tmp_path) as second:
        await with_devices(first, ALICE)
        for n in range(1, 7):
            await first.create_blob_upload(upload(n), 0, 1000 + TTL_MS)
        counted: list[int] = []

        async def collect(store: Store) -> None:
            counted.append((await store.collect_blobs(1000 + DAY_MS, 100)).uploads)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect, first)
            nursery.start_soon(collect, second)
        assert sum(counted) == 6
        assert len(await first.blob_trash(100)) == 6


async def test_migrating_a_personal_relay_to_postgres_keeps_its_blobs(tmp_path: Path) -> None:
    """``tetherless migrate --to postgresql://…`` copies the blob tables (the bytes stay under data/blobs)."""
    sqlite = await SQLiteStore.open(tmp_path)
    try:
        await with_devices(sqlite, ALICE)
        blob_id = await stored(sqlite, 1, cap=digest(b"cap"))
        await sqlite.create_blob_upload(upload(2, length=7), 0, 1000 + TTL_MS)
        await sqlite.create_blob_upload(upload(3), 0, 1000 + TTL_MS)
        await sqlite.discard_blob_upload(upload(3).upload_id, False, 1000)  # its storage is still to drop
        before = (await sqlite.get_blob(blob_id), await sqlite.get_blob_upload(upload(2).upload_id))
    finally:
        await sqlite.close()
    with fresh_database() as url:
        copied = {table.table: table.rows for table in copy_from_sqlite(tmp_path / DB_FILE, url)}
        assert [copied[t] for t in ("blobs", "blob_capabilities", "blob_uploads", "blob_trash")] == [1, 1, 2, 1]
        postgres = await PostgresStore.open(url, pool_min=1, pool_max=2)
        try:
            assert (await postgres.get_blob(blob_id), await postgres.get_blob_upload(upload(2).upload_id)) == before
            assert await postgres.blob_usage(ALICE.account_id) == 107
            assert await postgres.blob_trash(10) == [BlobTrash(upload(3).upload_id, "")]
        finally:
            await postgres.close()
