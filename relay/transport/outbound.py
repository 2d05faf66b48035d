"""Outbound HTTP/1.1 for server-to-server (federation) requests: h11 over trio, TLS for https.

Implements :class:`relay.services.PeerTransport`. Defensive by design, since
peers are untrusted: one deadline bounds the whole exchange (connect, TLS,
request, response), the response body is capped, and any protocol
violation, timeout or oversize answer becomes
:class:`~relay.services.PeerUnreachableError` (a name the resolver says does
not exist: its subclass :class:`~relay.services.PeerNameNotFoundError`). Idle
keep-alive connections are reused per base URL (a few at most); a connection
that misbehaves once is closed. Which addresses may be connected to is
decided by the federation service: it resolves names with
:meth:`OutboundClient.resolve`, checks the answer, and passes the checked
addresses back as ``connect_to``, which is all a new connection then uses
(no second lookup for DNS to change).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

from relay.services import PeerNameNotFoundError, PeerResponse, PeerUnreachableError

MAX_IDLE_PER_PEER: Final = 4
MAX_RESPONSE_HEADERS_BYTES: Final = 64 * 1024
READ_BYTES: Final = 64 * 1024
USER_AGENT: Final = "tetherless-federation/1"
# getaddrinfo's answers that the name does not exist (NXDOMAIN) or has no address (NODATA; glibc and the BSDs
# define EAI_NODATA, others fold it into EAI_NONAME). EAI_AGAIN (no answer yet), EAI_FAIL (SERVFAIL, a DNSSEC
# failure) and the rest say nothing about the name: those stay "unreachable", retried.
NO_SUCH_NAME: Final = frozenset(
    code for code in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)) if code is not None
)


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEADERS_BYTES)

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


class OutboundClient:
    """HTTP/1.1 client for peer relays. ``ssl_context`` verifies certificates (system trust store by default)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._idle: dict[str, list[_Connection]] = {}

    async def aclose(self) -> None:
        """Close every idle connection. Idempotent."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                await conn.aclose()

    async def resolve(self, host: str, port: int, *, timeout_seconds: float) -> list[str]:
        """Every TCP address of ``host`` (system resolver); see :class:`relay.services.PeerTransport`.

        Raises :class:`PeerNameNotFoundError` for an answer in :data:`NO_SUCH_NAME`, else
        :class:`PeerUnreachableError`. Cancellation abandons the lookup (its thread finishes alone).
        """
        with trio.move_on_after(timeout_seconds):
            try:
                infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                if exc.errno in NO_SUCH_NAME:
                    raise PeerNameNotFoundError(f"{host} does not resolve: {exc.strerror}") from exc
                raise PeerUnreachableError(f"cannot resolve {host}: {exc}") from exc
            except (OSError, UnicodeError) as exc:  # IDNA failures are UnicodeError
                raise PeerUnreachableError(f"cannot resolve {host}: {exc}") from exc
            return list(dict.fromkeys(str(info[4][0]) for info in infos))
        raise PeerUnreachableError(f"cannot resolve {host} within {timeout_seconds}s")

    async def request(
        self,
        base_url: str,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        timeout_seconds: float,
        max_response_bytes: int,
        connect_to: Sequence[str] = (),
    ) -> PeerResponse:
        """One request; see :class:`relay.services.PeerTransport`. Raises ``PeerUnreachableError``."""
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PeerUnreachableError(f"unusable peer URL {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with trio.move_on_after(timeout_seconds) as scope:
            conn = self._take_idle(base_url)
            reused = conn is not None
            try:
                if conn is None:
                    conn = await self._connect(parts.scheme, parts.hostname, port, connect_to)
                try:
                    response, reusable = await self._exchange(
                        conn, parts.netloc, method, path, headers, body, max_response_bytes
                    )
                except PeerUnreachableError:
                    await conn.aclose()
                    if not reused:
                        raise
                    # A kept-alive connection the peer had closed: try once on a fresh one.
                    conn = await self._connect(parts.scheme, parts.hostname, port, connect_to)
                    response, reusable = await self._exchange(
                        conn, parts.netloc, method, path, headers, body, max_response_bytes
                    )
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
                if conn is not None:
                    await conn.aclose()
                raise PeerUnreachableError(f"{type(exc).__name__}: {exc}") from exc
            except BaseException:
                if conn is not None:
                    await conn.aclose()
                raise
            if not (reusable and self._give_back(base_url, conn)):
                await conn.aclose()
            return response
        assert scope.cancelled_caught
        raise PeerUnreachableError(f"no complete answer within {timeout_seconds}s")

    def _take_idle(self, base_url: str) -> _Connection | None:
        conns = self._idle.get(base_url)
        return conns.pop() if conns else None

    def _give_back(self, base_url: str, conn: _Connection) -> bool:
        """Keep ``conn`` for reuse; False when enough are idle already (the caller closes it)."""
        conns = self._idle.setdefault(base_url, [])
        if len(conns) >= MAX_IDLE_PER_PEER:
            return False
        conns.append(conn)
        return True

    async def _connect(self, scheme: str, host: str, port: int, connect_to: Sequence[str]) -> _Connection:
        """A connection to ``host`` — to the first of ``connect_to`` that answers, when given (no DNS then)."""
        stream: trio.abc.Stream | None = None
        error: OSError | None = None
        for target in connect_to or (host,):
            try:
                stream = await trio.open_tcp_stream(target, port)
                break
            except OSError as exc:
                error = exc
        if stream is None:
            assert error is not None
            raise PeerUnreachableError(f"cannot connect to {host}: {error.strerror or error}") from error
        if scheme == "https":
            tls = trio.SSLStream(stream, self._ssl_context, server_hostname=host, https_compatible=True)
            await tls.do_handshake()
            stream = tls
        return _Connection(stream)

    async def _exchange(
        self,
        conn: _Connection,
        authority: str,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        max_response_bytes: int,
    ) -> tuple[PeerResponse, bool]:
        h = conn.h11
        request_headers = [("host", authority.lower()), ("user-agent", USER_AGENT)]
        request_headers += [(k, v) for k, v in headers if k.lower() not in ("host", "content-length")]
        request_headers.append(("content-length", str(len(body))))
        try:
            data = h.send(h11.Request(method=method, target=path, headers=request_headers))
            data += h.send(h11.Data(data=body)) if body else b""
            data += h.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise PeerUnreachableError(f"cannot send: {exc}") from exc
        await conn.stream.send_all(data)
        status = 0
        response_headers: list[tuple[str, str]] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                raise PeerUnreachableError(f"protocol error: {exc}") from exc
            if event is h11.NEED_DATA:
                received = await conn.stream.receive_some(READ_BYTES)
                if not received:
                    raise PeerUnreachableError("the peer closed the connection")
                try:
                    h.receive_data(bytes(received))
                except h11.RemoteProtocolError as exc:
                    raise PeerUnreachableError(f"protocol error: {exc}") from exc
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_response_bytes:
                    raise PeerUnreachableError(f"answer larger than {max_response_bytes} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise PeerUnreachableError("the peer closed the connection mid-answer")
        reusable = h.our_state is h11.DONE and h.their_state is h11.DONE
        if reusable:
            try:
                h.start_next_cycle()
            except h11.LocalProtocolError:
                reusable = False
        return PeerResponse(status, response_headers, b"".join(chunks)), reusable
