"""Media blobs (docs/blobs.md): tus 1.0 uploads and Range downloads; thin handlers, rules in relay.services.blobs.

tus 1.0 (core, creation, checksum, expiration, termination) is spoken exactly,
so generic tus clients work: every response but OPTIONS carries
``Tus-Resumable: 1.0.0``, problems included, which is why these handlers
authenticate themselves (``_principal``) rather than through the route's
``auth`` flag: an error the application raised before the handler would leave
without the header. Errors are RFC 9457 problems with stable codes, at the
statuses tus prescribes (409 offset, 412 version, 413 size, 415 content type,
460 checksum).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import logging
import re
from typing import Final

from protocol.errors import ErrorCode as E
from protocol.errors import TetherlessError
from relay.services.auth import Principal
from relay.services.blobs import CHECKSUM_ALGORITHMS, Checksum, UploadStatus, no_chunks
from relay.store import StoreUnavailableError

from .context import Api
from .http import BodyIncompleteError, Response, problem_response
from .routing import AUTH_ERRORS, Call, Endpoint, RouteTable

log = logging.getLogger("relay.api")

ROUTES = RouteTable("blobs")

TUS_VERSION: Final = "1.0.0"
TUS_EXTENSIONS: Final = "creation,checksum,expiration,termination"
OFFSET_CONTENT_TYPE: Final = "application/offset+octet-stream"
BLOB_CONTENT_TYPE: Final = "application/octet-stream"
UPLOADS_PATH: Final = "/v1/blobs/uploads"
_DIGITS = re.compile(r"[0-9]{1,19}")
_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")
_METADATA_KEY = re.compile(r"[^\s,]+")
_CAPABILITY = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]=?")  # 32 bytes: 43 characters, the last 2 bits 0
_TUS_ERRORS = (*AUTH_ERRORS, E.TUS_VERSION_UNSUPPORTED)  # every authenticated tus request meets these first


def _tus(handler: Endpoint) -> Endpoint:
    """``Tus-Resumable`` on the handler's every answer, problems included (tus 1.0: all but OPTIONS)."""

    @functools.wraps(handler)
    async def answer(api: Api, call: Call) -> Response:
        try:
            response: Response = await handler(api, call)
        except TetherlessError as exc:
            response = problem_response(exc)
            if exc.code is E.TUS_VERSION_UNSUPPORTED:
                response.headers.append(("tus-version", TUS_VERSION))
        except StoreUnavailableError as exc:
            log.warning("store unavailable: %s", exc)
            response = problem_response(TetherlessError(E.UNAVAILABLE, "storage unavailable", retry_after_seconds=1))
        response.headers.append(("tus-resumable", TUS_VERSION))
        return response

    return answer


async def _device(api: Api, call: Call) -> Principal:
    """The device behind the request's token, its request budget counted (what ``auth=True`` routes get)."""
    principal = await api.services.auth.authenticate(call.request.header("authorization"))
    api.services.abuse.device_request(principal.device_id)
    return principal


async def _principal(api: Api, call: Call) -> Principal:
    """:func:`_device` for a tus request, then its Tus-Resumable (a caller without a token learns nothing, not
    even the protocol version)."""
    principal = await _device(api, call)
    if call.request.header("tus-resumable") != TUS_VERSION:
        raise TetherlessError(E.TUS_VERSION_UNSUPPORTED, f"send Tus-Resumable: {TUS_VERSION}")
    return principal


def _int_header(call: Call, name: str) -> int:
    value = call.request.header(name)
    if value is None or not _DIGITS.fullmatch(value.strip()):
        raise TetherlessError(E.INVALID_HEADER, f"{name}: expected a non-negative integer")
    return int(value)


def _metadata(value: str | None) -> dict[str, bytes]:
    """tus ``Upload-Metadata``: comma-separated ``key`` or ``key base64value`` pairs."""
    pairs: dict[str, bytes] = {}
    for item in filter(None, (part.strip() for part in (value or "").split(","))):
        key, _, encoded = item.partition(" ")
        if not _METADATA_KEY.fullmatch(key) or key in pairs or " " in encoded.strip():
            raise TetherlessError(E.INVALID_HEADER, "Upload-Metadata: expected comma-separated 'key base64' pairs")
        try:
            pairs[key] = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise TetherlessError(E.INVALID_HEADER, f"Upload-Metadata: {key}: not base64") from None
    return pairs


def _digest_field(metadata: dict[str, bytes], key: str) -> bytes | None:
    value = metadata.get(key)
    if value is not None and len(value) != 32:
        raise TetherlessError(E.INVALID_HEADER, f"Upload-Metadata: {key}: expected 32 bytes (a SHA-256 digest)")
    return value


