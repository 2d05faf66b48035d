"""Blob storage in files under the data directory (``--data/blobs/``): the default, for one relay process.

One file per upload, named by its key; an append writes at the committed
offset with ``pwrite`` and cuts the file there when done, so bytes a failed or
interrupted append left beyond the committed offset never survive the next
append. ``append`` returns only after ``fsync`` (and the directory's ``fsync``
after a file was created), so an offset the service commits is on disk. Completion
renames nothing: the upload's key stays the blob's key (D4).

File I/O runs in worker threads (``trio.to_thread``), so the trio loop never
blocks on the disk; writes are gathered into buffers of :data:`WRITE_BYTES`
so a body arriving in 16 KiB frames costs one thread hop per MiB, not per
frame (writing one buffer while the next fills measured no faster: the page
cache takes a MiB in well under the time the network brings it). Memory per
append is bounded by that buffer.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import trio

from .base import AppendResult, BlobStorageError

WRITE_BYTES: Final = 1024 * 1024  # bytes gathered before one pwrite
READ_BYTES: Final = 256 * 1024  # the largest chunk read() yields (base.BlobStorage.read)
# Keys come from the service (32 lowercase hex); anything that could name another path is refused.
_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
_STATE: Final = "files"  # the only state: the file itself holds everything


class FileStorage:
    """:class:`relay.blobs.base.BlobStorage` over files in ``root`` (created owner-only on first use)."""

    name = "files"

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a storage key: {key!r}")
        return self.root / key

    async def start(self, key: str, length: int) -> str:
        """Create the upload's empty file (and make its directory entry durable). Raises
        :class:`BlobStorageError` (also when the key exists: keys are never reused)."""
        path = self._path(key)
        try:
            await trio.to_thread.run_sync(_create, self.root, path)
        except OSError as exc:
            raise _error("create", key, exc) from exc
        return _STATE

    async def append(
        self, key: str, state: str, offset: int, length: int, chunks: AsyncIterator[bytes]
    ) -> AppendResult:
        """See :meth:`relay.blobs.base.BlobStorage.append`. The file must exist (:meth:`start`): an upload
        aborted meanwhile is never brought back by a late append."""
        path = self._path(key)
        try:
            fd = await trio.to_thread.run_sync(os.open, path, os.O_WRONLY)
        except OSError as exc:
            raise _error("open", key, exc) from exc
        written = 0
        buffer = bytearray()
        try:
            try:
                async for chunk in chunks:
                    if offset + written + len(buffer) + len(chunk) > length:
                        raise ValueError(f"append past the declared length {length}")
                    buffer += chunk
                    if len(buffer) >= WRITE_BYTES:
                        written += await _write(fd, key, buffer, offset + written)
                        buffer = bytearray()
            except Exception as exc:  # cancellation is not caught: nothing is committed, the bytes are garbage
                # tus keeps what arrived before the body was cut: make it durable and say how much it is.
                if buffer:
                    written += await _write(fd, key, buffer, offset + written)
                await _settle(fd, key, offset + written)
                exc.append_result = AppendResult(written, _STATE)  # type: ignore[attr-defined]
                raise
            if buffer:
                written += await _write(fd, key, buffer, offset + written)
            await _settle(fd, key, offset + written)
        finally:
            os.close(fd)
        return AppendResult(written, _STATE)

    async def complete(self, key: str, state: str, length: int) -> None:
        """Check that the file holds ``length`` bytes (dropping garbage an interrupted append left beyond them).
        Idempotent. Raises :class:`BlobStorageError` when it holds fewer."""
        path = self._path(key)
        try:
            await trio.to_thread.run_sync(_complete, path, length)
        except OSError as exc:
            raise _error("complete", key, exc) from exc

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) in chunks of at most 256 KiB. Raises :class:`BlobStorageError` when the file is
        missing or shorter than ``end``."""
        path = self._path(key)
        try:
            fd = await trio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        except OSError as exc:
            raise _error("open", key, exc) from exc
        try:
            position = start
            while position < end:
                want = min(READ_BYTES, end - position)
                try:
                    data = await trio.to_thread.run_sync(os.pread, fd, want, position)
                except OSError as exc:
                    raise _error("read", key, exc) from exc
                if not data:
                    raise BlobStorageError(f"read {key}: the file ends at {position}, before {end}")
                position += len(data)
                yield data
        finally:
            os.close(fd)

    async def abort(self, key: str, state: str) -> None:
        """Delete the upload's file. Idempotent."""
        await self.delete(key)

    async def delete(self, key: str) -> None:
        """Delete the blob's file. Idempotent (a missing file is not an error)."""
        path = self._path(key)
        try:
            await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
        except OSError as exc:
            raise _error("delete", key, exc) from exc

    async def aclose(self) -> None:
        """Nothing to release."""


def _error(operation: str, key: str, exc: OSError) -> BlobStorageError:
    return BlobStorageError(f"{operation} {key}: {exc.strerror or exc}")


def _create(root: Path, path: Path) -> None:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(root)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pwrite_all(fd: int, data: bytes | bytearray, position: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], position + done)
    return done


async def _write(fd: int, key: str, data: bytearray, position: int) -> int:
    try:
        return await trio.to_thread.run_sync(_pwrite_all, fd, data, position)
    except OSError as exc:
        raise _error("write", key, exc) from exc


def _truncate_and_sync(fd: int, size: int) -> None:
    os.ftruncate(fd, size)  # garbage beyond the bytes just written never outlives this append
    os.fsync(fd)


async def _settle(fd: int, key: str, size: int) -> None:
    try:
        await trio.to_thread.run_sync(_truncate_and_sync, fd, size)
    except OSError as exc:
        raise _error("sync", key, exc) from exc


def _complete(path: Path, length: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        size = os.fstat(fd).st_size
        if size < length:
            raise BlobStorageError(f"complete {path.name}: holds {size} bytes, expected {length}")
        if size > length:
            _truncate_and_sync(fd, length)
    finally:
        os.close(fd)
