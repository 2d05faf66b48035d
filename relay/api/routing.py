"""The one way to declare a route, the router, and query parsing.

A topic module (``relay/api/messages.py``, ``devices.py`` …) makes one
:class:`RouteTable` and declares each handler with :meth:`RouteTable.route`::

    @ROUTES.route("POST", "/v1/messages", body=SendRequest, response=SendResponse, auth=True, status=201,
                  errors=(E.BATCH_TOO_LARGE, …))
    async def send(api: Api, call: Call) -> SendResponse:
        \"\"\"POST /v1/messages — Send a batch of envelopes (atomic, idempotent per key)\"\"\"
        return await api.services.inbox.send(call.principal, call.body)

The handler's first docstring line names its method and path (checked when
the module is imported) and its text after the dash is the OpenAPI summary.
``errors`` lists only what the handler and the services it calls raise; the
errors of the steps the application runs before the handler (IP rate limit,
token, federation signature, query, body, content negotiation) are added
from the route's flags by :attr:`Route.errors`, so no route copies them by
hand. ``tests/relay/api/test_error_codes.py`` derives from the code what
each handler can raise and compares it with the OpenAPI document.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import ID_PATTERN, RELAY_PATTERN

from .context import Api
from .http import Request

E = ErrorCode

PARAM_PATTERNS: dict[str, str] = {
    "account_id": ID_PATTERN,
    "device_id": ID_PATTERN,
    "relay": RELAY_PATTERN,
    "snapshot_id": "^[0-9a-f]{32}$",  # account log: 16 bytes as lowercase hex
    "upload_id": "^[0-9a-f]{32}$",  # media blobs: 16 random bytes as lowercase hex
    "blob_id": "^[0-9a-f]{32}$",  # the upload id that stored the blob
    # enrolment: 16 base32 characters; anything else up to 64 characters reaches the handler and is
    # answered enrolment_unknown (a mistyped link code finds nothing), not the generic not_found.
    "lookup_id": "^[^/]{1,64}$",
}

# What the application's steps before the handler can answer (relay/api/application.py, Application._dispatch).
IP_LIMIT_ERRORS: tuple[ErrorCode, ...] = (E.RATE_LIMITED,)
AUTH_ERRORS: tuple[ErrorCode, ...] = (
    E.MISSING_TOKEN,
    E.INVALID_TOKEN,
    E.TOKEN_EXPIRED,
    E.TOKEN_REVOKED,
    E.DEVICE_REVOKED,  # a revoked device's tokens are revoked with it, on every authenticated route
    E.RATE_LIMITED,  # per-device request budget
)
SIGNATURE_ERRORS: tuple[ErrorCode, ...] = (
    E.BODY_TOO_LARGE,
    E.SIGNATURE_MISSING,
    E.BAD_SIGNATURE,
    E.SIGNATURE_EXPIRED,
    E.WRONG_DESTINATION,
    E.DIGEST_MISMATCH,
    E.PEER_FORBIDDEN,
    E.UNKNOWN_RELAY_KEY,
    E.PEER_UNAVAILABLE,
    E.RATE_LIMITED,
    E.SIGNATURE_REPLAYED,
    E.REMOTE_RECIPIENT,  # federation is off
    E.PEER_ADDRESS_REFUSED,  # the origin is an IP literal or resolves to a non-public address
    E.INVALID_FIELD,  # the origin is not host[:port]
)
QUERY_ERRORS: tuple[ErrorCode, ...] = (E.INVALID_QUERY,)
# BODY_TOO_LARGE comes from the transport, which refuses a body above max_body_bytes before the application.
BODY_ERRORS: tuple[ErrorCode, ...] = (E.MALFORMED_BODY, E.INVALID_FIELD, E.UNSUPPORTED_MEDIA_TYPE, E.BODY_TOO_LARGE)
NEGOTIATION_ERRORS: tuple[ErrorCode, ...] = (E.NOT_ACCEPTABLE,)
PATH_ERRORS: tuple[ErrorCode, ...] = (E.NOT_FOUND,)  # a path parameter that does not match its pattern


@dataclass(frozen=True, slots=True)
class QueryParam:
    name: str
    description: str
    minimum: int = 0
    maximum: int = 2**63 - 1


@dataclass(slots=True)
class Call:
    """Everything a handler gets: the request, its decoded parts and the caller."""

    request: Request
    path_params: dict[str, str]
    query: dict[str, int | None]
    body: Any
    principal: Any  # relay.services.Principal (auth) or the origin relay's name (signed), else None
    media_type: str  # negotiated response media type


Endpoint = Callable[[Api, Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint, completely: the router dispatches on it and the OpenAPI document is generated from it."""

    method: str
    template: str
    endpoint: Endpoint
    summary: str
    operation_id: str
    body: type | None = None
    response: type | None = None
    auth: bool = False  # bearer token; the principal is the device
    ip_limited: bool = False  # unauthenticated and costly: rate-limited per source IP
    signed: bool = False  # federation: authenticated by the origin relay's HTTP message signature
    status: int = 200
    query: tuple[QueryParam, ...] = ()
    handler_errors: tuple[ErrorCode, ...] = ()  # what the handler and its services raise
    stream: bool = False  # long-lived streaming response
    raw_content_type: str | None = None  # response is not a protocol message (metrics, this document)
    no_content: str = ""  # non-empty: the route may also answer 204 without a body (this says when)
    tag: str = "relay"
    # The handler reads the request body as it arrives (Request.body_stream), unbounded by max_body_bytes,
    # and answers a BodyIncompleteError itself (one it lets through becomes 400 bad_request, a safety net that
    # is not documented per route, like internal).
    stream_body: bool = False
    stream_media_type: str = "application/octet-stream"  # what a streamed body is (the API document says so)
    # Authentication the handler does itself (documentation only: "bearer", "capability"), for routes whose
    # handler must answer even the token's errors in its own way (tus: Tus-Resumable on every answer).
    security: tuple[str, ...] = ()
    path_params: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.stream_body and (self.body is not None or self.signed):
            # A decoded body needs the whole body, and so does a signature over its digest.
            raise ValueError(f"{self.method} {self.template}: a streamed body has no body type and no signature")
        if self.auth and self.security:
            raise ValueError(f"{self.method} {self.template}: auth (the application's check) or security, not both")
        pattern = "^"
        names: list[str] = []
        for part in self.template.strip("/").split("/"):
            if part.startswith("{") and part.endswith("}"):
                name = part[1:-1]
                names.append(name)
                inner = PARAM_PATTERNS[name].strip("^$")
                pattern += f"/(?P<{name}>{inner})"
            else:
                pattern += "/" + re.escape(part)
        object.__setattr__(self, "path_params", tuple(names))
        object.__setattr__(self, "_regex", re.compile(pattern + "$"))

    @property
    def errors(self) -> tuple[ErrorCode, ...]:
        """Every code this route can answer with (except the generic ``unavailable`` and ``internal``), in order."""
        codes: list[ErrorCode] = []
        for part in (
            IP_LIMIT_ERRORS if self.ip_limited else (),
            AUTH_ERRORS if self.auth else (),
            SIGNATURE_ERRORS if self.signed else (),
            PATH_ERRORS if self.path_params else (),
            QUERY_ERRORS if self.query else (),
            BODY_ERRORS if self.body is not None else (),
            NEGOTIATION_ERRORS if self.raw_content_type is None else (),
            self.handler_errors,
        ):
            codes += (code for code in part if code not in codes)
        return tuple(codes)

    def match(self, path: str) -> dict[str, str] | None:
        m = self._regex.match(path)
        return m.groupdict() if m else None


