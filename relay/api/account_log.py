"""The account log (docs/account-log.md §3.1): always the caller's account's log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qsl

from protocol import codec
from protocol.errors import ErrorCode as E
from protocol.errors import TetherlessError
from protocol.messages import AppendRequest, AppendResponse, LogPage, LogRetention, LogStreamItem, SnapshotRef

from .context import Api
from .http import Response
from .messages import stream_response
from .routing import Call, QueryParam, RouteTable

ROUTES = RouteTable("log")

LOG_AFTER = QueryParam("after", "return records with a position greater than this (default 0)")
LOG_LIMIT = QueryParam(
    "limit", "page size (default and maximum: limits.max_page_log_records; 0: only head, horizon, snapshot)"
)


def _parts_full(call: Call) -> bool:
    """``parts=stub`` (default) or ``parts=full``; anything else is ``invalid_query``."""
    values = [value for key, value in parse_qsl(call.request.query, keep_blank_values=True) if key == "parts"]
    if not values:
        return False
    if values[-1] not in ("stub", "full"):
        raise TetherlessError(E.INVALID_QUERY, "parts must be stub or full")
    return values[-1] == "full"


@ROUTES.route(
    "POST",
    "/v1/log",
    body=AppendRequest,
    response=AppendResponse,
    auth=True,
    status=201,
    errors=(
        E.BATCH_TOO_LARGE,
        E.RECORD_TOO_LARGE,
        E.LOG_CONFLICT,
        E.LOG_EPOCH_STALE,
        E.LOG_REKEY_REQUIRED,
        E.LOG_QUOTA,
        E.SNAPSHOT_INCOMPLETE,
    ),
)
async def append(api: Api, call: Call) -> AppendResponse:
    """POST /v1/log — Append records to the account log (atomic, idempotent per record id)"""
    return await api.services.log.append(call.principal, call.body)


@ROUTES.route("GET", "/v1/log", response=LogPage, auth=True, query=(LOG_AFTER, LOG_LIMIT))
async def page(api: Api, call: Call) -> LogPage:
    """GET /v1/log — A page of the account log after a position (query parts=stub|full, default stub)"""
    return await api.services.log.page(call.principal, call.query["after"] or 0, call.query["limit"], _parts_full(call))


@ROUTES.route(
    "GET",
    "/v1/log/stream",
    response=LogStreamItem,  # type: ignore[arg-type]
    auth=True,
    query=(LOG_AFTER,),
    stream=True,
)
async def stream(api: Api, call: Call) -> Response:
    """GET /v1/log/stream — Stream account log records as they commit (resumable by position)"""
    after = call.query["after"] or 0
    await api.services.log.check_device(call.principal)
    media_type = call.media_type
    chunks = api.services.log.stream(call.principal, after, api.heartbeat_seconds)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                if chunk.heartbeat is not None:
                    yield codec.encode_stream_item(chunk.heartbeat, media_type)
                else:
                    yield b"".join(codec.encode_stream_item(r, media_type) for r in chunk.records)
        except TetherlessError:
            return  # the device was revoked: end the response; the reconnect gets the error
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return stream_response(media_type, body())


@ROUTES.route("GET", "/v1/log/snapshot", response=SnapshotRef, auth=True, errors=(E.NO_SNAPSHOT,))
async def snapshot(api: Api, call: Call) -> SnapshotRef:
    """GET /v1/log/snapshot — The newest complete snapshot of the account log"""
    return await api.services.log.snapshot(call.principal)


@ROUTES.route(
    "GET",
    "/v1/log/snapshot/{snapshot_id}",
    response=LogPage,
    auth=True,
    query=(LOG_AFTER, LOG_LIMIT),
    errors=(E.NO_SNAPSHOT,),
)
async def snapshot_parts(api: Api, call: Call) -> LogPage:
    """GET /v1/log/snapshot/{snapshot_id} — The newest snapshot's parts, with full ciphertext (snapshot_id: 32 lowercase hex digits)"""  # noqa: E501
    snapshot_id = bytes.fromhex(call.path_params["snapshot_id"])
    return await api.services.log.snapshot_parts(
        call.principal, snapshot_id, call.query["after"] or 0, call.query["limit"]
    )


@ROUTES.route("GET", "/v1/log/retention", response=LogRetention, auth=True)
async def get_retention(api: Api, call: Call) -> LogRetention:
    """GET /v1/log/retention — The account log's retention"""
    return await api.services.log.get_retention(call.principal)


@ROUTES.route("PUT", "/v1/log/retention", body=LogRetention, response=LogRetention, auth=True)
async def set_retention(api: Api, call: Call) -> LogRetention:
    """PUT /v1/log/retention — Set the account log's retention (forever, or days)"""
    return await api.services.log.set_retention(call.principal, call.body)
