"""Blob storage on any S3-compatible object store (docs/decisions/0014-media-blobs.md D4).

One multipart upload per blob, object key ``blobs/<key>``. The part size is
fixed at :meth:`S3Storage.start` (``max(8 MiB, ⌈length/10,000⌉ rounded up to
1 MiB)``) and kept in the opaque state with the S3 ``UploadId``, so part
*n* always holds bytes ``[(n-1)·part, n·part)``. Bytes short of a full part
live in a *tail object* ``uploads/<key>/tail-<offset>`` named after the
offset it ends at:

- :meth:`S3Storage.append` at the committed offset ``o`` reads
  ``tail-<o>``, streams the new bytes behind it, uploads every part that
  fills up (re-uploading a part number replaces that part, which is how
  garbage a failed PATCH left beyond ``o`` is overwritten) and PUTs
  ``tail-<o + written>``. It never writes ``tail-<o>`` itself, so a PATCH
  that fails at any point leaves the committed state readable.
- :meth:`S3Storage.complete` uploads the tail as the last part and
  completes the upload with exactly parts ``1..n``, each checked for its
  size first (ListParts), so a part the database and the bucket disagree
  about is an error rather than a corrupt blob.
- Tails below the committed offset are deleted lazily by the next append,
  and all of them by complete and abort. Tails *above* it are left alone:
  one may belong to an append whose offset is being committed right now.

Why httpx and botocore's signer (rather than boto3 in worker threads): httpx
runs on trio through anyio, so a request costs no thread, bodies stream, and
timeouts are trio's; the signature is AWS's own code (``S3SigV4Auth``), not
ours. Part bodies are signed with their SHA-256 (computed while the part is
buffered, which it is anyway) instead of ``UNSIGNED-PAYLOAD``: the store
then rejects a part corrupted or altered on the way, which matters over the
plain HTTP that in-cluster stores often use, for one SHA-256 pass over the
bytes (about 1 GB/s on one core here, ~1 s of CPU per GiB uploaded).

Memory: one part buffer per active append (at most the part size plus the
chunk being split at a part boundary); a part is sent from the list of
received chunks, never joined into one copy.

Only this module imports httpx and botocore: the relay imports it when S3 is
configured, and the command line never does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import quote, urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import httpx
import trio
from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from relay.blobs.base import AppendResult, BlobStorage, BlobStorageError

MIB = 1024 * 1024
DEFAULT_MIN_PART_BYTES = 8 * MIB
S3_MIN_PART_BYTES = 5 * MIB  # S3 refuses smaller parts except the last one
S3_MAX_PARTS = 10_000
READ_CHUNK_BYTES = 256 * 1024  # BlobStorage.read's promise
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_RETRY_DELAYS_SECONDS = (0.25, 1.0, 4.0)  # three retries, ~5 s in all: a blip, not an outage
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_ERROR_BODY_BYTES = 64 * 1024  # S3 error documents are small; never read more than this to explain one
_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")  # no "/" or ".": a key can never reach another key's objects
_TAIL = re.compile(r"tail-([0-9]{1,20})")


def part_bytes_for(length: int, min_part_bytes: int = DEFAULT_MIN_PART_BYTES) -> int:
    """The part size for an upload of ``length`` bytes: ≥ ``min_part_bytes``, ≤ 10,000 parts, whole MiB."""
    needed = math.ceil(length / S3_MAX_PARTS)
    return max(min_part_bytes, math.ceil(needed / MIB) * MIB)


@dataclass(frozen=True, slots=True)
class _State:
    upload_id: str  # "" for a 0-byte upload: it has no multipart upload
    part_bytes: int

    def encode(self) -> str:
        return json.dumps({"upload_id": self.upload_id, "part_bytes": self.part_bytes}, separators=(",", ":"))

    @classmethod
    def decode(cls, state: str) -> _State:
        """Raises ValueError for a state this backend did not write (a bug, not a storage failure)."""
        try:
            data = json.loads(state)
            upload_id, part_bytes = data["upload_id"], data["part_bytes"]
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError("not an S3 blob state") from exc
        if not isinstance(upload_id, str) or not isinstance(part_bytes, int) or part_bytes < S3_MIN_PART_BYTES:
            raise ValueError("not an S3 blob state")
        return cls(upload_id, part_bytes)


class _Part:
    """Bytes buffered for one part (or a tail), kept as the chunks that arrived, hashed as they arrive."""

    __slots__ = ("_hash", "pieces", "size")

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self._hash = hashlib.sha256()

    def add(self, piece: bytes) -> None:
        if piece:
            self.pieces.append(piece)
            self.size += len(piece)
            self._hash.update(piece)

    def sha256(self) -> str:
        return self._hash.hexdigest()


class _PayloadAuth(S3SigV4Auth):  # type: ignore[misc]
    """SigV4 for S3 with the payload hash we computed while buffering (botocore would hash the body again)."""

    def payload(self, request: AWSRequest) -> str:
        return str(request.context["payload_sha256"])


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]  # S3 answers in its 2006-03-01 namespace; some compatible stores do not


def _children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    return [child for child in element if _local_name(child.tag) == name]


def _text(element: ElementTree.Element, name: str) -> str:
    found = _children(element, name)
    return (found[0].text or "") if found else ""


def _xml(body: bytes, what: str) -> ElementTree.Element:
    try:
        return ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise BlobStorageError(f"S3 {what}: unreadable answer ({exc})") from None


def _error_code(response: httpx.Response) -> str:
    """S3's error code (``NoSuchUpload`` …) or "" when the answer has no error document (HEAD, proxies)."""
    body = response.content[:_ERROR_BODY_BYTES]
    if not body.lstrip().startswith(b"<"):
        return ""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return ""
    return _text(root, "Code") if _local_name(root.tag) == "Error" else ""


