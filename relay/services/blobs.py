"""Media blobs: tus uploads, downloads, quotas, expiry and the collector (docs/blobs.md; decision 0014).

Rules decided here (the store applies them atomically; the storage backend only moves bytes):

- an upload declares its length (at most ``max_bytes``) and optionally the
  ciphertext's SHA-256 and the SHA-256 of a download capability; the account's
  stored blobs plus its unfinished uploads' declared lengths stay within
  ``quota_bytes``; a declared digest the account already stores completes the
  upload at once (dedup within one account only, never across accounts);
- a PATCH appends at the committed offset only, under a lease on the upload
  row (one appender at a time, through any replica); its bytes are made
  durable by the backend, then the new offset is committed, then it is
  answered. A body past the declared length (413) or failing its
  ``Upload-Checksum`` (460) keeps nothing; a body cut short without a
  checksum keeps what arrived (tus);
- the last byte's PATCH completes the object and checks the digest: from the
  hash kept as the bytes passed (a per-process cache keyed by upload id and
  offset), else by reading the object back once. A mismatch discards the
  upload (409 ``blob_digest_mismatch``);
- a blob is downloaded with a capability whose SHA-256 the uploader declared
  (compared in constant time) or with a token of the owning account; an
  unknown blob and a refused one are the same 404;
- storage whose rows are gone goes through the store's trash, emptied after
  each operation that fills it and by the collector, so a crash never leaves
  an orphan the relay forgets.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from protocol.errors import ErrorCode, TetherlessError
from relay import metrics
from relay.blobs.base import AppendResult, BlobStorage, BlobStorageError
from relay.config import Config
from relay.store.base import BlobRecord, BlobStore, BlobUploadRecord, NewBlobUpload

from .auth import Principal
from .context import ServiceContext

log = logging.getLogger("relay.blobs")

# Upload-Checksum algorithms (tus checksum extension: sha1 is mandatory; sha256 is what our client sends).
CHECKSUM_ALGORITHMS: Final[dict[str, Callable[[], Any]]] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}
LEASE_MS: Final = 30_000  # an append's hold on its upload, renewed while bytes flow; a dead replica's lapses in this
# How long a PATCH refused blob_upload_locked is told to wait (Retry-After): a third of a lease, so a client polls
# a few times across the lease a crashed appender left behind rather than giving up or hammering.
LOCKED_RETRY_AFTER_SECONDS: Final = LEASE_MS // 3000
DIGEST_CACHE_ENTRIES: Final = 4096  # hash states kept per process (a few hundred bytes each)
GiB: Final = 1024**3


@dataclass(frozen=True, slots=True)
class BlobSettings:
    """Limits and timings of blobs (config ``blob_*``)."""

    max_bytes: int = 16 * GiB
    quota_bytes: int = 20 * GiB  # 0: no quota
    upload_expiry_seconds: int = 86_400
    ttl_seconds: int = 30 * 86_400
    collect_interval_seconds: float = 60.0
    collect_batch: int = 500

    @classmethod
    def from_config(cls, config: Config) -> BlobSettings:
        return cls(
            max_bytes=config.blob_max_bytes,
            quota_bytes=config.blob_quota_bytes,
            upload_expiry_seconds=config.blob_upload_expiry_seconds,
            ttl_seconds=config.blob_ttl_seconds,
            collect_interval_seconds=config.blob_collect_interval_seconds,
        )


@dataclass(frozen=True, slots=True)
class Checksum:
    """A PATCH's ``Upload-Checksum``: the algorithm's name as sent and the digest bytes."""

    algorithm: str
    digest: bytes


@dataclass(frozen=True, slots=True)
class UploadStatus:
    """What tus answers about an upload: committed offset, declared length, expiry, and the blob once stored."""

    upload_id: str
    length: int
    offset: int
    expires_at_ms: int
    blob_id: str | None


@dataclass(frozen=True, slots=True)
class CollectorReport:
    uploads: int  # unfinished uploads collected
    blobs: int  # blobs collected
    dropped: int  # storage objects dropped (aborted or deleted)


class _BodyTooLongError(Exception):
    """The PATCH body goes past the upload's declared length."""


