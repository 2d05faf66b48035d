"""The one route table of the relay, and its thin handlers (decode → service → encode).

Each handler's first docstring line names its method and path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qsl

from protocol import codec
from protocol.errors import ErrorCode as E
from protocol.errors import TetherlessError
from protocol.messages import (
    API_VERSION,
    AccountCreated,
    AckRequest,
    AckResponse,
    AppendRequest,
    AppendResponse,
    Challenge,
    ChallengeRequest,
    CreateAccountRequest,
    DeviceListChain,
    Health,
    InboxPage,
    LogPage,
    LogRetention,
    LogStreamItem,
    RelayKey,
    RevokeSessionsRequest,
    SendRequest,
    SendResponse,
    Session,
    SessionRequest,
    SessionsRevoked,
    SnapshotRef,
    StreamItem,
    WellKnown,
)
from relay import metrics
from relay.services import Services

from .devices import device_routes
from .federation import federation_routes
from .http import Response
from .prekeys import prekey_routes
from .routing import Call, QueryParam, Route

AFTER = QueryParam("after", "return envelopes with a cursor greater than this (default 0)")
LIMIT = QueryParam("limit", "page size (default and maximum: limits.max_page_envelopes)", minimum=1)

LOG_AFTER = QueryParam("after", "return records with a position greater than this (default 0)")
LOG_LIMIT = QueryParam(
    "limit", "page size (default and maximum: limits.max_page_log_records; 0: only head, horizon, snapshot)"
)

AUTH_ERRORS = (E.MISSING_TOKEN, E.INVALID_TOKEN, E.TOKEN_EXPIRED, E.TOKEN_REVOKED, E.RATE_LIMITED)
BODY_ERRORS = (E.MALFORMED_BODY, E.INVALID_FIELD, E.UNSUPPORTED_MEDIA_TYPE, E.BODY_TOO_LARGE)


class Endpoints:
    """Handlers bound to one relay's services."""

    def __init__(self, services: Services, well_known: WellKnown, heartbeat_seconds: float) -> None:
        self.services = services
        self.well_known = well_known
        self.heartbeat_seconds = heartbeat_seconds
        self.ready = False
        self.routes: list[Route] = []  # filled by build_routes; read by openapi()

    @classmethod
    def unbound(cls) -> Endpoints:
        """Endpoints without services: enough to build the route table for documentation, not to serve."""
        endpoints = cls.__new__(cls)
        endpoints.routes = []
        return endpoints

    # -- operations ---------------------------------------------------------------

    async def livez(self, call: Call) -> Health:
        """GET /livez — the process is alive."""
        return Health(status="ok")

    async def readyz(self, call: Call) -> Health:
        """GET /readyz — ready for traffic (503 ``unavailable`` while starting or draining)."""
        if not self.ready:
            raise TetherlessError(E.UNAVAILABLE, "starting or draining", retry_after_seconds=1)
        return Health(status="ready")

    async def metrics(self, call: Call) -> Response:
        """GET /metrics — Prometheus exposition."""
        body, content_type = metrics.render()
        return Response(200, [("content-type", content_type)], body)

    async def well_known_doc(self, call: Call) -> WellKnown:
        """GET /.well-known/tetherless — relay name, key, API versions and limits."""
        return self.well_known

    async def openapi(self, call: Call) -> Response:
        """GET /openapi.json — the OpenAPI document generated from this table."""
        from .openapi import openapi_bytes

        return Response(200, [("content-type", "application/json")], openapi_bytes(self.routes))

    # -- accounts and auth -------------------------------------------------------------

    async def create_account(self, call: Call) -> AccountCreated:
        """POST /v1/accounts — register an account with its genesis device list."""
        return await self.services.accounts.create_account(call.body)

    async def device_list(self, call: Call) -> DeviceListChain:
        """GET /v1/accounts/{account_id}/devices — the account's device list chain."""
        return await self.services.accounts.device_list_chain(call.path_params["account_id"])

    async def challenge(self, call: Call) -> Challenge:
        """POST /v1/auth/challenge — a single-use nonce for a device to sign."""
        return await self.services.auth.issue_challenge(call.body)

    async def session(self, call: Call) -> Session:
        """POST /v1/auth/session — exchange a signed challenge for a bearer token."""
        return await self.services.auth.open_session(call.body)

    async def revoke_session(self, call: Call) -> SessionsRevoked:
        """DELETE /v1/auth/session — revoke this token (or all of the device's)."""
        body: RevokeSessionsRequest = call.body or RevokeSessionsRequest()
        count = await self.services.auth.revoke(call.principal, all_sessions=body.all_sessions)
        return SessionsRevoked(revoked=count)

    # -- messages -------------------------------------------------------------------------

    async def send(self, call: Call) -> SendResponse:
        """POST /v1/messages — store a batch of envelopes durably."""
        return await self.services.inbox.send(call.principal, call.body)

    def _device(self, call: Call) -> str:
        device_id: str = call.path_params.get("device_id") or call.principal.device_id
        self.services.inbox.check_owner(call.principal, device_id)
        return device_id

    async def inbox(self, call: Call) -> InboxPage:
        """GET /v1/inbox — a page of the caller's inbox after a cursor."""
        return await self.services.inbox.page(self._device(call), call.query["after"] or 0, call.query["limit"])

    async def inbox_stream(self, call: Call) -> Response:
        """GET /v1/inbox/stream — envelopes as they commit, with heartbeats, until the client leaves."""
        device_id = self._device(call)
        after = call.query["after"] or 0
        media_type = call.media_type
        chunks = self.services.inbox.stream(device_id, after, self.heartbeat_seconds)

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

        content_type = codec.MSGPACK if media_type == codec.MSGPACK else codec.JSON_LINES
        return Response(200, [("content-type", content_type), ("cache-control", "no-store")], stream=body())

    async def ack(self, call: Call) -> AckResponse:
        """POST /v1/inbox/ack — delete acknowledged envelopes."""
        return await self.services.inbox.acknowledge(self._device(call), call.body)