def _failure(what: str, response: httpx.Response) -> BlobStorageError:
    code = _error_code(response)
    return BlobStorageError(f"S3 {what}: HTTP {response.status_code}{' ' + code if code else ''}")


def _retryable(response: httpx.Response) -> bool:
    # 5xx (InternalError, SlowDown 503) may pass; 429 is what some compatible stores send for SlowDown.
    return response.status_code >= 500 or response.status_code == 429


class _Pieces:
    """A part's chunks as a request body; a class, not an async generator, so an answer that arrives before the
    body was sent (a 403) leaves nothing for trio to warn about when it is collected."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = iter(pieces)

    def __aiter__(self) -> _Pieces:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._pieces)
        except StopIteration:
            raise StopAsyncIteration from None


class S3Storage:
    """:class:`~relay.blobs.base.BlobStorage` on an S3-compatible bucket (see the module docstring for the layout).

    Every request has a timeout; a request that fails with a 5xx, a 429 or a
    connection error is retried after each of ``retry_delays_seconds``
    (re-signed each time), a 4xx never. Errors are :class:`BlobStorageError`
    with one line: the operation, the HTTP status and S3's error code; never
    a credential.
    """

    name = "s3"

    def __init__(
        self,
        *,
        endpoint_url: str,
        bucket: str,
        access_key_id: str,
        secret_access_key: str,
        session_token: str | None = None,
        region: str = "us-east-1",
        virtual_host: bool = False,
        min_part_bytes: int = DEFAULT_MIN_PART_BYTES,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        retry_delays_seconds: Sequence[float] = DEFAULT_RETRY_DELAYS_SECONDS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Raises ValueError for an unusable setting. No I/O: the first request connects.

        ``min_part_bytes`` (≥ 5 MiB, S3's minimum) exists for tests; ``transport``
        replaces httpx's network transport (tests inject failures with it).
        """
        endpoint = urlsplit(endpoint_url)
        if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
            raise ValueError(f"the S3 endpoint must be an http(s) URL, not {endpoint_url!r}")
        if endpoint.query or endpoint.fragment or endpoint.path.strip("/"):
            raise ValueError(f"the S3 endpoint must be a bare http(s)://host[:port], not {endpoint_url!r}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket) or ".." in bucket:
            raise ValueError(f"{bucket!r} is not an S3 bucket name (3-63 characters: a-z, 0-9, '.', '-')")
        if virtual_host and "." in bucket and endpoint.scheme == "https":
            raise ValueError("a bucket name with '.' breaks TLS in virtual-host addressing: use path style")
        if not access_key_id or not secret_access_key:
            raise ValueError("S3 needs an access key id and a secret access key")
        if min_part_bytes < S3_MIN_PART_BYTES:
            raise ValueError(f"min_part_bytes must be at least {S3_MIN_PART_BYTES} (S3's minimum part size)")
        origin = f"{endpoint.scheme}://{endpoint.netloc}"
        if virtual_host:
            self._base = f"{endpoint.scheme}://{bucket}.{endpoint.netloc}/"
        else:
            self._base = f"{origin}/{bucket}/"
        self.bucket = bucket
        self.min_part_bytes = min_part_bytes
        self._signer = _PayloadAuth(Credentials(access_key_id, secret_access_key, session_token), "s3", region)
        self._retry_delays = tuple(retry_delays_seconds)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_seconds),
            transport=transport,
            follow_redirects=False,  # a redirect (wrong region) is an error to report, not a place to send keys
            headers={"Accept-Encoding": "identity"},  # Range offsets count stored bytes, never decoded ones
        )

    @classmethod
    def from_environment(
        cls,
        bucket: str,
        environ: Mapping[str, str],
        *,
        virtual_host: bool = False,
        min_part_bytes: int = DEFAULT_MIN_PART_BYTES,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> S3Storage:
        """Build from AWS's environment conventions; raises ValueError (one line) when something required is missing.

        ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` are required;
        ``AWS_SESSION_TOKEN`` optional; ``AWS_REGION`` (else ``AWS_DEFAULT_REGION``,
        else us-east-1); ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (else
        AWS itself: ``https://s3.<region>.amazonaws.com``). The keyword
        settings are the constructor's.
        """
        if not bucket:
            raise ValueError("S3 blob storage needs a bucket (TETHERLESS_BLOB_BUCKET)")
        missing = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not environ.get(name)]
        if missing:
            raise ValueError(f"S3 blob storage needs {' and '.join(missing)} in the environment")
        region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        endpoint = (
            environ.get("AWS_ENDPOINT_URL_S3")
            or environ.get("AWS_ENDPOINT_URL")
            or f"https://s3.{region}.amazonaws.com"
        )
        return cls(
            endpoint_url=endpoint,
            bucket=bucket,
            access_key_id=environ["AWS_ACCESS_KEY_ID"],
            secret_access_key=environ["AWS_SECRET_ACCESS_KEY"],
            session_token=environ.get("AWS_SESSION_TOKEN") or None,
            region=region,
            virtual_host=virtual_host,
            min_part_bytes=min_part_bytes,
            timeout_seconds=timeout_seconds,
        )

    # -- the BlobStorage interface ------------------------------------------------------------------------

    async def start(self, key: str, length: int) -> str:
        """CreateMultipartUpload for ``blobs/<key>``; a 0-byte upload gets none (S3 has no empty multipart).

        Raises BlobStorageError, ValueError for a bad key or length. Not
        idempotent: a retried create leaves an unused multipart upload,
        which only the bucket's lifecycle rule collects (docs/operations.md).
        Cancellation: the same.
        """
        _check_key(key)
        if length < 0:
            raise ValueError("a blob's length is not negative")
        part_bytes = part_bytes_for(length, self.min_part_bytes)
        if length == 0:
            return _State("", part_bytes).encode()
        response = await self._request("POST", _object(key), "create the multipart upload", query={"uploads": ""})
        if response.status_code != 200:
            raise _failure("create the multipart upload", response)
        upload_id = _text(_xml(response.content, "create the multipart upload"), "UploadId")
        if not upload_id:
            raise BlobStorageError("S3 create the multipart upload: no UploadId in the answer")
        return _State(upload_id, part_bytes).encode()

    async def append(
        self, key: str, state: str, offset: int, length: int, chunks: AsyncIterator[bytes]
    ) -> AppendResult:
        """See :meth:`BlobStorage.append`. Holds at most one part in memory, as references to the chunks
        (``bytes``, immutable: a reused buffer would change a part after it was hashed).

        Raises BlobStorageError; ValueError for a bad key, state or offset,
        or when ``chunks`` goes past ``length``. Idempotent in effect: the
        same bytes at the same committed offset store the same parts and
        tail. Cancellation: the parts and the tail written so far are
        garbage beyond the committed offset, overwritten by the next append.
        """
        _check_key(key)
        parsed = _State.decode(state)
        if not 0 <= offset <= length:
            raise ValueError(f"offset {offset} is outside the upload's {length} bytes")
        part_bytes = parsed.part_bytes
        await self._delete_tails(key, below=offset)
        boundary = offset - offset % part_bytes  # where the part holding `offset` starts
        buffer = _Part()
        if offset > boundary:
            buffer.add(await self._read_tail(key, offset, offset - boundary))
        written = 0
        interrupted: Exception | None = None
        iterator = aiter(chunks)
        while True:
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                break
            except Exception as exc:  # the body broke off: keep what arrived (tus), then let the caller know
                interrupted = exc
                break
            if len(chunk) > length - offset - written:
                raise ValueError(f"the chunks go past the upload's {length} bytes")
            written += len(chunk)
            while chunk:
                room = part_bytes - buffer.size
                buffer.add(chunk[:room] if len(chunk) > room else chunk)
                chunk = chunk[room:] if len(chunk) > room else b""
                if buffer.size == part_bytes:
                    await self._upload_part(key, parsed.upload_id, boundary // part_bytes + 1, buffer)
                    boundary += part_bytes
                    buffer = _Part()
        end = offset + written
        if written and end > boundary:  # the bytes short of a full part; `tail-<offset>` itself is never written
            await self._put(_tail(key, end), buffer, "store the tail")
        result = AppendResult(written, state)
        if interrupted is not None:
            interrupted.append_result = result  # type: ignore[attr-defined]
            raise interrupted
        return result

    async def complete(self, key: str, state: str, length: int) -> None:
        """Upload the tail as the last part and complete the multipart upload; then drop the tails.

        Idempotent: when the upload is already complete (a retry after a lost
        answer, another replica), it checks that ``blobs/<key>`` holds
        ``length`` bytes and returns. Raises BlobStorageError (also when a
        part is missing or of the wrong size: the database and the bucket
        disagree). Cancellation: the upload may or may not be complete;
        calling again finishes it.
        """
        _check_key(key)
        parsed = _State.decode(state)
        if length == 0:
            await self._put(_object(key), _Part(), "store the empty blob")
            return
        await self._complete_parts(key, parsed, length)
        await self._delete_tails(key)  # also after a retry: the first attempt may have stopped before this

    async def _complete_parts(self, key: str, parsed: _State, length: int) -> None:
        part_bytes = parsed.part_bytes
        last = math.ceil(length / part_bytes)
        last_size = length - (last - 1) * part_bytes
        tail_etag = None
        if last_size < part_bytes:
            response = await self._request("GET", _tail(key, length), "read the last tail")
            if response.status_code == 404:  # complete deletes the tails last: completed before, or never appended
                return await self._check_completed(key, length)
            if response.status_code != 200 or len(response.content) != last_size:
                raise _failure("read the last tail", response)
            tail = _Part()
            tail.add(response.content)
            tail_etag = await self._upload_part(key, parsed.upload_id, last, tail, completing=True)
            if tail_etag is None:
                return await self._check_completed(key, length)
        listed = await self._list_parts(key, parsed.upload_id)
        if listed is None:
            return await self._check_completed(key, length)
        if tail_etag is not None:
            listed[last] = (tail_etag, last_size)
        manifest = []
        for number in range(1, last + 1):
            etag, size = listed.get(number, ("", -1))
            if size != (last_size if number == last else part_bytes):
                raise BlobStorageError(f"S3 complete {key}: part {number} is missing or has the wrong size")
            manifest.append(f"<Part><PartNumber>{number}</PartNumber><ETag>{escape(etag)}</ETag></Part>")
        body = _Part()
        body.add(f"<CompleteMultipartUpload>{''.join(manifest)}</CompleteMultipartUpload>".encode())
        what = "complete the multipart upload"
        response = await self._request("POST", _object(key), what, query={"uploadId": parsed.upload_id}, body=body)
        # S3 may answer 200 and put the error in the body (the work takes a while and the status was sent first).
        code = _error_code(response)
        if response.status_code == 404 and code == "NoSuchUpload":
            return await self._check_completed(key, length)
        if response.status_code != 200 or code:
            raise _failure(what, response)
        return None

    async def read(self, key: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Stream bytes [start, end) of ``blobs/<key>`` with one ranged GET, in chunks of at most 256 KiB.

        Raises BlobStorageError (a missing object, fewer bytes than asked,
        a connection lost mid-stream), ValueError for a bad range. Retries
        happen only before the first byte. Cancellation (or closing the
        iterator early) closes the connection; trio may then emit a
        ResourceWarning for httpx's inner stream generators (harmless).
        """
        _check_key(key)
        if not 0 <= start <= end:
            raise ValueError(f"bad range [{start}, {end})")
        what = "read the blob"
        if start == end:  # an empty range cannot be asked for with Range; still, the blob must exist
            response = await self._request("HEAD", _object(key), what)
            if response.status_code != 200:
                raise _failure(what, response)
            return
        headers = {"Range": f"bytes={start}-{end - 1}"}
        response = await self._request("GET", _object(key), what, headers=headers, stream=True)
        try:
            if response.status_code == 206:
                skip = 0
            elif response.status_code == 200:  # a store that ignores Range sends the whole object
                skip = start
            else:
                await response.aread()
                raise _failure(what, response)
            remaining = end - start
            # aiter_raw is an async generator typed as a plain iterator; close it now rather than when collected.
            raw = cast(AsyncGenerator[bytes, None], response.aiter_raw(READ_CHUNK_BYTES))
            async with aclosing(raw) as received:
                async for data in received:
                    if skip:
                        dropped = min(skip, len(data))
                        data, skip = data[dropped:], skip - dropped
                    data = data[:remaining]
                    if data:
                        remaining -= len(data)
                        yield data
                    # No break at 0 remaining: the ranged answer ends there anyway, and leaving httpx's nested
                    # stream generators unexhausted makes trio warn when they are collected.
            if remaining:
                raise BlobStorageError(f"S3 {what}: the answer ended {remaining} bytes short")
        except httpx.HTTPError as exc:
            raise BlobStorageError(f"S3 {what}: {type(exc).__name__} mid-stream") from None
        finally:
            await response.aclose()

    async def abort(self, key: str, state: str) -> None:
        """AbortMultipartUpload (an unknown upload is fine), delete the tails and any completed object.

        Idempotent. Raises BlobStorageError. Cancellation: call again.
        """
        _check_key(key)
        parsed = _State.decode(state)
        if parsed.upload_id:
            what = "abort the multipart upload"
            response = await self._request("DELETE", _object(key), what, query={"uploadId": parsed.upload_id})
            if response.status_code not in (200, 204, 404):
                raise _failure(what, response)
        await self._delete_tails(key)
        await self.delete(key)  # an upload the service discards after completing (a digest mismatch)

    async def delete(self, key: str) -> None:
        """DeleteObject ``blobs/<key>``. Idempotent (S3 answers 204 for a missing key). Raises BlobStorageError."""
        _check_key(key)
        await self._delete(_object(key), "delete the blob")

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent."""
        await self._client.aclose()

    # -- requests -----------------------------------------------------------------------------------------

    async def _read_tail(self, key: str, offset: int, size: int) -> bytes:
        response = await self._request("GET", _tail(key, offset), "read the tail")
        if response.status_code != 200:
            raise _failure("read the tail", response)
        if len(response.content) != size:
            raise BlobStorageError(f"S3 read the tail: {len(response.content)} bytes where {size} were committed")
        return response.content

    async def _upload_part(
        self, key: str, upload_id: str, number: int, part: _Part, *, completing: bool = False
    ) -> str | None:
        """UploadPart; the ETag. None when ``completing`` and the upload is gone (it was completed)."""
        what = f"upload part {number}"
        query = {"partNumber": str(number), "uploadId": upload_id}
        response = await self._request("PUT", _object(key), what, query=query, body=part)
        if completing and response.status_code == 404 and _error_code(response) == "NoSuchUpload":
            return None
        etag = response.headers.get("ETag")
        if response.status_code != 200 or not etag:
            raise _failure(what, response)
        return str(etag)

    async def _list_parts(self, key: str, upload_id: str) -> dict[int, tuple[str, int]] | None:
        """Part number -> (ETag, size) of the multipart upload (paginated); None when it is gone."""
        what = "list the parts"
        parts: dict[int, tuple[str, int]] = {}
        marker = "0"
        while True:
            query = {"uploadId": upload_id, "part-number-marker": marker}
            response = await self._request("GET", _object(key), what, query=query)
            if response.status_code == 404 and _error_code(response) == "NoSuchUpload":
                return None
            if response.status_code != 200:
                raise _failure(what, response)
            root = _xml(response.content, what)
            for part in _children(root, "Part"):
                try:
                    parts[int(_text(part, "PartNumber"))] = (_text(part, "ETag"), int(_text(part, "Size")))
                except ValueError:
                    raise BlobStorageError(f"S3 {what}: unreadable answer") from None
            marker = _text(root, "NextPartNumberMarker")
            if _text(root, "IsTruncated") != "true":
                return parts
            if not marker.isdigit():
                raise BlobStorageError(f"S3 {what}: a truncated answer without NextPartNumberMarker")

    async def _tails(self, key: str) -> list[tuple[int, str]]:
        """(offset, object key) of every tail of ``key`` (ListObjectsV2, paginated)."""
        what = "list the tails"
        prefix = f"uploads/{key}/"
        found: list[tuple[int, str]] = []
        token = ""
        while True:
            query = {"list-type": "2", "prefix": prefix}
            if token:
                query["continuation-token"] = token
            response = await self._request("GET", "", what, query=query)
            if response.status_code != 200:
                raise _failure(what, response)
            root = _xml(response.content, what)
            for item in _children(root, "Contents"):
                name = _text(item, "Key")
                match = _TAIL.fullmatch(name.removeprefix(prefix))
                if match:
                    found.append((int(match[1]), name))
            token = _text(root, "NextContinuationToken")
            if _text(root, "IsTruncated") != "true" or not token:
                return found

    async def _delete_tails(self, key: str, below: int | None = None) -> None:
        """Delete the tails of ``key`` (only those ending strictly below ``below`` when given)."""
        for offset, name in await self._tails(key):
            if below is None or offset < below:
                await self._delete(name, "delete a stale tail")

    async def _delete(self, path: str, what: str) -> None:
        response = await self._request("DELETE", path, what)
        if response.status_code not in (200, 204, 404):
            raise _failure(what, response)

    async def _put(self, path: str, body: _Part, what: str) -> None:
        response = await self._request("PUT", path, what, body=body)
        if response.status_code != 200:
            raise _failure(what, response)

    async def _check_completed(self, key: str, length: int) -> None:
        """The multipart upload is gone: fine if ``blobs/<key>`` holds ``length`` bytes (completed before)."""
        response = await self._request("HEAD", _object(key), "check the completed blob")
        if response.status_code != 200:
            raise BlobStorageError(f"S3 complete {key}: the multipart upload is gone and the blob is missing")
        size = response.headers.get("Content-Length", "")
        if size != str(length):
            raise BlobStorageError(f"S3 complete {key}: the completed blob holds {size or '?'} bytes, not {length}")

    async def _request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: _Part | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """One signed request, retried after a 5xx, a 429 or a connection error; the last answer otherwise.

        Without ``stream`` the body is read (responses here are small, a tail
        at most); with it the caller reads and closes the response.
        """
        url = self._base + quote(path, safe="/-_.~")
        if query:
            url += "?" + _query_string(query)
        attempts = len(self._retry_delays) + 1
        for attempt in range(attempts):
            request = self._signed(method, url, headers or {}, body)
            try:
                response = await self._client.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt + 1 == attempts:
                    raise BlobStorageError(f"S3 {what}: {type(exc).__name__} ({_reason(exc)})") from None
            else:
                if not (_retryable(response) and attempt + 1 < attempts):
                    if not stream:
                        try:
                            await response.aread()
                        except httpx.HTTPError as exc:
                            raise BlobStorageError(f"S3 {what}: {type(exc).__name__} reading the answer") from None
                    return response
                await response.aclose()
            await trio.sleep(self._retry_delays[attempt])
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _signed(self, method: str, url: str, headers: Mapping[str, str], body: _Part | None) -> httpx.Request:
        """Sign now (SigV4 signatures carry the time, so a retry is signed again)."""
        signing = AWSRequest(method=method, url=url, headers=dict(headers))
        signing.context["payload_sha256"] = body.sha256() if body is not None else EMPTY_SHA256
        if body is not None:
            signing.headers["Content-Length"] = str(body.size)
        self._signer.add_auth(signing)
        signed = dict(signing.headers.items())
        if body is None:
            return self._client.build_request(method, url, headers=signed)
        # Sent from the buffered chunks; the explicit Content-Length stops httpx from chunking the body.
        return self._client.build_request(method, url, headers=signed, content=_Pieces(body.pieces))


def _reason(exc: httpx.TransportError) -> str:
    """The first line of a transport error, which names the host and never a credential."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else "no detail"


def _query_string(query: Mapping[str, str]) -> str:
    """Encoded as SigV4 wants it (every byte but the unreserved ones): botocore signs the URL's own query.

    An empty value is sent as the bare name (``?uploads``): some stores (moto) do not see ``uploads=``.
    """
    return "&".join(
        f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}" if value else quote(name, safe="-_.~")
        for name, value in query.items()
    )


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        raise ValueError("a blob key is 1-128 characters of A-Z, a-z, 0-9, '_' and '-'")


def _object(key: str) -> str:
    return f"blobs/{key}"


def _tail(key: str, offset: int) -> str:
    return f"uploads/{key}/tail-{offset}"


if TYPE_CHECKING:

    def _implements_the_interface(storage: S3Storage) -> BlobStorage:  # mypy checks S3Storage against BlobStorage
        return storage