class _DigestCache:
    """SHA-256 states of uploads as their bytes passed, keyed by upload id and the offset they reached.

    A cache: losing an entry (restart, another replica, eviction) costs one
    read-back of the object at completion, never a wrong answer, because an
    entry is used only at exactly the offset it was stored for.
    """

    def __init__(self, entries: int = DIGEST_CACHE_ENTRIES) -> None:
        self._entries = entries
        self._states: OrderedDict[str, tuple[int, Any]] = OrderedDict()

    def resume(self, upload_id: str, offset: int) -> Any | None:
        """A copy of the state at ``offset`` (a fresh one at 0), or None when it is not known."""
        if offset == 0:
            return hashlib.sha256()
        found = self._states.get(upload_id)
        if found is None or found[0] != offset:
            return None
        return found[1].copy()

    def keep(self, upload_id: str, offset: int, state: Any) -> None:
        self._states[upload_id] = (offset, state)
        self._states.move_to_end(upload_id)
        while len(self._states) > self._entries:
            self._states.popitem(last=False)

    def drop(self, upload_id: str) -> None:
        self._states.pop(upload_id, None)


def _not_found() -> TetherlessError:
    return TetherlessError(ErrorCode.BLOB_NOT_FOUND, "no such upload or blob")


async def no_chunks() -> AsyncIterator[bytes]:
    """An empty body (an append that only cuts garbage off; a HEAD's stream of known length)."""
    nothing: tuple[bytes, ...] = ()
    for chunk in nothing:
        yield chunk


