"""Raw-frame attack clients and the checks every attack test makes against a real relay process.

Everything here is blocking (plain sockets, threads): an attack client must
be able to send bytes no well-behaved library would, and the relay under
test is a separate process, so there is no event loop to share.

- :class:`RawH2` speaks HTTP/2 frame by frame (hyperframe + hpack, no state
  machine, so nothing stops us from sending what the RFC forbids).
- :class:`LivenessProbe` is the legitimate client: it asks ``/livez`` on
  fresh connections from another loopback address (127.0.0.2, so the
  attacker's per-IP cap never applies to it) for as long as the attack runs.
- :func:`rss_kib` reads the relay's resident set from ``/proc``.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LEGIT_SOURCE_IP = "127.0.0.2"
# Generous: the relay is a Python process on a shared 2-core machine; what
# the bound catches is growth with the size of the attack, not noise.
RSS_GROWTH_LIMIT_KIB = 50 * 1024

# SETTINGS identifiers (RFC 9113 §6.5.2).
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5

# Error codes (RFC 9113 §7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def request_headers(path: str = "/livez", method: str = "GET", **extra: str) -> list[tuple[str, str]]:
    headers = [(":method", method), (":scheme", "http"), (":authority", "127.0.0.1"), (":path", path)]
    return headers + [(name.replace("_", "-"), value) for name, value in extra.items()]


@dataclass
class Received:
    """Every frame the relay sent on one connection, by kind."""

    frames: list[Frame] = field(default_factory=list)
    goaway: GoAwayFrame | None = None
    closed: bool = False  # the relay closed the TCP connection (EOF or reset)

    def of(self, kind: type[Frame]) -> list[Frame]:
        return [frame for frame in self.frames if isinstance(frame, kind)]

    def resets(self) -> dict[int, int]:
        """stream id → error code of the RST_STREAM frames received."""
        return {frame.stream_id: frame.error_code for frame in self.of(RstStreamFrame)}  # type: ignore[attr-defined]


class RawH2:
    """A hand-driven HTTP/2 client connection: send any frame, read what comes back."""

    def __init__(
        self,
        port: int,
        *,
        settings: dict[int, int] | None = None,
        preface: bool = True,
        source_ip: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source_ip, 0) if source_ip else None
        )
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.received = Received()
        self._buffer = bytearray()
        self.send_failed = False
        self.next_stream_id = 1
        if preface:
            frame = SettingsFrame(0)
            frame.settings = {ENABLE_PUSH: 0, **(settings or {})}
            self.send(PREFACE + frame.serialize())

    # -- sending -------------------------------------------------------------------
    def send(self, data: bytes | Frame) -> bool:
        """Send raw bytes or a frame; False (and remembered) once the relay stopped taking bytes."""
        if self.send_failed:
            return False
        try:
            self.sock.sendall(data.serialize() if isinstance(data, Frame) else data)
        except OSError:
            self.send_failed = True
        return not self.send_failed

    def header_block(self, headers: list[tuple[str, str]]) -> bytes:
        return bytes(self.encoder.encode(headers, huffman=False))

    def headers(
        self,
        headers: list[tuple[str, str]] | None = None,
        *,
        stream_id: int | None = None,
        end_stream: bool = True,
        block: bytes | None = None,
        end_headers: bool = True,
    ) -> int:
        """Open a stream with one HEADERS frame; returns its id."""
        if stream_id is None:
            stream_id = self.next_stream_id
        self.next_stream_id = max(self.next_stream_id, stream_id + 2)
        frame = HeadersFrame(stream_id)
        frame.data = block if block is not None else self.header_block(headers or request_headers())
        if end_headers:
            frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        self.send(frame)
        return stream_id

    def headers_frame_bytes(self, stream_id: int, headers: list[tuple[str, str]], *, end_stream: bool = True) -> bytes:
        flags = 0x4 | (0x1 if end_stream else 0)  # END_HEADERS, END_STREAM
        return frame_bytes(0x1, flags, stream_id, self.header_block(headers))

    def data(self, stream_id: int, payload: bytes = b"", *, end_stream: bool = False) -> bool:
        frame = DataFrame(stream_id)
        frame.data = payload
        if end_stream:
            frame.flags.add("END_STREAM")
        return self.send(frame)

    def window_update(self, stream_id: int, increment: int) -> bool:
        # hyperframe refuses increments outside 1..2**31-1 when serialising; build by hand.
        return self.send(frame_bytes(0x8, 0, stream_id, increment.to_bytes(4, "big")))

    def rst(self, stream_id: int, code: int = CANCEL) -> bool:
        return self.send(RstStreamFrame(stream_id, error_code=code))

    def ping(self, payload: bytes = b"12345678") -> bool:
        return self.send(PingFrame(0, opaque_data=payload))

    def continuation(self, stream_id: int, payload: bytes, *, end_headers: bool = False) -> bool:
        frame = ContinuationFrame(stream_id)
        frame.data = payload
        if end_headers:
            frame.flags.add("END_HEADERS")
        return self.send(frame)

    # -- receiving -----------------------------------------------------------------
    def read_until(self, done: Callable[[Received], bool], timeout: float = 15.0) -> Received:
        """Read frames until ``done(received)``, the relay closes, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not done(self.received) and not self.received.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(min(remaining, 1.0))
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.received.closed = True
                break
            self._buffer += chunk
            self._parse()
        return self.received

    def wait_goaway(self, timeout: float = 15.0) -> GoAwayFrame | None:
        """Keep reading until GOAWAY arrives or the connection closes; the GOAWAY, if any."""
        return self.read_until(lambda r: r.goaway is not None, timeout).goaway

    def wait_closed(self, timeout: float = 15.0) -> Received:
        return self.read_until(lambda r: False, timeout)

    def _parse(self) -> None:
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                return
            frame.parse_body(memoryview(bytes(self._buffer[9 : 9 + length])))
            del self._buffer[: 9 + length]
            self.received.frames.append(frame)
            if isinstance(frame, GoAwayFrame) and self.received.goaway is None:
                self.received.goaway = frame
            if isinstance(frame, HeadersFrame):
                with contextlib.suppress(Exception):
                    frame.decoded = self.decoder.decode(bytes(frame.data))  # type: ignore[attr-defined]

    def response_status(self, stream_id: int) -> str | None:
        for frame in self.received.of(HeadersFrame):
            if frame.stream_id == stream_id:
                for name, value in getattr(frame, "decoded", []):
                    if name in (":status", b":status"):
                        return value.decode() if isinstance(value, bytes) else str(value)
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def frame_bytes(frame_type: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """A frame built by hand: for payloads hyperframe would refuse to serialise."""
    return len(payload).to_bytes(3, "big") + bytes([frame_type, flags]) + stream_id.to_bytes(4, "big") + payload


def settings_ack_count(received: Received) -> int:
    return sum(1 for frame in received.of(SettingsFrame) if "ACK" in frame.flags)


def ping_ack_count(received: Received) -> int:
    return sum(1 for frame in received.of(PingFrame) if "ACK" in frame.flags)


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return bytes(WindowUpdateFrame(stream_id, window_increment=increment).serialize())


# -- the legitimate client -------------------------------------------------------------


@dataclass
class ProbeResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    slowest_seconds: float = 0.0


class LivenessProbe:
    """Asks ``GET /livez`` over and over from 127.0.0.2 in a background thread.

    Use as a context manager around an attack; :meth:`assert_served` then
    checks that the relay kept answering a legitimate client throughout.
    """

    def __init__(self, port: int, *, tls: bool = False, interval_seconds: float = 0.05) -> None:
        self.port = port
        self.tls = tls
        self.interval_seconds = interval_seconds
        self.result = ProbeResult()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connection(self) -> http.client.HTTPConnection:
        source = (LEGIT_SOURCE_IP, 0)
        if self.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=10, source_address=source, context=context
            )
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=source)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            conn = self._connection()
            try:
                conn.request("GET", "/livez")
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    self.result.ok += 1
                else:
                    self.result.failures.append(f"status {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.result.failures.append(repr(exc))
            finally:
                conn.close()
            self.result.slowest_seconds = max(self.result.slowest_seconds, time.monotonic() - started)
            self._stop.wait(self.interval_seconds)

    def __enter__(self) -> LivenessProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Keep probing a moment after the attack: the relay must still be fine.
        time.sleep(0.2)
        self._stop.set()
        self._thread.join(timeout=30)

    def assert_served(self, minimum: int = 2) -> None:
        result = self.result
        assert not result.failures, f"legitimate client failed during the attack: {result.failures[:5]}"
        assert result.ok >= minimum, f"legitimate client got only {result.ok} answers"
        # Generous: this catches starvation (an event loop stuck in the attacker's
        # work), not a slow machine.
        assert result.slowest_seconds < 8.0, f"a /livez took {result.slowest_seconds:.1f} s"


@contextlib.contextmanager
def attack(pid: int, port: int, *, tls: bool = False, probes: int = 2) -> Iterator[LivenessProbe]:
    """Run the body as an attack: a legitimate client probes throughout, RSS growth is bounded."""
    before = rss_kib(pid)
    with LivenessProbe(port, tls=tls) as probe:
        yield probe
    after = rss_kib(pid)
    probe.assert_served(probes)
    assert after - before < RSS_GROWTH_LIMIT_KIB, f"relay RSS grew {before} → {after} KiB"
