"""HTTP/1.1 on one connection: h11 as the state machine, trio for I/O.

One request at a time (h11 pauses after each request until the response is
complete, which makes pipelining safe). Keep-alive timing follows the usual
split: between requests the connection may sit idle for
``idle_timeout_seconds``; once the first byte of a request arrives its
headers must be complete within ``header_timeout_seconds`` (for the first
request: measured from connect) and its body within ``body_timeout_seconds``.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Final

import h11
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay import metrics
from relay.api.http import Handler, Request, Response, problem_response
from relay.config import Config
from relay.transport.base import (
    HTTP11,
    InvalidResponseError,
    WriteStalledError,
    aclose_iterator,
    body_has_no_content,
    decode_headers,
    logger,
    response_headers,
    send_with_stall_timeout,
    split_target,
)

RECEIVE_BYTES: Final = 64 * 1024
# After an error response on a connection whose request body was not read,
# keep reading (and discarding) this long so closing does not send a TCP RST
# that could destroy the response before the client reads it.
LINGER_SECONDS: Final = 1.0
LINGER_MAX_BYTES: Final = 16 * 1024 * 1024


class _Phase(enum.Enum):
    IDLE = "idle"  # waiting for the first byte of a request
    HEADERS = "headers"
    BODY = "body"
    HANDLER = "handler"
    STREAMING = "streaming"  # writing a streaming response


class _PeerGoneError(Exception):
    """The socket broke or stalled; nothing more can be written."""


class HTTP11Connection:
    """Serves one HTTP/1.1 connection; :meth:`run` returns when it should be closed.

    Does not close ``stream`` (the server does). Cancelling :meth:`run`
    abandons the request in progress (a streaming response's iterator is
    still ``aclose``\\ d).
    """

    protocol = HTTP11

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        config: Config,
        handler: Handler,
        client: str,
        scheme: str,
        initial: bytes,
        started_at: float,
    ) -> None:
        self._stream = stream
        self._config = config
        self._handler = handler
        self._client = client
        self._scheme = scheme
        self._started_at = started_at
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_list_bytes)
        if initial:
            self._conn.receive_data(initial)
        self._phase = _Phase.IDLE
        self._in_flight = 0
        self._draining = False
        self._read_scope: trio.CancelScope | None = None
        self._next_chunk_scope: trio.CancelScope | None = None

    @property
    def open_streams(self) -> int:
        return 0 if self._phase in (_Phase.IDLE, _Phase.HEADERS) else 1

    @property
    def buffered_bytes(self) -> int:
        return self._in_flight

    def _is_draining(self) -> bool:
        # A method so mypy does not narrow a flag that start_drain() flips meanwhile.
        return self._draining

    def start_drain(self) -> None:
        """Close when idle; the request in progress is answered with ``Connection: close``. Idempotent."""
        self._draining = True
        if self._phase is _Phase.IDLE and self._read_scope is not None:
            self._read_scope.cancel()
        if self._next_chunk_scope is not None:
            self._next_chunk_scope.cancel()

    async def run(self) -> None:
        """Serve requests until the peer closes, an error or timeout ends the connection, or a drain."""
        first = True
        try:
            while True:
                try:
                    request = await self._read_request_head(first)
                    if request is None:
                        return
                    keep_open = await self._serve_request(request)
                except h11.RemoteProtocolError as exc:
                    await self._answer_protocol_error(exc)
                    return
                if not keep_open or self._draining:
                    return
                try:
                    self._conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return  # the response or request did not complete cleanly
                first = False
        except _PeerGoneError as exc:
            logger.debug("http/1.1 connection %s lost: %s", self._client, exc)

    # -- reading -------------------------------------------------------------------
    async def _receive(self, deadline: float) -> bytes | bytearray | None:
        """Bytes from the peer, b"" at EOF or on a broken socket, None at ``deadline`` or on drain."""
        with trio.CancelScope(deadline=deadline) as scope:
            self._read_scope = scope
            try:
                return await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
            finally:
                self._read_scope = None
        return None

    async def _next_event(self, deadline: float) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED] | None:
        """The next h11 event, reading as needed; None at ``deadline``. Raises h11.RemoteProtocolError."""
        while True:
            event = self._conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self._receive(deadline)
            if data is None:
                return None
            self._conn.receive_data(bytes(data))

    async def _read_request_head(self, first: bool) -> h11.Request | None:
        now = trio.current_time()
        if not self._conn.trailing_data[0]:
            self._phase = _Phase.IDLE
            if self._draining:
                return None
            deadline = (
                self._started_at + self._config.header_timeout_seconds
                if first
                else now + (self._config.idle_timeout_seconds)
            )
            data = await self._receive(deadline)
            if data is None and first and not self._draining:
                metrics.protocol_errors_total.labels(kind="header_timeout").inc()
            if not data:
                return None
            self._conn.receive_data(bytes(data))
            now = trio.current_time()
        self._phase = _Phase.HEADERS
        deadline = (self._started_at if first else now) + self._config.header_timeout_seconds
        event = await self._next_event(deadline)
        if event is None:
            metrics.protocol_errors_total.labels(kind="header_timeout").inc()
            logger.debug("http/1.1 connection %s: header timeout", self._client)
            return None
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed

    async def _read_body(self, method: str) -> bytearray | None:
        """The request body; None when it was too large (413 sent) or timed out."""
        body = bytearray()
        deadline = trio.current_time() + self._config.body_timeout_seconds
        while True:
            event = await self._next_event(deadline)
            if event is None:
                metrics.protocol_errors_total.labels(kind="body_timeout").inc()
                logger.debug("http/1.1 connection %s: body timeout", self._client)
                return None
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._config.max_body_bytes:
                    await self._answer_too_large(method)
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return body
            else:
                return None  # ConnectionClosed mid-body

    # -- one request ---------------------------------------------------------------
    async def _serve_request(self, head: h11.Request) -> bool:
        """Read the body, run the handler, answer. True when the connection may serve another request."""
        self._phase = _Phase.BODY
        method = head.method.decode("latin-1").upper()
        target = head.target.decode("latin-1")
        headers = decode_headers(head.headers)
        rejection = self._reject_head(method, head, headers)
        if rejection is not None:
            metrics.protocol_errors_total.labels(kind="http11_bad_request").inc()
            await self._send(method, rejection, close=True)
            await self._linger()
            return False
        # h11 has already rejected malformed or conflicting Content-Length.
        declared = next((int(value) for name, value in headers if name == "content-length"), None)
        if declared is not None and declared > self._config.max_body_bytes:
            await self._answer_too_large(method)
            return False
        if self._conn.they_are_waiting_for_100_continue:
            await self._write(
                self._conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")) or b""
            )
        body = await self._read_body(method)
        if body is None:
            return False
        path, query = split_target(target)
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=bytes(body),
            client=self._client,
            http_version="1.1",
            scheme=self._scheme,
        )
        del body
        self._phase = _Phase.HANDLER
        try:
            response = await self._handler(request)
        except Exception:
            logger.exception("handler raised on %s %s", method, path)
            response = problem_response(TetherlessError(ErrorCode.INTERNAL))
        return await self._send(method, response)

    def _reject_head(self, method: str, head: h11.Request, headers: list[tuple[str, str]]) -> Response | None:
        """A 4xx problem for a request h11 accepts but the relay must not (or None)."""
        # h11 checks the size only while headers are incomplete; a request
        # that arrives whole in one read is measured here, the way HTTP/2
        # measures MAX_HEADER_LIST_SIZE (name + value + 32 per field).
        size = sum(len(name) + len(value) + 32 for name, value in head.headers)
        if size > self._config.max_header_list_bytes:
            return problem_response(
                TetherlessError(ErrorCode.BAD_REQUEST, "request header fields too large"), status=431
            )
        if method == "CONNECT":
            return problem_response(TetherlessError(ErrorCode.BAD_REQUEST, "CONNECT is not supported"))
        names = {name for name, _ in headers}
        if "transfer-encoding" in names and "content-length" in names:
            # RFC 9112 §6.3: a smuggling vector; refuse rather than pick one.
            return problem_response(TetherlessError(ErrorCode.BAD_REQUEST, "both Transfer-Encoding and Content-Length"))
        return None

    async def _answer_too_large(self, method: str) -> None:
        detail = f"request body larger than {self._config.max_body_bytes} bytes"
        await self._send(method, problem_response(TetherlessError(ErrorCode.BODY_TOO_LARGE, detail)), close=True)
        await self._linger()

    async def _answer_protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        metrics.protocol_errors_total.labels(kind="http11_bad_request").inc()
        logger.debug("http/1.1 connection %s: bad request: %s", self._client, exc)
        if self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = exc.error_status_hint if 400 <= exc.error_status_hint <= 499 else 400
        response = problem_response(TetherlessError(ErrorCode.BAD_REQUEST, str(exc)), status=status)
        try:
            await self._send("GET", response, close=True)
        except _PeerGoneError:
            return
        await self._linger()

    async def _linger(self) -> None:
        """Half-close, then discard what the peer still sends for a short while (see LINGER_SECONDS)."""
        if isinstance(self._stream, trio.abc.HalfCloseableStream):
            try:
                await self._stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
        discarded = 0
        with trio.move_on_after(LINGER_SECONDS):
            while discarded < LINGER_MAX_BYTES:
                try:
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                discarded += len(data)

    # -- writing -------------------------------------------------------------------
    async def _write(self, data: bytes) -> None:
        """Raises :class:`_PeerGoneError` when the socket is broken or the peer stopped reading."""
        if not data:
            return
        self._in_flight = len(data)
        try:
            await send_with_stall_timeout(self._stream, data, self._config.idle_timeout_seconds)
        except (trio.BrokenResourceError, trio.ClosedResourceError, WriteStalledError) as exc:
            raise _PeerGoneError(repr(exc)) from None
        finally:
            self._in_flight = 0

    def _event_bytes(self, event: h11.Event) -> bytes:
        return self._conn.send(event) or b""

    async def _send(self, method: str, response: Response, *, close: bool = False) -> bool:
        """Write ``response``; True when the connection may be kept open."""
        try:
            headers = response_headers(response)
        except InvalidResponseError as exc:
            logger.error("invalid response to %s: %s", method, exc)
            if response.stream is not None:
                await aclose_iterator(response.stream)
            response = problem_response(TetherlessError(ErrorCode.INTERNAL))
            headers = response_headers(response)
        if close or self._draining:
            headers.append((b"connection", b"close"))
        no_body = body_has_no_content(method, response.status)
        try:
            reason = HTTPStatus(response.status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        if response.stream is None or no_body:
            if response.stream is not None:
                await aclose_iterator(response.stream)
            elif response.status not in (204, 304):
                headers.append((b"content-length", str(len(response.body)).encode("ascii")))
            data = self._event_bytes(h11.Response(status_code=response.status, headers=headers, reason=reason))
            if response.body and not no_body:
                data += self._event_bytes(h11.Data(data=response.body))
            data += self._event_bytes(h11.EndOfMessage())
            await self._write(data)
        else:
            self._phase = _Phase.STREAMING
            head = self._event_bytes(h11.Response(status_code=response.status, headers=headers, reason=reason))
            try:
                await self._write(head)
                if not await self._stream_body(method, response.stream):
                    return False
            finally:
                await aclose_iterator(response.stream)
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    async def _stream_body(self, method: str, iterator: AsyncIterator[bytes]) -> bool:
        """Send chunks until the iterator ends or a drain; False when the body could not be finished."""
        with trio.CancelScope() as peer_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_peer, peer_scope)
                while not self._is_draining():
                    with trio.CancelScope() as self._next_chunk_scope:
                        try:
                            chunk = await iterator.__anext__()
                        except StopAsyncIteration:
                            break
                        except Exception:
                            logger.exception("response stream raised on %s", method)
                            # Without the final chunk the client sees a truncated body.
                            nursery.cancel_scope.cancel()
                            return False
                    self._next_chunk_scope = None
                    if self._is_draining():
                        break
                    if chunk:
                        await self._write(self._event_bytes(h11.Data(data=chunk)))
                self._next_chunk_scope = None
                await self._write(self._event_bytes(h11.EndOfMessage()))
                nursery.cancel_scope.cancel()
        return not peer_scope.cancelled_caught

    async def _watch_peer(self, peer_scope: trio.CancelScope) -> None:
        """While a response streams, notice the peer leaving (EOF) and stop the stream.

        Bytes that arrive instead (a pipelined request) are handed to h11 for
        the next cycle; watching then stops, so at most one read is buffered.
        """
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if data:
            self._conn.receive_data(bytes(data))
        else:
            logger.debug("http/1.1 connection %s: peer left during a streaming response", self._client)
            peer_scope.cancel()
