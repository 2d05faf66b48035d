"""The boundary between the transport and the application.

The transport (``relay.transport``) turns HTTP/1.1 and HTTP/2 into
:class:`Request` objects, awaits the application's :data:`Handler`, and
writes the :class:`Response` back. Nothing here knows about h2, h11 or
sockets, and the transport knows nothing about routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from protocol.errors import PROBLEM_CONTENT_TYPE, TetherlessError
from relay import metrics


@dataclass(frozen=True, slots=True)
class Request:
    """A complete request: the transport has read the whole body (bounded by ``max_body_bytes``)."""

    method: str  # upper case, e.g. "GET"
    path: str  # raw (not percent-decoded) path without the query string, e.g. "/v1/inbox"
    query: str  # raw query string without "?", "" when absent
    headers: Sequence[tuple[str, str]]  # names lower-cased, in received order, pseudo-headers removed
    body: bytes
    client: str  # "ip:port" of the peer
    http_version: str  # "1.1" or "2"
    scheme: str = "http"  # "http" or "https"

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (lower-case), or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


@dataclass(slots=True)
class Response:
    """What the application answers.

    When ``stream`` is set the transport ignores ``body``, sends the headers
    at once and then each chunk the iterator yields, as flow control allows
    (it pulls the next chunk only after the previous one is handed to the
    socket, so at most one chunk plus the peer's window is buffered). When
    the peer goes away or the server drains, the transport stops iterating
    and calls ``aclose()`` on the iterator (if it has one) so the producer
    can release its resources.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[Request], Awaitable[Response]]


def problem_response(error: TetherlessError, *, status: int | None = None) -> Response:
    """The RFC 9457 problem response for ``error``: the one place an error becomes HTTP.

    The status is the code's one status in ``protocol.errors.STATUS``;
    ``status`` overrides it only where HTTP itself prescribes another (the
    transport's 431 for oversized headers), and the body's ``status`` member
    follows. Adds ``Retry-After`` when the error carries one and counts the
    code in ``relay_problems_total``. Never raises.
    """
    problem = error.to_problem()
    if status is not None:
        problem = msgspec.structs.replace(problem, status=status)
    headers = [("content-type", PROBLEM_CONTENT_TYPE), ("cache-control", "no-store")]
    if error.retry_after_seconds is not None:
        headers.append(("retry-after", str(error.retry_after_seconds)))
    metrics.problems_total.labels(error.code.value).inc()
    return Response(problem.status, headers, msgspec.json.encode(problem))
