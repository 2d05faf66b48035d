"""The interface every blob storage backend implements (docs/decisions/0014-media-blobs.md D4).

The database, not the backend, holds the truth about an upload: its
committed offset and the backend's opaque ``state``. A backend only moves
bytes. Bytes it holds beyond the committed offset are garbage that the next
:meth:`BlobStorage.append` at that offset overwrites, so a PATCH that fails
its checksum, or a replica that dies mid-PATCH, costs nothing to undo.

Keys are chosen by the service (the upload id, 32 lowercase hex characters)
and are never derived from anything a client can choose freely.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


class BlobStorageError(Exception):
    """The backend failed (I/O error, S3 error, unreachable endpoint). Retryable: the service answers 503."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What :meth:`BlobStorage.append` made durable."""

    written: int  # bytes taken from ``chunks`` and durable at [offset, offset + written)
    state: str  # the backend's new opaque state, to be committed with the new offset


class BlobStorage(Protocol):
    """Moves ciphertext bytes; holds no state the database does not also hold."""

    name: str  # "files" or "s3" (a metric label and what `config show` prints)

    async def start(self, key: str, length: int) -> str:
        """Prepare storage for an upload of ``length`` bytes; returns the initial opaque state.

        Raises :class:`BlobStorageError`. Not idempotent (an S3 multipart upload is created);
        a state that is never committed is collected by :meth:`abort`.
        """
        ...

    async def append(
        self, key: str, state: str, offset: int, length: int, chunks: AsyncIterator[bytes]
    ) -> AppendResult:
        """Write the bytes of ``chunks`` at ``offset`` (the committed offset) and make them durable.

        ``length`` is the upload's declared total; ``offset + written`` never
        exceeds it (the service stops the iterator first). When ``chunks``
        raises, the bytes received before it are made durable and the
        exception propagates with the partial result attached as
        ``exc.append_result`` (an :class:`AppendResult`), so the caller may
        keep them (tus: an interrupted PATCH keeps what arrived). Memory is
        bounded by the backend's part buffer, never by the body. Raises
        :class:`BlobStorageError`. Cancellation: nothing is committed; the
        bytes written are garbage beyond the committed offset.
        """
        ...

    async def complete(self, key: str, state: str, length: int) -> None:
        """Make the ``length`` bytes of a fully appended upload readable with :meth:`read`.

        Idempotent (a retry after a lost answer succeeds). Raises :class:`BlobStorageError`.
        """
        ...

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Stream bytes [start, end) of a completed blob (S3 cannot read an unfinished multipart upload).

        Chunks are at most 256 KiB. Raises :class:`BlobStorageError` (also
        when the object is missing: the database said it exists).
        """
        ...

    async def abort(self, key: str, state: str) -> None:
        """Drop an unfinished upload and everything stored for it. Idempotent."""
        ...

    async def delete(self, key: str) -> None:
        """Drop a completed blob. Idempotent (a missing object is not an error)."""
        ...

    async def aclose(self) -> None:
        """Release connections. Idempotent."""
        ...
