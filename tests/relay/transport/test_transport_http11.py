"""HTTP/1.1 behaviour of the transport, driven by h11 and raw sockets over loopback."""

from __future__ import annotations

import json

import pytest
import trio

from tests.relay.transport.transport_testing import (
    FIRES_WITHIN_SECONDS,
    App,
    H11Client,
    make_config,
    open_stream,
    parse_response,
    problem_code,
    raw_exchange,
    run,
    serving,
    wait_until,
)


def test_keep_alive_echo_with_default_headers() -> None:
    async def main() -> None:
        app = App()
        async with serving(make_config(), app) as server:
            client = await H11Client.connect(server.port)
            first = await client.request("POST", "/echo?x=1", b"one", [("X-Custom", "Value")])
            second = await client.request("POST", "/echo", b"two")
            assert (first.status, first.body, second.status, second.body) == (200, b"one", 200, b"two")
            assert first.headers["server"] == "tetherless"
            assert first.headers["content-length"] == "3"
            assert "date" in first.headers
            info = json.loads(first.headers["x-info"])
            assert (info["method"], info["path"], info["query"], info["version"]) == ("POST", "/echo", "x=1", "1.1")
            assert ["x-custom", "Value"] in info["headers"]
            assert len({request.client for request in app.requests}) == 1  # one connection
            assert server.statistics().connections_http1 == 1

    run(main)


def test_chunked_request_body() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            raw = (
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            status, _, body = parse_response(await raw_exchange(server.port, raw))
            assert (status, body) == (200, b"hello world")

    run(main)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            raw = (
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst"
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecond"
            )
            received = await raw_exchange(server.port, raw)
            first = parse_response(received)
            second = parse_response(received[received.index(b"first") + 5 :])
            assert (first[0], first[2], second[0], second[2]) == (200, b"first", 200, b"second")
            assert second[1]["connection"] == "close"

    run(main)


def test_streaming_response_uses_chunked_encoding() -> None:
    async def main() -> None:
        app = App()
        async with serving(make_config(), app) as server:
            client = await H11Client.connect(server.port)
            response = await client.request("GET", "/stream?n=3")
            assert response.status == 200
            assert response.headers["transfer-encoding"] == "chunked"
            assert "content-length" not in response.headers
            assert response.body == b"chunk0\nchunk1\nchunk2\n"
            assert app.streams_closed == 1
            again = await client.request("GET", "/echo")  # keep-alive after a chunked response
            assert again.status == 200

    run(main)


def test_head_has_length_but_no_body() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            client = await H11Client.connect(server.port)
            response = await client.request("HEAD", "/big?bytes=1234")
            assert (response.status, response.headers["content-length"], response.body) == (200, "1234", b"")
            assert (await client.request("GET", "/echo")).status == 200

    run(main)


def test_expect_100_continue() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            stream = await open_stream(server.port)
            await stream.send_all(
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
            )
            interim = await stream.receive_some(65536)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"body")
            received = b""
            while b"body" not in received:
                received += await stream.receive_some(65536)
            status, _, body = parse_response(received)
            assert (status, body) == (200, b"body")

    run(main)


def test_body_limit_exact_and_one_over() -> None:
    async def main() -> None:
        limit = 5000
        async with serving(make_config(max_body_bytes=limit), App()) as server:
            client = await H11Client.connect(server.port)
            ok = await client.request("POST", "/echo", b"a" * limit)
            assert (ok.status, len(ok.body)) == (200, limit)
            over = await client.request("POST", "/echo", b"a" * (limit + 1))
            assert (over.status, problem_code(over.body)) == (413, "body_too_large")
            assert over.headers["content-type"] == "application/problem+json"
            assert over.headers["connection"] == "close"
            # Chunked: no declared length, the limit is hit while reading.
            chunk = b"a" * (limit + 1)
            raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                len(chunk),
                chunk,
            )
            status, _, body = parse_response(await raw_exchange(server.port, raw))
            assert (status, problem_code(body)) == (413, "body_too_large")

    run(main)


def test_handler_exception_is_500_and_next_request_works() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            client = await H11Client.connect(server.port)
            failed = await client.request("GET", "/boom")
            assert (failed.status, problem_code(failed.body)) == (500, "internal")
            bad = await client.request("GET", "/bad-header")
            assert (bad.status, problem_code(bad.body)) == (500, "internal")
            ok = await client.request("POST", "/echo", b"next")
            assert (ok.status, ok.body) == (200, b"next")

    run(main)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"NOT A REQUEST LINE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 requires Host
    ],
    ids=["conflicting-content-length", "te-and-content-length", "garbage", "space-in-name", "nul", "no-host"],
)
def test_bad_framing_is_a_bad_request_problem(raw: bytes, status: int) -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            got_status, headers, body = parse_response(await raw_exchange(server.port, raw))
            assert (got_status, problem_code(body)) == (status, "bad_request")
            assert json.loads(body)["status"] == status
            assert headers["connection"] == "close"

    run(main)


def test_connect_is_rejected() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            raw = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
            status, _, body = parse_response(await raw_exchange(server.port, raw))
            assert (status, problem_code(body)) == (400, "bad_request")

    run(main)


def test_oversize_headers_get_431() -> None:
    async def main() -> None:
        async with serving(make_config(max_header_list_bytes=4096), App()) as server:
            raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 8000 + b"\r\n\r\n"
            status, _, body = parse_response(await raw_exchange(server.port, raw))
            assert (status, problem_code(body)) == (431, "bad_request")

    run(main)


def test_header_timeout_closes_a_slow_client() -> None:
    async def main() -> None:
        async with serving(make_config(header_timeout_seconds=0.3), App()) as server:
            start = trio.current_time()
            received = await raw_exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes
            assert received == b""
            assert 0.2 < trio.current_time() - start < FIRES_WITHIN_SECONDS

    run(main)


def test_body_timeout_closes_the_connection() -> None:
    async def main() -> None:
        async with serving(make_config(body_timeout_seconds=0.3), App()) as server:
            start = trio.current_time()
            received = await raw_exchange(
                server.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab"
            )
            assert received == b""
            assert 0.2 < trio.current_time() - start < FIRES_WITHIN_SECONDS

    run(main)


def test_idle_keep_alive_connection_is_closed() -> None:
    async def main() -> None:
        async with serving(make_config(idle_timeout_seconds=0.3, header_timeout_seconds=60.0), App()) as server:
            client = await H11Client.connect(server.port)
            assert (await client.request("GET", "/echo")).status == 200
            with trio.fail_after(FIRES_WITHIN_SECONDS):
                assert await client.stream.receive_some(65536) == b""

    run(main)


def test_peer_leaving_ends_a_streaming_response() -> None:
    async def main() -> None:
        app = App()
        async with serving(make_config(), app) as server:
            stream = await open_stream(server.port)
            await stream.send_all(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200 ")
            await stream.aclose()
            await wait_until(lambda: app.streams_closed == 1)
            await wait_until(lambda: server.statistics().connections_open == 0)

    run(main)
