"""Server-level behaviour: detection, TLS + ALPN, caps, drain, real clients (curl, nghttp, h2load)."""

from __future__ import annotations

import inspect
import re
import ssl
from pathlib import Path

import h2.errors
import pytest
import trio
import trio.testing

import relay.transport
from relay.ratelimit import TokenBucket
from relay.transport import Server, TransportStatistics
from tests.relay.transport.transport_testing import (
    FIRES_WITHIN_SECONDS,
    WAIT_SECONDS,
    App,
    H2Client,
    H11Client,
    make_config,
    open_stream,
    parse_response,
    problem_code,
    run,
    serving,
    wait_until,
)

ErrorCodes = h2.errors.ErrorCodes
MiB = 1024 * 1024
SLOW_SECONDS = 2.0  # the drain test's in-flight requests: long enough to outlast the set-up on a loaded host


async def _process(*args: str) -> tuple[int, bytes, bytes]:
    result = await trio.run_process(list(args), capture_stdout=True, capture_stderr=True, check=False)
    return result.returncode, result.stdout, result.stderr


# -- surface and small parts ------------------------------------------------------------------
def test_public_surface_is_pinned() -> None:
    assert relay.transport.__all__ == ["Server", "TransportStatistics"]
    assert list(inspect.signature(Server).parameters) == ["config", "handler", "streams_body"]
    assert {"serve", "drain", "statistics", "port"} <= set(dir(Server))


def test_token_bucket_follows_the_trio_clock() -> None:
    async def main() -> None:
        bucket = TokenBucket(10, refill_per_second=5)
        assert all(bucket.take() for _ in range(10))
        assert not bucket.take()
        await trio.sleep(1.0)
        assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
        await trio.sleep(100)
        assert bucket.tokens == 10  # never above capacity
        unlimited = TokenBucket(0, 0)
        assert all(unlimited.take() for _ in range(10_000))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# -- protocol detection and real clients -------------------------------------------------------
def test_both_protocols_share_one_port() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            h1 = await H11Client.connect(server.port)
            h2c = await H2Client.connect(server.port)
            # "PRI" diverges from a POST after two bytes; both must still be detected right.
            assert (await h1.request("POST", "/echo", b"one")).body == b"one"
            response = await h2c.response(await h2c.request("POST", "/echo", b"two"))
            assert bytes(response.body) == b"two"
            stats = server.statistics()
            assert (stats.connections_open, stats.connections_http1, stats.connections_http2) == (2, 1, 1)
            assert stats.streams_open == 0

    run(main)


@pytest.mark.parametrize(("flag", "version"), [("--http1.1", "1.1"), ("--http2-prior-knowledge", "2")])
def test_curl(flag: str, version: str, tmp_path: Path) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(bytes(range(256)) * 20_000)  # ~5 MiB

    async def main() -> None:
        async with serving(make_config(), App()) as server:
            base = f"http://127.0.0.1:{server.port}"
            out = tmp_path / "out.bin"
            code, stdout, _ = await _process(
                "curl", "-sS", flag, "-o", str(out), "-w", "%{http_code} %{http_version}",
                "--data-binary", f"@{upload}", "-H", "Expect:", f"{base}/echo",
            )  # fmt: skip
            assert (code, stdout.decode()) == (0, f"200 {version}")
            assert out.read_bytes() == upload.read_bytes()
            code, stdout, _ = await _process("curl", "-sS", flag, f"{base}/stream?n=3")
            assert (code, stdout) == (0, b"chunk0\nchunk1\nchunk2\n")
            code, stdout, _ = await _process("curl", "-sS", flag, f"{base}/boom")
            assert (code, problem_code(stdout)) == (0, "internal")

    run(main)


def test_curl_expect_100_continue(tmp_path: Path) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"z" * (2 * MiB))

    async def main() -> None:
        async with serving(make_config(), App()) as server:
            code, stdout, stderr = await _process(
                "curl", "-sS", "-v", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}",
                "-H", "Expect: 100-continue", "--data-binary", f"@{upload}", f"http://127.0.0.1:{server.port}/echo",
            )  # fmt: skip
            assert (code, stdout) == (0, b"200")
            assert b"HTTP/1.1 100 Continue" in stderr

    run(main)


