"""Slow and stuck clients against a real relay: slowloris, slow bodies, slow reads, half-open TLS, per-IP caps.

The relay runs with a 1 s header timeout, 2 s body and idle timeouts, a 1 s
TLS handshake timeout and 32 connections per IP (tests/attacks/conftest.py).
Every assertion on time is generous (a loaded 2-core machine): the point is
that a timeout fires at all, not how precisely.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.attacks.conftest import ATTACK_ENV
from tests.attacks.raw import (
    CANCEL,
    INITIAL_WINDOW_SIZE,
    NO_ERROR,
    PREFACE,
    RawH2,
    attack,
    frame_bytes,
    request_headers,
)
from tests.relay_process import RelayProcess

HEADER_TIMEOUT = float(ATTACK_ENV["TETHERLESS_HEADER_TIMEOUT_SECONDS"])
IDLE_TIMEOUT = float(ATTACK_ENV["TETHERLESS_IDLE_TIMEOUT_SECONDS"])
PER_IP = int(ATTACK_ENV["TETHERLESS_MAX_CONNECTIONS_PER_IP"])
CLOSE_WITHIN = 8.0  # any timeout above, plus a loaded machine's slack


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WITHIN + 5)


def _dribble_until_closed(sock: socket.socket, pieces: list[bytes], interval: float) -> tuple[float, bytes]:
    """Send ``pieces`` one per ``interval`` until the relay closes; (seconds it took, bytes it answered)."""
    started = time.monotonic()
    answer = b""
    sock.settimeout(interval)
    for piece in pieces:
        try:
            sock.sendall(piece)
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        answer += chunk
        if time.monotonic() - started > CLOSE_WITHIN * 2:
            break
    return time.monotonic() - started, answer


def test_http11_slowloris_headers_time_out(relay: RelayProcess, pid: int) -> None:
    with attack(pid, relay.port):
        socks = [_connect(relay.port) for _ in range(PER_IP // 2)]
        pieces = [b"GET /livez HTTP/1.1\r\nHost: x\r\n"] + [b"x-a: b\r\n"] * 200
        elapsed, answer = _dribble_until_closed(socks[0], pieces, 0.25)
        for sock in socks:
            sock.close()
    assert elapsed < CLOSE_WITHIN, f"connection open for {elapsed:.1f} s"
    # h11 answers nothing for an incomplete head: the connection is just closed.
    assert answer in (b"",) or answer.startswith(b"HTTP/1.1 408")


def test_http11_slow_body_times_out(relay: RelayProcess, pid: int) -> None:
    with attack(pid, relay.port), _connect(relay.port) as sock:
        head = (
            b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        elapsed, answer = _dribble_until_closed(sock, [head] + [b"{"] * 200, 0.25)
    assert elapsed < CLOSE_WITHIN + 2, f"connection open for {elapsed:.1f} s"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_h2_without_preface_or_settings_times_out(relay: RelayProcess, pid: int) -> None:
    with attack(pid, relay.port), _connect(relay.port) as sock:
        elapsed, _ = _dribble_until_closed(sock, [bytes([b]) for b in PREFACE[:20]], 0.25)
    assert elapsed < CLOSE_WITHIN


def test_h2_incomplete_header_block_times_out(relay: RelayProcess, pid: int) -> None:
    """HEADERS without END_HEADERS, then a CONTINUATION now and then: the header timeout still applies."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        client.read_until(lambda r: len(r.frames) >= 2, timeout=5)
        started = time.monotonic()
        client.headers(block=client.header_block(request_headers("/livez")), end_headers=False)
        while time.monotonic() - started < CLOSE_WITHIN * 2 and not client.received.closed:
            client.send(frame_bytes(0x9, 0, 1, b""))
            client.read_until(lambda r: r.goaway is not None, timeout=0.5)
            if client.received.goaway is not None:
                break
        elapsed = time.monotonic() - started
    assert elapsed < CLOSE_WITHIN, f"header block still open after {elapsed:.1f} s"


