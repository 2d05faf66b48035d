"""The BlobStorage contract (relay/blobs/base.py), run against every backend: files and S3 (moto on loopback).

The service drives a backend exactly like this: ``start``, then ``append`` at
the committed offset (a failed PATCH's bytes are never committed and the next
append at the same offset overwrites them), ``complete``, ``read`` ranges,
``abort``/``delete``. Sizes cross the S3 part size (5 MiB here) on purpose.
"""

from __future__ import annotations

import hashlib
import random
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from relay.blobs.base import AppendResult, BlobStorage, BlobStorageError
from tests.relay.blobs.conftest import Backend

CHUNK = 65_537  # odd on purpose: chunk edges never line up with part edges
READ_CHUNK_BYTES = 256 * 1024


def new_key() -> str:
    return uuid.uuid4().hex


def data_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def chunks_of(data: bytes, size: int = CHUNK) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def append(storage: BlobStorage, key: str, state: str, offset: int, length: int, data: bytes) -> AppendResult:
    result = await storage.append(key, state, offset, length, chunks_of(data))
    assert result.written == len(data)
    return result


async def read(storage: BlobStorage, key: str, start: int, end: int) -> bytes:
    got = bytearray()
    async with aclosing(storage.read(key, start, end)) as stream:
        async for chunk in stream:
            assert 0 < len(chunk) <= READ_CHUNK_BYTES
            got += chunk
    return bytes(got)


async def upload(storage: BlobStorage, key: str, data: bytes, cuts: list[int]) -> None:
    """Start, append the pieces between ``cuts`` (offsets), complete: what the service does."""
    state = await storage.start(key, len(data))
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        state = (await append(storage, key, state, start, len(data), data[start:end])).state
    await storage.complete(key, state, len(data))


async def finish(storage: BlobStorage, key: str, state: str, offset: int, data: bytes) -> None:
    """Append the rest of ``data`` from ``offset``, complete, and check that the blob reads back whole."""
    state = (await append(storage, key, state, offset, len(data), data[offset:])).state
    await storage.complete(key, state, len(data))
    assert await read(storage, key, 0, len(data)) == data


async def test_small_upload_round_trip(backend: Backend) -> None:
    async with backend.open() as storage:
        key, data = new_key(), data_of(1000)
        await upload(storage, key, data, cuts=[])
        assert await read(storage, key, 0, 1000) == data
        assert await read(storage, key, 10, 11) == data[10:11]


async def test_appends_of_odd_sizes_across_part_boundaries(backend: Backend) -> None:
    part = backend.part_bytes
    async with backend.open() as storage:
        key, data = new_key(), data_of(3 * part + 777)
        # 1 byte; up to one byte short of a part; across two boundaries; one byte; the rest.
        cuts = [1, part - 1, 3 * part + 2, 3 * part + 3]
        await upload(storage, key, data, cuts)
        assert await read(storage, key, 0, len(data)) == data