class BlobService:
    def __init__(self, store: BlobStore, storage: BlobStorage, ctx: ServiceContext, settings: BlobSettings) -> None:
        self._store = store
        self.storage = storage
        self._ctx = ctx
        self.settings = settings
        self._digests = _DigestCache()

    def _status(self, record: BlobUploadRecord, blob_id: str | None = None) -> UploadStatus:
        return UploadStatus(record.upload_id, record.length, record.offset, record.expires_at_ms, blob_id)

    # -- uploads ---------------------------------------------------------------------------------

    async def create(
        self, principal: Principal, length: int, sha256: bytes | None, capability_hash: bytes | None
    ) -> UploadStatus:
        """Create an upload of ``length`` bytes for the principal's account (tus creation).

        Raises ``blob_too_large`` (above ``max_bytes``), ``blob_quota_exceeded``
        (nothing stored), ``unavailable`` when the storage backend fails (the
        row is discarded). A declared digest the account stores answers an
        upload that is complete at once (``offset == length``, ``blob_id``
        set). A 0-byte upload is stored at once. Not idempotent: each call
        creates a new upload (the unused one expires). Cancellation: a row
        without storage expires and is collected.
        """
        if length > self.settings.max_bytes:
            raise TetherlessError(ErrorCode.BLOB_TOO_LARGE, f"Upload-Length above {self.settings.max_bytes} bytes")
        now = self._ctx.clock_ms()
        upload_id = self._ctx.random_bytes(16).hex()
        record = await self._store.create_blob_upload(
            NewBlobUpload(
                upload_id=upload_id,
                account_id=principal.account_id,
                device_id=principal.device_id,
                length=length,
                sha256=sha256,
                capability_hash=capability_hash,
                created_at_ms=now,
                expires_at_ms=now + self.settings.upload_expiry_seconds * 1000,
            ),
            self.settings.quota_bytes,
            now + self.settings.ttl_seconds * 1000,
        )
        if record.blob_id is not None:
            metrics.blob_uploads_total.labels("deduplicated").inc()
            return self._status(record, record.blob_id)
        try:
            state = await self.storage.start(upload_id, length)
        except BlobStorageError as exc:
            log.warning("blob storage: %s", exc)
            await self._store.discard_blob_upload(upload_id, False, self._ctx.clock_ms())
            raise TetherlessError(ErrorCode.UNAVAILABLE, "blob storage unavailable", retry_after_seconds=1) from None
        await self._store.set_blob_upload_state(upload_id, state)
        if length == 0:  # nothing to append: stored at once (None only if it vanished meanwhile; HEAD says so)
            blob_id = await self._finish(upload_id, state, 0, sha256)
            return UploadStatus(upload_id, 0, 0, record.expires_at_ms, blob_id)
        return self._status(record)

    async def _owned_upload(self, principal: Principal, upload_id: str) -> BlobUploadRecord:
        record = await self._store.get_blob_upload(upload_id)
        if record is None or record.account_id != principal.account_id:
            raise _not_found()
        if record.blob_id is None and record.expires_at_ms <= self._ctx.clock_ms():
            raise _not_found()  # expired: the collector drops it soon; resuming it must not keep it alive
        return record

    async def status(self, principal: Principal, upload_id: str) -> UploadStatus:
        """The upload's committed offset (tus HEAD). An upload whose last byte was committed but not yet turned
        into a blob (its PATCH died in between) is finished here, so the client learns its blob id.

        Raises ``blob_not_found`` (unknown, expired, another account's), and
        what :meth:`append` raises at completion. Idempotent.
        """
        record = await self._owned_upload(principal, upload_id)
        if record.blob_id is None and record.offset == record.length:
            blob_id = await self._finish(upload_id, record.storage_state, record.length, record.sha256)
            if blob_id is None:
                raise _not_found()
            return self._status(record, blob_id)
        return self._status(record, record.blob_id)

    async def append(
        self,
        principal: Principal,
        upload_id: str,
        offset: int,
        body: AsyncIterable[bytes],
        declared_length: int | None,
        checksum: Checksum | None,
    ) -> UploadStatus:
        """Append ``body`` at ``offset`` (tus PATCH); returns the new committed state.

        Raises, before reading the body: ``blob_checksum_unsupported``,
        ``blob_not_found``, ``blob_offset_mismatch`` (``offset`` is not the
        committed one, or the upload is complete), ``blob_too_large``
        (``declared_length`` goes past the upload's length),
        ``blob_upload_locked`` (another append holds the upload). After it:
        ``blob_too_large`` (the body went past the length), ``blob_checksum_mismatch``
        (both keep nothing), ``blob_digest_mismatch`` (the last byte arrived and the
        whole does not hash to the declared digest: the upload is discarded),
        ``blob_not_found`` (terminated or collected meanwhile), ``unavailable``
        (the backend failed; nothing new committed). When ``body`` raises (the
        client went away), what arrived is committed unless a checksum was
        given, and the exception propagates. Not idempotent (a retry at the
        old offset gets ``blob_offset_mismatch``; ask :meth:`status`).
        Cancellation: nothing new is committed; the bytes written are garbage
        the next append overwrites.
        """
        if checksum is not None and checksum.algorithm not in CHECKSUM_ALGORITHMS:
            raise TetherlessError(
                ErrorCode.BLOB_CHECKSUM_UNSUPPORTED, f"Upload-Checksum algorithms: {', '.join(CHECKSUM_ALGORITHMS)}"
            )
        record = await self._owned_upload(principal, upload_id)
        if record.blob_id is not None or offset != record.offset:
            raise TetherlessError(
                ErrorCode.BLOB_OFFSET_MISMATCH, f"the upload's offset is {record.offset} of {record.length}"
            )
        remaining = record.length - offset
        if declared_length is not None and declared_length > remaining:
            raise TetherlessError(ErrorCode.BLOB_TOO_LARGE, f"the body goes past Upload-Length {record.length}")
        holder = self._ctx.random_bytes(16).hex()
        now = self._ctx.clock_ms()
        if not await self._store.lease_blob_upload(upload_id, offset, holder, now, now + LEASE_MS):
            raise TetherlessError(
                ErrorCode.BLOB_UPLOAD_LOCKED,
                "another request is appending to this upload (a crashed one's hold lapses within "
                f"{LEASE_MS // 1000} s)",
                retry_after_seconds=LOCKED_RETRY_AFTER_SECONDS,
            )
        try:
            return await self._append_leased(record, holder, body, checksum)
        except BaseException:
            with trio.CancelScope(shield=True):
                # A commit released it already (then this changes nothing); otherwise the next PATCH need not wait.
                await self._store.release_blob_lease(upload_id, holder)
            raise

    async def _append_leased(
        self, record: BlobUploadRecord, holder: str, body: AsyncIterable[bytes], checksum: Checksum | None
    ) -> UploadStatus:
        upload_id, offset, length = record.upload_id, record.offset, record.length
        digest = self._digests.resume(upload_id, offset)
        check = CHECKSUM_ALGORITHMS[checksum.algorithm]() if checksum is not None else None
        passed = 0
        renew_at = self._ctx.clock_ms() + LEASE_MS // 2

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal passed, renew_at
            async for chunk in body:
                metrics.blob_received_bytes_total.inc(len(chunk))
                if passed + len(chunk) > length - offset:
                    raise _BodyTooLongError
                passed += len(chunk)
                if digest is not None:
                    digest.update(chunk)
                if check is not None:
                    check.update(chunk)
                now = self._ctx.clock_ms()
                if now >= renew_at:  # a long PATCH keeps its hold while bytes flow
                    if not await self._store.lease_blob_upload(upload_id, offset, holder, now, now + LEASE_MS):
                        raise _not_found()
                    renew_at = now + LEASE_MS // 2
                yield chunk

        try:
            result = await self.storage.append(upload_id, record.storage_state, offset, length, chunks())
        except _BodyTooLongError:
            await self._roll_back(record)
            raise TetherlessError(
                ErrorCode.BLOB_TOO_LARGE, f"the body goes past Upload-Length {length}; nothing of it was kept"
            ) from None
        except BlobStorageError as exc:
            if getattr(exc, "append_result", None) is None:
                log.warning("blob storage: %s", exc)
                raise TetherlessError(ErrorCode.UNAVAILABLE, "blob storage failed", retry_after_seconds=1) from None
            raise
        except TetherlessError:
            raise
        except Exception as exc:  # the body was cut short: tus keeps what arrived, unless it must match a checksum
            partial: AppendResult | None = getattr(exc, "append_result", None)
            if partial is not None and partial.written and check is None:
                kept = digest if partial.written == passed else None
                await self._commit(record, holder, partial, kept)
            else:
                await self._roll_back(record)
            raise
        if check is not None and checksum is not None and not hmac.compare_digest(check.digest(), checksum.digest):
            metrics.blob_checksum_failures_total.inc()
            await self._roll_back(record)
            raise TetherlessError(
                ErrorCode.BLOB_CHECKSUM_MISMATCH, "the body does not match Upload-Checksum; nothing of it was kept"
            )
        new_offset = await self._commit(record, holder, result, digest if result.written == passed else None)
        if new_offset < length:
            return UploadStatus(upload_id, length, new_offset, record.expires_at_ms, None)
        blob_id = await self._finish(upload_id, result.state, length, record.sha256)
        if blob_id is None:
            raise _not_found()  # terminated or collected between the commit and now
        return UploadStatus(upload_id, length, new_offset, record.expires_at_ms, blob_id)

    async def _commit(self, record: BlobUploadRecord, holder: str, result: AppendResult, digest: Any | None) -> int:
        new_offset = record.offset + result.written
        if not await self._store.commit_blob_append(record.upload_id, holder, record.offset, new_offset, result.state):
            raise _not_found()  # terminated, collected, or its lease lapsed and another append took over
        metrics.blob_upload_bytes_total.inc(result.written)
        if digest is not None:
            self._digests.keep(record.upload_id, new_offset, digest)
        else:
            self._digests.drop(record.upload_id)
        return new_offset

    async def _roll_back(self, record: BlobUploadRecord) -> None:
        """Drop the bytes a refused PATCH wrote beyond the committed offset now, rather than at the next append
        (an empty append at the committed offset cuts them off); the outcome is the same if this fails."""
        with trio.CancelScope(shield=True):
            try:
                await self.storage.append(
                    record.upload_id, record.storage_state, record.offset, record.length, no_chunks()
                )
            except BlobStorageError as exc:
                log.warning("blob storage: rolling back a refused append: %s", exc)

    async def _finish(self, upload_id: str, state: str, length: int, declared: bytes | None) -> str | None:
        """Complete the object, check its digest, and store it as a blob; returns the blob id (None: the upload
        is gone). Idempotent."""
        try:
            await self.storage.complete(upload_id, state, length)
            digest = self._digests.resume(upload_id, length)
            if digest is None:  # the hash state was lost: read the object back once
                digest = hashlib.sha256()
                async for chunk in self.storage.read(upload_id, 0, length):
                    digest.update(chunk)
        except BlobStorageError as exc:
            log.warning("blob storage: completing an upload: %s", exc)
            raise TetherlessError(ErrorCode.UNAVAILABLE, "blob storage failed", retry_after_seconds=1) from None
        self._digests.drop(upload_id)
        sha256 = digest.digest()
        now = self._ctx.clock_ms()
        if declared is not None and not hmac.compare_digest(sha256, declared):
            await self._store.discard_blob_upload(upload_id, True, now)
            metrics.blob_uploads_total.labels("digest_mismatch").inc()
            await self.empty_trash()
            raise TetherlessError(
                ErrorCode.BLOB_DIGEST_MISMATCH, "the upload does not hash to its declared sha256; it was discarded"
            )
        blob_id = await self._store.finish_blob_upload(upload_id, sha256, now + self.settings.ttl_seconds * 1000, now)
        if blob_id is None:
            return None
        if blob_id == upload_id:
            metrics.blob_uploads_total.labels("stored").inc()
        else:
            metrics.blob_uploads_total.labels("deduplicated").inc()
            await self.empty_trash()
        return blob_id

    async def terminate(self, principal: Principal, upload_id: str) -> None:
        """Drop the upload and its bytes (tus termination). A finished upload's blob stays (delete it with
        :meth:`delete`). Raises ``blob_not_found``. Cancellation: the row is gone or not; bytes whose row is gone
        are dropped by the collector."""
        record = await self._owned_upload(principal, upload_id)
        completed = record.blob_id is None and record.offset == record.length
        discarded = await self._store.discard_blob_upload(upload_id, completed, self._ctx.clock_ms())
        if discarded and record.blob_id is None:
            metrics.blob_uploads_total.labels("terminated").inc()
        self._digests.drop(upload_id)
        await self.empty_trash()

    async def usage(self, principal: Principal) -> int:
        """Bytes counted against the principal's account's quota."""
        return await self._store.blob_usage(principal.account_id)

    # -- downloads -------------------------------------------------------------------------------

    async def authorise_download(
        self, blob_id: str, principal: Principal | None, capability: bytes | None
    ) -> BlobRecord:
        """The blob, if ``capability`` is one its uploads declared or ``principal`` belongs to its account.

        Raises ``blob_not_found`` for an unknown or expired blob and for a
        refused caller alike (nothing tells them apart). Every stored
        capability hash is compared, in constant time, whatever matches.
        Reads only.
        """
        blob = await self._store.get_blob(blob_id)
        if blob is None or blob.expires_at_ms <= self._ctx.clock_ms():
            raise _not_found()
        allowed = principal is not None and principal.account_id == blob.account_id
        if capability is not None:
            wanted = hashlib.sha256(capability).digest()
            for stored in blob.capability_hashes:
                allowed |= hmac.compare_digest(stored, wanted)
        if not allowed:
            raise _not_found()
        return blob

    async def read(self, blob: BlobRecord, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes [start, end) of ``blob``, at most 256 KiB per chunk, counted in ``relay_blob_download_bytes_total``.

        The first chunk is read before this returns, so a missing object is
        ``unavailable`` before any response header is sent; a failure later
        raises :class:`BlobStorageError` from the iterator (the transport
        aborts the response, never truncates it silently).
        """
        first = b""
        try:
            chunks = self.storage.read(blob.storage_key, start, end).__aiter__()
            if end > start:
                first = await chunks.__anext__()
        except (BlobStorageError, StopAsyncIteration) as exc:
            log.warning("blob storage: reading %s: %s", blob.blob_id, exc)
            raise TetherlessError(ErrorCode.UNAVAILABLE, "blob storage failed", retry_after_seconds=1) from None
        return self._counted(first, chunks)

    @staticmethod
    async def _counted(first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            if first:
                metrics.blob_download_bytes_total.inc(len(first))
                yield first
            async for chunk in chunks:
                metrics.blob_download_bytes_total.inc(len(chunk))
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()

    async def delete(self, principal: Principal, blob_id: str) -> None:
        """Delete a blob of the principal's account, bytes included. Raises ``blob_not_found`` (also for another
        account's blob). Not idempotent on the wire (a second call is a 404); the deletion itself is."""
        if not await self._store.delete_blob(blob_id, principal.account_id, self._ctx.clock_ms()):
            raise _not_found()
        await self.empty_trash()

    # -- collection ------------------------------------------------------------------------------

    async def empty_trash(self) -> int:
        """Drop the storage of rows already gone (abort unfinished uploads, delete objects); returns how many.
        A backend failure leaves the entry for the next run. Idempotent; safe on several replicas at once."""
        dropped = 0
        while True:
            entries = await self._store.blob_trash(self.settings.collect_batch)
            done: list[str] = []
            for entry in entries:
                try:
                    if entry.storage_state is None:
                        await self.storage.delete(entry.storage_key)
                    else:
                        await self.storage.abort(entry.storage_key, entry.storage_state)
                except BlobStorageError as exc:
                    log.warning("blob storage: dropping %s: %s (will retry)", entry.storage_key, exc)
                    continue
                done.append(entry.storage_key)
            if done:
                await self._store.forget_blob_trash(done)
                metrics.blob_collected_total.labels("storage").inc(len(done))
            dropped += len(done)
            if len(entries) < self.settings.collect_batch or not done:
                return dropped

    async def collect(self) -> CollectorReport:
        """One collector run: unfinished uploads and blobs past their expiry are deleted (in batches, one
        transaction each) and their storage dropped; updates the stored-bytes gauge. Idempotent."""
        uploads = blobs = 0
        now = self._ctx.clock_ms()
        while True:
            report = await self._store.collect_blobs(now, self.settings.collect_batch)
            uploads, blobs = uploads + report.uploads, blobs + report.blobs
            if not report.more:
                break
        metrics.blob_collected_total.labels("upload").inc(uploads)
        metrics.blob_collected_total.labels("blob").inc(blobs)
        dropped = await self.empty_trash()
        metrics.blob_stored_bytes.set(await self._store.blob_stored_bytes())
        return CollectorReport(uploads, blobs, dropped)

    async def run_collector(self) -> None:
        """Collect every ``collect_interval_seconds`` (next to the inbox expiry loop). Runs until cancelled."""
        while True:
            try:
                report = await self.collect()
            except Exception:
                log.exception("blob collector failed; will retry")
            else:
                if report.uploads or report.blobs:
                    log.info("blob collector: %d expired uploads, %d expired blobs", report.uploads, report.blobs)
            await trio.sleep(self.settings.collect_interval_seconds)


class NoBlobStorage:
    """The storage of a relay built without one (tests of other topics): every blob operation fails as
    ``unavailable``; nothing is stored anywhere."""

    name = "none"

    async def start(self, key: str, length: int) -> str:
        raise BlobStorageError("no blob storage configured")

    async def append(
        self, key: str, state: str, offset: int, length: int, chunks: AsyncIterator[bytes]
    ) -> AppendResult:
        raise BlobStorageError("no blob storage configured")

    async def complete(self, key: str, state: str, length: int) -> None:
        raise BlobStorageError("no blob storage configured")

    def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        raise BlobStorageError("no blob storage configured")

    async def abort(self, key: str, state: str) -> None:
        raise BlobStorageError("no blob storage configured")

    async def delete(self, key: str) -> None:
        raise BlobStorageError("no blob storage configured")

    async def aclose(self) -> None:
        """Nothing to release."""
