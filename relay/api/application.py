"""The HTTP application: route, check the caller, decode, call the handler, encode, map errors.

This is the :data:`relay.api.http.Handler` the transport calls. The steps
before a handler run cheapest and least trusting first, so that an
unauthenticated client cannot make the relay parse a large body: per-IP rate
limit, bearer token (and the device's rate limit) or federation signature,
query, then the body. Every error leaves through
:func:`~relay.api.http.problem_response`, so each one becomes an RFC 9457
problem with its stable code and the status from the one table in
``protocol.errors``. Unexpected exceptions become 500 ``internal`` and are
logged with a traceback (never with the body or the token).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from protocol import codec
from protocol.errors import ErrorCode, TetherlessError
from relay import metrics
from relay.store import StoreUnavailableError

from .context import Api
from .http import BodyIncompleteError, BufferedBodyStream, Request, Response, problem_response
from .openapi import openapi_bytes
from .routes import all_routes
from .routing import Call, MethodNotAllowedError, Route, Router, parse_query

log = logging.getLogger("relay.api")


class Application:
    """Dispatches requests over the route table of :mod:`relay.api.routes` (or ``routes``, in tests).

    ``unlisted`` routes are served like the others but left out of the API
    document: the browser client's files (:mod:`relay.api.web`).
    """

    def __init__(self, api: Api, routes: Sequence[Route] | None = None, *, unlisted: Sequence[Route] = ()) -> None:
        self.api = api
        self.routes = list(routes) if routes is not None else all_routes()
        self.router = Router([*self.routes, *unlisted])
        api.openapi_document = openapi_bytes(self.routes)

    def streams_body(self, method: str, path: str) -> bool:
        """Whether the route of ``method path`` reads its request body as a stream (False when no route matches).

        The transport asks this once per request, after the head and before
        any body byte, to decide between buffering the body and handing the
        handler a :class:`~relay.api.http.BodyStream`. Pure route lookup:
        never raises, idempotent.
        """
        try:
            route, _ = self.router.resolve(method, path)
        except (TetherlessError, MethodNotAllowedError):
            return False
        return route.stream_body

    @property
    def ready(self) -> bool:
        return self.api.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.api.ready = value

    async def __call__(self, request: Request) -> Response:
        """Answer ``request``; never raises (cancellation excepted: the transport is going away)."""
        started = time.perf_counter()
        label = "unmatched"
        try:
            route, params = self.router.resolve(request.method, request.path)
            label = route.template
            response = await self._dispatch(route, params, request)
        except MethodNotAllowedError as exc:  # counted below like every other answer
            response = problem_response(TetherlessError(ErrorCode.METHOD_NOT_ALLOWED, "method not allowed here"))
            response.headers.append(("allow", ", ".join(exc.allowed)))
        except TetherlessError as exc:
            response = problem_response(exc)
        except BodyIncompleteError as exc:  # a streaming handler that let it through: the client's doing
            response = problem_response(TetherlessError(ErrorCode.BAD_REQUEST, str(exc)))
        except StoreUnavailableError as exc:
            log.warning("store unavailable: %s", exc)
            response = problem_response(
                TetherlessError(ErrorCode.UNAVAILABLE, "storage unavailable", retry_after_seconds=1)
            )
        except Exception:
            log.exception("unhandled error on %s %s", request.method, label)
            response = problem_response(TetherlessError(ErrorCode.INTERNAL, "internal error"))
        metrics.observe_request(label, request.method, response.status, time.perf_counter() - started)
        return response

    async def _dispatch(self, route: Route, params: dict[str, str], request: Request) -> Response:
        services = self.api.services
        principal: Any = None
        if route.ip_limited:
            services.abuse.unauthenticated_request(request.client)
        if route.auth:
            principal = await services.auth.authenticate(request.header("authorization"))
            services.abuse.device_request(principal.device_id)
        if route.signed:  # the signature covers the body's digest: checked before the body is parsed
            principal = await services.federation.authenticate(
                method=request.method,
                path=request.path,
                authority=request.header("host") or "",
                headers=request.headers,
                body=request.body,
            )
        query = parse_query(request.query, route.query)
        if route.stream_body and request.body_stream is None:
            # Buffered after all (a request built in a test, or a transport that does not stream): the
            # handler still reads one way. The route has no body type, so nothing below decodes it.
            buffered = BufferedBodyStream(request.body, len(request.body))
            request = dataclasses.replace(request, body_stream=buffered, body=b"")
        body: Any = None
        request_media = codec.MSGPACK
        if route.body is not None and request.body:
            request_media = codec.media_type_of(request.header("content-type"))
            body = codec.decode(request.body, route.body, request_media)
        elif route.body is not None and request.method == "POST":
            raise TetherlessError(ErrorCode.MALFORMED_BODY, "this endpoint needs a body")
        media_type = ""
        if route.raw_content_type is None:
            media_type = codec.negotiate(request.header("accept"), request_media if request.body else codec.JSON)
        result = await route.endpoint(self.api, Call(request, params, query, body, principal, media_type))
        if isinstance(result, Response):
            return result
        return Response(route.status, [("content-type", media_type)], codec.encode(result, media_type))
