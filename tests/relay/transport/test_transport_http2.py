"""HTTP/2 behaviour of the transport, driven by a raw h2 client over loopback."""

from __future__ import annotations

import json

import h2.errors
import h2.events
import h2.settings
import pytest
import trio
from hyperframe.frame import PingFrame

from tests.relay.transport.transport_testing import (
    FIRES_WITHIN_SECONDS,
    WAIT_SECONDS,
    App,
    H2Client,
    H2Response,
    make_config,
    open_stream,
    problem_code,
    run,
    serving,
    wait_until,
)

ErrorCodes = h2.errors.ErrorCodes
MiB = 1024 * 1024


def test_echo_request_fields_and_default_headers() -> None:
    async def main() -> None:
        app = App()
        async with serving(make_config(), app) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("POST", "/echo?a=1&b=2", b"hello", [("x-custom", "Value")])
            response = await client.response(sid)
            assert response.status == 200
            assert bytes(response.body) == b"hello"
            assert response.headers["server"] == "tetherless"
            assert response.headers["content-length"] == "5"
            assert "date" in response.headers
            info = json.loads(response.headers["x-info"])
            assert (info["method"], info["path"], info["query"], info["version"]) == ("POST", "/echo", "a=1&b=2", "2")
            assert ["x-custom", "Value"] in info["headers"]
            assert ["host", "localhost"] in info["headers"]
            assert not any(name.startswith(":") for name, _ in info["headers"])
            assert app.requests[0].client.startswith("127.0.0.1:")

    run(main)


def test_many_concurrent_streams_on_one_connection() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            client = await H2Client.connect(server.port)
            ids = [await client.request("POST", "/echo", f"body{i}".encode()) for i in range(50)]
            for i, sid in enumerate(ids):
                response = await client.response(sid)
                assert (response.status, bytes(response.body)) == (200, f"body{i}".encode())

    run(main)


def test_upload_of_several_mib() -> None:
    async def main() -> None:
        body = bytes(range(256)) * (12 * 4096)  # 12 MiB
        async with serving(make_config(max_body_bytes=16 * MiB), App()) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("POST", "/echo", body)
            response = await client.response(sid)
            assert response.status == 200
            assert bytes(response.body) == body

    run(main)


def test_small_client_window_still_gets_the_whole_response() -> None:
    async def main() -> None:
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024}
        async with serving(make_config(), App()) as server:
            client = await H2Client.connect(server.port, settings=settings)
            sid = await client.request("GET", f"/big?bytes={MiB}")
            response = await client.response(sid)
            assert response.status == 200
            assert response.headers["content-length"] == str(MiB)
            assert len(response.body) == MiB

    run(main)


def test_streaming_response_is_chunked_and_ends() -> None:
    async def main() -> None:
        app = App()
        async with serving(make_config(), app) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("GET", "/stream?n=4")
            response = await client.response(sid)
            assert response.status == 200
            assert "content-length" not in response.headers
            assert bytes(response.body) == b"chunk0\nchunk1\nchunk2\nchunk3\n"
            assert response.reset_code is None
            assert app.streams_closed == 1

    run(main)


def test_peer_that_never_reads_keeps_server_buffer_bounded() -> None:
    async def main() -> None:
        cap = 256 * 1024
        app = App()
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}
        async with serving(make_config(send_buffer_bytes=cap), app) as server:
            client = await H2Client.connect(server.port, settings=settings, connection_window=2**31 - 1 - 65535)
            await client.request("GET", "/infinite-chunks")
            await app.stream_started.wait()
            # The kernel buffers fill, then the transport's cap holds: the producer stops being pulled (half a
            # second without a pull). A transport without the cap pulls it for ever and fails here.
            pulled = -1
            with trio.fail_after(WAIT_SECONDS):
                while app.chunks_pulled != pulled:
                    pulled = app.chunks_pulled
                    await trio.sleep(0.5)
            stats = server.statistics()
            assert stats.streams_open == 1
            # One frame of slack: a sender stops at the cap, after its last frame.
            assert 0 < stats.max_connection_buffered_bytes <= cap + 16 * 1024
            await trio.aclose_forcefully(client.stream)
            await wait_until(lambda: app.streams_closed == 1)

    run(main)