def _parts_full(call: Call) -> bool:
    """``parts=stub`` (default) or ``parts=full``; anything else is ``invalid_query``."""
    values = [value for key, value in parse_qsl(call.request.query, keep_blank_values=True) if key == "parts"]
    if not values:
        return False
    if values[-1] not in ("stub", "full"):
        raise TetherlessError(E.INVALID_QUERY, "parts must be stub or full")
    return values[-1] == "full"


class LogEndpoints:
    """The account log (docs/account-log.md §3): always the caller's account's log."""

    def __init__(self, ep: Endpoints) -> None:
        self.ep = ep

    async def append(self, call: Call) -> AppendResponse:
        """POST /v1/log — append a batch of records (atomic, idempotent per record id)."""
        return await self.ep.services.log.append(call.principal, call.body)

    async def page(self, call: Call) -> LogPage:
        """GET /v1/log — a page of the account log after a position (snapshot parts stubbed unless parts=full)."""
        return await self.ep.services.log.page(
            call.principal, call.query["after"] or 0, call.query["limit"], _parts_full(call)
        )

    async def stream(self, call: Call) -> Response:
        """GET /v1/log/stream — records as they commit, with heartbeats carrying the head, until the client leaves."""
        after = call.query["after"] or 0
        await self.ep.services.log.check_device(call.principal)
        media_type = call.media_type
        chunks = self.ep.services.log.stream(call.principal, after, self.ep.heartbeat_seconds)

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

        content_type = codec.MSGPACK if media_type == codec.MSGPACK else codec.JSON_LINES
        return Response(200, [("content-type", content_type), ("cache-control", "no-store")], stream=body())

    async def snapshot(self, call: Call) -> SnapshotRef:
        """GET /v1/log/snapshot — the newest complete snapshot."""
        return await self.ep.services.log.snapshot(call.principal)

    async def snapshot_parts(self, call: Call) -> LogPage:
        """GET /v1/log/snapshot/{snapshot_id} — the newest snapshot's parts, with full ciphertext."""
        snapshot_id = bytes.fromhex(call.path_params["snapshot_id"])
        return await self.ep.services.log.snapshot_parts(
            call.principal, snapshot_id, call.query["after"] or 0, call.query["limit"]
        )

    async def get_retention(self, call: Call) -> LogRetention:
        """GET /v1/log/retention — the account log's retention and horizon."""
        return await self.ep.services.log.get_retention(call.principal)

    async def set_retention(self, call: Call) -> LogRetention:
        """PUT /v1/log/retention — set retention (forever, or days); applied by the next sweep."""
        return await self.ep.services.log.set_retention(call.principal, call.body)


