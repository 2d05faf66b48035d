"""A fault-injecting TCP proxy for end-to-end tests (docs/account-log.md §14.3).

``FaultProxy(upstream_host, upstream_port, plan)`` listens on ``127.0.0.1:0``.
For every accepted connection it opens the upstream and runs two pump tasks
(``"up"``: client → relay, ``"down"``: relay → client). Each pump reads a
chunk, asks ``plan.next(direction, conn_no, bytes_so_far)`` for an
:class:`Action` and applies it:

- ``Pass()``: forward the chunk;
- ``Delay(ms)``: sleep, then forward;
- ``Split(k)``: forward ``k`` bytes, then the rest (boundaries inside frames);
- ``Cut(k)``: forward ``k`` bytes (at most the chunk), then close both sides
  with ``SO_LINGER 0`` (TCP RST);
- ``Blackhole()``: stop forwarding, keep both sockets open (until the
  connection is reset or the proxy closed).

``Refuse()`` is asked for with direction ``"accept"`` before the upstream is
opened: the client connection is reset at once.

The plan is data: :class:`ScriptedPlan` maps ``(direction, conn_no)`` to an
ordered list of ``(at_offset, action)`` rules, and each rule fires on the chunk
that crosses its offset (so ``Cut`` at an offset inside a chunk delivers
exactly that many bytes). Hypothesis draws such scripts, which keeps a run
reproducible. ``set_plan`` swaps the plan for *new* connections; ``reset``
resets every open connection now. Counters: bytes per direction and actions
applied (``stats``).

Use it inside a trio nursery (``async with FaultProxy.serve(...) as proxy``),
or from a plain thread / another process via :class:`ThreadedFaultProxy`,
which runs its own trio loop in a background thread.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

CHUNK_BYTES = 65536


@dataclass(frozen=True)
class Pass:
    pass


@dataclass(frozen=True)
class Delay:
    ms: int


@dataclass(frozen=True)
class Split:
    k: int


@dataclass(frozen=True)
class Cut:
    k: int


@dataclass(frozen=True)
class Blackhole:
    pass


@dataclass(frozen=True)
class Refuse:
    pass


Action = Pass | Delay | Split | Cut | Blackhole | Refuse


class Plan(Protocol):
    def next(self, direction: str, conn_no: int, bytes_so_far: int, chunk_len: int) -> Action: ...


class PassPlan:
    """Forward everything."""

    def next(self, direction: str, conn_no: int, bytes_so_far: int, chunk_len: int) -> Action:
        return Pass()


@dataclass
class ScriptedPlan:
    """Rules as data: ``{(direction, conn_no | None): [(offset, action), ...]}``.

    ``conn_no`` None matches every connection; ``direction`` is ``"up"``,
    ``"down"`` or ``"accept"``. A rule fires once per connection, on the chunk
    whose byte range ``[bytes_so_far, bytes_so_far + chunk_len)`` reaches its
    offset. ``Cut``/``Split`` offsets are absolute stream offsets; the proxy
    turns them into offsets inside the chunk.
    """

    rules: dict[tuple[str, int | None], list[tuple[int, Action]]] = field(default_factory=dict)
    _fired: set[tuple[str, int, int]] = field(default_factory=set)

    def next(self, direction: str, conn_no: int, bytes_so_far: int, chunk_len: int) -> Action:
        for key in ((direction, conn_no), (direction, None)):
            for index, (offset, action) in enumerate(self.rules.get(key, [])):
                tag = (direction, conn_no, index if key[1] is not None else -1 - index)
                if tag in self._fired:
                    continue
                if direction == "accept" or offset < bytes_so_far + max(chunk_len, 1):
                    self._fired.add(tag)
                    if isinstance(action, Cut | Split):
                        rel = max(0, offset - bytes_so_far)
                        return Cut(rel) if isinstance(action, Cut) else Split(rel)
                    return action
        return Pass()


def _rst(sock: trio.socket.SocketType) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """The proxy. ``port`` is known once :meth:`serve` has entered."""

    def __init__(self, upstream_host: str, upstream_port: int, plan: Plan | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.plan: Plan = plan or PassPlan()
        self.port = 0
        self.bytes: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.connections = 0
        self._cancel: trio.CancelScope | None = None
        self._open: dict[int, trio.CancelScope] = {}
        self._socks: dict[int, list[trio.socket.SocketType]] = {}
        self._rst_pending: set[int] = set()
        self._listener: trio.socket.SocketType | None = None

    def set_plan(self, plan: Plan) -> None:
        """Use ``plan`` for connections accepted from now on."""
        self.plan = plan

    def set_upstream(self, host: str, port: int) -> None:
        """Point new connections at another upstream (a restarted relay on a new port)."""
        self.upstream = (host, port)

    def reset_all(self) -> None:
        """Reset every open connection now (RST on both sides, once their pumps have stopped)."""
        for conn_no, scope in list(self._open.items()):
            self._rst_pending.add(conn_no)
            scope.cancel()

    @property
    def stats(self) -> dict[str, object]:
        return {"connections": self.connections, "bytes": dict(self.bytes), "actions": dict(self.actions)}

    @classmethod
    @asynccontextmanager
    async def serve(cls, upstream_host: str, upstream_port: int, plan: Plan | None = None) -> AsyncIterator[FaultProxy]:
        proxy = cls(upstream_host, upstream_port, plan)
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy._run)
            try:
                yield proxy
            finally:
                proxy.reset_all()
                nursery.cancel_scope.cancel()

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    client, _ = await listener.accept()
                    self.connections += 1
                    nursery.start_soon(self._handle, client, self.connections)
        finally:
            listener.close()

    async def _handle(self, client: trio.socket.SocketType, conn_no: int) -> None:
        action = self.plan.next("accept", conn_no, 0, 0)
        if isinstance(action, Refuse):
            self.actions["refuse"] += 1
            _rst(client)
            return
        upstream = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await upstream.connect(self.upstream)
        except OSError:
            self.actions["upstream_refused"] += 1
            upstream.close()
            _rst(client)
            return
        self._socks[conn_no] = [client, upstream]
        try:
            with trio.CancelScope() as scope:
                self._open[conn_no] = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, "up", conn_no, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, client, "down", conn_no, nursery.cancel_scope)
        finally:
            self._open.pop(conn_no, None)
            rst = conn_no in self._rst_pending
            self._rst_pending.discard(conn_no)
            for sock in self._socks.pop(conn_no, []):
                if rst:
                    _rst(sock)
                else:
                    sock.close()

    async def _pump(
        self,
        src: trio.socket.SocketType,
        dst: trio.socket.SocketType,
        direction: str,
        conn_no: int,
        both: trio.CancelScope,
    ) -> None:
        sent = 0
        try:
            while True:
                chunk = await src.recv(CHUNK_BYTES)
                if not chunk:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                action = self.plan.next(direction, conn_no, sent, len(chunk))
                self.actions[type(action).__name__.lower()] += 1
                if isinstance(action, Delay):
                    await trio.sleep(action.ms / 1000)
                elif isinstance(action, Split):
                    k = min(action.k, len(chunk))
                    await _send_all(dst, chunk[:k])
                    self.bytes[direction] += k
                    sent += k
                    await trio.sleep(0.001)
                    chunk = chunk[k:]
                elif isinstance(action, Cut):
                    k = min(action.k, len(chunk))
                    await _send_all(dst, chunk[:k])
                    self.bytes[direction] += k
                    self._rst_pending.add(conn_no)
                    both.cancel()
                    return
                elif isinstance(action, Blackhole):
                    await trio.sleep_forever()
                await _send_all(dst, chunk)
                self.bytes[direction] += len(chunk)
                sent += len(chunk)
        except (OSError, trio.ClosedResourceError):
            self._rst_pending.add(conn_no)
            both.cancel()


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view)
        view = view[n:]


class ThreadedFaultProxy:
    """A :class:`FaultProxy` on its own trio loop in a daemon thread, for synchronous tests.

    ``start()`` returns once it listens; ``call(fn, *args)`` runs ``fn`` in the
    loop (e.g. ``proxy.call(proxy.proxy.set_plan, plan)``); ``close()`` stops
    it and joins the thread.
    """

    def __init__(self, upstream_host: str, upstream_port: int, plan: Plan | None = None) -> None:
        self._args = (upstream_host, upstream_port, plan)
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.proxy: FaultProxy | None = None
        self.error: BaseException | None = None

    async def _main(self) -> None:
        try:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with FaultProxy.serve(*self._args) as proxy:
                self.proxy = proxy
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self._ready.set()

    def start(self) -> ThreadedFaultProxy:
        self._thread.start()
        self._ready.wait(10)
        if self.error is not None or self.proxy is None:
            raise RuntimeError(f"the fault proxy did not start: {self.error!r}")
        return self

    @property
    def port(self) -> int:
        assert self.proxy is not None
        return self.proxy.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, fn: Callable[..., object], *args: object) -> object:
        """Run a synchronous proxy method on the proxy's loop."""
        assert self._token is not None
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)


__all__ = [
    "Action",
    "Blackhole",
    "Cut",
    "Delay",
    "FaultProxy",
    "Pass",
    "PassPlan",
    "Plan",
    "Refuse",
    "ScriptedPlan",
    "Split",
    "ThreadedFaultProxy",
]
