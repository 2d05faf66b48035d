"""Media in the SDK: encrypted, resumable uploads and downloads of files (docs/decisions/0014-media-blobs.md D5, D6).

- :func:`upload_file` encrypts a file with a fresh key (``protocol.blobs``: age's STREAM with a committed header)
  and uploads the ciphertext with tus (``client.api.blob_*``) in bounded pieces, each with its checksum. Pass 1
  computes the ciphertext's digest and length (constant memory); the upload's state (path, size, mtime, file key,
  nonce, capability, digest, upload id, blob id when done) is kept sealed in ``state.db`` (table
  ``media_uploads``) *before* the relay hears of it, so after ``kill -9`` the next call for the same path asks the
  relay for its offset (``HEAD``) and continues, re-encrypting the pieces deterministically from the file. A file
  whose size, mtime or content changed meanwhile is never resumed under the old key and nonce (that would reuse
  the keystream): before a resume sends a byte, pass 1 runs again and its digest must be the stored one;
  otherwise the old upload is terminated and a fresh one starts (or ``file_changed`` for :func:`resume_uploads`).
- :func:`send_file` uploads, then queues the file message (:data:`~protocol.payload.FILE_CONTENT_TYPE`, the
  :class:`~protocol.blobs.BlobRef` as MessagePack) and forgets the upload in one local transaction; the
  message goes out like any other (the outbox, then the sync engine).
- :func:`download` fetches a blob from the relay that holds it (``BlobRef.relay``: this device's own, or another
  one reached directly, :func:`relay_url_for`; never an IP address or a name resolving to a non-public address
  on the sender's word, :func:`check_blob_relay`) with the capability, into the encrypted media cache
  (``<home>/media/<blob_id>``: ciphertext only; its key stays in the sealed history), resuming from the partial
  ciphertext with ``Range``. The header's key commitment is checked before anything else, each 64 KiB chunk as it
  arrives, the digest at the end; only then is plaintext written, to a temporary file beside the destination that
  is fsync'd and renamed. The cache keeps the least recently used blobs up to a size limit
  (:data:`CACHE_LIMIT_ENV`, default :data:`DEFAULT_CACHE_LIMIT_BYTES`), so cached media opens offline.

The relay is the adversary: a relay (or proxy) that serves other bytes, a truncated or longer blob, another
blob's bytes, or lies about an upload's offset gets a :class:`MediaError` naming what failed — never plaintext on
disk that did not verify. No printing: progress goes through a :data:`Progress` callback.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import hmac
import os
import re
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Final

import msgspec
import trio

from .. import blobs as blobfmt
from .. import hosts
from ..errors import ErrorCode, RemoteError, TetherlessError
from ..ids import RELAY_PATTERN, Address
from ..payload import FILE_CONTENT_TYPE
from . import outbox
from .api import BlobUpload, RelayApi
from .http import ConnectError, TransportError
from .keystore import DeviceKeys
from .localdb import LocalDB
from .sdk import RelayClient
from .store import MEDIA_CACHE_TABLE, MEDIA_UPLOADS_TABLE, ClientStore, HistoryMessage, OutboxEntry

#: Ciphertext bytes per PATCH: memory holds one piece, and an interrupted PATCH loses at most one.
PIECE_BYTES: Final = 8 * 1024 * 1024
#: The encrypted media cache's size limit unless :data:`CACHE_LIMIT_ENV` says otherwise.
DEFAULT_CACHE_LIMIT_BYTES: Final = 2 * 1024**3
CACHE_LIMIT_ENV: Final = "TETHERLESS_MEDIA_CACHE_BYTES"
#: ``name=url,name=url``: where relays other than the home one are reached (tests, private networks); without an
#: entry a relay name ``example.org`` is reached at ``https://example.org`` (as federation finds it).
RELAY_URLS_ENV: Final = "TETHERLESS_RELAY_URLS"
MEDIA_DIR: Final = "media"
PARTIAL_SUFFIX: Final = ".part"
#: How many times an upload continues after a transport error or an offset conflict before giving up (the next
#: ``send --file`` or ``sync`` continues from the relay's offset then).
MAX_UPLOAD_RETRIES: Final = 8
#: A relay that makes the client send more than this many times the blob's length is losing (or lying about)
#: what it stored: the upload stops instead of looping.
MAX_SENT_FACTOR: Final = 3
_READ_BYTES: Final = 1024 * 1024

#: ``(phase, done, total)``: phase is a :class:`Phase` value; ``done`` and ``total`` count bytes of that phase.
Progress = Callable[[str, int, int], None]


class Phase(enum.StrEnum):
    ENCRYPTING = "encrypting"  # pass 1 of an upload: digest and length
    CHECKING = "checking"  # pass 1 again before a resumed upload sends anything: is the file unchanged?
    UPLOADING = "uploading"
    DOWNLOADING = "downloading"
    DECRYPTING = "decrypting"


def _no_progress(phase: str, done: int, total: int) -> None:
    del phase, done, total


class MediaError(Exception):
    """A file could not be sent or fetched; ``code`` is stable, ``str()`` is ``"<code>: <sentence>"``.

    Codes: ``file_unreadable`` (missing, not a regular file, no permission), ``invalid_content_type``,
    ``file_changed`` (size, mtime or content changed during an upload, or before :func:`resume_uploads` could
    continue it; the upload was dropped),
    ``file_too_large`` (above the relay's blob limit), ``blob_digest_mismatch`` (the relay hashed the upload
    otherwise; dropped), ``blob_corrupt`` / ``blob_key_mismatch`` (the relay served bytes that do not verify:
    chunk, digest, length / the header's key commitment), ``relay_misbehaved`` (impossible offsets or ranges),
    ``upload_stalled`` (gave up for now; resumable), ``download_incomplete`` (the transfer stopped early;
    resumable), ``destination_exists`` (no ``force``),
    ``destination_unwritable``, ``not_a_file_message`` / ``unknown_message`` (a ``blob get`` reference),
    ``blob_relay_refused`` (the message names a relay at an IP address or a non-public one: :func:`check_blob_relay`).
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# -- the upload's state (sealed in state.db) ----------------------------------------------------------------------


class UploadState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything an upload needs to continue in another process. Sealed: it holds the file key and capability."""

    path: str
    size: int
    mtime_ns: int
    name: str
    content_type: str
    file_key: bytes
    nonce: bytes
    capability: bytes
    digest: bytes
    length: int
    relay: str
    recipient: str | None = None  # the file message to queue once complete (send_file)
    upload_id: str | None = None
    blob_id: str | None = None

    def ref(self) -> blobfmt.BlobRef:
        """The reference the file message carries (only once :attr:`blob_id` is known)."""
        assert self.blob_id is not None
        return blobfmt.BlobRef(
            relay=self.relay,
            blob_id=self.blob_id,
            digest=self.digest,
            key=self.file_key,
            length=self.length,
            capability=self.capability,
            name=self.name,
            content_type=self.content_type,
            size=self.size,
        )


def _path_index(db: LocalDB, path: Path) -> str:
    return db.blind("media-upload", str(path)).hex()


def _load_state(db: LocalDB, index: str) -> UploadState | None:
    row = db.execute(f"SELECT state FROM {MEDIA_UPLOADS_TABLE} WHERE path_index = ?", (index,)).fetchone()
    if row is None:
        return None
    raw = db.open_column(MEDIA_UPLOADS_TABLE, index, "state", row[0])
    return msgspec.msgpack.decode(raw, type=UploadState)


def _save_state(db: LocalDB, index: str, state: UploadState) -> None:
    sealed = db.seal_column(MEDIA_UPLOADS_TABLE, index, "state", msgspec.msgpack.encode(state))
    db.execute(
        f"INSERT INTO {MEDIA_UPLOADS_TABLE} (path_index, created_seq, state) VALUES (?, "
        f"(SELECT coalesce(max(created_seq), 0) + 1 FROM {MEDIA_UPLOADS_TABLE}), ?) "
        "ON CONFLICT(path_index) DO UPDATE SET state = excluded.state",
        (index, sealed),
    )


def forget_upload(db: LocalDB, path: str | os.PathLike[str]) -> bool:
    """Drop the upload state of ``path`` (True if there was one). The relay's unfinished upload, if any, expires
    there. Idempotent; local."""
    index = _path_index(db, Path(path).resolve())
    return db.execute(f"DELETE FROM {MEDIA_UPLOADS_TABLE} WHERE path_index = ?", (index,)).rowcount > 0


def unfinished_uploads(db: LocalDB) -> list[UploadState]:
    """Every upload not yet handed to the outbox, oldest first (what :func:`resume_uploads` continues). Raises
    :class:`~protocol.client.localdb.TamperedRowError` for a row that does not open; read-only."""
    rows = db.execute(f"SELECT path_index, state FROM {MEDIA_UPLOADS_TABLE} ORDER BY created_seq").fetchall()
    return [
        msgspec.msgpack.decode(db.open_column(MEDIA_UPLOADS_TABLE, index, "state", blob), type=UploadState)
        for index, blob in rows
    ]


# -- encryption from the file, any ciphertext range ---------------------------------------------------------------


class _Source:
    """The file being uploaded, read at offsets (``os.pread``: no shared file position), with the size and mtime
    it had when the upload began checked on every open."""

    def __init__(self, path: Path, size: int, mtime_ns: int) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise MediaError("file_unreadable", f"cannot open {path}: {exc.strerror or exc}") from exc
        info = os.fstat(self._fd)
        if info.st_size != size or info.st_mtime_ns != mtime_ns:
            os.close(self._fd)
            raise MediaError("file_changed", f"{path} changed while it was being uploaded")
        self.size = size

    def read(self, offset: int, count: int) -> bytes:
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise MediaError("file_changed", f"{self.path} changed while it was being uploaded")
        return data

    def close(self) -> None:
        os.close(self._fd)


def _ciphertext(source: _Source, encryptor: blobfmt.Encryptor, start: int, end: int) -> Iterator[bytes]:
    """Ciphertext bytes ``[start, end)``, a chunk at a time, encrypted again from the file (deterministic: the
    same key, nonce and file give the same bytes, so a resumed upload continues the same blob)."""
    return encryptor.read_range(start, end, source.read)


# -- upload ------------------------------------------------------------------------------------------------------


def _stat_file(given: str | os.PathLike[str]) -> tuple[Path, os.stat_result]:
    """The absolute path of ``given`` and its ``stat``; raises :class:`MediaError` ``file_unreadable``."""
    path = Path(given).resolve()
    try:
        info = path.stat()
    except OSError as exc:
        raise MediaError("file_unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise MediaError("file_unreadable", f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise MediaError("file_unreadable", f"cannot read {path}: permission denied")
    return path, info


async def max_blob_bytes(client: RelayClient) -> int | None:
    """The relay's blob size limit from its ``/.well-known/tetherless`` (None: it publishes none, or it cannot be
    asked now — the relay's own 413 then says it). Never raises for the relay's sake."""
    try:
        limit = (await client.well_known()).limits.max_blob_bytes
    except (RemoteError, TransportError, TetherlessError):
        return None
    return limit if limit > 0 else None


async def _first_pass(
    source: _Source, encryptor: blobfmt.Encryptor, progress: Progress, phase: Phase = Phase.ENCRYPTING
) -> bytes:
    """Pass 1: the ciphertext's SHA-256, a chunk at a time (constant memory)."""
    hasher = hashlib.sha256()
    done = 0
    for piece in _ciphertext(source, encryptor, 0, encryptor.length):
        hasher.update(piece)
        done += len(piece)
        if done % (16 * blobfmt.CIPHER_CHUNK_BYTES) < len(piece) or done == encryptor.length:
            progress(phase, done, encryptor.length)
            await trio.lowlevel.checkpoint()
    return hasher.digest()


async def _new_state(
    client: RelayClient,
    path: Path,
    info: os.stat_result,
    *,
    name: str | None,
    content_type: str | None,
    recipient: str | None,
    progress: Progress,
) -> UploadState:
    keys = client.keys
    if keys is None:
        raise RuntimeError("this client has no device keys")
    content_type = content_type or guess_content_type(path.name)
    if not 0 < len(content_type) <= 255 or not all(" " <= c <= "~" for c in content_type):
        raise MediaError("invalid_content_type", f"not a media type: {content_type[:80]!r} (printable ASCII)")
    limit = await max_blob_bytes(client)
    length = blobfmt.blob_length(info.st_size)
    if limit is not None and length > limit:
        raise MediaError(
            "file_too_large", f"{path} is {info.st_size} bytes; the relay takes blobs up to {limit} bytes encrypted"
        )
    file_key, nonce, capability = client.random_bytes(32), client.random_bytes(16), client.random_bytes(32)
    source = _Source(path, info.st_size, info.st_mtime_ns)
    try:
        encryptor = blobfmt.Encryptor(file_key, nonce, info.st_size)
        digest = await _first_pass(source, encryptor, progress)
    finally:
        source.close()
    return UploadState(
        path=str(path),
        size=info.st_size,
        mtime_ns=info.st_mtime_ns,
        name=blobfmt.safe_name(name if name is not None else path.name),
        content_type=content_type,
        file_key=file_key,
        nonce=nonce,
        capability=capability,
        digest=digest,
        length=length,
        relay=Address.parse(keys.address).relay,
        recipient=recipient,
    )


async def _unchanged(state: UploadState, info: os.stat_result, progress: Progress) -> bool:
    """Whether the file still encrypts, under the upload's key and nonce, to the ciphertext the upload declared.

    Size and mtime alone do not say it: ``touch -d``, editors and copies that keep the mtime, and coarse-mtime file
    systems leave both alone while the content changes. So an unfinished upload re-runs pass 1 and compares
    digests before any byte of it is sent again. A completed one only checks size and mtime: nothing more of it
    is sent (its blob is the content as it was when uploaded)."""
    if state.size != info.st_size or state.mtime_ns != info.st_mtime_ns:
        return False
    if state.blob_id is not None:
        return True
    try:
        source = _Source(Path(state.path), state.size, state.mtime_ns)
    except MediaError as exc:
        if exc.code == "file_changed":
            return False
        raise
    try:
        encryptor = blobfmt.Encryptor(state.file_key, state.nonce, state.size)
        digest = await _first_pass(source, encryptor, progress, Phase.CHECKING)
    except MediaError as exc:
        if exc.code == "file_changed":  # shorter than it says: changed while being read
            return False
        raise
    finally:
        source.close()
    return hmac.compare_digest(digest, state.digest)


async def _drop_upload(api: RelayApi, db: LocalDB, index: str, state: UploadState) -> None:
    """Forget the upload here and terminate it on the relay (best effort: an upload the relay cannot be told about
    expires there). Idempotent; cancellation after the local delete leaves the relay's copy to expire."""
    db.execute(f"DELETE FROM {MEDIA_UPLOADS_TABLE} WHERE path_index = ?", (index,))
    if state.upload_id is not None and state.blob_id is None:
        with contextlib.suppress(RemoteError, TransportError, TetherlessError):
            await api.blob_terminate_upload(state.upload_id)


def guess_content_type(name: str) -> str:
    """The media type for a file name (``mimetypes``), else ``application/octet-stream``."""
    import mimetypes  # here: only a file upload needs it

    guessed, _ = mimetypes.guess_type(name, strict=False)
    return guessed or "application/octet-stream"


async def upload_file(
    client: RelayClient,
    db: LocalDB,
    path: str | os.PathLike[str],
    *,
    recipient: str | None = None,
    name: str | None = None,
    content_type: str | None = None,
    progress: Progress = _no_progress,
    piece_bytes: int = PIECE_BYTES,
    restart_changed: bool = True,
) -> UploadState:
    """Upload ``path`` encrypted (or continue its unfinished upload); returns the state with its ``blob_id``.

    ``client`` is connected to this device's relay (with keys); ``db`` keeps the upload's state. ``recipient`` is
    remembered for :func:`resume_uploads`. Before an unfinished upload continues, the file is encrypted once more
    under the stored key and nonce and its digest compared with the stored one (:func:`_unchanged`: one read of
    the file, constant memory). A file whose size, mtime or content changed is never continued, since its new
    bytes under the old key and nonce would reuse the keystream (docs/crypto.md §17.2): the old upload is dropped
    here and terminated on the relay, then a fresh upload (new key, nonce and capability) starts, or, with
    ``restart_changed=False``, :class:`MediaError` ``file_changed`` is raised. Raises :class:`MediaError`
    (``file_unreadable``, ``file_changed`` — also when the file changes *during* this call —, ``file_too_large``,
    ``relay_misbehaved``, ``upload_stalled``), ``RemoteError`` (``blob_quota_exceeded``, ``body_too_large`` …)
    and ``TransportError`` when the relay cannot be reached. Idempotent: calling it again for the same unchanged
    file continues the same upload (a completed one returns at once). Cancellation (or ``kill -9``) leaves the
    state in ``db``; the relay keeps every piece it acknowledged.
    """
    resolved, info = _stat_file(path)
    index = _path_index(db, resolved)
    state = _load_state(db, index)
    if state is not None and not await _unchanged(state, info, progress):
        await _drop_upload(client.api, db, index, state)
        if not restart_changed:
            raise MediaError(
                "file_changed",
                f"{resolved} changed since its upload began; the unfinished upload was dropped: send it again to "
                "upload the new content",
            )
        state = None
    if state is None:
        state = await _new_state(
            client, resolved, info, name=name, content_type=content_type, recipient=recipient, progress=progress
        )
        _save_state(db, index, state)  # before the relay hears of it: a crash never loses the key of a blob
    if state.blob_id is not None:
        progress(Phase.UPLOADING, state.length, state.length)
        return state
    state = await _transfer(client.api, db, index, state, progress, piece_bytes)
    return state


async def _transfer(
    api: RelayApi, db: LocalDB, index: str, state: UploadState, progress: Progress, piece_bytes: int
) -> UploadState:
    """HEAD → PATCH pieces from the relay's offset until complete; the state is saved at each change."""
    capability_hash = hashlib.sha256(state.capability).digest()
    retries = 0
    sent = 0
    source = _Source(Path(state.path), state.size, state.mtime_ns)
    try:
        encryptor = blobfmt.Encryptor(state.file_key, state.nonce, state.size)
        answer: BlobUpload | None = None
        while True:
            try:
                if state.upload_id is None:
                    answer = await api.blob_create_upload(
                        state.length, sha256=state.digest, capability_hash=capability_hash
                    )
                    state = msgspec.structs.replace(state, upload_id=answer.upload_id)
                    _save_state(db, index, state)
                elif answer is None:
                    answer = await api.blob_upload_offset(state.upload_id, state.length)
                if answer.offset == state.length and answer.blob_id is None:
                    answer = await api.blob_upload_offset(answer.upload_id, state.length)  # a dedup: ask for the id
                if answer.blob_id is not None:
                    if answer.offset != state.length:
                        raise MediaError("relay_misbehaved", "the relay named a blob for an incomplete upload")
                    state = msgspec.structs.replace(state, blob_id=answer.blob_id)
                    _save_state(db, index, state)
                    progress(Phase.UPLOADING, state.length, state.length)
                    return state
                if answer.offset == state.length:
                    raise MediaError("relay_misbehaved", "the relay holds the whole upload but names no blob")
                progress(Phase.UPLOADING, answer.offset, state.length)
                end = min(answer.offset + piece_bytes, state.length)
                piece = b"".join(_ciphertext(source, encryptor, answer.offset, end))
                await trio.lowlevel.checkpoint()  # a cancellation stops between pieces, never mid-piece locally
                sent += len(piece)
                if sent > MAX_SENT_FACTOR * state.length + piece_bytes:
                    raise MediaError(
                        "relay_misbehaved",
                        f"sent {sent} bytes of a {state.length}-byte upload: the relay keeps losing what it stored",
                    )
                assert state.upload_id is not None
                answer = await api.blob_upload_patch(state.upload_id, answer.offset, piece, state.length)
                del piece
                retries = 0
            except RemoteError as exc:
                if exc.code is ErrorCode.BLOB_DIGEST_MISMATCH:
                    db.execute(f"DELETE FROM {MEDIA_UPLOADS_TABLE} WHERE path_index = ?", (index,))
                    raise MediaError(
                        exc.code.value,
                        "the relay hashed the upload to another digest than this client (did the file change during "
                        "the upload?); it was dropped: send the file again",
                    ) from exc
                if exc.code is ErrorCode.BLOB_NOT_FOUND and state.upload_id is not None:
                    # Expired or collected on the relay: start the upload again (same key, same ciphertext).
                    state = msgspec.structs.replace(state, upload_id=None)
                    _save_state(db, index, state)
                    answer = None
                    continue
                if exc.code not in _ASK_AGAIN or retries >= MAX_UPLOAD_RETRIES:
                    raise
                retries += 1
                if exc.code is ErrorCode.BLOB_UPLOAD_LOCKED:
                    # Another PATCH of ours still holds the upload: a request the relay is finishing, or one a
                    # crashed replica held, whose lease lapses. Wait as the relay says (Retry-After), then ask again.
                    await api.backoff(retries, exc.retry_after_seconds)
                answer = None  # another offset, a damaged piece: ask where the relay stands
            except TetherlessError as exc:  # an answer that cannot be true (api.py checks offsets and ids)
                raise MediaError("relay_misbehaved", exc.detail) from exc
            except TransportError as exc:
                retries += 1
                if retries > MAX_UPLOAD_RETRIES or not exc.retryable:
                    raise MediaError(
                        "upload_stalled", f"the upload stopped ({exc}); run the command again to continue it"
                    ) from exc
                await api.backoff(retries)
                answer = None
    finally:
        source.close()


#: Refusals of a PATCH after which the upload continues from the offset the relay states.
_ASK_AGAIN: Final = frozenset(
    {ErrorCode.BLOB_OFFSET_MISMATCH, ErrorCode.BLOB_CHECKSUM_MISMATCH, ErrorCode.BLOB_UPLOAD_LOCKED}
)


async def resume_uploads(
    client: RelayClient,
    store: ClientStore,
    *,
    progress: Progress = _no_progress,
    dropped: Callable[[UploadState, MediaError], None] | None = None,
) -> list[OutboxEntry]:
    """Continue every unfinished :func:`send_file` (after ``kill -9``) and queue its file message; returns the
    queued entries. An upload whose file changed (size, mtime or content) or vanished is dropped, not sent with
    content the user never asked to send: its ``MediaError`` goes to ``dropped`` (the CLI warns) instead of being
    raised. Other errors are raised and the rest wait for next time. Each resumed upload reads its file once more
    first (:func:`upload_file`). Cancellation leaves every upload resumable."""
    queued: list[OutboxEntry] = []
    for state in unfinished_uploads(store.db):
        if state.recipient is None:
            continue
        try:
            done = await upload_file(
                client, store.db, state.path, recipient=state.recipient, progress=progress, restart_changed=False
            )
        except MediaError as exc:
            if exc.code in ("file_changed", "file_unreadable"):
                forget_upload(store.db, state.path)
                if dropped is not None:
                    dropped(state, exc)
                continue
            raise
        queued.append(queue_file_message(store, done))
    return queued


def queue_file_message(store: ClientStore, state: UploadState) -> OutboxEntry:
    """Queue the file message of a completed upload to its recipient and forget the upload, in one transaction
    (a crash leaves either the upload to resume or the message queued, never both or neither). Raises what
    :func:`protocol.client.outbox.enqueue` raises. Not idempotent (each call queues a message)."""
    assert state.recipient is not None
    assert state.blob_id is not None
    body = msgspec.msgpack.encode(state.ref())
    with store.transaction():
        entry = outbox.enqueue(store, state.recipient, FILE_CONTENT_TYPE, body)
        forget_upload(store.db, state.path)
    return entry


async def send_file(
    client: RelayClient,
    store: ClientStore,
    recipient: str,
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    content_type: str | None = None,
    progress: Progress = _no_progress,
) -> OutboxEntry:
    """Upload ``path`` (or continue its upload) and queue the file message to ``recipient``; returns the outbox
    entry (the caller flushes it, as ``send`` does). An interrupted ``send_file`` of the same unchanged file to
    someone else is not dropped: its message is queued too (same blob), before this one. Raises what
    :func:`upload_file` and :func:`queue_file_message` raise; the upload resumes from where it stopped on the next
    call."""
    Address.parse(recipient)  # before any work: a bad address is refused at once
    state = await upload_file(
        client, store.db, path, recipient=recipient, name=name, content_type=content_type, progress=progress
    )
    if state.recipient is None or state.recipient == recipient:
        return queue_file_message(store, msgspec.structs.replace(state, recipient=recipient))
    with store.transaction():
        outbox.enqueue(store, state.recipient, FILE_CONTENT_TYPE, msgspec.msgpack.encode(state.ref()))
        return queue_file_message(store, msgspec.structs.replace(state, recipient=recipient))


# -- file messages in the history ---------------------------------------------------------------------------------


def file_ref(message: HistoryMessage) -> blobfmt.BlobRef | None:
    """The :class:`~protocol.blobs.BlobRef` of a file message (None for any other message, or a body that does
    not decode as one: shown as a plain binary message)."""
    if message.content_type != FILE_CONTENT_TYPE:
        return None
    try:
        ref = msgspec.msgpack.decode(message.body, type=blobfmt.BlobRef)
        _check_ref(ref)
    except (msgspec.DecodeError, msgspec.ValidationError, TetherlessError, MediaError):
        return None
    return ref


def _check_ref(ref: blobfmt.BlobRef) -> None:
    """What the sender put in the message is consistent (length and size, a plain file name …)."""
    try:
        ref.check()
    except TetherlessError as exc:
        raise MediaError("not_a_file_message", f"the file message is malformed ({exc.detail})") from exc


def find_file(store: ClientStore, message_id: bytes) -> tuple[HistoryMessage, blobfmt.BlobRef]:
    """The file message whose ``message_uid`` is ``message_id`` and its reference. Raises :class:`MediaError`
    ``unknown_message`` / ``not_a_file_message``. Read-only (opens history rows newest first until found)."""
    found = store.history(newest=1, where=lambda m: m.message_uid == message_id)
    if not found:
        raise MediaError("unknown_message", "no message with that id in this device's history (run `sync` first?)")
    ref = file_ref(found[0])
    if ref is None:
        raise MediaError("not_a_file_message", "that message is not a file")
    return found[0], ref


# -- relays other than the home one ------------------------------------------------------------------------------


def relay_urls(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``name=url`` pairs of :data:`RELAY_URLS_ENV` (lower-case names); malformed entries are ignored."""
    text = (os.environ if environ is None else environ).get(RELAY_URLS_ENV, "")
    pairs = (item.partition("=") for item in text.split(",") if item.strip())
    return {name.strip().lower(): url.strip().rstrip("/") for name, sep, url in pairs if sep and name and url}


def relay_url_for(relay: str, keys: DeviceKeys, environ: Mapping[str, str] | None = None) -> str:
    """The URL of relay ``relay``: this device's own relay URL for its home relay, else :data:`RELAY_URLS_ENV`'s
    entry, else ``https://<relay>``. Raises ``TetherlessError`` ``invalid_field`` for a name that is not a relay
    name (it comes from a message: it never becomes a path, a user or another scheme). Pure lookup: whether the
    device may connect there is :func:`check_blob_relay`'s question."""
    if relay.lower() == Address.parse(keys.address).relay:
        return keys.relay_url
    if not re.match(RELAY_PATTERN, relay):  # the relay-name rule of addresses
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"not a relay name: {relay[:100]!r}")
    return relay_urls(environ).get(relay.lower()) or f"https://{relay.lower()}"


#: ``(host, port)`` → the addresses a connection to it would use (:func:`system_resolve`; tests pass their own).
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """The system resolver's TCP addresses for ``host`` (trio's ``getaddrinfo``). Raises ``OSError``
    (``socket.gaierror``) when the name does not resolve; cancellation abandons the lookup."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


async def check_blob_relay(
    relay: str,
    keys: DeviceKeys,
    *,
    environ: Mapping[str, str] | None = None,
    resolve: Resolve = system_resolve,
) -> str:
    """The URL of the relay a file message names (:func:`relay_url_for`), once it is a place this device may
    connect to on a sender's word; the federation rule of relays (docs/federation.md §1.1), on the client.

    ``BlobRef.relay`` is whatever the sender wrote: without this, a message could make ``blob get`` connect to
    the recipient's loopback, LAN or link-local addresses (a probe of their network, a request to a local service
    with the recipient's trust). Allowed without question: this device's home relay and the names the user mapped
    in :data:`RELAY_URLS_ENV` (their own configuration; the tests map their 127.0.0.1 relays so). Any other name
    must not be an IP address in any spelling (:func:`protocol.hosts.numeric_host`), and every address it
    resolves to must be public (:func:`protocol.hosts.public_address`). Raises :class:`MediaError`
    ``blob_relay_refused``, ``TetherlessError`` ``invalid_field`` (not a relay name) and
    :class:`~protocol.client.http.ConnectError` (the name does not resolve now). Read-only; idempotent;
    cancellation abandons the lookup.

    :func:`blob_relay` then connects to the very addresses checked here (:func:`checked_blob_relay`), not to a
    second lookup of the name, so a DNS answer that changes in between (rebinding) cannot redirect it.
    """
    url, _ = await checked_blob_relay(relay, keys, environ=environ, resolve=resolve)
    return url


async def checked_blob_relay(
    relay: str,
    keys: DeviceKeys,
    *,
    environ: Mapping[str, str] | None = None,
    resolve: Resolve = system_resolve,
) -> tuple[str, tuple[str, ...]]:
    """:func:`check_blob_relay`, with the addresses it checked: connect to those (empty for the home relay and
    the user's mapped names, which are resolved as usual). Raises what :func:`check_blob_relay` raises."""
    url = relay_url_for(relay, keys, environ)
    if url == keys.relay_url or relay.lower() in relay_urls(environ):
        return url, ()
    host, port = hosts.split_relay_name(relay)
    if hosts.numeric_host(host):
        raise MediaError(
            "blob_relay_refused",
            f"the file's relay {relay} is an IP address; not connecting there on a sender's word "
            f"(map it in {RELAY_URLS_ENV} to allow it)",
        )
    try:
        addresses = await resolve(host, port or 443)
    except OSError as exc:
        raise ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    if not addresses:
        raise ConnectError(f"cannot resolve {host}: no address")
    refused = [address for address in addresses if not hosts.public_address_text(address)]
    if refused:
        raise MediaError(
            "blob_relay_refused",
            f"the file's relay {relay} resolves to the non-public address {refused[0]} (loopback, private, "
            f"link-local, multicast or reserved); not connecting there on a sender's word (map it in "
            f"{RELAY_URLS_ENV} to allow it)",
        )
    return url, tuple(addresses)


# -- the encrypted media cache -----------------------------------------------------------------------------------


class MediaCache:
    """``<home>/media/``: blobs' ciphertext by blob id (``<id>`` complete and verified, ``<id>.part`` while it
    downloads), their least-recently-used order in ``state.db``, and a size limit over the complete ones."""

    def __init__(self, home: str | os.PathLike[str], db: LocalDB, *, limit_bytes: int | None = None) -> None:
        self.root = Path(home) / MEDIA_DIR
        self.db = db
        self.limit_bytes = limit_bytes if limit_bytes is not None else cache_limit_from_env()

    def path(self, blob_id: str, *, partial: bool = False) -> Path:
        if len(blob_id) != 32 or any(c not in "0123456789abcdef" for c in blob_id):
            raise MediaError("not_a_file_message", f"not a blob id: {blob_id[:40]!r}")
        return self.root / (blob_id + (PARTIAL_SUFFIX if partial else ""))

    def ensure_root(self) -> None:
        self.root.mkdir(mode=0o700, exist_ok=True)

    def has(self, blob_id: str) -> bool:
        row = self.db.execute(f"SELECT 1 FROM {MEDIA_CACHE_TABLE} WHERE blob_id = ?", (blob_id,)).fetchone()
        return row is not None and self.path(blob_id).is_file()

    def touch(self, blob_id: str, size_bytes: int) -> None:
        """Mark ``blob_id`` used now (newest in the LRU order)."""
        self.db.execute(
            f"INSERT INTO {MEDIA_CACHE_TABLE} (blob_id, size_bytes, used_seq) VALUES (?, ?, "
            f"(SELECT coalesce(max(used_seq), 0) + 1 FROM {MEDIA_CACHE_TABLE})) "
            "ON CONFLICT(blob_id) DO UPDATE SET used_seq = excluded.used_seq, size_bytes = excluded.size_bytes",
            (blob_id, size_bytes),
        )

    def forget(self, blob_id: str) -> None:
        """Drop ``blob_id`` from the cache (file and row). Idempotent."""
        self.db.execute(f"DELETE FROM {MEDIA_CACHE_TABLE} WHERE blob_id = ?", (blob_id,))
        for partial in (False, True):
            with contextlib.suppress(FileNotFoundError):
                self.path(blob_id, partial=partial).unlink()

    def size_bytes(self) -> int:
        return int(self.db.execute(f"SELECT coalesce(sum(size_bytes), 0) FROM {MEDIA_CACHE_TABLE}").fetchone()[0])

    def evict(self, *, keep: str | None = None) -> list[str]:
        """Delete least recently used blobs until the cache is within its limit (never ``keep``); returns the
        evicted ids. Idempotent."""
        evicted: list[str] = []
        total = self.size_bytes()
        rows = self.db.execute(f"SELECT blob_id, size_bytes FROM {MEDIA_CACHE_TABLE} ORDER BY used_seq").fetchall()
        for blob_id, size in rows:
            if total <= self.limit_bytes:
                break
            if blob_id == keep:
                continue
            self.forget(blob_id)
            total -= int(size)
            evicted.append(blob_id)
        return evicted


def cache_limit_from_env(environ: Mapping[str, str] | None = None) -> int:
    """:data:`CACHE_LIMIT_ENV` in bytes (a plain integer), else :data:`DEFAULT_CACHE_LIMIT_BYTES`."""
    text = (os.environ if environ is None else environ).get(CACHE_LIMIT_ENV, "").strip()
    return int(text) if text.isdigit() else DEFAULT_CACHE_LIMIT_BYTES


# -- download ----------------------------------------------------------------------------------------------------


class _ChunkChecker:
    """Opens each ciphertext chunk as its bytes arrive (after the header's commitment was checked), so a relay
    serving other bytes is caught at the first chunk, not at the end."""

    def __init__(self, ref: blobfmt.BlobRef) -> None:
        self.ref = ref
        self.count = blobfmt.chunk_count(blobfmt.padded_size(ref.size))
        self.step = blobfmt.CIPHER_CHUNK_BYTES
        self.decryptor: blobfmt.Decryptor | None = None

    def header(self, data: bytes) -> None:
        """Check the header's key commitment (before any chunk is opened)."""
        try:
            self.decryptor = blobfmt.Decryptor(self.ref.key, data)
        except TetherlessError as exc:
            raise MediaError(exc.code.value, f"the blob's header is not its key's ({exc.detail})") from exc

    def chunk(self, index: int, data: bytes) -> bytes:
        """The file's bytes in chunk ``index`` (padding checked and cut)."""
        assert self.decryptor is not None
        try:
            padded = self.decryptor.open_chunk(index, data, index == self.count - 1)
            return blobfmt.strip_padding(index, padded, self.ref.size)
        except TetherlessError as exc:
            raise MediaError(exc.code.value, f"the blob does not open ({exc.detail})") from exc

    def boundary(self, offset: int) -> int:
        """The largest chunk boundary (or the header's end, or 0) at or below ``offset``."""
        if offset < blobfmt.HEADER_BYTES:
            return 0
        return blobfmt.HEADER_BYTES + (offset - blobfmt.HEADER_BYTES) // self.step * self.step


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path, end: int) -> hashlib._Hash:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        remaining = end
        while remaining > 0:
            data = f.read(min(_READ_BYTES, remaining))
            if not data:
                break
            hasher.update(data)
            remaining -= len(data)
    return hasher


def _prepare_partial(cache: MediaCache, checker: _ChunkChecker) -> tuple[Path, int]:
    """The partial file, cut back to the last whole chunk (bytes after it were never checked), and its size.
    Its header is checked again (the cache is on disk: changed bytes are refused, then fetched afresh)."""
    partial = cache.path(checker.ref.blob_id, partial=True)
    try:
        size = partial.stat().st_size
    except FileNotFoundError:
        return partial, 0
    keep = min(checker.boundary(size), checker.ref.length)
    with partial.open("r+b") as f:
        f.truncate(keep)
        if keep >= blobfmt.HEADER_BYTES:
            f.seek(0)
            try:
                checker.header(f.read(blobfmt.HEADER_BYTES))
            except MediaError:
                f.truncate(0)
                checker.decryptor = None
                return partial, 0
    return partial, keep


def _content_range_start(response_range: str | None, length: int) -> int | None:
    """``bytes START-END/LENGTH`` → START when END is the last byte and LENGTH the blob's; None otherwise."""
    if response_range is None or not response_range.startswith("bytes "):
        return None
    span, _, total = response_range[6:].partition("/")
    first, _, last = span.partition("-")
    if not (first.isdigit() and last.isdigit() and total.isdigit()):
        return None
    if int(total) != length or int(last) != length - 1:
        return None
    return int(first)


async def _fetch(api: RelayApi, cache: MediaCache, ref: blobfmt.BlobRef, progress: Progress) -> Path:
    """Bring the verified ciphertext of ``ref`` into the cache; returns its path."""
    checker = _ChunkChecker(ref)
    cache.ensure_root()
    partial, offset = _prepare_partial(cache, checker)
    hasher = _hash_file(partial, offset) if offset else hashlib.sha256()
    pending = bytearray()  # bytes of the current chunk (or of the header) not yet checked
    position = offset
    with partial.open("ab") as out:
        if offset == ref.length:  # killed after the last byte, before the rename: nothing left to ask
            return _complete(cache, ref, partial, hasher)
        try:
            async with api.blob_download(ref.blob_id, capability=ref.capability, start=offset) as response:
                if response.status == 206:
                    if _content_range_start(response.header("content-range"), ref.length) != offset:
                        raise MediaError("relay_misbehaved", "the relay answered another byte range than asked")
                elif offset:  # a 200 to a Range request: the whole blob again, from the start
                    out.truncate(0)
                    offset, hasher, checker.decryptor = 0, hashlib.sha256(), None
                position = offset
                async for data in response:
                    if position + len(pending) + len(data) > ref.length:
                        raise MediaError("blob_corrupt", f"the relay sent more than the blob's {ref.length} bytes")
                    pending += data
                    position = _check_pending(checker, pending, position, out, hasher)
                    progress(Phase.DOWNLOADING, position + len(pending), ref.length)
        finally:  # what was checked stays: the next call continues after it
            out.flush()
            os.fsync(out.fileno())
    if position + len(pending) != ref.length or pending:
        raise MediaError(
            "download_incomplete",
            f"the relay sent {position + len(pending)} of {ref.length} bytes; run the command again to continue",
        )
    return _complete(cache, ref, partial, hasher)


def _complete(cache: MediaCache, ref: blobfmt.BlobRef, partial: Path, hasher: hashlib._Hash) -> Path:
    """The whole ciphertext is in ``partial``: its digest must be the message's, then it becomes the cache entry."""
    if hasher.digest() != ref.digest:
        cache.forget(ref.blob_id)
        raise MediaError("blob_corrupt", "the downloaded blob's SHA-256 is not the one in the message")
    final = cache.path(ref.blob_id)
    os.replace(partial, final)
    _fsync_dir(cache.root)
    cache.touch(ref.blob_id, ref.length)
    return final


def _check_pending(
    checker: _ChunkChecker, pending: bytearray, position: int, out: IO[bytes], hasher: hashlib._Hash
) -> int:
    """Check every whole chunk (or the header) at the front of ``pending`` and append it to the partial file;
    returns the new checked position. The last chunk is whole when the blob ends."""
    while True:
        if position == 0:
            need = blobfmt.HEADER_BYTES
        else:
            index = (position - blobfmt.HEADER_BYTES) // checker.step
            need = min(checker.step, checker.ref.length - position)
        if len(pending) < need or need <= 0:
            return position
        data = bytes(pending[:need])
        if position == 0:
            checker.header(data)
        else:
            checker.chunk(index, data)
        out.write(data)
        hasher.update(data)
        del pending[:need]
        position += need


def _decrypt_to(cached: Path, ref: blobfmt.BlobRef, temp: IO[bytes], progress: Progress) -> None:
    """Decrypt the cached ciphertext into ``temp``, checking it all again (the cache is on disk): the header's
    commitment, every chunk, the padding, the length and the digest."""
    checker = _ChunkChecker(ref)
    hasher = hashlib.sha256()
    written = 0
    with cached.open("rb") as f:
        header = f.read(blobfmt.HEADER_BYTES)
        hasher.update(header)
        checker.header(header)
        for index in range(checker.count):
            data = f.read(checker.step)
            hasher.update(data)
            plaintext = checker.chunk(index, data)
            temp.write(plaintext)
            written += len(plaintext)
            progress(Phase.DECRYPTING, written, ref.size)
        if f.read(1):
            raise MediaError("blob_corrupt", "the cached blob is longer than its length")
    if hasher.digest() != ref.digest:
        raise MediaError("blob_corrupt", "the blob's SHA-256 is not the one in the message")


def destination_for(ref: blobfmt.BlobRef, dest: str | os.PathLike[str] | None) -> Path:
    """Where :func:`download` writes: ``dest`` itself, or the file's (sanitised) name inside ``dest`` when it is a
    directory (the current one when None). The name from the message never adds a directory."""
    target = Path(dest) if dest is not None else Path.cwd()
    if target.is_dir():
        return target / blobfmt.safe_name(ref.name)
    if dest is not None and os.fspath(dest).endswith((os.sep, "/")):
        # "out/" names a directory; Path() drops the slash and would write a file called "out".
        raise MediaError("destination_unwritable", f"{os.fspath(dest)} is not a directory")
    return target


def _publish(temp_path: Path, dest: Path, *, force: bool) -> None:
    """Move the finished plaintext into place: atomically replacing (``force``) or only if nothing is there."""
    if force:
        os.replace(temp_path, dest)
        return
    try:
        os.link(temp_path, dest)
    except FileExistsError as exc:
        raise MediaError("destination_exists", f"{dest} exists; use --force to replace it") from exc
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if dest.exists():  # a file system without hard links: a small window, documented
            raise MediaError("destination_exists", f"{dest} exists; use --force to replace it") from exc
        os.replace(temp_path, dest)
        return
    temp_path.unlink()


@asynccontextmanager
async def blob_relay(
    ref: blobfmt.BlobRef, keys: DeviceKeys, *, resolve: Resolve = system_resolve, **options: object
) -> AsyncIterator[RelayApi]:
    """The request layer of the relay that holds ``ref``, once :func:`check_blob_relay` allowed it (raises what
    that raises, before any connection), without this device's keys on a relay that is not its own (the
    capability authorises the download; nothing else is sent there)."""
    url, addresses = await checked_blob_relay(ref.relay, keys, resolve=resolve)
    own = url == keys.relay_url
    async with RelayClient.connect(
        url, keys=keys if own else None, ca_file=keys.ca_file, addresses=addresses, **options
    ) as client:
        yield client.api


async def download(
    ref: blobfmt.BlobRef,
    dest: str | os.PathLike[str] | None,
    *,
    cache: MediaCache,
    relay: Callable[[blobfmt.BlobRef], contextlib.AbstractAsyncContextManager[RelayApi]],
    force: bool = False,
    progress: Progress = _no_progress,
) -> Path:
    """Fetch (or take from the cache), verify and decrypt ``ref`` to ``dest``; returns the path written.

    ``relay(ref)`` opens the request layer of the blob's relay (:func:`blob_relay`); it is not called when the
    cache holds the blob (the medic's offline case). The destination (:func:`destination_for`) is checked first:
    an existing file without ``force`` raises :class:`MediaError` ``destination_exists`` before any transfer.
    Raises :class:`MediaError` (``blob_corrupt``: nothing of it reaches ``dest``, and the cached or partial
    ciphertext is dropped; ``download_incomplete``, ``relay_misbehaved``, ``destination_unwritable``, and what
    ``relay`` raises: ``blob_relay_refused`` from :func:`blob_relay`),
    ``RemoteError`` (``blob_not_found``: unknown blob or refused capability) and ``TransportError``. Idempotent;
    cancellation or ``kill -9`` keeps the verified part of the ciphertext, and the next call continues it.
    """
    _check_ref(ref)
    target = _writable_destination(ref, dest, force=force)
    if not cache.has(ref.blob_id):
        async with relay(ref) as api:
            await _fetch(api, cache, ref, progress)
    _write_plaintext(cache, ref, target, force=force, progress=progress)
    cache.touch(ref.blob_id, ref.length)
    cache.evict(keep=ref.blob_id)
    return target


def _writable_destination(ref: blobfmt.BlobRef, dest: str | os.PathLike[str] | None, *, force: bool) -> Path:
    target = destination_for(ref, dest)
    if target.exists() and not force:
        raise MediaError("destination_exists", f"{target} exists; use --force to replace it")
    return target


def _write_plaintext(cache: MediaCache, ref: blobfmt.BlobRef, target: Path, *, force: bool, progress: Progress) -> None:
    """Decrypt the cached blob to a temporary file beside ``target``, fsync it, and move it into place."""
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{target.name[:64]}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
    except OSError as exc:
        raise MediaError("destination_unwritable", f"cannot write in {target.parent}: {exc.strerror}") from exc
    temp_path = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as temp:
            try:
                _decrypt_to(cache.path(ref.blob_id), ref, temp, progress)
            except MediaError:
                cache.forget(ref.blob_id)  # changed on disk: fetched afresh next time
                raise
            temp.flush()
            os.fsync(temp.fileno())
        _publish(temp_path, target, force=force)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()


__all__ = [
    "CACHE_LIMIT_ENV",
    "DEFAULT_CACHE_LIMIT_BYTES",
    "PIECE_BYTES",
    "RELAY_URLS_ENV",
    "MediaCache",
    "MediaError",
    "Phase",
    "Progress",
    "Resolve",
    "UploadState",
    "blob_relay",
    "cache_limit_from_env",
    "check_blob_relay",
    "destination_for",
    "download",
    "file_ref",
    "find_file",
    "forget_upload",
    "guess_content_type",
    "queue_file_message",
    "relay_url_for",
    "relay_urls",
    "resume_uploads",
    "send_file",
    "system_resolve",
    "unfinished_uploads",
    "upload_file",
]
