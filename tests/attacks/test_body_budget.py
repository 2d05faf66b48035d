"""Many concurrent uploads on one HTTP/2 connection: buffered request bodies are bounded per connection.

Without a per-connection budget a client could park max_concurrent_streams
bodies of max_body_bytes each (100 x 8 MiB by default) in one connection.
The relay stops reopening flow-control windows once
max_connection_body_bytes are buffered, so a client that honours flow
control (as every real client must) can send at most that budget plus the
connection window before it has to wait.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from tests.attacks.conftest import ATTACK_ENV
from tests.attacks.raw import attack
from tests.relay_process import RelayProcess

MiB = 1024 * 1024
MAX_BODY = 1 * MiB
BUDGET = 2 * MiB
CONNECTION_WINDOW = 16 * MiB  # relay/transport/http2.py CONNECTION_WINDOW_BYTES
STREAMS = 60  # 60 bodies just under MAX_BODY: ~60 MiB without the budget


def _upload_until_stalled(port: int) -> int:
    """Open STREAMS uploads, send as much as flow control allows, return the bytes sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    streams = []
    for _ in range(STREAMS):
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":path", "/v1/messages"),
                (":scheme", "http"),
                (":authority", "relay"),
                ("content-type", "application/vnd.msgpack"),
            ],
        )
        streams.append(stream_id)
    remaining = dict.fromkeys(streams, MAX_BODY - 1024)
    sent = 0
    last_progress = time.monotonic()
    chunk = b"\x00" * 16384
    while time.monotonic() - last_progress < 1.5:
        progressed = False
        for stream_id in streams:
            try:
                window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                remaining[stream_id] = 0
                continue
            size = min(window, remaining[stream_id], len(chunk))
            if size > 0:
                conn.send_data(stream_id, chunk[:size])
                remaining[stream_id] -= size
                sent += size
                progressed = True
        data = conn.data_to_send()
        if data:
            sock.sendall(data)
        sock.settimeout(0.05)
        try:
            incoming = sock.recv(65536)
        except TimeoutError:
            incoming = None
        if incoming == b"":
            break
        if incoming:
            for event in conn.receive_data(incoming):
                if isinstance(event, h2.events.ConnectionTerminated):
                    break
            reply = conn.data_to_send()
            if reply:
                sock.sendall(reply)
        if progressed:
            last_progress = time.monotonic()
        if not any(remaining.values()):
            break
    sock.close()
    return sent


def test_buffered_bodies_are_bounded_per_connection(tmp_path: Path) -> None:
    env = {
        **ATTACK_ENV,
        "TETHERLESS_MAX_BODY_BYTES": str(MAX_BODY),
        "TETHERLESS_MAX_CONNECTION_BODY_BYTES": str(BUDGET),
        "TETHERLESS_BODY_TIMEOUT_SECONDS": "10",
    }
    relay = RelayProcess(tmp_path / "data", env=env)
    relay.start()
    try:
        assert relay.proc is not None
        with attack(relay.proc.pid, relay.port):
            sent = _upload_until_stalled(relay.port)
        # Budget + the connection window the relay granted up front + one frame per stream of slack.
        assert sent <= BUDGET + CONNECTION_WINDOW + STREAMS * 16384, f"sent {sent / MiB:.1f} MiB"
        assert sent >= BUDGET, "the relay should accept bodies up to its budget"
    finally:
        assert relay.stop() == 0, relay.logs()[-3000:]
