"""Streamed request bodies (streaming routes) and Response.length, over real loopback sockets.

A streaming route's handler reads ``request.body_stream`` as the bytes arrive: no ``max_body_bytes`` cap in
the transport, bounded buffering (HTTP/2: the stream's window, reopened only as the handler reads; HTTP/1.1:
the socket is read only when the handler asks), a timeout that measures inactivity, and BodyIncompleteError
with the received byte count when the body is cut short (peer reset or close, inactivity, drain).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h2.errors
import h2.events
import h11
import pytest
import trio
import trio.testing

from relay.api.application import Application
from relay.api.context import Api
from relay.api.http import BodyIncompleteError, BodyStream, BufferedBodyStream, Request, Response
from relay.api.routing import Call, RouteTable
from relay.app import Switchboard, _server_or_refuse
from relay.config import Config
from relay.transport import Server
from relay.transport.http2 import CONNECTION_WINDOW_BYTES, STREAM_WINDOW_BYTES, HTTP2Connection
from relay.transport.http11 import RECEIVE_BYTES
from tests.relay.transport.transport_testing import (
    FIRES_WITHIN_SECONDS,
    WAIT_SECONDS,
    H2Client,
    H11Client,
    make_config,
    open_stream,
    parse_response,
    problem_code,
    raw_exchange,
    run,
    wait_until,
)

ErrorCodes = h2.errors.ErrorCodes
MiB = 1024 * 1024
BIG_BYTES = 64 * MiB  # the CI size: far above max_body_bytes (8 MiB), so only streaming gets it through
STREAMING_PATHS = frozenset({"/hash", "/early", "/ignore"})
# The inactivity tests: a pause longer than INACTIVITY_SECONDS fails, gaps of TRICKLE_GAP_SECONDS never do,
# whatever the total. The gap is a tenth of the timeout so a loaded host's scheduling delays cannot reach it.
INACTIVITY_SECONDS = 1.0
TRICKLE_GAP_SECONDS = 0.1
TRICKLE_PIECES = 15  # 1.5 s in total: longer than the timeout


def _payload(size: int) -> bytes:
    """Random-looking bytes with no two MiB alike (so a reordered or repeated piece changes the hash)."""
    block = os.urandom(MiB - 8)
    return b"".join(index.to_bytes(8, "big") + block for index in range(size // MiB + 1))[:size]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the application --------------------------------------------------------------------------
@dataclass
class Outcome:
    """What a streaming handler saw of its body."""

    path: str
    received: int
    declared: int | None
    digest: str
    reason: str | None  # BodyIncompleteError.reason, None when the body ended normally


@dataclass
class StreamingApp:
    """Streaming routes: /hash (read all, hash), /early (answer at once), /ignore (wait for ``release``, read
    nothing). ``/hash?wait=1`` reads nothing until ``gate``; ``/hash?pause=1`` stops after its first chunk
    until ``resume``. Buffered routes: /echo; /download?length=N&actual=M streams M bytes declaring N.

    A cut body is "committed" with an await after BodyIncompleteError, so a handler cancelled instead of
    being told shows up as a missing outcome (and in ``handlers_cancelled``).
    """

    outcomes: list[Outcome] = field(default_factory=list)
    handlers_cancelled: int = 0
    waiting: int = 0
    gate: trio.Event = field(default_factory=trio.Event)
    first_chunk_read: trio.Event = field(default_factory=trio.Event)
    resume: trio.Event = field(default_factory=trio.Event)
    release: trio.Event = field(default_factory=trio.Event)
    ignoring: int = 0
    bodies: list[BodyStream] = field(default_factory=list)  # every streamed body handed to a handler

    @staticmethod
    def streams_body(method: str, path: str) -> bool:
        return path in STREAMING_PATHS

    async def __call__(self, request: Request) -> Response:
        query = dict(part.partition("=")[::2] for part in request.query.split("&") if part)
        if request.path == "/echo":
            assert request.body_stream is None
            return Response(200, [("content-type", "application/octet-stream")], request.body)
        if request.path == "/download":
            return Response(200, [], stream=_produce(int(query["actual"])), length=int(query["length"]))
        body = request.body_stream
        assert body is not None
        assert request.body == b""
        self.bodies.append(body)
        if request.path == "/early":
            return Response(409, [("content-type", "text/plain")], b"refused before reading")
        if request.path == "/ignore":
            self.ignoring += 1
            await self.release.wait()
            self.ignoring -= 1
            return Response(409, [("content-type", "text/plain")], b"refused after waiting")
        digest = hashlib.sha256()
        reason = None
        try:
            if "wait" in query:
                self.waiting += 1
                await self.gate.wait()
            async for chunk in body:
                assert chunk
                digest.update(chunk)
                if "pause" in query and not self.first_chunk_read.is_set():
                    self.first_chunk_read.set()
                    await self.resume.wait()
        except BodyIncompleteError as exc:
            reason = exc.reason
            await trio.sleep(0.01)  # the commit of what arrived: it must get to run
        except trio.Cancelled:
            self.handlers_cancelled += 1
            raise
        outcome = Outcome(request.path, body.received, body.declared_length, digest.hexdigest(), reason)
        self.outcomes.append(outcome)
        return Response(200, [("content-type", "application/json")], json.dumps(asdict(outcome)).encode())


async def _produce(total: int) -> AsyncIterator[bytes]:
    piece = b"d" * (64 * 1024)
    sent = 0
    while sent < total:
        size = min(len(piece), total - sent)
        sent += size
        yield piece[:size]


@asynccontextmanager
async def streaming_server(
    config: Config, app: Callable[[Request], Awaitable[Response]], streams_body: Callable[[str, str], bool]
) -> AsyncIterator[Server]:
    """A running server with streaming routes; cancelled (not drained) on exit."""
    server = Server(config, app, streams_body=streams_body)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


def _serving(app: StreamingApp, **overrides: Any) -> Any:
    return streaming_server(make_config(**overrides), app, app.streams_body)


def _outcome(body: bytes | bytearray) -> dict[str, Any]:
    return dict(json.loads(bytes(body)))


async def _round_trip(client: H2Client) -> None:
    """A PING and its ACK: every frame the server queued before it has arrived (and been read)."""
    acks = sum(isinstance(event, h2.events.PingAckReceived) for event in client.events)
    client.conn.ping(os.urandom(8))
    await client.flush()
    await client.until(lambda: sum(isinstance(e, h2.events.PingAckReceived) for e in client.events) > acks)


async def _reset_code(client: H2Client, sid: int) -> int | None:
    """The stream's RST_STREAM code, read until it arrives (after the whole response)."""
    response = client.responses[sid]
    await client.until(lambda: response.reset_code is not None)
    return response.reset_code


