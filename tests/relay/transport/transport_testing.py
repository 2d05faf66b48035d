"""Helpers for the transport tests: a dummy application, a running server, raw h2/h11 clients.

Streams opened through these helpers are closed when :func:`run` ends, even
when an assertion fails first (an unclosed socket would fail the run with a
ResourceWarning). Fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import h11
import trio
from hyperframe.frame import Frame, GoAwayFrame

from relay.api.http import Request, Response
from relay.config import Config
from relay.transport import Server

TEST_TIMEOUT_SECONDS = 60.0
# How long a test waits for the server to do something (close, answer, count): far above what it needs even
# on a loaded two-core host, so only a server that never does it fails. Not a measure of speed.
WAIT_SECONDS = 20.0
# By when a sub-second timeout under test has fired, even on a loaded host; below every default timeout
# (header and TLS handshake 10 s, body 30 s, idle 120 s), so another timeout firing is not taken for it.
FIRES_WITHIN_SECONDS = 5.0


_open_streams: list[trio.abc.Stream] = []


async def open_stream(port: int) -> trio.SocketStream:
    """A TCP connection to 127.0.0.1:``port``, closed by :func:`run` at the latest."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    _open_streams.append(stream)
    return stream


def run(async_fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float = TEST_TIMEOUT_SECONDS) -> Any:
    """Run ``async_fn(*args)`` in a fresh trio run, failing after ``timeout`` seconds."""

    async def main() -> Any:
        try:
            with trio.fail_after(timeout):
                return await async_fn(*args)
        finally:
            while _open_streams:
                await trio.aclose_forcefully(_open_streams.pop())

    return trio.run(main)


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
    """Poll ``predicate`` until it holds (for counters that have no event to wait on)."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the state is a plain counter, there is no event
            await trio.sleep(0.01)


def make_config(**overrides: Any) -> Config:
    values: dict[str, Any] = {"listen": "127.0.0.1:0", "drain_timeout_seconds": 3.0}
    values.update(overrides)
    return Config(**values)


# -- the dummy application -------------------------------------------------------------
@dataclass
class App:
    """Routes: /echo, /big?bytes=N, /stream?n=N, /forever, /slow?seconds=S, /boom, /bad-header, /infinite-chunks."""

    requests: list[Request] = field(default_factory=list)
    handlers_cancelled: int = 0
    streams_closed: int = 0  # response iterators that got aclose()d or finished
    chunks_pulled: int = 0
    slow_started: trio.Event = field(default_factory=trio.Event)
    stream_started: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, request: Request) -> Response:
        self.requests.append(request)
        query = dict(part.partition("=")[::2] for part in request.query.split("&") if part)
        if request.path == "/echo":
            info = {
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "version": request.http_version,
                "scheme": request.scheme,
                "length": len(request.body),
                "headers": [list(pair) for pair in request.headers],
            }
            return Response(200, [("content-type", "application/json"), ("x-info", json.dumps(info))], request.body)
        if request.path == "/big":
            return Response(200, [("content-type", "application/octet-stream")], b"x" * int(query["bytes"]))
        if request.path == "/stream":
            return Response(200, [("content-type", "text/plain")], stream=self._chunks(int(query.get("n", "3"))))
        if request.path == "/forever":
            return Response(200, [("content-type", "text/plain")], stream=self._chunks(math.inf, delay=0.05))
        if request.path == "/infinite-chunks":
            return Response(200, [], stream=self._chunks(math.inf, size=64 * 1024))
        if request.path == "/slow":
            self.slow_started.set()
            try:
                await trio.sleep(float(query.get("seconds", "0.5")))
            except trio.Cancelled:
                self.handlers_cancelled += 1
                raise
            return Response(200, [], b"slow done")
        if request.path == "/boom":
            raise RuntimeError("handler failure for the test")
        if request.path == "/bad-header":
            return Response(200, [("x-bad", "line\r\nbreak")], b"never")
        return Response(404, [], b"")

    async def _chunks(self, count: float, *, delay: float = 0.0, size: int = 0) -> AsyncIterator[bytes]:
        self.stream_started.set()
        index = 0
        try:
            while index < count:
                self.chunks_pulled += 1
                yield (b"c" * size) if size else f"chunk{index}\n".encode()
                index += 1
                if delay:
                    await trio.sleep(delay)
        finally:
            self.streams_closed += 1


@asynccontextmanager
async def serving(config: Config, app: Callable[[Request], Awaitable[Response]]) -> AsyncIterator[Server]:
    """A running server on 127.0.0.1; cancelled (not drained) on exit."""
    server = Server(config, app)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


# -- raw HTTP/2 client ---------------------------------------------------------------------
@dataclass
class H2Response:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset_code: int | None = None


class H2Client:
    """An h2 client over a trio TCP stream that records every event it sees."""

    def __init__(self, stream: trio.abc.Stream, *, validate: bool = True) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=validate,
                normalize_outbound_headers=validate,
            )
        )
        self.responses: dict[int, H2Response] = {}
        self.events: list[h2.events.Event] = []
        # GOAWAY frames are taken out before h2 sees them: h2 refuses every
        # frame after a GOAWAY, but a graceful server GOAWAY is followed by
        # the in-flight responses.
        self.goaways: list[GoAwayFrame] = []
        self._frames = bytearray()
        self.closed = False
        self.auto_ack = True

    @classmethod
    async def connect(
        cls, port: int, *, settings: dict[int, int] | None = None, validate: bool = True, connection_window: int = 0
    ) -> H2Client:
        return await cls.start(
            await open_stream(port), settings=settings, validate=validate, connection_window=connection_window
        )

    @classmethod
    async def start(
        cls,
        stream: trio.abc.Stream,
        *,
        settings: dict[int, int] | None = None,
        validate: bool = True,
        connection_window: int = 0,
    ) -> H2Client:
        """Speak HTTP/2 over an already connected stream (e.g. TLS after ALPN)."""
        client = cls(stream, validate=validate)
        if settings:
            client.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)  # type: ignore[arg-type]
        client.conn.initiate_connection()
        if connection_window:
            client.conn.increment_flow_control_window(connection_window)
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Sequence[tuple[str, str]] = (),
        *,
        end_stream: bool = True,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        pseudo = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "localhost")]
        all_headers = [(name.encode(), value.encode()) for name, value in [*pseudo, *headers]]
        self.conn.send_headers(stream_id, all_headers, end_stream=end_stream and not body)
        self.responses[stream_id] = H2Response()
        if body:
            await self.send_body(stream_id, body, end_stream=end_stream)
        await self.flush()
        return stream_id

    async def send_body(self, stream_id: int, body: bytes, *, end_stream: bool = True) -> None:
        view = memoryview(body)
        while view:
            size = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size, len(view))
            if size <= 0:
                await self.flush()
                await self.receive_once()
                continue
            self.conn.send_data(stream_id, view[:size].tobytes())
            view = view[size:]
        if end_stream:
            self.conn.end_stream(stream_id)
        await self.flush()

    async def receive_once(self) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.closed = True
            return
        self._frames += data
        for_h2 = bytearray()
        while len(self._frames) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(bytes(self._frames[:9])))
            if len(self._frames) < 9 + length:
                break
            raw = bytes(self._frames[: 9 + length])
            del self._frames[: 9 + length]
            if isinstance(frame, GoAwayFrame):
                frame.parse_body(memoryview(raw[9:]))
                self.goaways.append(frame)
            else:
                for_h2 += raw
        if for_h2:
            for event in self.conn.receive_data(bytes(for_h2)):
                self.events.append(event)
                self._record(event)
        await self.flush()

    def _record(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            response = self.responses.setdefault(event.stream_id, H2Response())
            for name, value in event.headers:
                response.headers[bytes(name).decode()] = bytes(value).decode()
            response.status = int(response.headers[":status"])
        elif isinstance(event, h2.events.DataReceived):
            response = self.responses.setdefault(event.stream_id, H2Response())
            response.body += event.data or b""
            if self.auto_ack and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.responses.setdefault(event.stream_id, H2Response()).ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.responses.setdefault(event.stream_id, H2Response()).reset_code = int(event.error_code)

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Read until ``predicate()`` holds; fails if the connection closes first."""
        while not predicate():
            if self.closed:
                raise AssertionError("connection closed before the condition held")
            await self.receive_once()

    async def response(self, stream_id: int) -> H2Response:
        response = self.responses[stream_id]
        await self.until(lambda: response.ended or response.reset_code is not None)
        return response

    async def goaway(self) -> GoAwayFrame:
        """Read until a GOAWAY arrives; the first one."""
        while not self.goaways:
            if self.closed:
                raise AssertionError("connection closed without GOAWAY")
            await self.receive_once()
        return self.goaways[0]

    async def read_until_closed(self) -> None:
        while not self.closed:
            await self.receive_once()

    async def aclose(self) -> None:
        await self.stream.aclose()


