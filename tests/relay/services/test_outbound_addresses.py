"""The outbound client connects only where it is told (relay/transport/outbound.py ``connect_to``).

The federation service checks the addresses a name resolves to and passes
them on; the client must then not resolve the name again (DNS rebinding).
A name under ``.invalid`` never resolves (RFC 6761), so a request that
reaches the listener proves the connection went to ``connect_to``.
"""

from __future__ import annotations

import functools

import pytest
import trio

from relay.services import PeerUnreachableError
from relay.transport.outbound import OutboundClient

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"


async def test_connect_to_is_used_instead_of_resolving_and_the_host_header_keeps_the_name() -> None:
    heads: list[bytes] = []

    async def serve(stream: trio.SocketStream) -> None:
        heads.append(await stream.receive_some(65536))
        await stream.send_all(ANSWER)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        client = OutboundClient()
        url = f"http://relay.invalid:{port}"
        response = await client.request(
            url, "GET", "/x", [], b"", timeout_seconds=10, max_response_bytes=1024, connect_to=["127.0.0.1"]
        )
        assert (response.status, response.body) == (200, b"ok")
        assert f"host: relay.invalid:{port}".encode() in heads[0].lower()
        # without connect_to the name is resolved, and .invalid never resolves
        with pytest.raises(PeerUnreachableError):
            await client.request(url, "GET", "/x", [], b"", timeout_seconds=10, max_response_bytes=1024)
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_resolve() -> None:
    client = OutboundClient()
    assert "127.0.0.1" in await client.resolve("localhost", 443, timeout_seconds=10)
    assert await client.resolve("127.0.0.1", 443, timeout_seconds=10) == ["127.0.0.1"]
    with pytest.raises(PeerUnreachableError):
        await client.resolve("relay.invalid", 443, timeout_seconds=10)
