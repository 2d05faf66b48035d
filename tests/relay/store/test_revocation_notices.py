"""``Store.watch_session_revocations`` on SQLite and PostgreSQL (docs/decisions/0013-revocation-across-replicas.md).

PostgreSQL: a second store instance (another replica) hears, on commit only, every revocation of a
session — a logout of one token, of all of a device's, a device-list version removing the device —
named by device id; and the watch says when it cannot hear (its connection killed by
``pg_terminate_backend``) and when it can again. SQLite: one process, the watch listens at once and
sends nothing.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import trio

from relay.store import Store, StoreUnavailableError
from relay.store.sql import auth
from tests.relay.store import test_store_contract as contract
from tests.relay.store.postgres_db import fresh_database
from tests.relay.store.test_devices_store import account_with, update
from tests.relay.store.test_store_contract import Backend, device, open_store, with_devices

backend = contract.backend  # every test runs on SQLite and PostgreSQL

NOW = 1_765_000_000_000
LISTENER = "tetherless tetherless_revocations"  # the listener's application_name (relay/store/postgres.py)


class Heard:
    """What a watch reported, in order: device ids (notices) and True/False (listening or not)."""

    def __init__(self) -> None:
        self.events: list[str | bool] = []
        self._changed = trio.Event()

    def notify(self, device_id: str) -> None:
        self._record(device_id)

    def listening(self, up: bool) -> None:
        self._record(up)

    def _record(self, event: str | bool) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> list[str | bool]:
        """The events once there are ``count`` of them (fails after 10 s: a timeout, not a threshold)."""
        with trio.fail_after(10):
            while len(self.events) < count:
                await self._changed.wait()
        return list(self.events)


async def test_revocations_by_another_instance_are_heard_on_commit_only(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as one, open_store(backend, tmp_path) as two:
        second, third = device(2), device(3)
        first = await account_with(two, second, third)
        heard = Heard()
        async with trio.open_nursery() as nursery:
            await nursery.start(one.watch_session_revocations, heard.notify, heard.listening)
            assert heard.events == [True]  # listening before it reports started
            await two.create_session(b"t" * 32, first.device_id, first.account_id, NOW, NOW + 1000)
            await two.revoke_sessions(first.device_id, b"t" * 32, NOW)  # a logout of one token
            await two.revoke_sessions(second.device_id, None, NOW)  # of every token of a device
            await two.append_device_list(update(3, removed=[third.device_id]), NOW)  # a device removed
            # A transaction that revokes and then fails: its notice must not be heard.
            with pytest.raises(RolledBackError):
                await _revoke_then_fail(two, second.device_id)
            if backend.name == "sqlite":
                # One process owns a SQLite relay and clears its own cache: nothing is sent.
                await trio.sleep(0.2)
                assert heard.events == [True]
            else:
                # A later revocation as a marker: had the rolled-back one been sent, it would come before.
                await two.revoke_sessions(first.device_id, None, NOW)
                want = [True, first.device_id, second.device_id, third.device_id, first.device_id]
                assert await heard.wait_for(5) == want
            nursery.cancel_scope.cancel()
        assert heard.events[-1] is False  # a watch that ended no longer listens


async def test_a_killed_listener_says_so_and_listens_again(tmp_path: Path) -> None:
    with fresh_database() as url:
        await _kill_and_listen_again(Backend("postgres", url), tmp_path)


async def _kill_and_listen_again(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as one, open_store(backend, tmp_path) as two:
        dev = device(1)
        await with_devices(two, dev)
        heard = Heard()
        async with trio.open_nursery() as nursery:
            await nursery.start(one.watch_session_revocations, heard.notify, heard.listening)
            killed = await trio.to_thread.run_sync(_terminate_listeners, backend.url)
            assert killed == 1
            # Lost, then back (the listener reconnects after 0.1 s); nothing else in between.
            assert await heard.wait_for(3) == [True, False, True]
            await two.revoke_sessions(dev.device_id, None, NOW)
            assert await heard.wait_for(4) == [True, False, True, dev.device_id]
            nursery.cancel_scope.cancel()
        assert heard.events == [True, False, True, dev.device_id, False]


class RolledBackError(Exception):
    pass


async def _revoke_then_fail(store: Store, device_id: str) -> None:
    """The revocation SQL, then a failure in the same transaction (the SQLStore write hook rolls it back)."""

    def revoke_then_fail(conn: object) -> None:
        auth.revoke_sessions(conn, store.engine, device_id=device_id, token_hash=None, now_ms=NOW)  # type: ignore[attr-defined]
        raise RolledBackError

    await store._write(revoke_then_fail)  # type: ignore[attr-defined]


def _terminate_listeners(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (LISTENER,),
        ).fetchall()
    return sum(1 for (done,) in rows if done)


async def test_a_watch_on_a_closed_store_raises(backend: Backend, tmp_path: Path) -> None:
    store: Store
    async with open_store(backend, tmp_path) as store:
        pass
    heard = Heard()
    with pytest.raises(StoreUnavailableError, match="closed"):
        await store.watch_session_revocations(heard.notify, heard.listening)
    assert heard.events == []