# -- raw HTTP/1.1 client ---------------------------------------------------------------------
@dataclass
class H11Response:
    status: int
    headers: dict[str, str]
    body: bytes


class H11Client:
    """An h11 client over a trio TCP stream (keep-alive aware)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> H11Client:
        return cls(await open_stream(port))

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()
    ) -> H11Response:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        all_headers = [("host", "localhost"), *headers]
        if body and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
            all_headers.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=path, headers=all_headers)) or b""
        if body:
            data += self.conn.send(h11.Data(data=body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)
        return await self.read_response()

    async def read_response(self) -> H11Response:
        head: h11.Response | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {name.decode(): value.decode() for name, value in head.headers}
                return H11Response(head.status_code, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("connection closed before the response completed")

    async def aclose(self) -> None:
        await self.stream.aclose()


async def raw_exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    """Send raw bytes, return everything received until the server closes."""
    stream = await open_stream(port)
    try:
        if data:
            await stream.send_all(data)
        received = bytearray()
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            received += chunk
            if not read_until_close:
                break
        return bytes(received)
    finally:
        await stream.aclose()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Split one Content-Length-framed HTTP/1.1 response (the first, if several)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return status, headers, rest[:length]


def problem_code(body: bytes | bytearray) -> str:
    return str(json.loads(bytes(body))["code"])
