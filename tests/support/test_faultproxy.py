"""The fault proxy itself: byte-exact passthrough, exact cuts, refusals, and no leftover tasks."""

from __future__ import annotations

import os
import socket

import trio

from tests.support.faultproxy import Cut, FaultProxy, Refuse, ScriptedPlan, Split, ThreadedFaultProxy


async def _echo_server(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


async def _sink_server(received: list[bytes], task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async def sink(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some(65536):
                received.append(data)
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(sink, listeners)


async def test_passthrough_is_byte_exact() -> None:
    payload = os.urandom(300_000)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_echo_server)
        plan = ScriptedPlan({("up", None): [(1000, Split(7))], ("down", None): [(5000, Split(3))]})
        async with FaultProxy.serve("127.0.0.1", port, plan) as proxy:
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            got = bytearray()

            async def reader() -> None:
                while len(got) < len(payload):
                    got.extend(await stream.receive_some(65536))

            async with trio.open_nursery() as io:
                io.start_soon(reader)
                await stream.send_all(payload)
            await stream.aclose()
            assert bytes(got) == payload
            assert proxy.bytes["up"] == len(payload)
            assert proxy.bytes["down"] == len(payload)
            assert proxy.actions["split"] == 2
        nursery.cancel_scope.cancel()


async def test_cut_at_offset_delivers_exactly_k_bytes_then_resets() -> None:
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_sink_server, received)
        async with FaultProxy.serve("127.0.0.1", port, ScriptedPlan({("up", 1): [(12_345, Cut(12_345))]})) as proxy:
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            reset = False
            try:
                for _ in range(100):
                    await stream.send_all(b"x" * 1000)
                    await trio.sleep(0.001)
                await stream.receive_some(10)  # the RST reaches us as an error or as EOF
            except trio.BrokenResourceError:
                reset = True
            await stream.aclose()
            with trio.fail_after(5):
                while sum(map(len, received)) < 12_345:  # noqa: ASYNC110 - a plain sink, no event to wait on
                    await trio.sleep(0.01)
            await trio.sleep(0.05)
            assert sum(map(len, received)) == 12_345
            assert proxy.bytes["up"] == 12_345
            assert proxy.actions["cut"] == 1
            assert reset or proxy.actions["cut"] == 1
        nursery.cancel_scope.cancel()


async def test_refuse_resets_on_accept() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_echo_server)
        async with FaultProxy.serve("127.0.0.1", port, ScriptedPlan({("accept", None): [(0, Refuse())]})) as proxy:
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.port)
            try:
                await stream.send_all(b"hello")
                data = await stream.receive_some(10)
            except trio.BrokenResourceError:
                data = b""
            assert data == b""
            assert proxy.actions["refuse"] == 1
            await stream.aclose()
        nursery.cancel_scope.cancel()


def _all_tasks() -> set[trio.lowlevel.Task]:
    found: set[trio.lowlevel.Task] = set()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return found


async def test_no_task_left_after_close() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_echo_server)
        before = _all_tasks()
        async with FaultProxy.serve("127.0.0.1", port) as proxy:
            streams = [await trio.open_tcp_stream("127.0.0.1", proxy.port) for _ in range(3)]
            for s in streams:
                await s.send_all(b"ping")
                assert await s.receive_some(10) == b"ping"
            assert len(proxy._socks) == 3
            assert len(_all_tasks()) > len(before) + 6  # listener + 3 x (handler + 2 pumps)
        assert proxy._socks == {}
        assert proxy._open == {}
        for s in streams:
            await s.aclose()
        await trio.sleep(0.05)
        # The echo server's handlers may still be finishing; none of the proxy's tasks is left.
        leftover = {t.name for t in _all_tasks() - before}
        assert not any("faultproxy" in name or "FaultProxy" in name for name in leftover), leftover
        nursery.cancel_scope.cancel()


def test_threaded_proxy_serves_blocking_sockets() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    proxy = ThreadedFaultProxy("127.0.0.1", upstream.getsockname()[1]).start()
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        server, _ = upstream.accept()
        client.sendall(b"abc" * 1000)
        got = b""
        server.settimeout(5)
        while len(got) < 3000:
            got += server.recv(4096)
        assert got == b"abc" * 1000
        client.close()
        server.close()
        proxy.call(proxy.proxy.set_plan, ScriptedPlan({("accept", None): [(0, Refuse())]}))  # type: ignore[union-attr]
    finally:
        proxy.close()
        upstream.close()
    assert not proxy._thread.is_alive()
