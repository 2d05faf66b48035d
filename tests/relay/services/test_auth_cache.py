"""The session cache in front of ``AuthService.authenticate`` never outlives a revocation.

A durable single send is answered from the cache (no SELECT); these tests pin that a revocation
through this process is refused at the next request, also when a lookup was reading the session
row while the revocation committed: that lookup's answer (for a request concurrent with the
revocation) must not be cached. Revocations through another replica arrive as notices
(``revocation_noticed``); the cache answers only while the revocation watch listens
(``revocation_listener``; docs/decisions/0013-revocation-across-replicas.md). Real SQLite store,
whose rows are revoked behind the service's back to play the other replica; the interleaving is
made deterministic by holding the lookup after its read. The cross-process paths are in
tests/relay/store/test_revocation_notices.py and tests/e2e/test_replica_revocation.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.config import Config, ConfigError, load
from relay.services import ServiceContext, limits_from
from relay.services import auth as auth_module
from relay.services.auth import SESSION_CACHE_MS, AuthService, Principal, hash_token
from relay.store import SessionRecord, Store
from tests.relay.store.test_store_contract import Backend, device, open_store, with_devices

NOW = 1_765_000_000_000
TOKEN = "tls1_" + "t" * 43


class HeldReads:
    """The store, except that ``get_session`` waits for ``release`` after reading while ``hold`` is set."""

    def __init__(self, store: Store) -> None:
        self.real = store
        self.hold = False
        self.read_done = trio.Event()
        self.release = trio.Event()
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def get_session(self, token_hash: bytes) -> SessionRecord | None:
        self.reads += 1
        session = await self.real.get_session(token_hash)
        if self.hold:
            self.read_done.set()
            await self.release.wait()
        return session


@asynccontextmanager
async def _signed_in(
    tmp_path: Path, *, listening: bool = True, cache_ms: int = SESSION_CACHE_MS
) -> AsyncIterator[tuple[HeldReads, AuthService, Principal]]:
    """A real SQLite store holding one device with a session for TOKEN, and an AuthService on it (whose
    revocation watch listens unless told otherwise)."""
    async with open_store(Backend("sqlite"), tmp_path) as real:
        dev = device(1)
        await with_devices(real, dev)
        await real.create_session(hash_token(TOKEN), dev.device_id, dev.account_id, NOW, NOW + 3_600_000)
        store = HeldReads(real)
        ctx = ServiceContext("relay.test", limits_from(Config()), clock_ms=lambda: NOW)
        auth = AuthService(store, ctx, cache_ms=cache_ms)
        if listening:
            auth.revocation_listener(True)
        yield store, auth, Principal(dev.device_id, dev.account_id, hash_token(TOKEN))


async def _revoke_token(auth: AuthService, store: Store, principal: Principal) -> None:
    await auth.revoke(principal, all_sessions=False)


async def _revoke_device(auth: AuthService, store: Store, principal: Principal) -> None:
    # What DevicesService does when a device-list update revokes the device: the store commit, then this.
    await store.revoke_sessions(principal.device_id, None, NOW)
    auth.forget_devices([principal.device_id])


async def _revoked_elsewhere(auth: AuthService, store: Store, principal: Principal) -> None:
    # Another replica commits the revocation; its notice reaches this one.
    await store.revoke_sessions(principal.device_id, principal.token_hash, NOW)
    auth.revocation_noticed(principal.device_id)


async def _revoked_while_not_listening(auth: AuthService, store: Store, principal: Principal) -> None:
    # Another replica commits the revocation while this one's listener is down (the notice is lost).
    auth.revocation_listener(False)
    await store.revoke_sessions(principal.device_id, principal.token_hash, NOW)
    auth.revocation_listener(True)


@pytest.mark.parametrize(
    "revoke",
    [_revoke_token, _revoke_device, _revoked_elsewhere, _revoked_while_not_listening],
    ids=["revoke-token", "device-revoked", "revoked-elsewhere", "revoked-while-not-listening"],
)
def test_a_lookup_racing_a_revocation_is_not_cached(
    tmp_path: Path, revoke: Callable[[AuthService, Store, Principal], Any]
) -> None:
    async def main() -> None:
        async with _signed_in(tmp_path) as (store, auth, principal):
            store.hold = True
            async with trio.open_nursery() as nursery:
                concurrent: list[Principal] = []

                async def request() -> None:
                    concurrent.append(await auth.authenticate(f"Bearer {TOKEN}"))

                nursery.start_soon(request)
                await store.read_done.wait()  # the row is read, not revoked yet
                await revoke(auth, store.real, principal)
                store.hold = False
                store.release.set()
            assert concurrent == [principal]  # concurrent with the revocation: either answer is right
            reads = store.reads
            with pytest.raises(TetherlessError) as refused:
                await auth.authenticate(f"Bearer {TOKEN}")
            assert refused.value.code in (ErrorCode.TOKEN_REVOKED, ErrorCode.DEVICE_REVOKED)
            assert store.reads == reads + 1  # asked the store, not the cache

    trio.run(main)


def test_the_cache_answers_repeated_requests_without_the_store(tmp_path: Path) -> None:
    async def main() -> None:
        async with _signed_in(tmp_path) as (store, auth, _):
            first = await auth.authenticate(f"Bearer {TOKEN}")
            for _ in range(5):
                assert await auth.authenticate(f"Bearer {TOKEN}") == first
            assert store.reads == 1
            await auth.revoke(first, all_sessions=False)
            with pytest.raises(TetherlessError) as refused:
                await auth.authenticate(f"Bearer {TOKEN}")
            assert refused.value.code is ErrorCode.TOKEN_REVOKED

    trio.run(main)


def test_a_notice_from_another_replica_drops_the_devices_cached_sessions(tmp_path: Path) -> None:
    async def main() -> None:
        async with _signed_in(tmp_path) as (store, auth, principal):
            await auth.authenticate(f"Bearer {TOKEN}")
            await store.real.revoke_sessions(principal.device_id, principal.token_hash, NOW)  # another replica
            assert await auth.authenticate(f"Bearer {TOKEN}") == principal  # cached: the notice is not here yet
            assert store.reads == 1
            auth.revocation_noticed("someone-else")
            assert await auth.authenticate(f"Bearer {TOKEN}") == principal
            auth.revocation_noticed(principal.device_id)
            with pytest.raises(TetherlessError) as refused:
                await auth.authenticate(f"Bearer {TOKEN}")
            assert refused.value.code is ErrorCode.TOKEN_REVOKED
            assert store.reads == 2

    trio.run(main)


def test_without_a_listener_the_cache_is_emptied_and_not_used(tmp_path: Path) -> None:
    async def main() -> None:
        async with _signed_in(tmp_path, listening=False) as (store, auth, principal):
            for _ in range(3):  # not listening yet (a replica just started): every request reads its row
                await auth.authenticate(f"Bearer {TOKEN}")
            assert store.reads == 3
            auth.revocation_listener(True)
            for _ in range(3):
                await auth.authenticate(f"Bearer {TOKEN}")
            assert store.reads == 4
            # The listener's connection is lost; a revocation elsewhere now sends a notice nobody hears.
            auth.revocation_listener(False)
            await store.real.revoke_sessions(principal.device_id, principal.token_hash, NOW)
            with pytest.raises(TetherlessError) as refused:
                await auth.authenticate(f"Bearer {TOKEN}")
            assert refused.value.code is ErrorCode.TOKEN_REVOKED
            # Nothing is cached either while not listening.
            other = "tls1_" + "o" * 43
            await store.real.create_session(hash_token(other), principal.device_id, principal.account_id, NOW, NOW + 9)
            reads = store.reads
            for _ in range(2):
                await auth.authenticate(f"Bearer {other}")
            assert store.reads == reads + 2

    trio.run(main)


def test_a_cache_lifetime_of_zero_reads_every_session(tmp_path: Path) -> None:
    async def main() -> None:
        async with _signed_in(tmp_path, cache_ms=0) as (store, auth, _):
            for _ in range(3):
                await auth.authenticate(f"Bearer {TOKEN}")
            assert store.reads == 3

    trio.run(main)


class HeldRevocation:
    """The store, except that ``revoke_sessions`` commits, then waits for ``release`` before it returns."""

    def __init__(self, store: Store) -> None:
        self.real = store
        self.committed = trio.Event()
        self.release = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def revoke_sessions(self, device_id: str, token_hash: bytes | None, now_ms: int) -> int:
        count = await self.real.revoke_sessions(device_id, token_hash, now_ms)
        self.committed.set()
        await self.release.wait()
        return count


def test_a_cancelled_logout_that_committed_still_clears_the_cache(tmp_path: Path) -> None:
    async def main() -> None:
        async with _signed_in(tmp_path) as (store, _, principal):
            held = HeldRevocation(store.real)
            auth = AuthService(held, ServiceContext("relay.test", limits_from(Config()), clock_ms=lambda: NOW))
            auth.revocation_listener(True)
            await auth.authenticate(f"Bearer {TOKEN}")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(auth.revoke, principal, all_sessions=False))
                await held.committed.wait()
                nursery.cancel_scope.cancel()  # the client went away while the commit was being answered
                held.release.set()
            with pytest.raises(TetherlessError) as refused:  # SQLite sends no notice: only the shield helps
                await auth.authenticate(f"Bearer {TOKEN}")
            assert refused.value.code is ErrorCode.TOKEN_REVOKED

    trio.run(main)


def test_the_cache_lifetime_setting_is_bounded() -> None:
    assert load(env={})[0].session_cache_seconds == SESSION_CACHE_MS / 1000
    config, sources = load(env={"TETHERLESS_SESSION_CACHE_SECONDS": "120"})
    assert (config.session_cache_seconds, sources["session_cache_seconds"]) == (
        120.0,
        "env TETHERLESS_SESSION_CACHE_SECONDS",
    )
    assert load(env={"TETHERLESS_SESSION_CACHE_SECONDS": "0"})[0].session_cache_seconds == 0
    for bad, message in (("301", "at most 300"), ("-1", "must not be negative"), ("soon", "expected float")):
        with pytest.raises(ConfigError, match=message):
            load(env={"TETHERLESS_SESSION_CACHE_SECONDS": bad})


def test_the_cache_drops_its_oldest_entry_and_keeps_its_device_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "SESSION_CACHE_SIZE", 2)
    cache = auth_module._SessionCache()
    one, two, three = (Principal(device, "a" * 32, bytes([n]) * 32) for n, device in enumerate("xxy"))
    for principal in (one, two, three):
        cache.put(principal, NOW, NOW)
    assert list(cache.entries) == [two.token_hash, three.token_hash]  # the oldest went
    cache.drop_device("x")  # knows only the entry still cached
    assert list(cache.entries) == [three.token_hash]
    cache.drop(three.token_hash)
    cache.drop(three.token_hash)  # idempotent
    cache.drop_device("y")
    assert not cache.entries
