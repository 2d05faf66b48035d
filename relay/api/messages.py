"""Messages and inboxes: send a batch, page, stream and acknowledge an inbox (docs/protocol.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from protocol import codec
from protocol.errors import ErrorCode as E
from protocol.messages import AckRequest, AckResponse, InboxPage, SendRequest, SendResponse, StreamItem

from .context import Api
from .http import Response
from .routing import Call, QueryParam, RouteTable

ROUTES = RouteTable("messages")

AFTER = QueryParam("after", "return envelopes with a cursor greater than this (default 0)")
LIMIT = QueryParam("limit", "page size (default and maximum: limits.max_page_envelopes)", minimum=1)
# The caller's own inbox, or (on /v1/devices/{device_id}/…) that of another device of its account.
DEVICE_INBOX = "/v1/devices/{device_id}"


@ROUTES.route(
    "POST",
    "/v1/messages",
    body=SendRequest,
    response=SendResponse,
    auth=True,
    status=201,
    errors=(
        E.BATCH_TOO_LARGE,
        E.ENVELOPE_TOO_LARGE,
        E.UNKNOWN_RECIPIENT,
        E.RECIPIENT_REVOKED,
        E.REMOTE_RECIPIENT,
        E.PEER_FORBIDDEN,
        E.PEER_ADDRESS_REFUSED,
        E.IDEMPOTENCY_CONFLICT,
        E.INBOX_FULL,
    ),
)
async def send(api: Api, call: Call) -> SendResponse:
    """POST /v1/messages — Send a batch of envelopes (atomic, idempotent per key)"""
    return await api.services.inbox.send(call.principal, call.body)


def _device(api: Api, call: Call) -> str:
    """The inbox's device: the path's, if the caller may read it (raises ``forbidden``), else the caller's own."""
    device_id: str = call.path_params.get("device_id") or call.principal.device_id
    api.services.inbox.check_owner(call.principal, device_id)
    return device_id


@ROUTES.route(
    "GET",
    "/v1/inbox",
    also=(DEVICE_INBOX + "/inbox",),
    response=InboxPage,
    auth=True,
    query=(AFTER, LIMIT),
    errors=(E.FORBIDDEN,),
)
async def inbox(api: Api, call: Call) -> InboxPage:
    """GET /v1/inbox — A page of the inbox after a cursor"""
    return await api.services.inbox.page(_device(api, call), call.query["after"] or 0, call.query["limit"])


@ROUTES.route(
    "GET",
    "/v1/inbox/stream",
    also=(DEVICE_INBOX + "/inbox/stream",),
    response=StreamItem,  # type: ignore[arg-type]
    auth=True,
    query=(AFTER,),
    errors=(E.FORBIDDEN,),
    stream=True,
)
async def inbox_stream(api: Api, call: Call) -> Response:
    """GET /v1/inbox/stream — Stream envelopes as they are committed (resumable by cursor)"""
    device_id = _device(api, call)
    after = call.query["after"] or 0
    media_type = call.media_type
    chunks = api.services.inbox.stream(device_id, after, api.heartbeat_seconds)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                if chunk.heartbeat is not None:
                    yield codec.encode_stream_item(chunk.heartbeat, media_type)
                elif chunk.device_list is not None:
                    yield codec.encode_stream_item(chunk.device_list, media_type)
                else:
                    yield b"".join(codec.encode_stream_item(env, media_type) for env in chunk.envelopes)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return stream_response(media_type, body())


def stream_response(media_type: str, body: AsyncIterator[bytes]) -> Response:
    """A long-lived response of stream items: length-framed MessagePack, or JSON Lines."""
    content_type = codec.MSGPACK if media_type == codec.MSGPACK else codec.JSON_LINES
    return Response(200, [("content-type", content_type), ("cache-control", "no-store")], stream=body)


@ROUTES.route(
    "POST",
    "/v1/inbox/ack",
    also=(DEVICE_INBOX + "/inbox/ack",),
    body=AckRequest,
    response=AckResponse,
    auth=True,
    errors=(E.FORBIDDEN,),
)
async def ack(api: Api, call: Call) -> AckResponse:
    """POST /v1/inbox/ack — Acknowledge (delete) envelopes up to a cursor and/or by id"""
    return await api.services.inbox.acknowledge(_device(api, call), call.body)