def test_h2_slow_body_is_reset(relay: RelayProcess, pid: int) -> None:
    with attack(pid, relay.port), RawH2(relay.port) as client:
        sid = client.headers(request_headers("/v1/messages", "POST", content_type="application/json"), end_stream=False)
        started = time.monotonic()
        while time.monotonic() - started < CLOSE_WITHIN * 2 and sid not in client.received.resets():
            client.data(sid, b"{")
            client.read_until(lambda r: sid in r.resets(), timeout=0.25)
        elapsed = time.monotonic() - started
        assert client.received.resets().get(sid) == CANCEL
    assert elapsed < CLOSE_WITHIN


@pytest.mark.parametrize("window", [0, 1])
def test_h2_tiny_window_stalls_then_idle_timeout_closes(relay: RelayProcess, pid: int, window: int) -> None:
    """A peer that opens no flow-control window: the relay pauses, buffers nothing more, and gives up."""
    with attack(pid, relay.port), RawH2(relay.port, settings={INITIAL_WINDOW_SIZE: window}) as client:
        sids = [client.headers(request_headers("/openapi.json")) for _ in range(20)]
        started = time.monotonic()
        received = client.wait_closed(timeout=CLOSE_WITHIN * 3)
        elapsed = time.monotonic() - started
        body = sum(len(f.data) for f in received.frames if f.type == 0x0)
    assert body <= window * len(sids), "the relay sent past the peer's window"
    assert received.closed, "the relay kept a stalled connection open"
    assert elapsed < IDLE_TIMEOUT * 2 + CLOSE_WITHIN, f"closed only after {elapsed:.1f} s"
    assert received.goaway is None or received.goaway.error_code == NO_ERROR


def test_h2_peer_that_never_reads_is_closed(relay: RelayProcess, pid: int) -> None:
    """Wide-open windows, many large responses, and a peer that never reads a byte."""
    settings = {INITIAL_WINDOW_SIZE: 2**31 - 1}
    with attack(pid, relay.port), RawH2(relay.port, settings=settings) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.window_update(0, 2**31 - 1 - 65535)
        for _ in range(100):
            client.headers(request_headers("/openapi.json"))
        time.sleep(IDLE_TIMEOUT + 3)  # never read; the relay's write stalls, then it gives up
        received = client.wait_closed(timeout=CLOSE_WITHIN * 3)
    assert received.closed


def test_half_open_tls_handshakes_time_out_and_the_cap_holds(tmp_path: Path, tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    relay = RelayProcess(tmp_path / "tls-data", extra_args=["--tls-cert", cert, "--tls-key", key], env=ATTACK_ENV)
    relay.start()
    try:
        assert relay.proc is not None
        with attack(relay.proc.pid, relay.port, tls=True):
            socks = [_connect(relay.port) for _ in range(PER_IP + 8)]
            # Half a handshake: a ClientHello record header, then nothing.
            for sock in socks:
                try:
                    sock.sendall(b"\x16\x03\x01\x02\x00")
                except OSError:
                    pass
            started = time.monotonic()
            closed = 0
            for sock in socks:
                sock.settimeout(max(0.1, CLOSE_WITHIN - (time.monotonic() - started)))
                try:
                    if sock.recv(1024) == b"":
                        closed += 1
                except (TimeoutError, OSError) as exc:
                    closed += not isinstance(exc, TimeoutError)
                sock.close()
            elapsed = time.monotonic() - started
            # A real handshake still works afterwards.
            context = ssl.create_default_context(cafile=cert)
            with (
                socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"GET /livez HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                assert tls.recv(1024).startswith(b"HTTP/1.1 200")
        assert closed == len(socks), f"only {closed} of {len(socks)} half-open handshakes were closed"
        assert elapsed < CLOSE_WITHIN
    finally:
        assert relay.stop() == 0


def test_per_ip_connection_cap(relay: RelayProcess, pid: int) -> None:
    """Connections past the per-IP cap are closed at once; another address is unaffected (the probe)."""
    with attack(pid, relay.port):
        held = [RawH2(relay.port) for _ in range(PER_IP)]
        for client in held:  # each is served: the relay's SETTINGS arrives
            client.read_until(lambda r: len(r.frames) >= 1, timeout=10)
            assert client.received.frames
        extra = [_connect(relay.port) for _ in range(8)]
        for sock in extra:
            sock.settimeout(5)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
            sock.close()
        for client in held:
            client.close()
