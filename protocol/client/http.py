"""A small HTTP/2 client connection over trio (h2 as a sans-IO state machine).

- ``http://host:port`` is HTTP/2 over cleartext with prior knowledge (h2c);
  ``https://host:port`` is TLS with ALPN ``h2`` (``ca_file`` / ``verify``).
- Many concurrent requests share one connection as multiplexed streams.
- Flow control both ways: received data is acknowledged only as the caller
  consumes it (so a slow reader slows the relay down instead of growing a
  buffer), and large request bodies wait for WINDOW_UPDATE.
- Every failure of the connection surfaces as a :class:`TransportError`
  subclass; reconnecting is the caller's job (the SDK does it).

One background task per connection reads the socket and dispatches h2
events to the waiting streams; it never raises, it marks the connection
dead and fails every open stream with :class:`ConnectionLostError` instead.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Final
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import msgspec
import trio

DEFAULT_TIMEOUT_SECONDS: Final = 30.0
CONNECT_TIMEOUT_SECONDS: Final = 10.0
# A larger receive window than the 64 KiB default lets an inbox page stream
# in without a WINDOW_UPDATE round trip per 64 KiB.
RECEIVE_WINDOW_BYTES: Final = 4 * 1024 * 1024
READ_CHUNK_BYTES: Final = 64 * 1024
MAX_RESPONSE_BYTES: Final = 64 * 1024 * 1024

Headers = Sequence[tuple[str, str]]


# -- errors ---------------------------------------------------------------------------


class TransportError(Exception):
    """The request did not get a complete HTTP response.

    ``maybe_processed`` is False only when the relay certainly did not act on
    the request (it never reached it, or GOAWAY said it was not processed),
    so even a non-idempotent request may be retried.

    ``retryable`` (the rule of ``TetherlessError.retryable``: the same request may succeed later with nothing
    changed here) is True for every transport error — a relay restarting, a network dropping — except
    :class:`TLSSetupError`, which only a change of the URL or the trusted CAs fixes.
    """

    maybe_processed: bool = True
    retryable: bool = True

    def __init__(self, message: str, *, maybe_processed: bool = True) -> None:
        super().__init__(message)
        self.maybe_processed = maybe_processed


class ConnectError(TransportError):
    """Could not establish the connection (refused, DNS, TLS handshake, no ALPN h2); :class:`TLSSetupError` when
    the relay's TLS and the client's URL or trusted CAs do not match."""

    def __init__(self, message: str) -> None:
        super().__init__(message, maybe_processed=False)


class TLSSetupError(ConnectError):
    """The relay's TLS and this client's URL or trust settings do not match: trying again does not help until one
    of them changes (unlike the other :class:`ConnectError` cases, which may be a relay restarting)."""

    retryable = False


class TLSTrustError(TLSSetupError):
    """The relay's TLS certificate is not trusted (unknown CA, self-signed, expired, or issued for another name).

    ``host`` is the name the certificate was checked against; trusting its CA (``ca_file``) is the way on.
    """

    def __init__(self, message: str, *, host: str) -> None:
        super().__init__(message)
        self.host = host


class NotTLSError(TLSSetupError):
    """``https://`` was asked for, but the port does not speak TLS (a plain-HTTP relay port, most likely)."""


class TLSRequiredError(TLSSetupError):
    """``http://`` was asked for, but the port speaks TLS only: the relay must be reached with ``https://``."""


class _ClosedUnansweredError(Exception):
    """A cleartext connection closed before the relay sent a byte (internal: the connect step probes for TLS)."""


class ConnectionLostError(TransportError):
    """The connection dropped, or the relay closed it (GOAWAY), while the request was open."""


class RequestTimeoutError(TransportError):
    """The response (or the next chunk of it) did not arrive in time."""


class StreamResetError(TransportError):
    """The relay reset this one stream (RST_STREAM); the connection is still usable."""


class ResponseTooLargeError(TransportError):
    """A buffered response body exceeded the caller's limit."""


# -- connection -----------------------------------------------------------------------


