"""Route table machinery: templates, matching, query parameters.

A :class:`Route` describes one endpoint completely (method, path template,
body and response types, auth, documented errors); the router dispatches on
it and the OpenAPI document is generated from it, so the two cannot drift.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import ID_PATTERN, RELAY_PATTERN

from .http import Request, Response

PARAM_PATTERNS: dict[str, str] = {
    "account_id": ID_PATTERN,
    "device_id": ID_PATTERN,
    "relay": RELAY_PATTERN,
    "snapshot_id": "^[0-9a-f]{32}$",  # account log: 16 bytes as lowercase hex
    # enrolment: 16 base32 characters; anything else up to 64 characters reaches the handler and is
    # answered enrolment_unknown (a mistyped link code finds nothing), not the generic not_found.
    "lookup_id": "^[^/]{1,64}$",
}


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
    principal: Any  # relay.services.Principal for authenticated routes, else None
    media_type: str  # negotiated response media type


Endpoint = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    template: str
    endpoint: Endpoint
    summary: str
    body: type | None = None
    response: type | None = None
    auth: bool = False
    ip_limited: bool = False  # unauthenticated and costly: rate-limited per source IP
    status: int = 200
    query: tuple[QueryParam, ...] = ()
    errors: tuple[ErrorCode, ...] = ()
    stream: bool = False  # long-lived streaming response
    signed: bool = False  # federation: authenticated by the origin relay's HTTP message signature
    raw_content_type: str | None = None  # response is not a protocol message (metrics)
    no_content: str = ""  # non-empty: the route may also answer 204 without a body (this says when)
    tag: str = "relay"
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern = "^"
        for part in self.template.strip("/").split("/"):
            if part.startswith("{") and part.endswith("}"):
                name = part[1:-1]
                inner = PARAM_PATTERNS[name].strip("^$")
                pattern += f"/(?P<{name}>{inner})"
            else:
                pattern += "/" + re.escape(part)
        object.__setattr__(self, "_regex", re.compile(pattern + "$"))

    def match(self, path: str) -> dict[str, str] | None:
        m = self._regex.match(path)
        return m.groupdict() if m else None


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


RawHandler = Callable[[Request], Awaitable[Response]]