def test_nghttp(tmp_path: Path) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"n" * 300_000)

    async def main() -> None:
        async with serving(make_config(), App()) as server:
            base = f"http://127.0.0.1:{server.port}"
            code, stdout, stderr = await _process("nghttp", f"{base}/stream?n=3")
            assert (code, stdout, stderr) == (0, b"chunk0\nchunk1\nchunk2\n", b"")
            code, stdout, _ = await _process("nghttp", "-d", str(upload), f"{base}/echo")
            assert (code, stdout) == (0, upload.read_bytes())

    run(main)


def test_h2load_completes_without_errors() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            code, stdout, _ = await _process(
                "h2load", "-n", "2000", "-c", "4", "-m", "10", f"http://127.0.0.1:{server.port}/echo"
            )
            assert code == 0
            summary = re.search(rb"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                                rb"(\d+) errored, (\d+) timeout", stdout)  # fmt: skip
            assert summary is not None
            assert summary.groups() == (b"2000", b"2000", b"2000", b"0", b"0", b"0")
            assert b"status codes: 2000 2xx" in stdout

    run(main, timeout=40)


# -- TLS --------------------------------------------------------------------------------------
def _client_context(alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(alpn)
    return context


def test_tls_alpn_selects_the_protocol(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files

    async def main() -> None:
        app = App()
        async with serving(make_config(tls_cert=cert, tls_key=key), app) as server:
            tcp = await open_stream(server.port)
            tls = trio.SSLStream(tcp, _client_context(["h2", "http/1.1"]), server_hostname="localhost")
            await tls.do_handshake()
            assert tls.selected_alpn_protocol() == "h2"
            client = await H2Client.start(tls)
            response = await client.response(await client.request("POST", "/echo", b"secure"))
            assert (response.status, bytes(response.body)) == (200, b"secure")
            tcp1 = await open_stream(server.port)
            tls1 = trio.SSLStream(tcp1, _client_context(["http/1.1"]), server_hostname="localhost")
            await tls1.do_handshake()
            assert tls1.selected_alpn_protocol() == "http/1.1"
            h1 = H11Client(tls1)
            assert (await h1.request("POST", "/echo", b"secure1")).body == b"secure1"
            assert [request.scheme for request in app.requests] == ["https", "https"]
            assert [request.http_version for request in app.requests] == ["2", "1.1"]

    run(main)


@pytest.mark.parametrize(("flag", "version"), [("--http1.1", "1.1"), ("--http2", "2")])
def test_tls_with_curl(flag: str, version: str, tls_files: tuple[str, str]) -> None:
    cert, key = tls_files

    async def main() -> None:
        async with serving(make_config(tls_cert=cert, tls_key=key), App()) as server:
            code, stdout, _ = await _process(
                "curl", "-sS", "-k", flag, "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                "-d", "x", f"https://127.0.0.1:{server.port}/echo",
            )  # fmt: skip
            assert (code, stdout.decode()) == (0, f"200 {version}")

    run(main)


def test_tls_handshake_timeout(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files

    async def main() -> None:
        async with serving(make_config(tls_cert=cert, tls_key=key, tls_handshake_timeout_seconds=0.3), App()) as server:
            stream = await open_stream(server.port)
            with trio.fail_after(FIRES_WITHIN_SECONDS):
                assert await stream.receive_some(65536) == b""
            assert server.statistics().connections_rejected == 1

    run(main)


# -- caps -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", ["max_connections_per_ip", "max_connections"])
def test_connection_cap(cap: str) -> None:
    async def main() -> None:
        async with serving(make_config(**{cap: 2}), App()) as server:
            clients = [await H11Client.connect(server.port) for _ in range(2)]
            for client in clients:
                assert (await client.request("GET", "/echo")).status == 200
            refused = await open_stream(server.port)
            with trio.fail_after(FIRES_WITHIN_SECONDS):
                try:
                    assert await refused.receive_some(65536) == b""
                except trio.BrokenResourceError:
                    pass  # reset instead of FIN: also a refusal
            assert server.statistics().connections_rejected == 1
            await clients[0].aclose()
            await wait_until(lambda: server.statistics().connections_open == 1)
            again = await H11Client.connect(server.port)  # a slot is free again
            assert (await again.request("GET", "/echo")).status == 200

    run(main)


def test_cleartext_header_timeout_before_any_byte() -> None:
    async def main() -> None:
        async with serving(make_config(header_timeout_seconds=0.3), App()) as server:
            stream = await open_stream(server.port)
            with trio.fail_after(FIRES_WITHIN_SECONDS):
                assert await stream.receive_some(65536) == b""
            assert server.statistics().connections_open == 0

    run(main)


# -- drain ------------------------------------------------------------------------------------
def test_drain_finishes_in_flight_work_and_ends_streams_cleanly() -> None:
    async def main() -> None:
        app = App()
        # Far above the slow requests: the drain ends when the work is done, not when this runs out.
        server = Server(make_config(drain_timeout_seconds=30.0), app)
        serve_returned = trio.Event()

        async def serve(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
            await server.serve(task_status=task_status)
            serve_returned.set()

        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve)
            # HTTP/2: one slow request and one endless stream on the same connection.
            h2c = await H2Client.connect(port)
            slow_sid = await h2c.request("GET", f"/slow?seconds={SLOW_SECONDS}")  # still running when the drain starts
            stream_sid = await h2c.request("GET", "/forever")
            await h2c.until(lambda: len(h2c.responses[stream_sid].body) > 0)
            # HTTP/1.1: an endless stream, a slow request, and an idle keep-alive connection.
            h1_stream = await open_stream(port)
            await h1_stream.send_all(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
            h1_received = bytearray(await h1_stream.receive_some(65536))
            h1_slow = await H11Client.connect(port)
            h1_idle = await H11Client.connect(port)
            assert (await h1_idle.request("GET", "/echo")).status == 200
            slow_result: list[int | str] = []

            async def slow_h1() -> None:
                response = await h1_slow.request("GET", f"/slow?seconds={SLOW_SECONDS}")
                slow_result.extend([response.status, response.headers.get("connection", "")])

            nursery.start_soon(slow_h1)
            await wait_until(lambda: server.statistics().streams_open == 4)  # h1_slow's request is in flight
            nursery.start_soon(server.drain)

            goaway = await h2c.goaway()
            assert goaway.error_code == ErrorCodes.NO_ERROR
            assert goaway.last_stream_id == stream_sid
            streamed = await h2c.response(stream_sid)
            assert (streamed.ended, streamed.reset_code) == (True, None)
            slow = await h2c.response(slow_sid)
            assert (slow.status, bytes(slow.body), slow.reset_code) == (200, b"slow done", None)
            await h2c.read_until_closed()
            assert [frame.error_code for frame in h2c.goaways] == [ErrorCodes.NO_ERROR, ErrorCodes.NO_ERROR]

            with trio.fail_after(WAIT_SECONDS):
                while chunk := await h1_stream.receive_some(65536):
                    h1_received += chunk
            assert h1_received.endswith(b"\r\n0\r\n\r\n")  # the final chunk: a clean end, then EOF
            assert await h1_idle.stream.receive_some(65536) == b""
            with trio.fail_after(WAIT_SECONDS):
                await serve_returned.wait()
            assert slow_result == [200, "close"]
            assert app.streams_closed == 2
            assert app.handlers_cancelled == 0
            assert server.statistics().connections_open == 0
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream("127.0.0.1", port)

    run(main)


def test_drain_timeout_closes_what_is_left() -> None:
    async def main() -> None:
        app = App()
        server = Server(make_config(drain_timeout_seconds=0.3), app)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            client = await H2Client.connect(port)
            await client.request("GET", "/slow?seconds=30")
            await app.slow_started.wait()
            with trio.fail_after(FIRES_WITHIN_SECONDS):
                await server.drain()
            assert app.handlers_cancelled == 1
            stats = server.statistics()
            assert isinstance(stats, TransportStatistics)
            assert (stats.connections_open, stats.draining) == (0, True)

    run(main)


def test_bad_request_problem_over_tls_is_readable(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files

    async def main() -> None:
        async with serving(make_config(tls_cert=cert, tls_key=key), App()) as server:
            tcp = await open_stream(server.port)
            tls = trio.SSLStream(tcp, _client_context(["http/1.1"]), server_hostname="localhost")
            await tls.send_all(b"GET / HTTP/1.1\r\n\r\n")  # no Host
            received = bytearray()
            with trio.fail_after(FIRES_WITHIN_SECONDS):
                while True:
                    try:
                        chunk = await tls.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    if not chunk:
                        break
                    received += chunk
            status, _, body = parse_response(bytes(received))
            assert (status, problem_code(body)) == (400, "bad_request")

    run(main)
