"""The HTTP application: match a route, authenticate, decode, call, encode, map errors.

This is the :data:`relay.api.http.Handler` the transport calls. Every error
leaves through :func:`problem_response`, so each one becomes an RFC 9457
problem with its stable code and the status from the one table in
``protocol.errors``. Unexpected exceptions become 500 ``internal`` and are
logged with a traceback (never with the body or the token).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from protocol import codec
from protocol.errors import PROBLEM_CONTENT_TYPE, ErrorCode, TetherlessError, problem_json
from relay import metrics
from relay.services import Services
from relay.store import StoreUnavailableError

from .http import Request, Response
from .routes import Endpoints, build_routes
from .routing import Call, Route, parse_query

log = logging.getLogger("relay.api")


def problem_response(error: TetherlessError) -> Response:
    headers = [("content-type", PROBLEM_CONTENT_TYPE)]
    if error.retry_after_seconds is not None:
        headers.append(("retry-after", str(error.retry_after_seconds)))
    metrics.problems_total.labels(error.code.value).inc()
    return Response(error.status, headers, problem_json(error))


class Application:
    """Dispatches requests over the route table of :mod:`relay.api.routes`."""

    def __init__(self, services: Services, endpoints: Endpoints) -> None:
        self.services = services
        self.endpoints = endpoints
        self.routes = build_routes(endpoints)

    @property
    def ready(self) -> bool:
        return self.endpoints.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.endpoints.ready = value
        metrics.ready.set(1 if value else 0)

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for ``method`` and ``path``; raises ``not_found`` / ``method_not_allowed``."""
        allowed: list[str] = []
        for route in self.routes:
            params = route.match(path)
            if params is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, params
            allowed.append(route.method)
        if allowed:
            raise _MethodNotAllowedError(allowed)
        raise TetherlessError(ErrorCode.NOT_FOUND, "no such route")

    async def __call__(self, request: Request) -> Response:
        started = time.perf_counter()
        label = "unmatched"
        try:
            try:
                route, params = self.resolve(request.method, request.path)
            except _MethodNotAllowedError as exc:
                response = problem_response(TetherlessError(ErrorCode.METHOD_NOT_ALLOWED, "method not allowed here"))
                response.headers.append(("allow", ", ".join(sorted(set(exc.allowed)))))
                return response
            label = route.template
            response = await self._dispatch(route, params, request)
        except TetherlessError as exc:
            response = problem_response(exc)
        except StoreUnavailableError as exc:
            log.warning("store unavailable: %s", exc)
            response = problem_response(
                TetherlessError(ErrorCode.UNAVAILABLE, "storage unavailable", retry_after_seconds=1)
            )
        except Exception:
            log.exception("unhandled error on %s %s", request.method, label)
            response = problem_response(TetherlessError(ErrorCode.INTERNAL, "internal error"))
        metrics.requests_total.labels(label, request.method, str(response.status)).inc()
        metrics.request_duration_seconds.labels(label).observe(time.perf_counter() - started)
        return response

    async def _dispatch(self, route: Route, params: dict[str, str], request: Request) -> Response:
        body: Any = None
        principal: Any = None
        if route.signed:  # federation: the origin relay's signature is checked before the body is decoded
            principal = await self.services.federation.authenticate(
                method=request.method,
                path=request.path,
                authority=request.header("host") or "",
                headers=request.headers,
                body=request.body,
            )
        request_media = codec.MSGPACK
        if route.body is not None and request.body:
            request_media = codec.media_type_of(request.header("content-type"))
            body = codec.decode(request.body, route.body, request_media)
        elif route.body is not None and request.method == "POST":
            raise TetherlessError(ErrorCode.MALFORMED_BODY, "this endpoint needs a body")
        default_media = request_media if request.body else codec.JSON
        media_type = codec.negotiate(request.header("accept"), default_media)
        if route.ip_limited:
            self.services.abuse.unauthenticated_request(request.client)
        if route.auth:
            principal = await self.services.auth.authenticate(request.header("authorization"))
            self.services.abuse.device_request(principal.device_id)
        query = parse_query(request.query, route.query)
        call = Call(request, params, query, body, principal, media_type)
        result = await route.endpoint(call)
        if isinstance(result, Response):
            return result
        return Response(route.status, [("content-type", media_type)], codec.encode(result, media_type))


class _MethodNotAllowedError(Exception):
    def __init__(self, allowed: list[str]) -> None:
        super().__init__("method not allowed")
        self.allowed = allowed