async def test_a_last_part_of_exactly_the_part_size(backend: Backend) -> None:
    part = backend.part_bytes
    async with backend.open() as storage:
        key, data = new_key(), data_of(2 * part)
        await upload(storage, key, data, cuts=[part // 2])
        assert hashlib.sha256(await read(storage, key, 0, len(data))).digest() == hashlib.sha256(data).digest()


async def test_an_append_at_the_committed_offset_overwrites_a_failed_append(backend: Backend) -> None:
    part = backend.part_bytes
    async with backend.open() as storage:
        key, data = new_key(), data_of(2 * part + 100)
        garbage = data_of(len(data), seed=2)
        state = await storage.start(key, len(data))
        committed = part // 2
        state = (await append(storage, key, state, 0, len(data), data[:committed])).state
        # A PATCH whose checksum failed: stored (parts 1 and 2, a tail) but never committed.
        await append(storage, key, state, committed, len(data), garbage[committed : 2 * part + 50])
        # The retry from the committed offset: shorter, so part 2 and a tail of the garbage outlive it...
        state = (await append(storage, key, state, committed, len(data), data[committed : part + 10])).state
        # ...until the next appends reach them.
        await finish(storage, key, state, part + 10, data)


async def test_a_failed_append_leaves_the_committed_bytes_intact(backend: Backend) -> None:
    part = backend.part_bytes
    async with backend.open() as storage:
        key, data = new_key(), data_of(part + 300)
        state = await storage.start(key, len(data))
        state = (await append(storage, key, state, 0, len(data), data[:200])).state
        await append(storage, key, state, 200, len(data), data_of(part, seed=3))  # not committed
        # Complete from the committed state: the garbage's bytes must not leak into what is read.
        await finish(storage, key, state, 200, data)


class BodyCutError(Exception):
    pass


async def cut_after(data: bytes, size: int = CHUNK) -> AsyncIterator[bytes]:
    async for chunk in chunks_of(data, size):
        yield chunk
    raise BodyCutError("the client went away")


async def test_interrupted_chunks_keep_what_arrived(backend: Backend) -> None:
    part = backend.part_bytes
    async with backend.open() as storage:
        key, data = new_key(), data_of(2 * part + 4321)
        state = await storage.start(key, len(data))
        arrived = part + part // 3  # a full part and a tail's worth
        with pytest.raises(BodyCutError) as caught:
            await storage.append(key, state, 0, len(data), cut_after(data[:arrived]))
        result = caught.value.append_result  # type: ignore[attr-defined]
        assert isinstance(result, AppendResult)
        assert result.written == arrived
        await finish(storage, key, result.state, arrived, data)


async def test_an_interruption_before_any_byte_keeps_nothing_and_breaks_nothing(backend: Backend) -> None:
    async with backend.open() as storage:
        key, data = new_key(), data_of(5000)
        state = await storage.start(key, len(data))
        state = (await append(storage, key, state, 0, len(data), data[:100])).state
        with pytest.raises(BodyCutError) as caught:
            await storage.append(key, state, 100, len(data), cut_after(b""))
        assert caught.value.append_result.written == 0  # type: ignore[attr-defined]
        await finish(storage, key, state, 100, data)


async def test_ranges_read_exactly_the_asked_bytes(backend: Backend) -> None:
    part = backend.part_bytes
    async with backend.open() as storage:
        key, data = new_key(), data_of(part + 1_000_003)
        await upload(storage, key, data, cuts=[777_777])
        n = len(data)
        ranges = [(0, n), (0, 1), (n - 1, n), (part - 3, part + 3), (12_345, 12_345 + 3 * READ_CHUNK_BYTES + 1), (7, 7)]
        for start, end in ranges:
            assert await read(storage, key, start, end) == data[start:end], (start, end)


async def test_complete_is_idempotent(backend: Backend) -> None:
    part = backend.part_bytes
    async with backend.open() as storage:
        for size in (10, part + 10, part):  # a tail as the last part, and a full last part (no tail)
            key, data = new_key(), data_of(size)
            state = await storage.start(key, size)
            state = (await append(storage, key, state, 0, size, data)).state
            await storage.complete(key, state, size)
            await storage.complete(key, state, size)  # a retry after a lost answer
            assert await read(storage, key, 0, size) == data


async def test_complete_keeps_only_the_blob(backend: Backend) -> None:
    part = backend.part_bytes
    async with backend.open() as storage:
        key, data = new_key(), data_of(part + 99)
        await upload(storage, key, data, cuts=[50, 60, part + 1])
        assert len(backend.leftovers(key)) == 1


async def test_abort_removes_everything(backend: Backend) -> None:
    part = backend.part_bytes
    async with backend.open() as storage:
        key, data = new_key(), data_of(2 * part + 10)
        state = await storage.start(key, len(data))
        state = (await append(storage, key, state, 0, len(data), data[:100])).state
        state = (await append(storage, key, state, 100, len(data), data[100 : part + 200])).state
        await append(storage, key, state, part + 200, len(data), data[part + 200 : part + 300])  # uncommitted
        assert backend.leftovers(key)
        await storage.abort(key, state)
        assert backend.leftovers(key) == []
        await storage.abort(key, state)  # idempotent
        assert backend.leftovers(key) == []


async def test_abort_of_a_completed_upload_removes_the_blob(backend: Backend) -> None:
    async with backend.open() as storage:
        key, data = new_key(), data_of(3000)
        state = await storage.start(key, len(data))
        state = (await append(storage, key, state, 0, len(data), data)).state
        await storage.complete(key, state, len(data))
        await storage.abort(key, state)  # the service discards an upload whose digest did not match
        assert backend.leftovers(key) == []


async def test_delete_is_idempotent_and_the_blob_is_gone(backend: Backend) -> None:
    async with backend.open() as storage:
        key, data = new_key(), data_of(2000)
        await upload(storage, key, data, cuts=[])
        await storage.delete(key)
        assert backend.leftovers(key) == []
        await storage.delete(key)
        await storage.delete(new_key())  # never stored
        with pytest.raises(BlobStorageError):
            await read(storage, key, 0, 10)


async def test_a_missing_blob_cannot_be_read(backend: Backend) -> None:
    async with backend.open() as storage:
        for start, end in ((0, 10), (0, 0)):
            with pytest.raises(BlobStorageError):
                await read(storage, new_key(), start, end)


async def test_a_zero_byte_upload(backend: Backend) -> None:
    async with backend.open() as storage:
        key = new_key()
        state = await storage.start(key, 0)
        result = await storage.append(key, state, 0, 0, chunks_of(b""))
        assert result.written == 0
        await storage.complete(key, result.state, 0)
        await storage.complete(key, result.state, 0)
        assert await read(storage, key, 0, 0) == b""
        await storage.delete(key)
        assert backend.leftovers(key) == []


async def test_an_unfinished_zero_byte_upload_aborts(backend: Backend) -> None:
    async with backend.open() as storage:
        key = new_key()
        state = await storage.start(key, 0)
        await storage.abort(key, state)
        assert backend.leftovers(key) == []


async def streamed(size: int, chunk: int = 64 * 1024) -> AsyncIterator[bytes]:
    """``size`` deterministic bytes made as they are asked for (the body never exists whole).

    Each chunk is a new object, as one read from a socket is: a backend that keeps chunks is charged for them.
    """
    for index, start in enumerate(range(0, size, chunk)):
        yield data_of(min(chunk, size - start), seed=index)


async def test_memory_stays_bounded_by_the_part_size(backend: Backend) -> None:
    part = backend.part_bytes
    size = 64 * 1024 * 1024
    async with backend.open() as storage:
        key = new_key()
        state = await storage.start(key, size)
        tracemalloc.start()
        try:
            result = await storage.append(key, state, 0, size, streamed(size))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.written == size
        # One part buffer, plus what the HTTP client and the chunk being split hold: well under two parts.
        assert peak < 2 * part, f"peak {peak / 2**20:.1f} MiB for {size / 2**20:.0f} MiB appended"
        await storage.complete(key, result.state, size)
        digest = hashlib.sha256()
        async with aclosing(storage.read(key, 0, size)) as stream:
            async for chunk in stream:
                digest.update(chunk)
        expected = hashlib.sha256()
        async for chunk in streamed(size):
            expected.update(chunk)
        assert digest.digest() == expected.digest()
        await storage.delete(key)
