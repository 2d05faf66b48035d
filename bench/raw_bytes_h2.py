"""Baseline for media: the smallest reasonable trio + h2 server that moves bulk bytes.

``PATCH``/``POST``/``PUT`` read the request body and throw it away (acknowledging
flow control as the bytes arrive, with a 16 MiB window, so the sender is never
waiting on this server's bookkeeping) and answer 204; ``GET /bytes/N`` answers
``N`` bytes in 16 KiB DATA frames as fast as the peer's window allows. No routing
beyond that, no authentication, no store, no hashing, no fsync: the cost of moving
the bytes through h2, trio and the kernel, measured in the same run as the relay's
tus upload and Range download (``python -m bench.media``).

Run: python -m bench.raw_bytes_h2  (prints "listening PORT" once bound to an ephemeral port)
"""

from __future__ import annotations

from functools import partial

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

WINDOW = 16 * 1024 * 1024
FRAME = 16 * 1024
_BLOCK = bytes(FRAME)


async def handle(stream: trio.SocketStream) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    conn.update_settings(
        {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100, h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW}
    )
    conn.increment_flow_control_window(WINDOW)
    await stream.send_all(conn.data_to_send())
    wake = trio.Event()
    downloads: dict[int, int] = {}  # stream id -> bytes still to send
    methods: dict[int, bytes] = {}

    async def writer() -> None:
        nonlocal wake
        while True:
            for stream_id, left in list(downloads.items()):
                while left > 0:
                    size = min(FRAME, left, conn.local_flow_control_window(stream_id))
                    if size <= 0:
                        break
                    left -= size
                    conn.send_data(stream_id, _BLOCK[:size], end_stream=left == 0)
                if left == 0:
                    del downloads[stream_id]
                else:
                    downloads[stream_id] = left
            data = conn.data_to_send()
            if data:
                await stream.send_all(data)
                continue
            await wake.wait()
            wake = trio.Event()

    def respond(stream_id: int, path: bytes) -> None:
        if methods.pop(stream_id, b"") == b"GET" and path.startswith(b"/bytes/"):
            size = int(path[len(b"/bytes/") :])
            conn.send_headers(stream_id, [(b":status", b"200"), (b"content-length", str(size).encode())])
            downloads[stream_id] = size
        else:
            conn.send_headers(stream_id, [(b":status", b"204")], end_stream=True)

    paths: dict[int, bytes] = {}
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            while True:
                data = await stream.receive_some(262144)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers)
                        methods[event.stream_id] = headers[b":method"]
                        paths[event.stream_id] = headers[b":path"]
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if isinstance(event, h2.events.StreamEnded):
                        respond(event.stream_id, paths.pop(event.stream_id, b""))
                wake.set()
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, h2.exceptions.ProtocolError):
        pass


async def main() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        print(f"listening {listeners[0].socket.getsockname()[1]}", flush=True)


if __name__ == "__main__":
    trio.run(main)