def test_body_limit_exact_and_one_over() -> None:
    async def main() -> None:
        limit = 100_000
        async with serving(make_config(max_body_bytes=limit), App()) as server:
            client = await H2Client.connect(server.port)
            ok = await client.response(await client.request("POST", "/echo", b"a" * limit))
            assert (ok.status, len(ok.body)) == (200, limit)
            # Without Content-Length: detected while the body arrives.
            over = await client.response(await client.request("POST", "/echo", b"a" * (limit + 1)))
            assert over.status == 413
            assert over.headers["content-type"] == "application/problem+json"
            assert problem_code(over.body) == "body_too_large"
            # With Content-Length: rejected before any body byte is read.
            sid = await client.request("POST", "/echo", headers=[("content-length", str(limit + 1))], end_stream=False)
            early = await client.response(sid)
            assert (early.status, problem_code(early.body)) == (413, "body_too_large")
            # The connection is still usable.
            again = await client.response(await client.request("POST", "/echo", b"fine"))
            assert (again.status, bytes(again.body)) == (200, b"fine")

    run(main)


def test_handler_exception_is_500_and_connection_survives() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            client = await H2Client.connect(server.port)
            failed = await client.response(await client.request("GET", "/boom"))
            assert (failed.status, problem_code(failed.body)) == (500, "internal")
            bad = await client.response(await client.request("GET", "/bad-header"))
            assert (bad.status, problem_code(bad.body)) == (500, "internal")
            ok = await client.response(await client.request("POST", "/echo", b"next"))
            assert (ok.status, bytes(ok.body)) == (200, b"next")

    run(main)


def test_client_reset_cancels_the_handler() -> None:
    async def main() -> None:
        app = App()
        async with serving(make_config(), app) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("GET", "/slow?seconds=10")
            await app.slow_started.wait()
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            await client.flush()
            await wait_until(lambda: app.handlers_cancelled == 1)
            ok = await client.response(await client.request("POST", "/echo", b"after"))
            assert ok.status == 200

    run(main)


def test_client_reset_ends_a_streaming_response() -> None:
    async def main() -> None:
        app = App()
        async with serving(make_config(), app) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("GET", "/forever")
            await client.until(lambda: len(client.responses[sid].body) > 0)
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            await client.flush()
            await wait_until(lambda: app.streams_closed == 1)
            assert server.statistics().streams_open == 0

    run(main)


def test_ping_flood_past_budget_gets_enhance_your_calm() -> None:
    async def main() -> None:
        async with serving(make_config(control_frame_budget=100), App()) as server:
            client = await H2Client.connect(server.port)
            await client.response(await client.request("GET", "/echo"))  # settings exchanged
            # Raw frames: h2 would refuse to send once it saw the GOAWAY.
            flood = b"".join(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(300))
            await client.stream.send_all(flood)
            goaway = await client.goaway()
            assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM

    run(main)


def test_pings_within_budget_are_answered() -> None:
    async def main() -> None:
        async with serving(make_config(control_frame_budget=100), App()) as server:
            client = await H2Client.connect(server.port)
            for i in range(50):
                client.conn.ping(i.to_bytes(8, "big"))
            await client.flush()
            await client.until(lambda: sum(isinstance(e, h2.events.PingAckReceived) for e in client.events) == 50)
            assert not client.goaways

    run(main)


def test_rapid_reset_past_budget_gets_enhance_your_calm() -> None:
    async def main() -> None:
        async with serving(make_config(reset_budget=50), App()) as server:
            client = await H2Client.connect(server.port)
            for _ in range(80):
                sid = client.conn.get_next_available_stream_id()
                client.conn.send_headers(
                    sid, [(b":method", b"GET"), (b":path", b"/slow"), (b":scheme", b"http"), (b":authority", b"x")]
                )
                client.conn.end_stream(sid)
                client.conn.reset_stream(sid, ErrorCodes.CANCEL)
            await client.flush()
            goaway = await client.goaway()
            assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM

    run(main)


def test_oversize_header_list_ends_connection() -> None:
    async def main() -> None:
        async with serving(make_config(max_header_list_bytes=4096), App()) as server:
            client = await H2Client.connect(server.port)
            await client.response(await client.request("GET", "/echo"))
            await client.request("GET", "/echo", headers=[("x-big", "v" * 8000)])
            goaway = await client.goaway()
            assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM

    run(main)


