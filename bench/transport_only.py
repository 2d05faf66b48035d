"""The relay's transport alone: ``relay.transport.Server`` with an application that answers at once.

Same requests as ``bench/bare_h2.py`` (h2load POST 1 KiB); the handler returns
a 201 with a small MessagePack body and the content type the API uses, so
the figure is what the transport itself (h2, limits, tasks, header
encoding) costs per request, between the bare responder and the full relay.

Run: python -m bench.transport_only  (prints "listening PORT" once bound to an ephemeral port)
"""

from __future__ import annotations

import trio

from relay.api.http import Request, Response
from relay.config import Config
from relay.transport import Server

BODY = b"\x81\xa6cursor\x01"


async def answer(request: Request) -> Response:
    return Response(201, [("content-type", "application/vnd.msgpack")], BODY)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(Server(Config(listen="127.0.0.1:0"), answer).serve)
        print(f"listening {port}", flush=True)


if __name__ == "__main__":
    trio.run(main)