def _summary(handler: Endpoint, method: str, template: str) -> str:
    """The text after "METHOD /path — " on the handler's first docstring line (which must name them)."""
    first = (handler.__doc__ or "").strip().splitlines()[0] if handler.__doc__ else ""
    prefix = f"{method} {template} — "
    if not first.startswith(prefix) or len(first) == len(prefix):
        raise ValueError(f"{handler.__qualname__}: the docstring must start with {prefix!r} and a summary")
    return first[len(prefix) :]


class RouteTable:
    """The routes of one topic module, declared on their handlers with :meth:`route`."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.routes: list[Route] = []

    def route(
        self,
        method: str,
        template: str,
        *,
        also: Sequence[str] = (),
        body: type | None = None,
        response: type | None = None,
        auth: bool = False,
        ip_limited: bool = False,
        signed: bool = False,
        status: int = 200,
        query: tuple[QueryParam, ...] = (),
        errors: tuple[ErrorCode, ...] = (),
        stream: bool = False,
        raw_content_type: str | None = None,
        no_content: str = "",
        tag: str | None = None,
        stream_body: bool = False,
        stream_media_type: str = "application/octet-stream",
        security: tuple[str, ...] = (),
    ) -> Callable[[Endpoint], Endpoint]:
        """Declare the decorated handler as ``method template`` (and as ``method`` on each ``also`` path).

        ``errors``: the codes the handler and the services it calls raise;
        those of the steps before the handler follow from the flags.
        ``stream_body``: the handler reads ``call.request.body_stream`` (no
        ``body`` type, not ``signed``), documented as ``stream_media_type``.
        ``security``: the schemes the handler checks itself (``auth`` is the
        application's bearer check; only one of the two). Raises
        ``ValueError`` at import when the docstring does not name the route or
        the flags contradict.
        """

        def register(handler: Endpoint) -> Endpoint:
            summary = _summary(handler, method, template)
            for path in (template, *also):
                # An alias path gets its own operation id: the handler's name and the alias's first segment.
                segment = next(s for s in path.strip("/").split("/") if s != "v1")
                self.routes.append(
                    Route(
                        method,
                        path,
                        handler,
                        summary,
                        handler.__name__ if path == template else f"{handler.__name__}_{segment}",
                        body=body,
                        response=response,
                        auth=auth,
                        ip_limited=ip_limited,
                        signed=signed,
                        status=status,
                        query=query,
                        handler_errors=errors,
                        stream=stream,
                        raw_content_type=raw_content_type,
                        no_content=no_content,
                        tag=tag or self.tag,
                        stream_body=stream_body,
                        stream_media_type=stream_media_type,
                        security=security,
                    )
                )
            return handler

        return register


class MethodNotAllowedError(Exception):
    """The path names a route, the method does not; ``allowed`` goes into the Allow header."""

    def __init__(self, allowed: Iterable[str]) -> None:
        super().__init__("method not allowed")
        self.allowed = sorted(set(allowed))


class Router:
    """Finds the route of a request: one dict lookup for static paths, a short scan for templated ones."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._static: dict[str, dict[str, Route]] = {}
        templated: dict[str, dict[str, Route]] = {}
        for route in routes:
            table = templated if route.path_params else self._static
            methods = table.setdefault(route.template, {})
            if route.method in methods:
                raise ValueError(f"{route.method} {route.template} is declared twice")
            methods[route.method] = route
        self._templated = [(next(iter(methods.values())), methods) for methods in templated.values()]

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route for ``method`` and ``path`` and its path parameters (HEAD is served by GET).

        Raises ``not_found`` (a :class:`TetherlessError`) or :class:`MethodNotAllowedError`.
        """
        params: dict[str, str] | None = {}
        methods = self._static.get(path)
        if methods is None:
            for sample, candidates in self._templated:
                params = sample.match(path)
                if params is not None:
                    methods = candidates
                    break
        if methods is None or params is None:
            raise TetherlessError(ErrorCode.NOT_FOUND, "no such route")
        route = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if route is None:
            raise MethodNotAllowedError(methods)
        return route, params


def parse_query(raw: str, params: Sequence[QueryParam]) -> dict[str, int | None]:
    """Integer query parameters; raises ``invalid_query`` for unknown-format or out-of-range values."""
    values: dict[str, int | None] = {p.name: None for p in params}
    if not raw:
        return values
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=True, max_num_fields=32)
    except ValueError as exc:
        raise TetherlessError(ErrorCode.INVALID_QUERY, "malformed query string") from exc
    by_name = {p.name: p for p in params}
    for key, value in pairs:
        param = by_name.get(key)
        if param is None:
            continue  # unknown parameters are ignored, like unknown fields
        if not value.isdigit() or len(value) > 19:
            raise TetherlessError(ErrorCode.INVALID_QUERY, f"{key} must be a non-negative integer")
        number = int(value)
        if not param.minimum <= number <= param.maximum:
            raise TetherlessError(ErrorCode.INVALID_QUERY, f"{key} must be between {param.minimum} and {param.maximum}")
        values[key] = number
    return values
