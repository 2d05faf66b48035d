"""The listener: accept, connection caps, TLS, protocol detection, graceful drain."""

from __future__ import annotations

import errno
import ssl
from typing import Final

import trio

from relay import metrics
from relay.api.http import Handler
from relay.config import Config
from relay.transport.base import (
    BODY_COMMIT_SECONDS,
    CLOSE_FLUSH_SECONDS,
    HTTP2,
    HTTP11,
    Connection,
    StreamsBody,
    TransportStatistics,
    logger,
    never_streams_body,
)
from relay.transport.http2 import HTTP2Connection
from relay.transport.http11 import HTTP11Connection

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ALPN_PROTOCOLS: Final = ["h2", "http/1.1"]
_DETECT_RECEIVE_BYTES: Final = 64 * 1024
# accept() failures that mean "out of a resource right now": wait and retry
# rather than let one bad moment end the listener.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_RETRY_SECONDS: Final = 0.1


def ssl_context(config: Config) -> ssl.SSLContext:
    """A server TLS context for ``config.tls_cert``/``tls_key`` offering ALPN h2 and http/1.1.

    Raises ``OSError`` / ``ssl.SSLError`` when the files cannot be read or do
    not match, so a misconfiguration fails at startup, not per connection.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 9113 §9.2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    context.options |= ssl.OP_NO_COMPRESSION  # RFC 9113 §9.2.1
    return context


def _peer(stream: trio.SocketStream) -> tuple[str, str]:
    """(ip, "ip:port") of the remote end; IPv6 addresses are bracketed in the second."""
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "unknown", "unknown:0"
    ip, port = str(address[0]), int(address[1])
    return ip, (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")


async def _close_stream(stream: trio.abc.Stream) -> None:
    # aclose() always closes the resource, even when it times out or is
    # cancelled; the timeout only bounds a TLS close_notify to a dead peer.
    with trio.move_on_after(CLOSE_FLUSH_SECONDS):
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class Server:
    """The relay's HTTP server: HTTP/1.1 and HTTP/2 (TLS with ALPN, or cleartext h2c prior knowledge) on one port.

    Construct once, run :meth:`serve` in a nursery, call :meth:`drain` to
    stop gracefully (or cancel :meth:`serve` to stop at once). Raises
    ``OSError``/``ssl.SSLError`` from the constructor for unusable TLS files.

    ``streams_body(method, path)`` is asked once per request, after its head:
    True hands the handler the body as a ``Request.body_stream`` as it
    arrives (no ``max_body_bytes`` cap, an inactivity timeout) instead of
    buffering it first. It must be cheap and must not raise.
    """

    def __init__(self, config: Config, handler: Handler, *, streams_body: StreamsBody = never_streams_body) -> None:
        self._config = config
        self._handler = handler
        self._streams_body = streams_body
        self._peak_closed_body_bytes = 0  # peak_connection_body_bytes of connections already closed
        self._ssl_context = ssl_context(config) if config.tls else None
        self._port = 0
        self._open = 0  # accepted and not closed, including still in TLS / detection
        self._per_ip: dict[str, int] = {}
        self._connections: set[Connection] = set()
        self._rejected = 0
        self._draining = False
        self._accept_scope: trio.CancelScope | None = None
        self._connections_scope: trio.CancelScope | None = None
        self._closed_lot = trio.lowlevel.ParkingLot()  # drain waits here for connections to end
        self._stopped: trio.Event | None = None
        self._bound: list[trio.SocketListener] = []

    async def bind(self) -> int:
        """Open the listening sockets now (before :meth:`serve`) and return the bound port.

        Lets a caller refuse to start with a clear reason (port in use, no
        permission) before it opens a database. Raises ``OSError``. Idempotent.
        Cancellation closes what was opened.
        """
        if not self._bound:
            self._bound = await trio.open_tcp_listeners(self._config.listen_port, host=self._config.listen_host)
            self._port = int(self._bound[0].socket.getsockname()[1])
        return self._port

    async def close_unserved(self) -> None:
        """Close sockets opened by :meth:`bind` when :meth:`serve` will never run. Idempotent."""
        bound, self._bound = self._bound, []
        for listener in bound:
            await listener.aclose()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); 0 before :meth:`serve` is listening."""
        return self._port

    def statistics(self) -> TransportStatistics:
        """A snapshot of connection, stream and buffer counts. Never blocks."""
        connections = list(self._connections)
        buffered = [connection.buffered_bytes for connection in connections]
        peaks = [connection.peak_body_buffered_bytes for connection in connections]
        return TransportStatistics(
            connections_open=self._open,
            connections_http1=sum(1 for c in connections if c.protocol == HTTP11),
            connections_http2=sum(1 for c in connections if c.protocol == HTTP2),
            streams_open=sum(connection.open_streams for connection in connections),
            buffered_bytes=sum(buffered),
            max_connection_buffered_bytes=max(buffered, default=0),
            connections_rejected=self._rejected,
            draining=self._draining,
            body_buffered_bytes=sum(connection.body_buffered_bytes for connection in connections),
            peak_connection_body_bytes=max([self._peak_closed_body_bytes, *peaks]),
        )

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``config.listen_host:listen_port`` and serve until drained or cancelled.

        Calls ``task_status.started(port)`` once listening. Returns after
        :meth:`drain` has closed every connection. Cancellation closes the
        listener and every connection at once. Raises ``OSError`` if the
        address cannot be bound, ``RuntimeError`` if already serving.
        """
        if self._stopped is not None:
            raise RuntimeError("Server.serve() can run only once")
        self._stopped = trio.Event()
        listeners: list[trio.SocketListener] = []
        try:
            await self.bind()
            listeners, self._bound = self._bound, []
            logger.debug("listening on %s:%d", self._config.listen_host, self._port)
            async with trio.open_nursery() as connections:
                self._connections_scope = connections.cancel_scope
                async with trio.open_nursery() as acceptors:
                    self._accept_scope = acceptors.cancel_scope
                    if self._draining:
                        acceptors.cancel_scope.cancel()
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, connections)
                    task_status.started(self._port)
                # Accepting stopped (drain): free the port now, while
                # connections finish.
                for listener in listeners:
                    await listener.aclose()
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()
            self._stopped.set()

    async def drain(self) -> None:
        """Stop accepting, ask every connection to close gracefully, then return when :meth:`serve` has.

        HTTP/2 connections get GOAWAY(NO_ERROR), HTTP/1.1 ones ``Connection:
        close`` (idle ones are closed at once); in-flight requests may finish
        for up to ``drain_timeout_seconds``, streaming responses of unknown
        length are ended cleanly at once. Streamed request bodies still
        arriving when the timeout is near are cut (``BodyIncompleteError``)
        with a reserve left (half the timeout, at most ``BODY_COMMIT_SECONDS``)
        for their handlers to commit what arrived and answer. What is still
        open after the timeout is closed forcefully. Idempotent; returns at
        once if :meth:`serve` is not running. If cancelled, the drain
        continues in the background.
        """
        self._draining = True
        if self._stopped is None or self._stopped.is_set():
            return
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        for connection in list(self._connections):
            connection.start_drain()
        reserve = min(self._config.drain_timeout_seconds / 2, BODY_COMMIT_SECONDS)
        with trio.move_on_after(self._config.drain_timeout_seconds - reserve):
            while self._open:
                await self._closed_lot.park()
        if self._open:
            for connection in list(self._connections):
                connection.cut_request_bodies("the server is shutting down")
            with trio.move_on_after(reserve):
                while self._open:
                    await self._closed_lot.park()
        if self._open:
            logger.debug("drain timeout: closing %d connections forcefully", self._open)
        if self._connections_scope is not None:
            self._connections_scope.cancel()
        await self._stopped.wait()

    # -- accepting -------------------------------------------------------------------
    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                logger.error("accept failed (%s); retrying in %.1f s", exc, _ACCEPT_RETRY_SECONDS)
                await trio.sleep(_ACCEPT_RETRY_SECONDS)
                continue
            ip, client = _peer(stream)
            reason = self._over_cap(ip)
            if reason is not None:
                self._rejected += 1
                metrics.connections_rejected_total.labels(reason=reason).inc()
                logger.debug("refused connection from %s: %s", client, reason)
                await trio.aclose_forcefully(stream)
                continue
            self._open += 1
            self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
            nursery.start_soon(self._serve_connection, stream, ip, client)

    def _over_cap(self, ip: str) -> str | None:
        if self._open >= self._config.max_connections:
            return "max_connections"
        if self._per_ip.get(ip, 0) >= self._config.max_connections_per_ip:
            return "max_connections_per_ip"
        return None

    # -- one connection ------------------------------------------------------------------
    async def _serve_connection(self, stream: trio.SocketStream, ip: str, client: str) -> None:
        started_at = trio.current_time()
        transport: trio.abc.Stream = stream
        connection: Connection | None = None
        try:
            scheme = "http"
            initial = b""
            if self._ssl_context is not None:
                scheme = "https"
                transport = trio.SSLStream(stream, self._ssl_context, server_side=True, https_compatible=True)
                protocol = await self._handshake(transport, client)
            else:
                protocol, initial = await self._detect(stream, client, started_at)
            if protocol is None:
                return
            kind = HTTP2Connection if protocol == HTTP2 else HTTP11Connection
            connection = kind(
                transport,
                config=self._config,
                handler=self._handler,
                client=client,
                scheme=scheme,
                initial=initial,
                started_at=started_at,
                streams_body=self._streams_body,
            )
            self._connections.add(connection)
            metrics.connections_total.labels(protocol=protocol).inc()
            metrics.connections_open.labels(protocol=protocol).inc()
            logger.debug("connection from %s speaks %s", client, protocol)
            if self._draining:
                connection.start_drain()
            await connection.run()
        except Exception:
            # A transport bug: lose this connection, never the server.
            logger.exception("connection from %s failed", client)
        finally:
            if connection is not None:
                self._connections.discard(connection)
                self._peak_closed_body_bytes = max(self._peak_closed_body_bytes, connection.peak_body_buffered_bytes)
                metrics.connections_open.labels(protocol=connection.protocol).dec()
            self._open -= 1
            remaining = self._per_ip.get(ip, 1) - 1
            if remaining:
                self._per_ip[ip] = remaining
            else:
                self._per_ip.pop(ip, None)
            self._closed_lot.unpark_all()
            await _close_stream(transport)
            logger.debug("connection from %s closed", client)

    async def _handshake(self, transport: trio.SSLStream[trio.SocketStream], client: str) -> str | None:
        """TLS handshake under its timeout; the protocol ALPN chose, or None if the handshake failed."""
        with trio.move_on_after(self._config.tls_handshake_timeout_seconds):
            try:
                await transport.do_handshake()
            except trio.BrokenResourceError as exc:
                metrics.protocol_errors_total.labels(kind="tls_handshake").inc()
                logger.debug("TLS handshake with %s failed: %r", client, exc.__cause__ or exc)
                return None
            return HTTP2 if transport.selected_alpn_protocol() == "h2" else HTTP11
        self._rejected += 1
        metrics.connections_rejected_total.labels(reason="tls_handshake_timeout").inc()
        logger.debug("TLS handshake with %s timed out", client)
        return None

    async def _detect(self, stream: trio.SocketStream, client: str, started_at: float) -> tuple[str | None, bytes]:
        """Read until the bytes are, or cannot be, the HTTP/2 preface; (protocol or None, bytes read)."""
        received = b""
        with trio.move_on_at(started_at + self._config.header_timeout_seconds):
            while len(received) < len(H2_PREFACE) and H2_PREFACE.startswith(received):
                try:
                    chunk = await stream.receive_some(_DETECT_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return None, b""
                if not chunk:
                    return (HTTP11, received) if received else (None, b"")
                received += chunk
            return (HTTP2 if received.startswith(H2_PREFACE) else HTTP11), received
        metrics.protocol_errors_total.labels(kind="header_timeout").inc()
        logger.debug("connection from %s sent no request within the header timeout", client)
        return None, b""
