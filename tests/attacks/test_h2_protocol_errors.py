"""HTTP/2 protocol violations against a real relay: each gets the right RST_STREAM or GOAWAY code.

Stream errors (RFC 9113 §5.4.2) reset one stream and leave the connection
usable; connection errors (§5.4.1) end it with GOAWAY. h2 treats several
stream errors (a zero stream WINDOW_UPDATE, a malformed Content-Length) as
connection errors, which §5.4.1 allows; the relay itself resets only CONNECT.
docs/security.md lists which is which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.attacks.raw import (
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RawH2,
    attack,
    frame_bytes,
    request_headers,
)
from tests.relay_process import RelayProcess


@dataclass(frozen=True)
class Case:
    send: Callable[[RawH2], None]
    goaway: int | None = None  # connection error with this code
    reset: int | None = None  # stream 1 reset with this code; the connection stays usable


def _oversize_data(client: RawH2) -> None:
    client.headers(request_headers("/v1/messages", "POST"), end_stream=False)
    client.send(frame_bytes(0x0, 0, 1, b"a" * 16_385))


def _oversize_headers(client: RawH2) -> None:
    block = client.header_block(request_headers("/livez", x_pad="a" * 16_000)) + b"\x00" * 800
    client.send(frame_bytes(0x1, 0x5, 1, block))


def _zero_window_increment_stream(client: RawH2) -> None:
    client.headers(request_headers("/v1/messages", "POST"), end_stream=False)
    client.window_update(1, 0)


def _smuggle(*extra: tuple[str, str], method: str = "POST", path: str = "/v1/messages") -> Callable[[RawH2], None]:
    def send(client: RawH2) -> None:
        client.headers(request_headers(path, method) + list(extra), end_stream=False)

    return send


def _raw_header_value(name: bytes, value: bytes) -> Callable[[RawH2], None]:
    """A literal field without indexing, built by hand (hpack would not encode a CR or NUL for us)."""

    def send(client: RawH2) -> None:
        field = b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
        client.headers(block=client.header_block(request_headers("/livez")) + field)

    return send


def _body_longer_than_content_length(client: RawH2) -> None:
    client.headers(request_headers("/v1/messages", "POST", content_length="4"), end_stream=False)
    client.data(1, b"0123456789", end_stream=True)


CASES = {
    "oversize DATA frame": Case(_oversize_data, goaway=FRAME_SIZE_ERROR),
    "oversize HEADERS frame": Case(_oversize_headers, goaway=FRAME_SIZE_ERROR),
    "zero WINDOW_UPDATE on the connection": Case(lambda c: c.window_update(0, 0), goaway=PROTOCOL_ERROR),
    "zero WINDOW_UPDATE on a stream": Case(_zero_window_increment_stream, goaway=PROTOCOL_ERROR),
    "connection window overflow": Case(lambda c: c.window_update(0, 2**31 - 1), goaway=FLOW_CONTROL_ERROR),
    "CR LF in a header value": Case(_raw_header_value(b"x-a", b"v\r\nx-b: smuggled"), goaway=PROTOCOL_ERROR),
    "NUL in a header value": Case(_raw_header_value(b"x-a", b"v\x00w"), goaway=PROTOCOL_ERROR),
    "upper-case header name": Case(_raw_header_value(b"X-A", b"v"), goaway=PROTOCOL_ERROR),
    "Transfer-Encoding on HTTP/2": Case(_smuggle(("transfer-encoding", "chunked")), goaway=PROTOCOL_ERROR),
    "Connection header on HTTP/2": Case(_smuggle(("connection", "keep-alive")), goaway=PROTOCOL_ERROR),
    "conflicting Content-Length": Case(
        _smuggle(("content-length", "4"), ("content-length", "5")), goaway=PROTOCOL_ERROR
    ),
    "non-numeric Content-Length": Case(_smuggle(("content-length", "4, x")), goaway=PROTOCOL_ERROR),
    "body longer than Content-Length": Case(_body_longer_than_content_length, goaway=PROTOCOL_ERROR),
    "CONNECT": Case(
        lambda c: c.headers([(":method", "CONNECT"), (":authority", "example.com:443")], end_stream=False),
        reset=PROTOCOL_ERROR,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_protocol_violation_gets_the_documented_code(relay: RelayProcess, pid: int, name: str) -> None:
    case = CASES[name]
    with attack(pid, relay.port), RawH2(relay.port) as client:
        case.send(client)
        if case.goaway is not None:
            goaway = client.wait_goaway()
            assert goaway is not None, f"{name}: no GOAWAY; got {client.received.frames}"
            assert goaway.error_code == case.goaway, f"{name}: GOAWAY {goaway.error_code}"
        else:
            received = client.read_until(lambda r: 1 in r.resets())
            assert received.resets().get(1) == case.reset, f"{name}: {received.frames}"
            assert received.goaway is None
            # The connection survives a stream error.
            sid = client.headers(request_headers("/livez"))
            client.read_until(lambda r: client.response_status(sid) is not None)
            assert client.response_status(sid) == "200"


def test_streams_past_the_concurrency_limit_are_refused(relay: RelayProcess, pid: int) -> None:
    """MAX_CONCURRENT_STREAMS is 100: the 101st open stream is refused, the first 100 still complete."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        # Wait for the relay's SETTINGS so we know its limit is in force.
        client.read_until(lambda r: any(f.type == 0x4 and "ACK" not in f.flags for f in r.frames))
        batch = bytearray()
        for n in range(101):
            batch += client.headers_frame_bytes(2 * n + 1, request_headers("/v1/messages", "POST"), end_stream=False)
        client.next_stream_id = 203
        client.send(bytes(batch))
        received = client.read_until(lambda r: bool(r.resets()) or r.goaway is not None)
        if received.goaway is not None:  # h2 may treat it as a connection error instead
            assert received.goaway.error_code in (PROTOCOL_ERROR, REFUSED_STREAM)
            return
        assert received.resets() == {201: REFUSED_STREAM}
        # Streams inside the limit are still served: finish one (an empty body is a 4xx, not a reset).
        client.data(1, b"", end_stream=True)
        client.read_until(lambda r: client.response_status(1) is not None)
        assert client.response_status(1) is not None


def test_stream_resets_within_budget_are_fine(relay: RelayProcess, pid: int) -> None:
    """The reset budget must not punish a normal client that cancels now and then."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        for _ in range(50):
            sid = client.headers(request_headers("/v1/messages", "POST"), end_stream=False)
            client.rst(sid)
        sid = client.headers(request_headers("/livez"))
        received = client.read_until(lambda r: client.response_status(sid) is not None)
        assert client.response_status(sid) == "200"
        assert received.goaway is None or received.goaway.error_code != ENHANCE_YOUR_CALM
