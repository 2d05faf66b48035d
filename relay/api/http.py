"""The boundary between the transport and the application.

The transport (``relay.transport``) turns HTTP/1.1 and HTTP/2 into
:class:`Request` objects, awaits the application's :data:`Handler`, and
writes the :class:`Response` back. Nothing here knows about h2, h11 or
sockets, and the transport knows nothing about routes.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from protocol.errors import PROBLEM_CONTENT_TYPE, TetherlessError
from relay import metrics


class BodyIncompleteError(Exception):
    """A streamed request body ended before its end (END_STREAM, the last chunk, or its Content-Length).

    ``reason`` says why, for logs: the peer reset the stream or closed the
    connection, no byte arrived for ``body_timeout_seconds``, the body was
    malformed (HTTP/1.1 chunked framing), or the server is draining. The
    bytes yielded before it (``BodyStream.received``) did arrive intact and
    in order, so a handler may keep them (tus does).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"request body incomplete: {reason}")
        self.reason = reason


class BodyStream(abc.ABC):
    """The body of a request to a streaming route (``Route.stream_body``), read as it arrives.

    ``async for chunk in request.body_stream`` yields non-empty ``bytes`` in
    order and ends normally at the body's end; it raises
    :class:`BodyIncompleteError` when the body is cut short (after yielding
    every byte that did arrive). Reading is what lets more bytes in: the
    transport holds a bounded number of unread bytes per stream (HTTP/2: the
    stream's flow-control window, reopened as the handler reads; HTTP/1.1:
    it does not read the socket until asked), so a handler that stops
    reading stops the sender. A wait for the next chunk fails when no byte
    arrives for ``body_timeout_seconds``; a steady sender may take any total
    time. Cancelling the iteration loses nothing: the next read resumes
    where it stopped. Iterate once, from one task. After the handler has
    returned, the transport discards what was not read.

    Implementations (the transport's, :class:`BufferedBodyStream`) supply
    :meth:`_read` and record the body's end or failure with ``_ended`` and
    :meth:`fail`; this class does the counting and the raising.
    """

    def __init__(self, declared_length: int | None) -> None:
        self._declared_length = declared_length
        self._received = 0
        self._failure: str | None = None  # why the body is incomplete
        self._ended = False  # the whole body has arrived (not necessarily been read)

    @property
    def received(self) -> int:
        """Bytes yielded so far."""
        return self._received

    @property
    def declared_length(self) -> int | None:
        """The request's Content-Length, or None when it sent none (HTTP/1.1 chunked, HTTP/2 without it)."""
        return self._declared_length

    def fail(self, reason: str) -> bool:
        """Mark the body incomplete unless it already ended or failed; True when this call did it."""
        if self._ended or self._failure is not None:
            return False
        self._failure = reason
        return True

    def __aiter__(self) -> BodyStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._read()
        if chunk:
            self._received += len(chunk)
            return chunk
        if self._failure is not None:
            raise BodyIncompleteError(self._failure)
        raise StopAsyncIteration

    @abc.abstractmethod
    async def _read(self) -> bytes:
        """The next bytes; b"" once the body ended (``_ended``) or failed (:meth:`fail`), bytes first.

        Each transport implements it (``_H2BodyStream``, ``_H11BodyStream``), as does :class:`BufferedBodyStream`.
        """


class BufferedBodyStream(BodyStream):
    """A :class:`BodyStream` over a body already in memory: one chunk (none when empty), then the end.

    What a streaming route's handler gets when the body was buffered anyway
    (a request built in a test, or a transport that does not stream), so a
    handler has one way to read its body. Never raises
    :class:`BodyIncompleteError`.
    """

    def __init__(self, body: bytes, declared_length: int | None = None) -> None:
        super().__init__(declared_length)
        self._body = body

    async def _read(self) -> bytes:
        body, self._body = self._body, b""
        self._ended = True
        return body


@dataclass(frozen=True, slots=True)
class Request:
    """A request as the application sees it.

    For most routes the transport has read the whole body (bounded by
    ``max_body_bytes``) into ``body``. For a streaming route (the
    transport's ``streams_body(method, path)`` said so) ``body`` is b""
    and ``body_stream`` yields the body as it arrives, with no size cap in
    the transport: the handler enforces its own.
    """

    method: str  # upper case, e.g. "GET"
    path: str  # raw (not percent-decoded) path without the query string, e.g. "/v1/inbox"
    query: str  # raw query string without "?", "" when absent
    headers: Sequence[tuple[str, str]]  # names lower-cased, in received order, pseudo-headers removed
    body: bytes
    client: str  # "ip:port" of the peer
    http_version: str  # "1.1" or "2"
    scheme: str = "http"  # "http" or "https"
    body_stream: BodyStream | None = None  # set only for streaming routes

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

    ``length``, for a ``stream`` response, is the exact number of bytes the
    iterator will yield: the transport sends it as ``content-length`` (a
    download needs it for progress and Range), keeps streaming it through a
    drain (a shortened body would be a corrupt one), and aborts the response
    (HTTP/2 RST_STREAM, HTTP/1.1 connection close) rather than send a body
    of another length, so a client never takes a truncated body for a whole
    one. None: the length is unknown (a long-lived stream).
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    length: int | None = None


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
