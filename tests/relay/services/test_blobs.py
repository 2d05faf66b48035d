"""The blob service (relay/services/blobs.py) over a real SQLite store and real files: every rule it decides.

Each refusal is checked to leave nothing behind: no row, no file bytes beyond
the committed offset, the account's quota usage unchanged.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay import metrics
from relay.blobs.files import FileStorage
from relay.config import Config, ConfigError, load
from relay.services import blobs as blobs_service
from relay.services.auth import Principal
from relay.services.blobs import BlobService, BlobSettings, Checksum
from relay.services.context import ServiceContext, limits_from
from relay.store import SQLiteStore
from tests.relay.store.test_store_contract import device, with_devices

ALICE = device(1, "a" * 32)
BOB = device(2, "b" * 32)
A = Principal(ALICE.device_id, ALICE.account_id, b"t")
A2 = Principal(ALICE.device_id, ALICE.account_id, b"t2")  # the same account from another session
B = Principal(BOB.device_id, BOB.account_id, b"u")
START_MS = 1_800_000_000_000
SETTINGS = BlobSettings(max_bytes=1_000_000, quota_bytes=2_000_000, upload_expiry_seconds=3600, ttl_seconds=86_400)


class BodyCutError(Exception):
    """What a transport raises when the client goes away mid-body."""


@dataclass
class Relay:
    service: BlobService
    store: SQLiteStore
    root: Path
    clock: list[int]

    def file(self, key: str) -> Path:
        return self.root / key

    def restarted(self) -> BlobService:
        """A second process over the same store and files (its digest cache is empty)."""
        return BlobService(self.store, FileStorage(self.root), self.service._ctx, self.service.settings)


@asynccontextmanager
async def relay(tmp_path: Path, settings: BlobSettings = SETTINGS) -> AsyncIterator[Relay]:
    store = await SQLiteStore.open(tmp_path / "data")
    clock = [START_MS]
    ctx = ServiceContext("relay.test", limits_from(Config()), clock_ms=lambda: clock[0])
    root = tmp_path / "data" / "blobs"
    try:
        await with_devices(store, ALICE, BOB)
        yield Relay(BlobService(store, FileStorage(root), ctx, settings), store, root, clock)
    finally:
        await store.close()


async def body(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


async def cut(*parts: bytes) -> AsyncIterator[bytes]:
    async for part in body(*parts):
        yield part
    raise BodyCutError("peer reset")


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def checksum(algorithm: str, data: bytes) -> Checksum:
    return Checksum(algorithm, hashlib.new(algorithm, data).digest())


async def upload_all(r: Relay, data: bytes, *, declare: bool = True, capability: bytes | None = None) -> str:
    cap_hash = sha256(capability) if capability is not None else None
    status = await r.service.create(A, len(data), sha256(data) if declare else None, cap_hash)
    half = len(data) // 2
    status = await r.service.append(A, status.upload_id, 0, body(data[:half]), half, checksum("sha256", data[:half]))
    status = await r.service.append(A, status.upload_id, half, body(data[half:]), None, None)
    assert status.blob_id is not None
    return status.blob_id


async def read_all(r: Relay, blob_id: str, start: int, end: int, *, capability: bytes) -> bytes:
    blob = await r.service.authorise_download(blob_id, None, capability)
    return b"".join([chunk async for chunk in await r.service.read(blob, start, end)])


async def refused(code: ErrorCode, call: Callable[[], object]) -> TetherlessError:
    with pytest.raises(TetherlessError) as raised:
        await call()  # type: ignore[misc]
    assert raised.value.code is code, raised.value
    return raised.value


async def test_an_upload_in_pieces_downloads_with_its_capability_and_ranges(tmp_path: Path) -> None:
    data = os.urandom(700_000)
    capability = os.urandom(32)
    async with relay(tmp_path) as r:
        blob_id = await upload_all(r, data, capability=capability)
        assert r.file(blob_id).read_bytes() == data
        assert await read_all(r, blob_id, 0, len(data), capability=capability) == data
        assert await read_all(r, blob_id, 300_001, 300_011, capability=capability) == data[300_001:300_011]
        # the owning account's token works without the capability; another account's does not
        assert (await r.service.authorise_download(blob_id, A2, None)).sha256 == sha256(data)
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.authorise_download(blob_id, B, None))
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.authorise_download(blob_id, B, os.urandom(32)))
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.authorise_download(blob_id, None, None))
        unknown = await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.authorise_download("0" * 32, None, None))
        wrong = await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.authorise_download(blob_id, None, b"x" * 32))
        assert str(unknown) == str(wrong)  # an unknown blob and a refused capability read the same
        assert await r.service.usage(A) == len(data)


async def test_a_wrong_offset_is_refused_before_the_body(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 100, None, None)
        await r.service.append(A, status.upload_id, 0, body(b"a" * 40), 40, None)
        for offset in (0, 39, 41, 100):
            await refused(
                ErrorCode.BLOB_OFFSET_MISMATCH,
                lambda o=offset: r.service.append(A, status.upload_id, o, body(b"b" * 10), 10, None),
            )
        assert r.file(status.upload_id).read_bytes() == b"a" * 40
        assert (await r.service.status(A, status.upload_id)).offset == 40


async def test_a_checksum_mismatch_keeps_nothing_of_that_patch(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 100, None, None)
        await r.service.append(A, status.upload_id, 0, body(b"a" * 40), 40, checksum("sha1", b"a" * 40))
        before = metrics.blob_checksum_failures_total._value.get()
        await refused(
            ErrorCode.BLOB_CHECKSUM_MISMATCH,
            lambda: r.service.append(A, status.upload_id, 40, body(b"b" * 30), 30, checksum("sha256", b"c" * 30)),
        )
        assert metrics.blob_checksum_failures_total._value.get() == before + 1
        assert r.file(status.upload_id).read_bytes() == b"a" * 40  # nothing beyond the committed offset
        assert (await r.service.status(A, status.upload_id)).offset == 40
        # the same bytes with the right checksum then go through at the same offset
        done = await r.service.append(A, status.upload_id, 40, body(b"b" * 60), 60, checksum("sha256", b"b" * 60))
        assert done.blob_id is not None


async def test_an_unsupported_checksum_algorithm_is_refused_before_anything(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 100, None, None)
        await refused(
            ErrorCode.BLOB_CHECKSUM_UNSUPPORTED,
            lambda: r.service.append(A, status.upload_id, 0, body(b"a"), 1, Checksum("md5", b"x" * 16)),
        )
        assert r.file(status.upload_id).read_bytes() == b""


async def test_a_body_past_the_length_keeps_nothing(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 100, None, None)
        await r.service.append(A, status.upload_id, 0, body(b"a" * 50), None, None)
        # declared up front: refused before a byte is read
        await refused(
            ErrorCode.BLOB_TOO_LARGE, lambda: r.service.append(A, status.upload_id, 50, body(b"b" * 51), 51, None)
        )
        # not declared (chunked): refused when the body goes past the length, and what it wrote is cut off
        await refused(
            ErrorCode.BLOB_TOO_LARGE,
            lambda: r.service.append(A, status.upload_id, 50, body(b"b" * 30, b"b" * 30), None, None),
        )
        assert r.file(status.upload_id).read_bytes() == b"a" * 50
        assert (await r.service.status(A, status.upload_id)).offset == 50


async def test_quota_and_size_refusals_store_nothing(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        await r.service.create(A, 1_000_000, None, None)
        await r.service.create(A, 900_000, None, None)
        files = sorted(os.listdir(r.root))
        await refused(ErrorCode.BLOB_QUOTA_EXCEEDED, lambda: r.service.create(A, 100_001, None, None))
        await refused(ErrorCode.BLOB_TOO_LARGE, lambda: r.service.create(A, 1_000_001, None, None))
        assert sorted(os.listdir(r.root)) == files
        assert await r.service.usage(A) == 1_900_000
        assert (await r.service.create(A, 100_000, None, None)).offset == 0  # up to the quota exactly
        assert (await r.service.create(B, 1_000_000, None, None)).offset == 0  # Bob's quota is his own


async def test_a_digest_mismatch_discards_the_upload(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 10, sha256(b"0123456789"), None)
        await r.service.append(A, status.upload_id, 0, body(b"01234"), 5, None)
        await refused(
            ErrorCode.BLOB_DIGEST_MISMATCH, lambda: r.service.append(A, status.upload_id, 5, body(b"xxxxx"), 5, None)
        )
        assert not r.file(status.upload_id).exists()
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.status(A, status.upload_id))
        assert await r.service.usage(A) == 0
        assert await r.store.blob_trash(10) == []


async def test_a_lost_hash_state_is_rebuilt_by_reading_the_object_back(tmp_path: Path) -> None:
    data = os.urandom(300_000)
    async with relay(tmp_path) as r:
        status = await r.service.create(A, len(data), sha256(data), None)
        await r.service.append(A, status.upload_id, 0, body(data[:100_000]), None, None)
        other = r.restarted()  # the rest goes through another process: no hash state there
        done = await other.append(A, status.upload_id, 100_000, body(data[100_000:]), None, None)
        assert done.blob_id == status.upload_id
        # and a mismatch is still found that way
        bad = await r.service.create(A, 4, sha256(b"abcd"), None)
        await r.service.append(A, bad.upload_id, 0, body(b"ab"), None, None)
        await refused(
            ErrorCode.BLOB_DIGEST_MISMATCH, lambda: r.restarted().append(A, bad.upload_id, 2, body(b"xy"), None, None)
        )


async def test_a_cut_body_keeps_what_arrived_unless_a_checksum_guards_it(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 100, None, None)
        with pytest.raises(BodyCutError):
            await r.service.append(A, status.upload_id, 0, cut(b"a" * 30), None, None)
        assert (await r.service.status(A, status.upload_id)).offset == 30  # tus keeps it
        with pytest.raises(BodyCutError):
            await r.service.append(A, status.upload_id, 30, cut(b"b" * 30), 60, checksum("sha1", b"b" * 60))
        assert (await r.service.status(A, status.upload_id)).offset == 30
        assert r.file(status.upload_id).read_bytes() == b"a" * 30
        # the lease was given back: the client resumes at once
        assert (await r.service.append(A, status.upload_id, 30, body(b"c" * 70), 70, None)).blob_id is not None


async def test_a_declared_digest_the_account_stores_completes_at_once(tmp_path: Path) -> None:
    data = os.urandom(1000)
    first, second = os.urandom(32), os.urandom(32)
    async with relay(tmp_path) as r:
        blob_id = await upload_all(r, data, capability=first)
        twin = await r.service.create(A, len(data), sha256(data), sha256(second))
        assert (twin.offset, twin.blob_id) == (len(data), blob_id)
        assert not r.file(twin.upload_id).exists()  # no storage for it
        assert await read_all(r, blob_id, 0, len(data), capability=second) == data
        assert await read_all(r, blob_id, 0, len(data), capability=first) == data
        assert await r.service.usage(A) == len(data)
        # Bob declaring the same digest learns nothing: a fresh upload of his own
        assert (await r.service.create(B, len(data), sha256(data), None)).blob_id is None


async def test_an_upload_without_a_declared_digest_joins_a_twin_at_completion(tmp_path: Path) -> None:
    data = os.urandom(1000)
    async with relay(tmp_path) as r:
        blob_id = await upload_all(r, data, capability=os.urandom(32))
        again = await upload_all(r, data, declare=False)  # a generic tus client: no sha256 in the metadata
        assert again == blob_id
        assert sorted(os.listdir(r.root)) == [blob_id]  # the copy was dropped
        assert await r.service.usage(A) == len(data)


async def test_the_collector_drops_expired_uploads_and_blobs(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        kept = await upload_all(r, b"kept")
        stale = await r.service.create(A, 100, None, None)
        await r.service.append(A, stale.upload_id, 0, body(b"x" * 10), 10, None)
        r.clock[0] += 3600 * 1000  # the upload's expiry
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.status(A, stale.upload_id))
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.append(A, stale.upload_id, 10, body(b"y"), 1, None))
        before = metrics.blob_collected_total.labels("upload")._value.get()
        report = await r.service.collect()
        assert (report.uploads, report.blobs) == (1, 0)
        assert metrics.blob_collected_total.labels("upload")._value.get() == before + 1
        assert not r.file(stale.upload_id).exists()
        assert r.file(kept).exists()
        assert metrics.blob_stored_bytes._value.get() == 4
        r.clock[0] += 86_400 * 1000  # the blob's TTL
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.authorise_download(kept, A, None))
        assert (await r.service.collect()).blobs == 1
        assert os.listdir(r.root) == []
        assert await r.service.usage(A) == 0


async def test_terminate_and_delete_drop_the_bytes_and_only_for_the_owner(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 100, None, None)
        await r.service.append(A, status.upload_id, 0, body(b"x" * 10), 10, None)
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.terminate(B, status.upload_id))
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.status(B, status.upload_id))
        await r.service.terminate(A2, status.upload_id)
        assert not r.file(status.upload_id).exists()
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.status(A, status.upload_id))
        blob_id = await upload_all(r, b"some bytes")
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.delete(B, blob_id))
        assert r.file(blob_id).exists()
        await r.service.delete(A, blob_id)
        assert not r.file(blob_id).exists()
        await refused(ErrorCode.BLOB_NOT_FOUND, lambda: r.service.authorise_download(blob_id, A, None))
        assert await r.service.usage(A) == 0


async def test_a_second_appender_is_refused_while_the_first_holds_the_upload(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 100, None, None)
        reading, gate = trio.Event(), trio.Event()

        async def slow() -> AsyncIterator[bytes]:
            reading.set()  # the body is read only once the upload is held
            yield b"a" * 10
            await gate.wait()
            yield b"b" * 10

        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.service.append, A, status.upload_id, 0, slow(), None, None)
            await reading.wait()
            locked = await refused(
                ErrorCode.BLOB_UPLOAD_LOCKED, lambda: r.service.append(A, status.upload_id, 0, body(b"c"), 1, None)
            )
            # When to ask again (Retry-After): within the lease a crashed appender may have left behind.
            assert locked.retry_after_seconds is not None
            assert 0 < locked.retry_after_seconds * 1000 < blobs_service.LEASE_MS
            gate.set()
        assert r.file(status.upload_id).read_bytes() == b"a" * 10 + b"b" * 10


async def test_a_head_finishes_an_upload_whose_last_patch_died_before_the_blob(tmp_path: Path) -> None:
    data = b"0123456789"
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 10, sha256(data), None)
        r.file(status.upload_id).write_bytes(data)  # the bytes made durable, the offset committed, then a crash
        assert await r.store.lease_blob_upload(status.upload_id, 0, "h", START_MS, START_MS + 1000)
        assert await r.store.commit_blob_append(status.upload_id, "h", 0, 10, "files")
        assert (await r.restarted().status(A, status.upload_id)).blob_id == status.upload_id


async def test_an_empty_upload_is_stored_at_once(tmp_path: Path) -> None:
    async with relay(tmp_path) as r:
        status = await r.service.create(A, 0, sha256(b""), None)
        assert status.blob_id == status.upload_id
        blob = await r.service.authorise_download(status.upload_id, A, None)
        assert [chunk async for chunk in await r.service.read(blob, 0, 0)] == []


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"blob_storage": "disk"}, "blob_storage: expected files or s3, got 'disk'"),
        ({"blob_storage": "s3"}, "blob_bucket: required with blob_storage = s3 (env TETHERLESS_BLOB_BUCKET)"),
        ({"blob_max_bytes": "0"}, "blob_max_bytes: must be at least 1"),
        ({"blob_ttl_seconds": "0"}, "blob_ttl_seconds: must be at least 1"),
        ({"blob_collect_interval_seconds": "0"}, "blob_collect_interval_seconds: must be above 0"),
        ({"blob_quota_bytes": "-1"}, "blob_quota_bytes from env TETHERLESS_BLOB_QUOTA_BYTES: must not be negative"),
    ],
)
def test_bad_blob_settings_get_one_line(values: dict[str, str], message: str) -> None:
    env = {f"TETHERLESS_{name.upper()}": value for name, value in values.items()}
    with pytest.raises(ConfigError) as raised:
        load(env=env)
    assert str(raised.value) == message


def test_blob_settings_come_from_the_config() -> None:
    config, sources = load(env={"TETHERLESS_BLOB_STORAGE": "s3", "TETHERLESS_BLOB_BUCKET": "media"})
    assert (config.blob_storage, config.blob_bucket, sources["blob_bucket"]) == (
        "s3",
        "media",
        "env TETHERLESS_BLOB_BUCKET",
    )
    assert BlobSettings.from_config(config) == BlobSettings(
        max_bytes=16 * 1024**3, quota_bytes=20 * 1024**3, upload_expiry_seconds=86_400, ttl_seconds=30 * 86_400
    )