def test_connect_method_resets_the_stream_only() -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            client = await H2Client.connect(server.port, validate=False)
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"example.com:443")])
            client.responses[sid] = H2Response()
            await client.flush()
            assert (await client.response(sid)).reset_code == ErrorCodes.PROTOCOL_ERROR
            ok = await client.response(await client.request("GET", "/echo"))
            assert ok.status == 200

    run(main)


@pytest.mark.parametrize(
    "headers",
    [
        [("content-length", "3"), ("content-length", "4")],
        [("transfer-encoding", "chunked")],
        [("connection", "keep-alive")],
        [("x-split", "a\r\nb")],
        [("x-nul", "a\x00b")],
        # Names reach the application without another lower-casing: h2 must refuse these.
        [("X-Upper", "v")],
    ],
    ids=["conflicting-content-length", "transfer-encoding", "connection", "crlf", "nul", "upper-case-name"],
)
def test_malformed_headers_end_the_connection(headers: list[tuple[str, str]]) -> None:
    async def main() -> None:
        async with serving(make_config(), App()) as server:
            client = await H2Client.connect(server.port, validate=False)
            await client.request("POST", "/echo", headers=headers, end_stream=False)
            goaway = await client.goaway()
            assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR

    run(main)


def test_header_timeout_without_settings() -> None:
    async def main() -> None:
        async with serving(make_config(header_timeout_seconds=0.3), App()) as server:
            stream = await open_stream(server.port)
            await stream.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # preface, then nothing
            start = trio.current_time()
            with trio.fail_after(WAIT_SECONDS):
                while await stream.receive_some(65536):
                    pass
            assert trio.current_time() - start < FIRES_WITHIN_SECONDS

    run(main)


def test_idle_timeout_sends_goaway_no_error() -> None:
    async def main() -> None:
        async with serving(make_config(idle_timeout_seconds=0.3), App()) as server:
            client = await H2Client.connect(server.port)
            assert (await client.response(await client.request("GET", "/echo"))).status == 200
            goaway = await client.goaway()
            assert goaway.error_code == ErrorCodes.NO_ERROR

    run(main)


def test_body_timeout_resets_the_stream() -> None:
    async def main() -> None:
        async with serving(make_config(body_timeout_seconds=0.3), App()) as server:
            client = await H2Client.connect(server.port)
            sid = await client.request("POST", "/echo", end_stream=False)
            response = await client.response(sid)
            assert response.reset_code == ErrorCodes.CANCEL

    run(main)


def test_too_many_concurrent_streams_is_a_connection_error() -> None:
    async def main() -> None:
        async with serving(make_config(max_concurrent_streams=3), App()) as server:
            client = await H2Client.connect(server.port)
            # Sent before the client has seen the server's SETTINGS, so its h2 does not hold them back.
            for _ in range(5):
                await client.request("GET", "/slow?seconds=1")
            goaway = await client.goaway()
            assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR

    run(main)


def test_streams_up_to_the_cap_all_succeed() -> None:
    async def main() -> None:
        async with serving(make_config(max_concurrent_streams=3), App()) as server:
            client = await H2Client.connect(server.port)
            await client.response(await client.request("GET", "/echo"))  # learn the server's settings
            slow = [await client.request("GET", "/slow?seconds=0.2") for _ in range(3)]
            for sid in slow:
                assert (await client.response(sid)).status == 200

    run(main)


def test_peer_that_stops_reading_is_closed_after_the_stall_timeout() -> None:
    async def main() -> None:
        app = App()
        settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}
        config = make_config(send_buffer_bytes=64 * 1024, idle_timeout_seconds=0.5)
        async with serving(config, app) as server:
            client = await H2Client.connect(server.port, settings=settings, connection_window=2**31 - 1 - 65535)
            await client.request("GET", "/infinite-chunks")
            # the server gave up (the stall timeout, not a default one) and closed the producer
            await wait_until(lambda: app.streams_closed == 1, timeout=FIRES_WITHIN_SECONDS)
            await wait_until(lambda: server.statistics().connections_open == 0)

    run(main)