# -- raw HTTP/1.1 helpers ------------------------------------------------------------------------
async def _h1_upload(port: int, path: str, data: bytes, *, chunked: bool) -> tuple[int, dict[str, str], bytes]:
    """PUT ``data`` as one Content-Length or chunked body in 1 MiB writes; the response."""
    client = H11Client(await open_stream(port))
    framing = ("transfer-encoding", "chunked") if chunked else ("content-length", str(len(data)))
    head = h11.Request(method="PUT", target=path, headers=[("host", "localhost"), framing])
    await client.stream.send_all(client.conn.send(head) or b"")
    for start in range(0, len(data), MiB):
        await client.stream.send_all(client.conn.send(h11.Data(data=data[start : start + MiB])) or b"")
    await client.stream.send_all(client.conn.send(h11.EndOfMessage()) or b"")
    response = await client.read_response()
    return response.status, response.headers, response.body


async def _read_response(stream: trio.abc.ReceiveStream) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length-framed response, read until complete (the connection may stay open)."""
    received = bytearray()
    while True:
        if b"\r\n\r\n" in received:
            status, headers, body = parse_response(bytes(received))
            if len(body) == int(headers["content-length"]):
                return status, headers, body
        chunk = await stream.receive_some(65536)
        assert chunk, "connection closed before the response completed"
        received += chunk


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not chunk:
            break
        received += chunk
    return bytes(received)


# -- whole bodies, in constant memory --------------------------------------------------------------
def test_64_mib_over_http2_is_hashed_whole_with_at_most_one_window_buffered() -> None:
    data = _payload(BIG_BYTES)

    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("PUT", "/hash", data, [("content-length", str(len(data)))])
            response = await client.response(sid)
            assert response.status == 200
            assert _outcome(response.body) == {
                "path": "/hash", "received": BIG_BYTES, "declared": BIG_BYTES, "digest": _sha256(data), "reason": None
            }  # fmt: skip
            stats = server.statistics()
            assert 0 < stats.peak_connection_body_bytes <= STREAM_WINDOW_BYTES
            assert stats.body_buffered_bytes == 0

    run(main)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_64_mib_over_http11_is_hashed_whole_reading_one_receive_at_a_time(chunked: bool) -> None:
    data = _payload(BIG_BYTES)

    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            status, _, body = await _h1_upload(server.port, "/hash", data, chunked=chunked)
            assert status == 200
            assert _outcome(body) == {
                "path": "/hash",
                "received": BIG_BYTES,
                "declared": None if chunked else BIG_BYTES,
                "digest": _sha256(data),
                "reason": None,
            }
            stats = server.statistics()
            assert 0 < stats.peak_connection_body_bytes <= RECEIVE_BYTES

    run(main)


def test_a_non_streaming_route_on_the_same_server_still_refuses_past_max_body_bytes() -> None:
    data = _payload(9 * MiB)

    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            client = await H2Client.connect(server.port)
            length = [("content-length", str(len(data)))]
            sid = await client.request("POST", "/echo", headers=length, end_stream=False)
            buffered = await client.response(sid)
            assert (buffered.status, problem_code(buffered.body)) == (413, "body_too_large")
            streamed = await client.response(await client.request("POST", "/hash", data, length))
            assert (streamed.status, _outcome(streamed.body)["digest"]) == (200, _sha256(data))
            h1 = await H11Client.connect(server.port)
            refused = await h1.request("POST", "/echo", data)
            assert (refused.status, problem_code(refused.body)) == (413, "body_too_large")
            status, _, body = await _h1_upload(server.port, "/hash", data, chunked=False)
            assert (status, _outcome(body)["digest"]) == (200, _sha256(data))

    run(main)


# -- backpressure ------------------------------------------------------------------------------------
def test_http2_slow_reader_closes_the_senders_window_instead_of_buffering() -> None:
    data = _payload(8 * MiB)

    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("PUT", "/hash?pause=1", end_stream=False)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_body, sid, data)
                await app.first_chunk_read.wait()
                # The sender is blocked: its window is spent and the server reopens none while the handler
                # does not read. What the server holds is at most that window.
                await wait_until(lambda: client.conn.local_flow_control_window(sid) == 0)
                stats = server.statistics()
                assert stats.body_buffered_bytes <= STREAM_WINDOW_BYTES
                assert stats.peak_connection_body_bytes <= STREAM_WINDOW_BYTES
                app.resume.set()
            response = await client.response(sid)
            assert _outcome(response.body)["digest"] == _sha256(data)
            assert server.statistics().peak_connection_body_bytes <= STREAM_WINDOW_BYTES

    run(main)


def test_http11_slow_reader_stops_reading_the_socket() -> None:
    data = _payload(BIG_BYTES)
    sent = [0]

    async def send(stream: trio.SocketStream) -> None:
        await stream.send_all(f"PUT /hash?pause=1 HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n\r\n".encode())
        for start in range(0, len(data), 64 * 1024):
            await stream.send_all(data[start : start + 64 * 1024])
            sent[0] = start + 64 * 1024

    async def settled() -> None:
        # The sender stalls once the kernel's socket buffers are full (a few MiB on loopback): wait until its
        # count stops moving. A host too slow to fill them just stalls later; it cannot fail the test.
        with trio.fail_after(WAIT_SECONDS):
            last, still = -1, 0
            while still < 20:
                await trio.sleep(0.05)
                still = still + 1 if sent[0] == last else 0
                last = sent[0]

    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            stream = await open_stream(server.port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, stream)
                await app.first_chunk_read.wait()
                await settled()
                assert sent[0] < len(data)  # blocked: the relay does not read for a handler that does not
                assert server.statistics().peak_connection_body_bytes <= RECEIVE_BYTES
                app.resume.set()
            status, _, body = await _read_response(stream)
            assert (status, _outcome(body)["digest"]) == (200, _sha256(data))

    run(main)


def test_many_concurrent_uploads_on_one_connection_stay_within_the_connection_budget() -> None:
    streams, each = 24, 2 * MiB  # 48 MiB offered at once, above max_connection_body_bytes (32 MiB)
    data = [_payload(each) for _ in range(streams)]

    async def main() -> None:
        app = StreamingApp()
        config = make_config()
        async with _serving(app) as server:
            client = await H2Client.connect(server.port)
            sids = [await client.request("PUT", "/hash?wait=1", end_stream=False) for _ in range(streams)]
            offset = dict.fromkeys(sids, 0)
            await wait_until(lambda: app.waiting == streams)
            # Send whatever the windows allow, as a greedy client would, until the server stops opening them.
            while True:
                for index, sid in enumerate(sids):
                    while offset[sid] < each:
                        size = min(
                            client.conn.local_flow_control_window(sid),
                            client.conn.max_outbound_frame_size,
                            each - offset[sid],
                        )
                        if size <= 0:
                            break
                        client.conn.send_data(sid, data[index][offset[sid] : offset[sid] + size])
                        offset[sid] += size
                await client.flush()
                if all(offset[sid] == each for sid in sids):
                    break
                # Two round trips: every WINDOW_UPDATE for the bytes sent so far is in.
                await _round_trip(client)
                await _round_trip(client)
                if all(offset[sid] == each or client.conn.local_flow_control_window(sid) == 0 for sid in sids):
                    break
            await wait_until(lambda: server.statistics().body_buffered_bytes == sum(offset.values()))
            held = server.statistics().peak_connection_body_bytes
            assert held <= config.max_connection_body_bytes
            assert held <= CONNECTION_WINDOW_BYTES
            app.gate.set()
            for index, sid in enumerate(sids):
                await client.send_body(sid, data[index][offset[sid] :])
            for index, sid in enumerate(sids):
                response = await client.response(sid)
                assert _outcome(response.body)["digest"] == _sha256(data[index])
            assert server.statistics().peak_connection_body_bytes <= CONNECTION_WINDOW_BYTES

    run(main)


# -- inactivity, not total time ----------------------------------------------------------------------
def test_http2_pause_longer_than_the_timeout_is_an_incomplete_body() -> None:
    async def main() -> None:
        app = StreamingApp()
        async with _serving(app, body_timeout_seconds=INACTIVITY_SECONDS) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("PUT", "/hash", b"x" * 1000, end_stream=False)
            with trio.fail_after(INACTIVITY_SECONDS + FIRES_WITHIN_SECONDS):
                response = await client.response(sid)
            outcome = _outcome(response.body)
            assert (response.status, outcome["received"]) == (200, 1000)
            assert outcome["reason"] == f"no body bytes for {INACTIVITY_SECONDS} s"
            assert await _reset_code(client, sid) == ErrorCodes.NO_ERROR  # the answer first, then the upload stopped
            again = await client.response(await client.request("POST", "/echo", b"still usable"))
            assert bytes(again.body) == b"still usable"

    run(main)


def test_http11_pause_longer_than_the_timeout_is_an_incomplete_body() -> None:
    async def main() -> None:
        app = StreamingApp()
        async with _serving(app, body_timeout_seconds=INACTIVITY_SECONDS) as server:
            request = b"PUT /hash HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n" + b"x" * 1000
            with trio.fail_after(INACTIVITY_SECONDS + FIRES_WITHIN_SECONDS):
                status, headers, body = parse_response(await raw_exchange(server.port, request))
            outcome = _outcome(body)
            assert (status, headers["connection"], outcome["received"]) == (200, "close", 1000)
            assert outcome["reason"] == f"no body bytes for {INACTIVITY_SECONDS} s"

    run(main)


@pytest.mark.parametrize("version", ["2", "1.1"])
def test_a_trickle_that_outlasts_the_timeout_in_total_succeeds(version: str) -> None:
    piece = b"t" * 100
    data = piece * TRICKLE_PIECES

    async def main() -> None:
        app = StreamingApp()
        async with _serving(app, body_timeout_seconds=INACTIVITY_SECONDS) as server:
            started = trio.current_time()
            if version == "2":
                client = await H2Client.connect(server.port)
                sid = await client.request("PUT", "/hash", end_stream=False)
                for _ in range(TRICKLE_PIECES):
                    await client.send_body(sid, piece, end_stream=False)
                    await trio.sleep(TRICKLE_GAP_SECONDS)
                await client.send_body(sid, b"")
                body = (await client.response(sid)).body
            else:
                h1 = await H11Client.connect(server.port)
                head = h11.Request(
                    method="PUT", target="/hash", headers=[("host", "x"), ("content-length", str(len(data)))]
                )
                await h1.stream.send_all(h1.conn.send(head) or b"")
                for _ in range(TRICKLE_PIECES):
                    await h1.stream.send_all(h1.conn.send(h11.Data(data=piece)) or b"")
                    await trio.sleep(TRICKLE_GAP_SECONDS)
                h1.conn.send(h11.EndOfMessage())
                body = (await h1.read_response()).body
            assert trio.current_time() - started > INACTIVITY_SECONDS  # the premise: longer than the timeout
            assert _outcome(body) == {
                "path": "/hash", "received": len(data), "declared": None if version == "2" else len(data),
                "digest": _sha256(data), "reason": None,
            }  # fmt: skip

    run(main)


# -- cut short by the peer ----------------------------------------------------------------------------
def test_http2_peer_reset_mid_body_reports_the_bytes_that_arrived() -> None:
    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("PUT", "/hash", b"r" * 100_000, end_stream=False)
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            await client.flush()
            await wait_until(lambda: len(app.outcomes) == 1)
            assert app.outcomes[0].reason == "the peer reset the stream"
            assert (app.outcomes[0].received, app.outcomes[0].digest) == (100_000, _sha256(b"r" * 100_000))
            assert app.handlers_cancelled == 0
            await wait_until(lambda: server.statistics().streams_open == 0)
            again = await client.response(await client.request("POST", "/echo", b"after"))
            assert bytes(again.body) == b"after"

    run(main)


@pytest.mark.parametrize("version", ["2", "1.1"])
def test_peer_closing_the_connection_mid_body_lets_the_handler_commit(version: str) -> None:
    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            if version == "2":
                client = await H2Client.connect(server.port)
                await client.request("PUT", "/hash", b"c" * 100_000, [("content-length", "1000000")], end_stream=False)
                # Closed once the handler has read it all: a close with bytes unread could be a TCP reset.
                await wait_until(lambda: bool(app.bodies) and app.bodies[0].received == 100_000)
                await client.aclose()
            else:
                stream = await open_stream(server.port)
                await stream.send_all(
                    b"PUT /hash HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n" + b"c" * 100_000
                )
                await wait_until(lambda: bool(app.bodies) and app.bodies[0].received == 100_000)
                await stream.aclose()
            await wait_until(lambda: len(app.outcomes) == 1)
            outcome = app.outcomes[0]
            expected = "the connection closed" if version == "2" else "the peer closed the connection"
            assert (outcome.reason, outcome.received, outcome.declared) == (expected, 100_000, 1_000_000)
            assert app.handlers_cancelled == 0
            await wait_until(lambda: server.statistics().connections_open == 0)

    run(main)


def test_http11_malformed_chunked_framing_is_an_incomplete_body() -> None:
    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            request = b"PUT /hash HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
            status, headers, body = parse_response(await raw_exchange(server.port, request))
            outcome = _outcome(body)
            assert (status, headers["connection"], outcome["received"]) == (200, "close", 5)
            assert outcome["reason"].startswith("malformed body")

    run(main)


def test_http2_failed_write_mid_body_still_lets_the_handler_commit() -> None:
    # A vanished peer often shows first as a failed write (the WINDOW_UPDATE that reading the body causes):
    # that must cut the body like a failed read, not cancel the handler before it commits.
    async def main() -> None:
        app = StreamingApp()
        client_stream, server_stream = trio.testing.memory_stream_pair()
        connection = HTTP2Connection(
            server_stream,
            config=make_config(),
            handler=app,
            client="test:1",
            scheme="http",
            initial=b"",
            started_at=trio.current_time(),
            streams_body=app.streams_body,
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            client = await H2Client.start(client_stream)
            await _round_trip(client)  # settings exchanged while the socket still works both ways
            sid = await client.request("PUT", "/hash", b"w" * 100_000, end_stream=False)
            await wait_until(lambda: bool(app.bodies) and app.bodies[0].received == 100_000)
            await client_stream.receive_stream.aclose()  # from now on every server write fails
            # Reading this is what makes the server write (a WINDOW_UPDATE once half the window is read).
            await client.send_body(sid, b"w" * (STREAM_WINDOW_BYTES - 100_000), end_stream=False)  # the window
            await wait_until(lambda: len(app.outcomes) == 1)
        outcome = app.outcomes[0]
        assert outcome.reason == "the connection closed"
        assert outcome.received >= STREAM_WINDOW_BYTES // 2
        assert app.handlers_cancelled == 0

    run(main)


# -- handlers that do not read everything --------------------------------------------------------------
def test_http2_early_answer_then_reset_no_error_and_discarded_bytes_are_acknowledged() -> None:
    rounds = CONNECTION_WINDOW_BYTES // STREAM_WINDOW_BYTES + 4  # more unread bytes than the connection window
    window = _payload(STREAM_WINDOW_BYTES)

    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            client = await H2Client.connect(server.port)
            for _ in range(rounds):
                # A whole stream window arrives and sits unread; then the handler answers without reading it.
                sid = await client.request("PUT", "/ignore", window, end_stream=False)
                await wait_until(lambda: server.statistics().body_buffered_bytes == STREAM_WINDOW_BYTES)
                app.release.set()
                response = await client.response(sid)
                assert (response.status, bytes(response.body)) == (409, b"refused after waiting")
                assert await _reset_code(client, sid) == ErrorCodes.NO_ERROR
                await wait_until(lambda: app.ignoring == 0)
                app.release = trio.Event()
            assert server.statistics().body_buffered_bytes == 0
            # Had the dropped bytes not been acknowledged, the connection window would now be spent.
            data = _payload(4 * MiB)
            after = await client.response(await client.request("PUT", "/hash", data))
            assert _outcome(after.body)["digest"] == _sha256(data)
            early = await client.response(await client.request("PUT", "/early", b"e" * 1000, end_stream=False))
            assert early.status == 409

    run(main)


def test_http11_early_answer_closes_the_connection_after_it() -> None:
    data = _payload(4 * MiB)

    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            stream = await open_stream(server.port)

            async def send() -> None:
                head = f"PUT /early HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\n\r\n".encode()
                try:
                    await stream.send_all(head + data)
                except trio.BrokenResourceError:
                    pass  # the relay closed after its answer: expected

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                received = await _read_all(stream)
            status, headers, body = parse_response(received)
            assert (status, headers["connection"], body) == (409, "close", b"refused before reading")

    run(main)


def test_http11_early_answer_keeps_the_connection_when_the_body_is_already_read() -> None:
    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            client = await H11Client.connect(server.port)
            first = await client.request("PUT", "/early", b"small body, in the same read as the head")
            assert (first.status, "connection" in first.headers) == (409, False)
            second = await client.request("POST", "/echo", b"same connection")
            assert second.body == b"same connection"

    run(main)


def test_http11_expect_100_continue_is_sent_only_when_the_handler_reads() -> None:
    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            stream = await open_stream(server.port)
            await stream.send_all(
                b"PUT /early HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\nexpect: 100-continue\r\n\r\n"
            )
            refused = await _read_all(stream)
            assert b"100 Continue" not in refused
            assert parse_response(refused)[0] == 409
            client = await H11Client.connect(server.port)
            headers = [("host", "x"), ("content-length", "10"), ("expect", "100-continue")]
            await client.stream.send_all(
                client.conn.send(h11.Request(method="PUT", target="/hash", headers=headers)) or b""
            )
            interim = await client.stream.receive_some(65536)
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")  # the handler started reading
            client.conn.receive_data(interim)
            await client.stream.send_all(client.conn.send(h11.Data(data=b"0123456789")) or b"")
            await client.stream.send_all(client.conn.send(h11.EndOfMessage()) or b"")
            response = await client.read_response()
            assert (response.status, _outcome(response.body)["digest"]) == (200, _sha256(b"0123456789"))

    run(main)


# -- drain -------------------------------------------------------------------------------------------------
def test_drain_cuts_streamed_bodies_and_their_handlers_answer() -> None:
    async def main() -> None:
        app = StreamingApp()
        server = Server(make_config(drain_timeout_seconds=1.0), app, streams_body=app.streams_body)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            h2c = await H2Client.connect(port)
            sid = await h2c.request("PUT", "/hash", b"2" * 70_000, end_stream=False)
            h1 = await open_stream(port)
            await h1.send_all(b"PUT /hash HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await wait_until(lambda: server.statistics().streams_open == 2)
            with trio.fail_after(FIRES_WITHIN_SECONDS):
                await server.drain()
            by_received = sorted(app.outcomes, key=lambda outcome: outcome.received)
            assert [(o.received, o.reason) for o in by_received] == [
                (3, "the server is shutting down"),
                (70_000, "the server is shutting down"),
            ]
            assert app.handlers_cancelled == 0
            h2_response = await h2c.response(sid)
            assert (h2_response.status, _outcome(h2_response.body)["received"]) == (200, 70_000)
            status, headers, body = parse_response(await _read_all(h1))
            assert (status, headers["connection"], _outcome(body)["received"]) == (200, "close", 3)

    run(main)


# -- real clients ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags",
    [
        ["--http2-prior-knowledge"],
        ["--http1.1"],  # Content-Length, and curl asks for 100-continue before a large body
        ["--http1.1", "-H", "Transfer-Encoding: chunked"],
    ],
    ids=["h2", "h1-length", "h1-chunked"],
)
def test_curl_uploads_with_dash_t(flags: list[str], tmp_path: Path) -> None:
    upload = tmp_path / "upload.bin"
    data = _payload(20 * MiB)  # above max_body_bytes
    upload.write_bytes(data)

    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            result = await trio.run_process(
                ["curl", "-sS", "--fail-with-body", *flags, "-T", str(upload), f"http://127.0.0.1:{server.port}/hash"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert (result.returncode, result.stderr) == (0, b"")
            outcome = _outcome(result.stdout)
            assert (outcome["received"], outcome["digest"], outcome["reason"]) == (len(data), _sha256(data), None)

    run(main)


# -- Response.length -----------------------------------------------------------------------------------------
def test_http2_stream_response_with_length_sends_content_length_and_aborts_on_a_mismatch() -> None:
    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            client = await H2Client.connect(server.port)
            exact = await client.response(await client.request("GET", "/download?length=200000&actual=200000"))
            assert (exact.status, exact.headers["content-length"], len(exact.body)) == (200, "200000", 200_000)
            assert exact.reset_code is None
            head = await client.response(await client.request("HEAD", "/download?length=200000&actual=200000"))
            assert (head.headers["content-length"], len(head.body)) == ("200000", 0)
            for actual in (199_999, 200_001):
                wrong = await client.response(await client.request("GET", f"/download?length=200000&actual={actual}"))
                assert (wrong.ended, wrong.reset_code) == (False, ErrorCodes.INTERNAL_ERROR)
                assert len(wrong.body) < 200_000

    run(main)


@pytest.mark.parametrize("actual", [199_999, 200_001])
def test_http11_stream_response_with_a_wrong_length_closes_before_its_end(
    actual: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        app = StreamingApp()
        async with _serving(app) as server:
            client = await H11Client.connect(server.port)
            exact = await client.request("GET", "/download?length=200000&actual=200000")
            assert (exact.headers["content-length"], len(exact.body)) == ("200000", 200_000)
            head = await client.request("HEAD", "/download?length=200000&actual=200000")
            assert (head.headers["content-length"], head.body) == ("200000", b"")
            request = f"GET /download?length=200000&actual={actual} HTTP/1.1\r\nhost: x\r\n\r\n".encode()
            raw = await raw_exchange(server.port, request)
            head_bytes, _, body = raw.partition(b"\r\n\r\n")
            assert b"content-length: 200000" in head_bytes
            assert len(body) < 200_000  # closed before the end: the client knows the body is incomplete

    run(main)
    # Refused by the transport's own check, not by h11 raising inside it (a transport failure with a traceback).
    assert [record.getMessage() for record in caplog.records if record.levelname == "ERROR"] == [
        "response to GET aborted: "
        + ("response stream yielded more than its length 200000" if actual > 200_000 else
           f"response stream ended after {actual} of its length 200000 bytes")
    ]  # fmt: skip


def test_drain_does_not_shorten_a_stream_of_known_length() -> None:
    async def main() -> None:
        total = 4 * MiB
        gate = trio.Event()

        async def slow_download(request: Request) -> Response:
            async def produce() -> AsyncIterator[bytes]:
                yield b"a" * MiB
                await gate.wait()
                for _ in range(3):
                    yield b"a" * MiB

            return Response(200, [], stream=produce(), length=total)

        server = Server(make_config(drain_timeout_seconds=10.0), slow_download)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            client = await H2Client.connect(port)
            sid = await client.request("GET", "/blob")
            await client.until(lambda: len(client.responses[sid].body) > 0)
            nursery.start_soon(server.drain)
            await client.goaway()
            gate.set()
            response = await client.response(sid)
            assert (response.ended, response.reset_code, len(response.body)) == (True, None, total)

    run(main)


# -- the application side: Route.stream_body and Application.streams_body ----------------------------------
def _routes() -> RouteTable:
    table = RouteTable("test")

    @table.route("PATCH", "/v1/uploads", stream_body=True, raw_content_type="text/plain")
    async def upload(api: Api, call: Call) -> Response:
        """PATCH /v1/uploads — Append to an upload"""
        stream = call.request.body_stream
        assert stream is not None
        assert call.body is None
        digest = hashlib.sha256()
        async for chunk in stream:
            digest.update(chunk)
        return Response(204, [("x-digest", digest.hexdigest()), ("x-received", str(stream.received))])

    @table.route("PATCH", "/v1/strict", stream_body=True, raw_content_type="text/plain")
    async def strict(api: Api, call: Call) -> Response:
        """PATCH /v1/strict — Lets a cut body through"""
        assert call.request.body_stream is not None
        async for _ in call.request.body_stream:
            pass
        return Response(204)

    @table.route("POST", "/v1/uploads", raw_content_type="text/plain")
    async def create(api: Api, call: Call) -> Response:
        """POST /v1/uploads — Create an upload"""
        return Response(201, [], call.request.body)

    return table


def _application() -> Application:
    return Application(Api(None, None, 1.0), _routes().routes)  # type: ignore[arg-type]  # no route uses services


def test_application_says_which_routes_stream_their_body() -> None:
    application = _application()
    assert application.streams_body("PATCH", "/v1/uploads")
    assert not application.streams_body("POST", "/v1/uploads")
    assert not application.streams_body("GET", "/v1/uploads")  # no such method: buffered, then 405
    assert not application.streams_body("PATCH", "/v1/elsewhere")
    route = next(r for r in _routes().routes if r.stream_body)
    assert route.body is None
    assert not {"malformed_body", "body_too_large"} & {code.value for code in route.errors}  # no body type


def test_a_streamed_body_route_takes_no_body_type_and_no_signature() -> None:
    table = RouteTable("test")

    async def handler(api: Api, call: Call) -> None:
        """PATCH /v1/x — X"""

    with pytest.raises(ValueError, match="streamed body"):
        table.route("PATCH", "/v1/x", stream_body=True, body=bytes)(handler)
    with pytest.raises(ValueError, match="streamed body"):
        table.route("PATCH", "/v1/x", stream_body=True, signed=True)(handler)


def test_application_streams_through_the_server_and_reads_a_buffered_body_the_same_way() -> None:
    data = _payload(12 * MiB)

    async def main() -> None:
        application = _application()
        async with streaming_server(make_config(), application, application.streams_body) as server:
            client = await H2Client.connect(server.port)
            response = await client.response(await client.request("PATCH", "/v1/uploads", data))
            assert response.status == 204
            assert (response.headers["x-digest"], response.headers["x-received"]) == (_sha256(data), str(len(data)))
        # A request built without a body stream (tests, a buffering transport) reads the same way.
        buffered = Request("PATCH", "/v1/uploads", "", (), b"abc", "127.0.0.1:1", "2")
        answer = await application(buffered)
        assert dict(answer.headers)["x-digest"] == _sha256(b"abc")

    run(main)


def test_the_relay_wires_its_application_routes_into_the_transport() -> None:
    data = _payload(12 * MiB)  # above max_body_bytes: only a streamed body gets through

    async def main() -> None:
        switchboard = Switchboard()
        server = _server_or_refuse(make_config(), switchboard)  # the construction relay.app.run uses
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            client = await H2Client.connect(port)
            length = [("content-length", str(len(data)))]
            starting = await client.response(
                await client.request("PATCH", "/v1/uploads", headers=length, end_stream=False)
            )
            assert (starting.status, problem_code(starting.body)) == (413, "body_too_large")  # no routes yet: buffered
            application = _application()
            switchboard.streaming = application.streams_body  # as relay.app.run installs it
            switchboard.application = application
            response = await client.response(await client.request("PATCH", "/v1/uploads", data, length))
            assert (response.status, response.headers["x-digest"]) == (204, _sha256(data))
            nursery.cancel_scope.cancel()

    run(main)


def test_a_cut_body_the_handler_lets_through_is_a_bad_request_not_a_500() -> None:
    class Cut(BufferedBodyStream):
        async def _read(self) -> bytes:
            chunk = await super()._read()
            self._ended = False
            self.fail("the peer reset the stream")
            return chunk

    async def main() -> None:
        application = _application()
        request = Request("PATCH", "/v1/strict", "", (), b"", "127.0.0.1:1", "2", body_stream=Cut(b"part"))
        answer = await application(request)
        assert (answer.status, problem_code(answer.body)) == (400, "bad_request")
        assert "the peer reset the stream" in json.loads(answer.body)["detail"]

    run(main)