def log_routes(ep: Endpoints) -> list[Route]:
    """The account log's routes (docs/account-log.md §3.1)."""
    log = LogEndpoints(ep)
    read_errors = (*AUTH_ERRORS, E.DEVICE_REVOKED, E.INVALID_QUERY)
    return [
        Route(
            "POST",
            "/v1/log",
            log.append,
            "Append records to the account log (atomic, idempotent per record id)",
            body=AppendRequest,
            response=AppendResponse,
            auth=True,
            status=201,
            errors=(
                *AUTH_ERRORS,
                *BODY_ERRORS,
                E.DEVICE_REVOKED,
                E.BATCH_TOO_LARGE,
                E.RECORD_TOO_LARGE,
                E.LOG_CONFLICT,
                E.LOG_EPOCH_STALE,
                E.LOG_REKEY_REQUIRED,
                E.LOG_QUOTA,
                E.SNAPSHOT_INCOMPLETE,
            ),
            tag="log",
        ),
        Route(
            "GET",
            "/v1/log",
            log.page,
            "A page of the account log after a position (query parts=stub|full, default stub)",
            response=LogPage,
            auth=True,
            query=(LOG_AFTER, LOG_LIMIT),
            errors=read_errors,
            tag="log",
        ),
        Route(
            "GET",
            "/v1/log/stream",
            log.stream,
            "Stream account log records as they commit (resumable by position)",
            response=LogStreamItem,  # type: ignore[arg-type]
            auth=True,
            query=(LOG_AFTER,),
            errors=read_errors,
            stream=True,
            tag="log",
        ),
        Route(
            "GET",
            "/v1/log/snapshot",
            log.snapshot,
            "The newest complete snapshot of the account log",
            response=SnapshotRef,
            auth=True,
            errors=(*AUTH_ERRORS, E.DEVICE_REVOKED, E.NO_SNAPSHOT),
            tag="log",
        ),
        Route(
            "GET",
            "/v1/log/snapshot/{snapshot_id}",
            log.snapshot_parts,
            "The newest snapshot's parts, with full ciphertext (snapshot_id: 32 lowercase hex digits)",
            response=LogPage,
            auth=True,
            query=(LOG_AFTER, LOG_LIMIT),
            errors=(*read_errors, E.NO_SNAPSHOT),
            tag="log",
        ),
        Route(
            "GET",
            "/v1/log/retention",
            log.get_retention,
            "The account log's retention",
            response=LogRetention,
            auth=True,
            errors=(*AUTH_ERRORS, E.DEVICE_REVOKED),
            tag="log",
        ),
        Route(
            "PUT",
            "/v1/log/retention",
            log.set_retention,
            "Set the account log's retention (forever, or days)",
            body=LogRetention,
            response=LogRetention,
            auth=True,
            errors=(*AUTH_ERRORS, *BODY_ERRORS, E.DEVICE_REVOKED),
            tag="log",
        ),
    ]


