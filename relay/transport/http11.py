"""HTTP/1.1 on one connection: h11 as the state machine, trio for I/O.

One request at a time (h11 pauses after each request until the response is
complete, which makes pipelining safe). Keep-alive timing follows the usual
split: between requests the connection may sit idle for
``idle_timeout_seconds``; once the first byte of a request arrives its
headers must be complete within ``header_timeout_seconds`` (for the first
request: measured from connect) and its body within ``body_timeout_seconds``.

A streaming route's body is not read ahead: the handler's reads pull it
from the socket (backpressure is the peer's TCP window), each read failing
after ``body_timeout_seconds`` without a byte. A handler that returns before
the body's end gets its response sent with ``Connection: close``.
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
from relay.api.http import BodyStream, Handler, Request, Response, problem_response
from relay.config import Config
from relay.transport.base import (
    HTTP11,
    InvalidResponseError,
    StreamsBody,
    WriteStalledError,
    aclose_iterator,
    body_has_no_content,
    decode_headers,
    logger,
    never_streams_body,
    response_headers,
    send_with_stall_timeout,
    split_target,
    stream_length_error,
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


class _H11BodyStream(BodyStream):
    """A streamed request body, read from the socket only when the handler asks for more."""

    def __init__(self, connection: HTTP11Connection, declared_length: int | None) -> None:
        super().__init__(declared_length)
        self._connection = connection
        self.cut_reason: str | None = None  # set by a drain: the next read ends the body
        self.read_scope: trio.CancelScope | None = None  # set while a read waits on the socket

    def end(self) -> None:
        self._ended = True

    def cut(self, reason: str) -> None:
        if self._ended or self._failure is not None:
            return
        self.cut_reason = reason
        if self.read_scope is not None:
            self.read_scope.cancel()

    def close(self) -> None:
        """The handler returned: later reads end the body."""
        self.fail("the request is over")

    async def _read(self) -> bytes:
        if self._ended or self._failure is not None:
            return b""
        if self.cut_reason is not None:
            self.fail(self.cut_reason)
            return b""
        return await self._connection.read_streamed_body(self)


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
        streams_body: StreamsBody = never_streams_body,
    ) -> None:
        self._stream = stream
        self._streams_body = streams_body
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
        self._body_stream: _H11BodyStream | None = None  # the streamed body of the request in progress
        self._body_bytes = 0  # request body bytes held: a buffered body, or a streamed body's last read
        self._peak_body_bytes = 0

    @property
    def open_streams(self) -> int:
        return 0 if self._phase in (_Phase.IDLE, _Phase.HEADERS) else 1

    @property
    def buffered_bytes(self) -> int:
        return self._in_flight

    @property
    def body_buffered_bytes(self) -> int:
        return self._body_bytes

    @property
    def peak_body_buffered_bytes(self) -> int:
        return self._peak_body_bytes

    def _hold_body_bytes(self, count: int) -> None:
        self._body_bytes = count
        self._peak_body_bytes = max(self._peak_body_bytes, count)

    def cut_request_bodies(self, reason: str) -> None:
        """End the streamed request body still arriving (if any) with BodyIncompleteError."""
        if self._body_stream is not None:
            self._body_stream.cut(reason)

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
                self._hold_body_bytes(len(body))
                if len(body) > self._config.max_body_bytes:
                    await self._answer_too_large(method)
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return body
            else:
                return None  # ConnectionClosed mid-body

    async def read_streamed_body(self, body: _H11BodyStream) -> bytes:
        """The streamed body's next bytes (what one socket read brought), or b"" at its end or failure.

        Reads the socket only here, so a handler that stops reading stops
        the sender (TCP backpressure); every read waits at most
        ``body_timeout_seconds``. Never raises: failures are recorded on
        ``body`` (BodyIncompleteError for the handler) and end the body.
        """
        try:
            if self._conn.they_are_waiting_for_100_continue:
                # Only now: a request refused before its body is read (bad token) never invites the body.
                await self._write(self._continue_bytes())
        except _PeerGoneError:
            body.fail("the peer closed the connection")
            return b""
        chunk = bytearray()
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                body.fail(f"malformed body: {exc}")
                break
            if isinstance(event, h11.Data):
                chunk += event.data
            elif isinstance(event, h11.EndOfMessage):
                body.end()
                break
            elif event is h11.NEED_DATA and not chunk:
                data = await self._receive_streamed(body)
                if not data:
                    break
                self._conn.receive_data(data)
            elif event is h11.NEED_DATA:
                break  # hand over what this read brought before reading again
            else:
                body.fail("the peer closed the connection")
                break
        self._hold_body_bytes(0)
        return bytes(chunk)

    async def _receive_streamed(self, body: _H11BodyStream) -> bytes:
        """One socket read for ``body``; b"" (with ``body`` failed) at EOF, on a drain cut or after the timeout."""
        timeout = self._config.body_timeout_seconds
        data: bytes | bytearray = b""
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            body.read_scope = scope
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            finally:
                body.read_scope = None
        if scope.cancelled_caught and body.cut_reason is not None:
            body.fail(body.cut_reason)
        elif scope.cancelled_caught:
            metrics.protocol_errors_total.labels(kind="body_timeout").inc()
            body.fail(f"no body bytes for {timeout} s")
        elif not data:
            body.fail("the peer closed the connection")
        self._hold_body_bytes(len(data))
        return bytes(data)

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
        path, query = split_target(target)
        body_stream = _H11BodyStream(self, declared) if self._streams_body(method, path) else None
        body = bytearray()  # a streamed body is read by the handler, later
        if body_stream is None:
            if declared is not None and declared > self._config.max_body_bytes:
                await self._answer_too_large(method)
                return False
            if self._conn.they_are_waiting_for_100_continue:
                await self._write(self._continue_bytes())
            whole = await self._read_body(method)
            if whole is None:
                return False
            body = whole
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            body=bytes(body),
            client=self._client,
            http_version="1.1",
            scheme=self._scheme,
            body_stream=body_stream,
        )
        del body
        self._hold_body_bytes(0)
        if body_stream is not None:
            return await self._serve_streamed_body(request, body_stream)
        return await self._send(method, await self._call_handler(request))

    async def _call_handler(self, request: Request) -> Response:
        self._phase = _Phase.HANDLER
        try:
            return await self._handler(request)
        except Exception:
            logger.exception("handler raised on %s %s", request.method, request.path)
            return problem_response(TetherlessError(ErrorCode.INTERNAL))

    async def _serve_streamed_body(self, request: Request, body: _H11BodyStream) -> bool:
        """Run the handler with the body as a stream; close the connection after a body it left unread."""
        self._body_stream = body
        try:
            response = await self._call_handler(request)
        finally:
            body.close()
            self._body_stream = None
        if not self._rest_of_body_is_here():
            # The rest of the body would be read as the next request: answer, then close (RFC 9112 §9.6).
            keep_open = False
            await self._send(request.method, response, close=True)
            await self._linger()
        else:
            keep_open = await self._send(request.method, response)
        return keep_open

    def _rest_of_body_is_here(self) -> bool:
        """Whether the request's body has ended, reading only what is already received (the rest is dropped)."""
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError:
                return False
            if isinstance(event, h11.EndOfMessage):
                return True
            if not isinstance(event, h11.Data):
                return self._conn.their_state is h11.DONE

    def _continue_bytes(self) -> bytes:
        return self._conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")) or b""

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
        length = len(response.body) if response.stream is None else response.length
        if length is not None and response.status not in (204, 304):
            headers.append((b"content-length", str(length).encode("ascii")))
        if response.stream is None or no_body:
            if response.stream is not None:
                await aclose_iterator(response.stream)
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
                if not await self._stream_body(method, response.stream, response.length):
                    return False
            finally:
                await aclose_iterator(response.stream)
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    async def _stream_body(self, method: str, iterator: AsyncIterator[bytes], length: int | None) -> bool:
        """Send chunks until the iterator ends or a drain; False when the body could not be finished.

        With a ``length`` the body is framed by Content-Length, is not ended
        by a drain (it would be a corrupt body), and a stream that yields
        another number of bytes ends the connection before its end, so the
        client sees an incomplete response rather than a wrong one.
        """
        stoppable = length is None
        sent = 0
        with trio.CancelScope() as peer_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_peer, peer_scope)
                while not (stoppable and self._is_draining()):
                    with trio.CancelScope() as scope:
                        self._next_chunk_scope = scope if stoppable else None
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
                    if stoppable and self._is_draining():
                        break
                    sent += len(chunk)
                    if problem := stream_length_error(length, sent, ended=False):
                        logger.error("response to %s aborted: %s", method, problem)
                        nursery.cancel_scope.cancel()
                        return False
                    if chunk:
                        await self._write(self._event_bytes(h11.Data(data=chunk)))
                self._next_chunk_scope = None
                if problem := stream_length_error(length, sent, ended=True):
                    logger.error("response to %s aborted: %s", method, problem)
                    nursery.cancel_scope.cancel()
                    return False
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
