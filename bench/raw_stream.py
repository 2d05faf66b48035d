"""Baseline for delivery: a raw trio stream writer and reader, no HTTP/2, no store.

The writer sends each connection ``N`` stream items in the relay's exact
MessagePack framing (``protocol.codec.encode_stream_item`` of a 200-byte
envelope), one ``send_all`` per page of 1,000 items; the pages are encoded
once up front, so this is the cost of moving the bytes through trio and the
kernel. The reader counts frames the way ``bench.load streams`` does.

    python -m bench.raw_stream serve PORT
    python -m bench.raw_stream read PORT --streams S --expect N   (prints one JSON object)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import trio

from protocol import codec
from protocol.messages import InboxEnvelope

from .load import count_items

PAGE = 1000


def _page() -> bytes:
    return b"".join(
        codec.encode_stream_item(
            InboxEnvelope(cursor=i + 1, id=os.urandom(16), sent_at_ms=1, expires_at_ms=2, ciphertext=os.urandom(200))
        )
        for i in range(PAGE)
    )


async def serve(port: int) -> None:
    page = _page()

    async def handle(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(64)
        count = int(request.strip())
        for _ in range(0, count, PAGE):
            await stream.send_all(page)
        await stream.aclose()

    await trio.serve_tcp(handle, port, host="127.0.0.1")


async def read(port: int, streams: int, expect: int) -> dict[str, float]:
    first = last = 0.0
    received = 0

    async def one() -> None:
        nonlocal first, last, received
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"%d\n" % expect)
        buf = bytearray()
        mine = 0
        while mine < expect:
            data = await stream.receive_some(65536)
            if not data:
                break
            if not first:
                first = time.perf_counter()
            buf += data
            n = count_items(buf)
            mine += n
            received += n
        last = time.perf_counter()
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one)
    return {"received": received, "seconds": last - first, "client_cpu_seconds": time.process_time()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "read"])
    parser.add_argument("port", type=int)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--expect", type=int, default=2000)
    args = parser.parse_args()
    if args.mode == "serve":
        trio.run(serve, args.port)
    else:
        print(json.dumps(trio.run(read, args.port, args.streams, args.expect)), flush=True)


if __name__ == "__main__":
    main()