def build_routes(ep: Endpoints) -> list[Route]:
    """The route table. Order does not matter: templates never overlap."""
    inbox_errors = (*AUTH_ERRORS, E.FORBIDDEN, E.INVALID_QUERY)
    routes = [
        Route("GET", "/livez", ep.livez, "Liveness probe", response=Health, tag="operations"),
        Route("GET", "/healthz", ep.livez, "Liveness probe (alias of /livez)", response=Health, tag="operations"),
        Route(
            "GET", "/readyz", ep.readyz, "Readiness probe", response=Health, errors=(E.UNAVAILABLE,), tag="operations"
        ),
        Route("GET", "/metrics", ep.metrics, "Prometheus metrics", raw_content_type="text/plain", tag="operations"),
        Route(
            "GET", "/openapi.json", ep.openapi, "This document", raw_content_type="application/json", tag="operations"
        ),
        Route("GET", "/.well-known/tetherless", ep.well_known_doc, "Relay discovery", response=WellKnown),
        Route(
            "POST",
            "/v1/accounts",
            ep.create_account,
            "Create an account with its genesis device list",
            body=CreateAccountRequest,
            response=AccountCreated,
            status=201,
            ip_limited=True,
            errors=(*BODY_ERRORS, E.RATE_LIMITED, E.INVALID_DEVICE_LIST, E.BAD_SIGNATURE, E.ACCOUNT_EXISTS),
            tag="accounts",
        ),
        Route(
            "GET",
            "/v1/accounts/{account_id}/devices",
            ep.device_list,
            "An account's device list chain, genesis first",
            response=DeviceListChain,
            errors=(E.UNKNOWN_ACCOUNT,),
            tag="accounts",
        ),
        Route(
            "POST",
            "/v1/auth/challenge",
            ep.challenge,
            "Get a single-use challenge for a device",
            body=ChallengeRequest,
            response=Challenge,
            ip_limited=True,
            errors=(*BODY_ERRORS, E.RATE_LIMITED, E.UNKNOWN_DEVICE),
            tag="auth",
        ),
        Route(
            "POST",
            "/v1/auth/session",
            ep.session,
            "Exchange a signed challenge for a bearer token",
            body=SessionRequest,
            response=Session,
            ip_limited=True,
            errors=(
                *BODY_ERRORS,
                E.RATE_LIMITED,
                E.UNKNOWN_DEVICE,
                E.CHALLENGE_UNKNOWN,
                E.CHALLENGE_USED,
                E.CHALLENGE_EXPIRED,
                E.BAD_SIGNATURE,
            ),
            tag="auth",
        ),
        Route(
            "DELETE",
            "/v1/auth/session",
            ep.revoke_session,
            "Revoke this session token, or all of the device's",
            body=RevokeSessionsRequest,
            response=SessionsRevoked,
            auth=True,
            errors=(*AUTH_ERRORS, *BODY_ERRORS),
            tag="auth",
        ),
        Route(
            "POST",
            "/v1/messages",
            ep.send,
            "Send a batch of envelopes (atomic, idempotent per key)",
            body=SendRequest,
            response=SendResponse,
            auth=True,
            status=201,
            errors=(
                *AUTH_ERRORS,
                *BODY_ERRORS,
                E.BATCH_TOO_LARGE,
                E.ENVELOPE_TOO_LARGE,
                E.UNKNOWN_RECIPIENT,
                E.REMOTE_RECIPIENT,
                E.IDEMPOTENCY_CONFLICT,
                E.INBOX_FULL,
            ),
            tag="messages",
        ),
    ]
    for prefix in ("/v1", "/v1/devices/{device_id}"):
        routes += [
            Route(
                "GET",
                f"{prefix}/inbox",
                ep.inbox,
                "A page of the inbox after a cursor",
                response=InboxPage,
                auth=True,
                query=(AFTER, LIMIT),
                errors=inbox_errors,
                tag="messages",
            ),
            Route(
                "GET",
                f"{prefix}/inbox/stream",
                ep.inbox_stream,
                "Stream envelopes as they are committed (resumable by cursor)",
                response=StreamItem,  # type: ignore[arg-type]
                auth=True,
                query=(AFTER,),
                errors=inbox_errors,
                stream=True,
                tag="messages",
            ),
            Route(
                "POST",
                f"{prefix}/inbox/ack",
                ep.ack,
                "Acknowledge (delete) envelopes up to a cursor and/or by id",
                body=AckRequest,
                response=AckResponse,
                auth=True,
                errors=(*inbox_errors, *BODY_ERRORS),
                tag="messages",
            ),
        ]
    routes += federation_routes(ep)
    routes += device_routes(ep)
    routes += log_routes(ep)
    routes += prekey_routes(ep)
    ep.routes = routes
    return routes


def well_known(
    relay: str,
    relay_key: bytes,
    limits: Any,
    *,
    relay_keys: Sequence[RelayKey] = (),
    federation_endpoint: str | None = None,
) -> WellKnown:
    return WellKnown(
        relay=relay,
        relay_key=relay_key,
        api_versions=[API_VERSION],
        limits=limits,
        federation_endpoint=federation_endpoint,
        relay_keys=list(relay_keys),
    )