class Origin(msgspec.Struct, frozen=True):
    scheme: str  # "http" or "https"
    host: str
    port: int

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    @classmethod
    def parse(cls, url: str) -> Origin:
        """Parse ``http(s)://host[:port]``; raises ``ValueError`` for anything else."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"relay URL must not have a path or query: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(scheme=parts.scheme, host=parts.hostname, port=port)


class _Stream(msgspec.Struct, eq=False):
    stream_id: int
    send: trio.MemorySendChannel[bytes | BaseException]
    receive: trio.MemoryReceiveChannel[bytes | BaseException]
    headers_ready: trio.Event = msgspec.field(default_factory=trio.Event)
    status: int = 0
    headers: list[tuple[str, str]] = msgspec.field(default_factory=list)
    error: TransportError | None = None
    ended: bool = False  # the relay sent END_STREAM
    request_sent: bool = False  # we sent END_STREAM


class Response(msgspec.Struct, frozen=True):
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (lower case), or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


class StreamingResponse:
    """A response whose body is read chunk by chunk (``async for chunk in response``).

    Iteration raises :class:`TransportError` subclasses (a chunk not arriving
    within ``chunk_timeout`` is :class:`RequestTimeoutError`). Each chunk is
    acknowledged to the relay's flow control when it is handed to the caller.
    """

    def __init__(self, conn: HTTP2Connection, stream: _Stream, chunk_timeout: float | None) -> None:
        self._conn = conn
        self._stream = stream
        self._chunk_timeout = chunk_timeout
        self.status = stream.status
        self.headers = stream.headers

    def header(self, name: str) -> str | None:
        return Response(self.status, self.headers, b"").header(name)

    def __aiter__(self) -> StreamingResponse:
        return self

    async def __anext__(self) -> bytes:
        timeout = math.inf if self._chunk_timeout is None else self._chunk_timeout
        with trio.move_on_after(timeout) as scope:
            try:
                item = await self._stream.receive.receive()
            except trio.EndOfChannel:
                raise StopAsyncIteration from None
        if scope.cancelled_caught:
            raise RequestTimeoutError(f"no data for {self._chunk_timeout} s")
        if isinstance(item, BaseException):
            raise item
        await self._conn._acknowledge(self._stream, len(item))
        return item

    async def read(self, max_bytes: int = MAX_RESPONSE_BYTES) -> bytes:
        """The rest of the body; raises :class:`ResponseTooLargeError` above ``max_bytes``."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if size > max_bytes:
                raise ResponseTooLargeError(f"response body above {max_bytes} bytes")
            parts.append(chunk)
        return b"".join(parts)


