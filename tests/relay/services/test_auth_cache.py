"""The session cache in front of ``AuthService.authenticate`` never outlives a revocation in this process.

A durable single send is answered from the cache (no SELECT); these tests pin that a revocation
through this process is refused at the next request, also when a lookup was reading the session
row while the revocation committed: that lookup's answer (for a request concurrent with the
revocation) must not be cached. Real SQLite store; the interleaving is made deterministic by
holding the lookup after its read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.config import Config
from relay.services import ServiceContext, limits_from
from relay.services.auth import AuthService, Principal, hash_token
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
async def _signed_in(tmp_path: Path) -> AsyncIterator[tuple[HeldReads, AuthService, Principal]]:
    """A real SQLite store holding one device with a session for TOKEN, and an AuthService on it."""
    async with open_store(Backend("sqlite"), tmp_path) as real:
        dev = device(1)
        await with_devices(real, dev)
        await real.create_session(hash_token(TOKEN), dev.device_id, dev.account_id, NOW, NOW + 3_600_000)
        store = HeldReads(real)
        auth = AuthService(store, ServiceContext("relay.test", limits_from(Config()), clock_ms=lambda: NOW))  # type: ignore[arg-type]
        yield store, auth, Principal(dev.device_id, dev.account_id, hash_token(TOKEN))


async def _revoke_token(auth: AuthService, store: Store, principal: Principal) -> None:
    await auth.revoke(principal, all_sessions=False)


async def _revoke_device(auth: AuthService, store: Store, principal: Principal) -> None:
    # What DevicesService does when a device-list update revokes the device: the store commit, then this.
    await store.revoke_sessions(principal.device_id, None, NOW)
    auth.forget_devices([principal.device_id])


@pytest.mark.parametrize("revoke", [_revoke_token, _revoke_device], ids=["revoke-token", "device-revoked"])
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