def _checksum(value: str | None) -> Checksum | None:
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise TetherlessError(
            E.BLOB_CHECKSUM_UNSUPPORTED, f"Upload-Checksum algorithms: {', '.join(CHECKSUM_ALGORITHMS)}"
        )
    try:
        return Checksum(algorithm, base64.b64decode(encoded.strip(), validate=True))
    except (binascii.Error, ValueError):
        raise TetherlessError(E.INVALID_HEADER, "Upload-Checksum: expected '<algorithm> <base64 digest>'") from None


def _capability(value: str | None) -> bytes | None:
    """``Tetherless-Capability``: 32 bytes, base64url (padding optional)."""
    if value is None:
        return None
    if not _CAPABILITY.fullmatch(value.strip()):  # the decoder alone would skip characters outside the alphabet
        raise TetherlessError(E.INVALID_HEADER, "Tetherless-Capability: expected 32 bytes, base64url")
    return base64.urlsafe_b64decode(value.strip().rstrip("=") + "=")


def _range(value: str, length: int) -> tuple[int, int]:
    """One ``bytes=`` range of RFC 9110 §14.1.2 as [start, end); raises ``range_not_satisfiable`` otherwise."""
    match = _RANGE.fullmatch(value.strip())
    first, last = (match[1], match[2]) if match else ("", "")
    if first:
        start = int(first)
        end = min(int(last) + 1, length) if last else length
        if start < length and (not last or int(last) >= start):
            return start, end
    elif last and int(last) > 0 and length > 0:  # a suffix: the last N bytes
        return max(0, length - int(last)), length
    raise TetherlessError(E.RANGE_NOT_SATISFIABLE, f"expected one range within the blob's {length} bytes")


def _expires(ms: int) -> str:
    return email.utils.formatdate(ms / 1000, usegmt=True)


def _upload_headers(status: UploadStatus) -> list[tuple[str, str]]:
    headers = [("upload-offset", str(status.offset)), ("upload-length", str(status.length))]
    if status.blob_id is None:
        headers.append(("upload-expires", _expires(status.expires_at_ms)))
    else:
        headers.append(("tetherless-blob-id", status.blob_id))
    return headers


# -- uploads (tus) -------------------------------------------------------------------------------


@ROUTES.route("OPTIONS", UPLOADS_PATH, status=204, raw_content_type=OFFSET_CONTENT_TYPE)
async def tus_options(api: Api, call: Call) -> Response:
    """OPTIONS /v1/blobs/uploads — tus discovery: version, extensions, maximum size, checksum algorithms"""
    return Response(
        204,
        [
            ("tus-version", TUS_VERSION),
            ("tus-extension", TUS_EXTENSIONS),
            ("tus-max-size", str(api.services.blobs.settings.max_bytes)),
            ("tus-checksum-algorithm", ",".join(CHECKSUM_ALGORITHMS)),
        ],
    )


@ROUTES.route(
    "POST",
    UPLOADS_PATH,
    status=201,
    raw_content_type=OFFSET_CONTENT_TYPE,
    security=("bearer",),
    errors=(*_TUS_ERRORS, E.INVALID_HEADER, E.BLOB_TOO_LARGE, E.BLOB_QUOTA_EXCEEDED, E.BLOB_DIGEST_MISMATCH),
)
@_tus
async def create_upload(api: Api, call: Call) -> Response:
    """POST /v1/blobs/uploads — tus creation: a new upload of Upload-Length bytes (Location names it)"""
    principal = await _principal(api, call)
    if call.request.header("upload-defer-length") is not None:
        raise TetherlessError(E.INVALID_HEADER, "Upload-Defer-Length is not supported: send Upload-Length")
    length = _int_header(call, "upload-length")
    metadata = _metadata(call.request.header("upload-metadata"))
    status = await api.services.blobs.create(
        principal, length, _digest_field(metadata, "sha256"), _digest_field(metadata, "capability")
    )
    headers = [("location", f"{UPLOADS_PATH}/{status.upload_id}"), *_upload_headers(status)]
    return Response(201, headers)


@ROUTES.route(
    "HEAD",
    UPLOADS_PATH + "/{upload_id}",
    status=204,
    raw_content_type=OFFSET_CONTENT_TYPE,
    security=("bearer",),
    errors=(*_TUS_ERRORS, E.BLOB_NOT_FOUND, E.BLOB_DIGEST_MISMATCH),
)
@_tus
async def upload_offset(api: Api, call: Call) -> Response:
    """HEAD /v1/blobs/uploads/{upload_id} — tus offset: the committed Upload-Offset (and the blob id once stored)"""
    principal = await _principal(api, call)
    status = await api.services.blobs.status(principal, call.path_params["upload_id"])
    return Response(204, [*_upload_headers(status), ("cache-control", "no-store")])