class HTTP2Connection:
    """One HTTP/2 connection. Create with :func:`open_connection` or :func:`start_connection`.

    All methods may be called from many tasks at once. Cancelling a request
    resets its stream (RST_STREAM CANCEL) and leaves the connection usable.
    """

    def __init__(self, stream: trio.abc.Stream, origin: Origin) -> None:
        self.origin = origin
        self._socket = stream
        self._h2 = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self._streams: dict[int, _Stream] = {}
        self._send_lock = trio.Lock()
        # Replaced after every batch of received events: whoever waits for a
        # window, a free stream slot or a state change waits on it.
        self._progress = trio.Event()
        self._closed: TransportError | None = None
        self._goaway = False
        self._reader_done = trio.Event()

    # -- lifecycle ------------------------------------------------------------------

    @property
    def is_usable(self) -> bool:
        """False once the connection died or the relay sent GOAWAY: open a new one."""
        return self._closed is None and not self._goaway

    async def _start(self) -> None:
        self._h2.initiate_connection()
        self._h2.update_settings(
            {
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW_BYTES,
            }
        )
        self._h2.increment_flow_control_window(RECEIVE_WINDOW_BYTES - 65535)
        await self._flush()

    async def _receive_preface(self) -> None:
        """Cleartext only, before the read loop starts: wait for the relay's first bytes (its SETTINGS), so a port
        that speaks TLS or something other than HTTP/2 fails while connecting, as a :class:`ConnectError`, instead
        of as a lost request later. Costs one round trip per new cleartext connection (a TLS connection has paid
        more than that in its handshake already).

        Raises :class:`TLSRequiredError` (the bytes are a TLS record), :class:`ConnectError` (not HTTP/2), and
        ``_ClosedUnansweredError`` (closed with nothing said: the caller probes for TLS).
        """
        try:
            data = await self._socket.receive_some(READ_CHUNK_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _ClosedUnansweredError from exc
        if not data:
            raise _ClosedUnansweredError
        authority = self.origin.authority
        if data[:1] in (b"\x15", b"\x16") and data[1:2] == b"\x03":  # a TLS alert or handshake record
            raise TLSRequiredError(f"{authority} speaks TLS on that port: use https://{authority}")
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise ConnectError(f"{authority} does not speak HTTP/2 (it answered {data[:24]!r})") from exc
        for event in events:
            self._dispatch(event)
        await self._flush()

    async def aclose(self) -> None:
        """Say GOAWAY (best effort) and close the socket. Idempotent; never raises."""
        if self._closed is None:
            self._fail_all(ConnectionLostError("connection closed by the client"))
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    self._h2.close_connection()
                    await self._flush()
                except (TransportError, h2.exceptions.ProtocolError):
                    pass
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._socket)

    def _fail_all(self, error: TransportError) -> None:
        if self._closed is None:
            self._closed = error
        for stream in list(self._streams.values()):
            self._fail_stream(stream, error)
        self._wake()

    def _fail_stream(self, stream: _Stream, error: TransportError) -> None:
        if stream.error is None and not stream.ended:
            stream.error = error
            try:
                stream.send.send_nowait(error)
            except trio.ClosedResourceError:
                pass  # the caller already gave up on this stream
        stream.send.close()
        stream.headers_ready.set()
        self._streams.pop(stream.stream_id, None)

    def _wake(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    # -- socket I/O -----------------------------------------------------------------

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._h2.data_to_send()
            if not data:
                return
            try:
                await self._socket.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                error = ConnectionLostError(f"send failed: {exc.__class__.__name__}")
                self._fail_all(error)
                raise error from exc

    async def _read_loop(self) -> None:
        """Read and dispatch until the connection ends. Never raises (except Cancelled)."""
        try:
            while True:
                try:
                    data = await self._socket.receive_some(READ_CHUNK_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._fail_all(ConnectionLostError(f"connection lost: {exc.__class__.__name__}"))
                    return
                if not data:
                    self._fail_all(ConnectionLostError("relay closed the connection"))
                    return
                try:
                    events = self._h2.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self._fail_all(ConnectionLostError(f"HTTP/2 protocol error: {exc.__class__.__name__}"))
                    return
                for event in events:
                    self._dispatch(event)
                self._wake()
                try:
                    await self._flush()  # PING acks, SETTINGS acks, WINDOW_UPDATEs
                except TransportError:
                    return
        finally:
            self._reader_done.set()
            # The read loop owns the socket's end: close it so nothing leaks.
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._socket)

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                raw = event.headers or []
                stream.headers = [(str(k), str(v)) for k, v in raw if not str(k).startswith(":")]
                status = next((str(v) for k, v in raw if str(k) == ":status"), "0")
                stream.status = int(status) if status.isdigit() else 0
                stream.headers_ready.set()
        elif isinstance(event, h2.events.InformationalResponseReceived):
            pass  # 1xx: wait for the final response
        elif isinstance(event, h2.events.DataReceived):
            stream = self._streams.get(event.stream_id)
            length = event.flow_controlled_length or 0
            if stream is None or stream.error is not None:
                # Late data for a stream we gave up on: give the window back at once.
                if length and event.stream_id is not None:
                    self._safe_ack(length, event.stream_id)
                return
            data = event.data or b""
            if length > len(data):
                # Padding counts against the window but never reaches the caller.
                self._safe_ack(length - len(data), stream.stream_id)
            if data:
                try:
                    stream.send.send_nowait(data)
                except trio.ClosedResourceError:
                    self._safe_ack(length, stream.stream_id)
            elif length:
                self._safe_ack(length, stream.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.pop(event.stream_id, None)
            if stream is not None:
                stream.ended = True
                stream.headers_ready.set()
                stream.send.close()
        elif isinstance(event, h2.events.StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                code = event.error_code
                # REFUSED_STREAM guarantees the relay did no work (RFC 9113 §8.7).
                refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
                self._fail_stream(
                    stream, StreamResetError(f"stream reset by relay: {code!s}", maybe_processed=not refused)
                )
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self._goaway = True
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream in list(self._streams.values()):
            if stream.stream_id > last:
                self._fail_stream(stream, ConnectionLostError("relay is going away", maybe_processed=False))
        if event.error_code != h2.errors.ErrorCodes.NO_ERROR or not self._streams:
            self._fail_all(ConnectionLostError(f"relay closed the connection (GOAWAY {event.error_code!s})"))
            return
        # A graceful GOAWAY: the relay still finishes streams up to last_stream_id,
        # but h2's state machine refuses every frame after GOAWAY. Reopen it so
        # those responses can be read; _goaway stops us from starting new streams.
        self._h2.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN

    def _safe_ack(self, length: int, stream_id: int) -> None:
        try:
            self._h2.acknowledge_received_data(length, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            # The stream is gone; h2 has already credited the connection window.
            pass

    async def _acknowledge(self, stream: _Stream, length: int) -> None:
        if self._closed is not None:
            return
        self._safe_ack(length, stream.stream_id)
        try:
            await self._flush()
        except TransportError:
            pass  # the next receive reports the failure

    # -- requests -------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed is not None:
            raise ConnectionLostError(str(self._closed), maybe_processed=False)
        if self._goaway:
            raise ConnectionLostError("relay is going away; reconnect", maybe_processed=False)

    async def _open_stream(self, method: str, path: str, headers: Headers, end_stream: bool) -> _Stream:
        while True:
            self._check_usable()
            limit = self._h2.remote_settings.max_concurrent_streams
            if self._h2.open_outbound_streams < limit:
                break
            await self._progress.wait()
        stream_id = self._h2.get_next_available_stream_id()
        send, receive = trio.open_memory_channel[bytes | BaseException](math.inf)
        stream = _Stream(stream_id=stream_id, send=send, receive=receive)
        request_headers = [
            (":method", method),
            (":scheme", self.origin.scheme),
            (":authority", self.origin.authority),
            (":path", path),
            *((name.lower(), value) for name, value in headers),
        ]
        self._streams[stream_id] = stream
        self._h2.send_headers(stream_id, request_headers, end_stream=end_stream)
        stream.request_sent = end_stream
        await self._flush()
        return stream

    async def _send_body(self, stream: _Stream, body: bytes) -> None:
        view = memoryview(body)
        while view:
            if stream.error is not None:
                raise stream.error
            if stream.ended:
                return  # the relay answered early (e.g. 413); it does not want the rest
            self._check_alive()
            try:
                window = self._h2.local_flow_control_window(stream.stream_id)
            except h2.exceptions.StreamClosedError:
                return
            size = min(window, self._h2.max_outbound_frame_size, len(view))
            if size <= 0:
                await self._progress.wait()  # woken by WINDOW_UPDATE / SETTINGS
                continue
            self._h2_send(self._h2.send_data, stream.stream_id, bytes(view[:size]))
            view = view[size:]
            await self._flush()
        self._check_alive()
        self._h2_send(self._h2.end_stream, stream.stream_id)
        stream.request_sent = True
        await self._flush()

    def _h2_send(self, action: Callable[..., None], *args: object) -> None:
        """Run an h2 send call; a connection that closed meanwhile (GOAWAY or loss noticed by the reader while
        this task awaited a flush) is a :class:`ConnectionLostError`, never h2's ``ProtocolError``. The request
        was not complete, so the relay cannot have acted on it (``maybe_processed`` False)."""
        try:
            action(*args)
        except h2.exceptions.StreamClosedError:
            raise
        except h2.exceptions.ProtocolError as exc:
            self._check_alive()
            raise ConnectionLostError(
                f"connection closed while sending the request body ({exc.__class__.__name__})", maybe_processed=False
            ) from exc

    def _check_alive(self) -> None:
        if self._closed is not None:
            raise self._closed

    async def _reset(self, stream: _Stream) -> None:
        """Cancel a stream we no longer want; shielded so it runs even when we are cancelled."""
        self._streams.pop(stream.stream_id, None)
        stream.send.close()
        if self._closed is not None or (stream.ended and stream.request_sent):
            return
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                self._h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
                await self._flush()
            except (h2.exceptions.ProtocolError, TransportError):
                pass

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        headers: Headers = (),
        body: bytes | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        chunk_timeout: float | None = None,
    ) -> AsyncIterator[StreamingResponse]:
        """Send a request and yield the response once its headers arrived.

        ``timeout`` bounds sending the request and receiving the response
        headers; ``chunk_timeout`` bounds the wait for each body chunk (None:
        wait forever, e.g. for a long-lived stream with its own heartbeat
        watchdog). Leaving the block before the body ended resets the stream.
        Raises :class:`TransportError` subclasses. On cancellation the stream
        is reset and the connection stays usable.
        """
        stream = await self._open_stream(method, path, headers, end_stream=body is None)
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                if body is not None:
                    await self._send_body(stream, body)
                await stream.headers_ready.wait()
            if scope.cancelled_caught:
                raise RequestTimeoutError(f"no response within {timeout} s")
            if stream.status == 0:
                # Failed before the headers came.
                raise stream.error or ConnectionLostError("stream ended without a response")
            yield StreamingResponse(self, stream, chunk_timeout)
        finally:
            await self._reset(stream)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Headers = (),
        *,
        timeout: float | None = DEFAULT_TIMEOUT_SECONDS,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> Response:
        """Send one request and read the whole response.

        ``timeout`` bounds the whole exchange. Raises :class:`TransportError`
        subclasses (never for HTTP error statuses: those are responses).
        On cancellation the stream is reset and the connection stays usable.
        """
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            async with self.stream(method, path, headers, body, timeout=None) as response:
                data = await response.read(max_response_bytes)
                return Response(response.status, response.headers, data)
        assert scope.cancelled_caught
        raise RequestTimeoutError(f"no complete response within {timeout} s")


# -- opening connections ----------------------------------------------------------------


def _ssl_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context


async def _open_tcp(origin: Origin, addresses: Sequence[str]) -> trio.SocketStream:
    """TCP to ``origin``, or to the first of ``addresses`` that answers (already resolved and checked by the caller:
    connecting to them, not to a second lookup of the name, is what keeps a DNS answer that changed in between
    (rebinding) out). Raises ``OSError`` when none answers."""
    if not addresses:
        return await trio.open_tcp_stream(origin.host, origin.port)
    failure: OSError | None = None
    for address in addresses:
        try:
            return await trio.open_tcp_stream(address, origin.port)
        except OSError as exc:
            failure = exc
    assert failure is not None
    raise failure


async def _connect(
    url: str, *, ca_file: str | None, verify: bool, connect_timeout: float, addresses: Sequence[str] = ()
) -> HTTP2Connection:
    origin = Origin.parse(url)
    try:
        with trio.fail_after(connect_timeout):
            tcp = await _open_tcp(origin, addresses)
            socket_stream: trio.abc.Stream = tcp
            if origin.scheme == "https":
                tls = trio.SSLStream(tcp, _ssl_context(ca_file, verify), server_hostname=origin.host)
                try:
                    await tls.do_handshake()
                except BaseException as exc:
                    await trio.aclose_forcefully(tcp)
                    typed = _tls_failure(exc, origin)
                    if typed is not None:
                        raise typed from exc
                    raise
                if tls.selected_alpn_protocol() != "h2":
                    await trio.aclose_forcefully(tls)
                    raise ConnectError(f"{origin.authority} does not speak HTTP/2 over TLS (ALPN)")
                socket_stream = tls
            conn = HTTP2Connection(socket_stream, origin)
            try:
                await conn._start()
                if origin.scheme == "http":
                    await conn._receive_preface()
            except _ClosedUnansweredError as exc:
                await trio.aclose_forcefully(socket_stream)
                if await _speaks_tls(origin):
                    raise TLSRequiredError(
                        f"{origin.authority} speaks TLS on that port: use https://{origin.authority}"
                    ) from exc
                raise ConnectError(f"{origin.authority} closed the connection before answering HTTP/2") from exc
            except BaseException:
                await trio.aclose_forcefully(socket_stream)
                raise
            return conn
    except trio.TooSlowError as exc:
        raise ConnectError(f"connecting to {origin.authority} timed out") from exc
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        if _all_refused(exc):
            raise ConnectError(f"connection refused by {origin.authority}") from exc
        raise ConnectError(f"cannot connect to {origin.authority}: {exc}") from exc
    except ConnectionLostError as exc:
        raise ConnectError(f"cannot connect to {origin.authority}: {exc}") from exc


# OpenSSL's reasons for a handshake answered by bytes that are not TLS: a plain-HTTP port answers the ClientHello
# with an HTTP/2 GOAWAY or an HTTP/1.1 "400", whose first bytes read as a record of an unknown version or length.
_NOT_TLS_REASONS: Final = frozenset({"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"})


def _tls_failure(exc: BaseException, origin: Origin) -> ConnectError | None:
    """The typed error for a failed TLS handshake (trio raises BrokenResourceError *from* the ssl error), or None."""
    cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return TLSTrustError(
            f"the TLS certificate of {origin.authority} is not trusted ({cause.verify_message})", host=origin.host
        )
    if isinstance(cause, ssl.SSLError) and cause.reason in _NOT_TLS_REASONS:
        return NotTLSError(f"{origin.authority} does not speak TLS on that port (a plain-HTTP port: use http://)")
    return None


async def _speaks_tls(origin: Origin) -> bool:
    """Whether ``origin``'s port completes a TLS handshake: asked only after a cleartext connection was closed
    unanswered, to tell "this port wants https://" from a relay that hangs up. Nothing is sent after the
    handshake, so not checking the certificate here trusts nothing. Never raises (except Cancelled)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        tcp = await trio.open_tcp_stream(origin.host, origin.port)
    except OSError:
        return False
    try:
        await trio.SSLStream(tcp, context, server_hostname=origin.host).do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError, OSError):
        return False
    finally:
        await trio.aclose_forcefully(tcp)
    return True


def _all_refused(exc: BaseException) -> bool:
    # trio reports "all attempts failed" as an OSError caused by a group of
    # per-address errors; refused everywhere means nothing is listening.
    if isinstance(exc, ConnectionRefusedError):
        return True
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return all(_all_refused(e) for e in cause.exceptions)
    return False


async def start_connection(
    nursery: trio.Nursery,
    url: str,
    *,
    ca_file: str | None = None,
    verify: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    addresses: Sequence[str] = (),
) -> HTTP2Connection:
    """Connect and run the connection's reader task in ``nursery``.

    For owners that outlive one connection (the SDK reconnects into the same
    nursery). ``addresses``: connect to these (in order) instead of resolving
    the URL's host; TLS still checks the certificate against the host. The
    caller must :meth:`~HTTP2Connection.aclose` it. Raises
    :class:`ConnectError`; cancellation while connecting closes the socket.
    """
    conn = await _connect(url, ca_file=ca_file, verify=verify, connect_timeout=connect_timeout, addresses=addresses)
    nursery.start_soon(conn._read_loop)
    return conn


@contextmanager
def collapse_single_group() -> Iterator[None]:
    """Re-raise the lone exception of a (nested) exception group as itself.

    trio nurseries wrap every error in an ``ExceptionGroup``; callers of the
    SDK should be able to write ``except RemoteError`` around a block that
    happens to run a nursery. Groups of several errors are left alone.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if error is group:
            raise
        raise error from error.__cause__


@asynccontextmanager
async def open_connection(
    url: str,
    *,
    ca_file: str | None = None,
    verify: bool = True,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
) -> AsyncIterator[HTTP2Connection]:
    """``async with open_connection(url) as conn:`` — a connection closed when the block ends."""
    with collapse_single_group():
        async with trio.open_nursery() as nursery:
            conn = await start_connection(nursery, url, ca_file=ca_file, verify=verify, connect_timeout=connect_timeout)
            try:
                yield conn
            finally:
                await conn.aclose()


def header_value(headers: Mapping[str, str] | Headers, name: str) -> str | None:
    """The last value of ``name`` (case-insensitive) in a header list or mapping."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    found = None
    for key, value in items:
        if key.lower() == name:
            found = value
    return found


#: Short alias: the name callers most often look for.
ConnectionLost = ConnectionLostError
