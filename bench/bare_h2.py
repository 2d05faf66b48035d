"""Baseline: the smallest reasonable trio + h2 server (a task per request, flush per loop turn).

It answers every request with a fixed 2-byte body after reading the request
body; no routing, no store. The relay's request paths are reported as a
ratio of this server's rate, measured in the same run on the same machine.

Run: python -m bench.bare_h2  (prints "listening PORT" once bound to an ephemeral port)
"""

from __future__ import annotations

from functools import partial

import h2.config
import h2.connection
import h2.events
import trio
import trio.lowlevel

RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/octet-stream"), ("content-length", "2")]


async def handle(stream: trio.SocketStream) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
    await stream.send_all(conn.data_to_send())
    dirty = trio.Event()

    async def writer() -> None:
        nonlocal dirty
        while True:
            await dirty.wait()
            dirty = trio.Event()
            data = conn.data_to_send()
            if data:
                await stream.send_all(data)

    async def respond(stream_id: int) -> None:
        await trio.lowlevel.checkpoint()  # a task per request, as the relay does
        conn.send_headers(stream_id, RESPONSE_HEADERS)
        conn.send_data(stream_id, b"ok", end_stream=True)
        dirty.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    break
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if isinstance(event, h2.events.StreamEnded):
                        nursery.start_soon(respond, event.stream_id)
                dirty.set()
            nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, h2.exceptions.ProtocolError):
        pass


async def main() -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        print(f"listening {listeners[0].socket.getsockname()[1]}", flush=True)


if __name__ == "__main__":
    trio.run(main)