@ROUTES.route(
    "PATCH",
    UPLOADS_PATH + "/{upload_id}",
    status=204,
    raw_content_type=OFFSET_CONTENT_TYPE,
    stream_body=True,
    stream_media_type=OFFSET_CONTENT_TYPE,
    security=("bearer",),
    errors=(
        *_TUS_ERRORS,
        E.UNSUPPORTED_MEDIA_TYPE,
        E.INVALID_HEADER,
        E.BLOB_CHECKSUM_UNSUPPORTED,
        E.BLOB_NOT_FOUND,
        E.BLOB_OFFSET_MISMATCH,
        E.BLOB_UPLOAD_LOCKED,
        E.BLOB_TOO_LARGE,
        E.BLOB_CHECKSUM_MISMATCH,
        E.BLOB_DIGEST_MISMATCH,
        E.BAD_REQUEST,
    ),
)
@_tus
async def append(api: Api, call: Call) -> Response:
    """PATCH /v1/blobs/uploads/{upload_id} — tus append at Upload-Offset (streamed; Upload-Checksum optional)"""
    principal = await _principal(api, call)
    content_type = (call.request.header("content-type") or "").split(";")[0].strip().lower()
    if content_type != OFFSET_CONTENT_TYPE:
        raise TetherlessError(E.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be {OFFSET_CONTENT_TYPE}")
    offset = _int_header(call, "upload-offset")
    checksum = _checksum(call.request.header("upload-checksum"))
    body = call.request.body_stream
    if body is None:  # never: the application gives every stream_body route a stream
        raise TetherlessError(E.BAD_REQUEST, "no request body stream")
    try:
        status = await api.services.blobs.append(
            principal, call.path_params["upload_id"], offset, body, body.declared_length, checksum
        )
    except BodyIncompleteError as exc:
        # The client went away (or stalled): what arrived is committed unless a checksum guarded it; it asks HEAD.
        raise TetherlessError(E.BAD_REQUEST, str(exc)) from None
    return Response(204, _upload_headers(status))


@ROUTES.route(
    "DELETE",
    UPLOADS_PATH + "/{upload_id}",
    status=204,
    raw_content_type=OFFSET_CONTENT_TYPE,
    security=("bearer",),
    errors=(*_TUS_ERRORS, E.BLOB_NOT_FOUND),
)
@_tus
async def terminate(api: Api, call: Call) -> Response:
    """DELETE /v1/blobs/uploads/{upload_id} — tus termination: drop the upload and its bytes"""
    principal = await _principal(api, call)
    await api.services.blobs.terminate(principal, call.path_params["upload_id"])
    return Response(204)


# -- downloads -----------------------------------------------------------------------------------


@ROUTES.route(
    "GET",
    "/v1/blobs/{blob_id}",
    raw_content_type=BLOB_CONTENT_TYPE,
    security=("bearer", "capability"),
    errors=(*AUTH_ERRORS, E.INVALID_HEADER, E.BLOB_NOT_FOUND, E.RANGE_NOT_SATISFIABLE),
)
async def download(api: Api, call: Call) -> Response:
    """GET /v1/blobs/{blob_id} — Download a blob (also HEAD; one Range → 206) with its capability or an owner's token"""
    request = call.request
    principal = await _device(api, call) if request.header("authorization") is not None else None
    if principal is None:  # a capability alone: unauthenticated, so the caller's address pays for the lookup
        api.services.abuse.unauthenticated_request(request.client)
    capability = _capability(request.header("tetherless-capability"))
    blob = await api.services.blobs.authorise_download(call.path_params["blob_id"], principal, capability)
    headers = [
        ("content-type", BLOB_CONTENT_TYPE),
        ("accept-ranges", "bytes"),
        ("etag", f'"{blob.sha256.hex()}"'),
        ("cache-control", "private, no-store"),
    ]
    status, start, end = 200, 0, blob.length
    asked = request.header("range")
    if asked is not None:
        try:
            start, end = _range(asked, blob.length)
        except TetherlessError as exc:
            response = problem_response(exc)
            response.headers.append(("content-range", f"bytes */{blob.length}"))
            return response
        status = 206
        headers.append(("content-range", f"bytes {start}-{end - 1}/{blob.length}"))
    if request.method == "HEAD":
        return Response(status, headers, stream=no_chunks(), length=end - start)
    stream = await api.services.blobs.read(blob, start, end)
    return Response(status, headers, stream=stream, length=end - start)


@ROUTES.route(
    "DELETE",
    "/v1/blobs/{blob_id}",
    status=204,
    raw_content_type=BLOB_CONTENT_TYPE,
    security=("bearer",),
    errors=(*AUTH_ERRORS, E.BLOB_NOT_FOUND),
)
async def delete_blob(api: Api, call: Call) -> Response:
    """DELETE /v1/blobs/{blob_id} — Delete a blob of the token's account (its bytes too)"""
    principal = await _device(api, call)
    await api.services.blobs.delete(principal, call.path_params["blob_id"])
    return Response(204)
