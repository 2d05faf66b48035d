"""The HTTP/2 client connection against a scripted in-memory h2 server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
import trio
import trio.testing
from hyperframe.frame import GoAwayFrame

from protocol.client.http import (
    ConnectionLostError,
    HTTP2Connection,
    Origin,
    RequestTimeoutError,
    StreamResetError,
)

Handler = Callable[["FakeServer", int, list[tuple[str, str]], bytes], Awaitable[None]]


class FakeServer:
    """A tiny h2 server: calls ``handler(server, stream_id, headers, body)`` for every complete request."""

    def __init__(self, stream: trio.abc.Stream, handler: Handler) -> None:
        self.stream = stream
        self.handler = handler
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        self.bodies: dict[int, bytearray] = {}
        self.headers: dict[int, list[tuple[str, str]]] = {}
        self.window_changed = trio.Event()
        self.requests_seen = 0
        self.send_lock = trio.Lock()

    async def flush(self) -> None:
        async with self.send_lock:
            data = self.h2.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def run(self, nursery: trio.Nursery) -> None:
        self.h2.initiate_connection()
        await self.flush()
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            for event in self.h2.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.headers[event.stream_id] = [(str(k), str(v)) for k, v in event.headers or []]
                    self.bodies[event.stream_id] = bytearray()
                elif isinstance(event, h2.events.DataReceived):
                    self.bodies[event.stream_id] += event.data or b""
                    self.h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self.requests_seen += 1
                    sid = event.stream_id
                    nursery.start_soon(self.handler, self, sid, self.headers[sid], bytes(self.bodies[sid]))
                elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                    self.window_changed.set()
                    self.window_changed = trio.Event()
            await self.flush()

    async def goaway(
        self, last_stream_id: int, error_code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR
    ) -> None:
        # Serialised by hand, as the relay does: h2's own close_connection()
        # would stop the server's state machine from finishing open streams.
        frame = GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=error_code)
        async with self.send_lock:
            await self.stream.send_all(self.h2.data_to_send() + frame.serialize())

    async def respond(self, stream_id: int, status: int, body: bytes = b"", *, end: bool = True) -> None:
        self.h2.send_headers(stream_id, [(":status", str(status))], end_stream=not body and end)
        await self.flush()
        view = memoryview(body)
        while view:
            size = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size, len(view))
            if size <= 0:
                await self.window_changed.wait()
                continue
            self.h2.send_data(stream_id, bytes(view[:size]), end_stream=end and size == len(view))
            view = view[size:]
            await self.flush()


async def echo(server: FakeServer, stream_id: int, headers: list[tuple[str, str]], body: bytes) -> None:
    path = dict(headers)[":path"]
    await server.respond(stream_id, 200, path.encode() + b":" + body)


def connected(handler: Handler) -> tuple[HTTP2Connection, FakeServer]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    return HTTP2Connection(client_stream, Origin("http", "relay.test", 80)), FakeServer(server_stream, handler)


async def start(nursery: trio.Nursery, handler: Handler) -> tuple[HTTP2Connection, FakeServer]:
    conn, server = connected(handler)
    nursery.start_soon(server.run, nursery)
    await conn._start()
    nursery.start_soon(conn._read_loop)
    return conn, server


async def test_concurrent_requests_are_multiplexed() -> None:
    order: list[str] = []
    slow_seen, fast_answered = trio.Event(), trio.Event()

    async def slow_first(server: FakeServer, sid: int, headers: list[tuple[str, str]], body: bytes) -> None:
        if dict(headers)[":path"] == "/slow":
            slow_seen.set()
            # Answered only after /fast: a connection that sent one request at a time would never get here.
            with trio.fail_after(20):
                await fast_answered.wait()
        order.append(dict(headers)[":path"])
        await server.respond(sid, 200, b"ok")
        if dict(headers)[":path"] == "/fast":
            fast_answered.set()

    async with trio.open_nursery() as nursery:
        conn, _ = await start(nursery, slow_first)
        async with trio.open_nursery() as requests:
            requests.start_soon(conn.request, "GET", "/slow")
            await slow_seen.wait()
            response = await conn.request("GET", "/fast")
            assert response.status == 200
        assert order == ["/fast", "/slow"]
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_large_bodies_both_ways_respect_flow_control() -> None:
    body = bytes(range(256)) * (5 * 1024 * 4)  # 5 MiB: above both default and our receive window
    async with trio.open_nursery() as nursery:
        conn, _ = await start(nursery, echo)
        response = await conn.request("POST", "/echo", body)
        assert response.status == 200
        assert response.body == b"/echo:" + body
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_streaming_response_yields_chunks() -> None:
    async def chunks(server: FakeServer, sid: int, headers: list[tuple[str, str]], body: bytes) -> None:
        await server.respond(sid, 200, b"first", end=False)
        await trio.sleep(0.05)
        server.h2.send_data(sid, b"second", end_stream=True)
        await server.flush()

    async with trio.open_nursery() as nursery:
        conn, _ = await start(nursery, chunks)
        async with conn.stream("GET", "/stream") as response:
            assert response.status == 200
            assert [chunk async for chunk in response] == [b"first", b"second"]
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_timeout_resets_the_stream_and_keeps_the_connection() -> None:
    async def maybe_never(server: FakeServer, sid: int, headers: list[tuple[str, str]], body: bytes) -> None:
        if dict(headers)[":path"] == "/never":
            await trio.sleep_forever()
        await server.respond(sid, 200, b"ok")

    async with trio.open_nursery() as nursery:
        conn, _ = await start(nursery, maybe_never)
        with pytest.raises(RequestTimeoutError):
            await conn.request("GET", "/never", timeout=0.1)
        assert conn.is_usable
        assert (await conn.request("GET", "/fine")).body == b"ok"
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_graceful_goaway_finishes_open_streams_then_refuses_new_ones() -> None:
    async def goaway_then_answer(server: FakeServer, sid: int, headers: list[tuple[str, str]], body: bytes) -> None:
        await server.goaway(sid)
        await trio.sleep(0.05)
        await server.respond(sid, 200, b"finished")

    async with trio.open_nursery() as nursery:
        conn, _ = await start(nursery, goaway_then_answer)
        response = await conn.request("GET", "/drain")
        assert response.body == b"finished"
        assert not conn.is_usable
        with pytest.raises(ConnectionLostError) as info:
            await conn.request("GET", "/again")
        assert not info.value.maybe_processed
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_goaway_with_an_error_fails_open_streams() -> None:
    async def fail(server: FakeServer, sid: int, headers: list[tuple[str, str]], body: bytes) -> None:
        await server.goaway(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)

    async with trio.open_nursery() as nursery:
        conn, _ = await start(nursery, fail)
        with pytest.raises(ConnectionLostError):
            await conn.request("GET", "/x")
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_dropped_connection_fails_requests() -> None:
    async def hang_up(server: FakeServer, sid: int, headers: list[tuple[str, str]], body: bytes) -> None:
        await server.respond(sid, 200, b"partial", end=False)
        await server.stream.aclose()

    async with trio.open_nursery() as nursery:
        conn, _ = await start(nursery, hang_up)
        with pytest.raises(ConnectionLostError):
            await conn.request("GET", "/x")
        assert not conn.is_usable
        with pytest.raises(ConnectionLostError):
            await conn.request("GET", "/y")
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_sending_on_a_connection_closed_meanwhile_is_connection_lost_not_an_h2_error() -> None:
    """The reader may close the h2 state machine (GOAWAY, loss) while a sender awaits a flush: the sender's
    next send_data / end_stream must surface as ConnectionLostError (not h2's ProtocolError, which escaped
    the SDK under load in bench p7_mixed), and as not processed: the request never ended."""

    async def never(server: FakeServer, sid: int, headers: list[tuple[str, str]], body: bytes) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        conn, _ = await start(nursery, never)
        stream_id = conn._h2.get_next_available_stream_id()
        conn._h2.send_headers(
            stream_id, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
        )
        conn._h2.close_connection()  # what GOAWAY or a loss does to the state machine, behind the sender's back
        for send in (lambda: conn._h2_send(conn._h2.send_data, stream_id, b"body"),
                     lambda: conn._h2_send(conn._h2.end_stream, stream_id)):  # fmt: skip
            with pytest.raises(ConnectionLostError) as info:
                send()
            assert not info.value.maybe_processed
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_refused_stream_is_safe_to_retry() -> None:
    async def refuse(server: FakeServer, sid: int, headers: list[tuple[str, str]], body: bytes) -> None:
        server.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
        await server.flush()

    async with trio.open_nursery() as nursery:
        conn, _ = await start(nursery, refuse)
        with pytest.raises(StreamResetError) as info:
            await conn.request("GET", "/x")
        assert not info.value.maybe_processed
        assert conn.is_usable
        await conn.aclose()
        nursery.cancel_scope.cancel()


def test_origin_parse() -> None:
    assert Origin.parse("http://127.0.0.1:8080").authority == "127.0.0.1:8080"
    assert Origin.parse("https://relay.example/").authority == "relay.example"
    assert Origin.parse("http://[::1]:9").authority == "[::1]:9"
    for bad in ("ftp://x", "relay.example", "http://x/path", "http://x?q"):
        with pytest.raises(ValueError, match="URL"):
            Origin.parse(bad)
