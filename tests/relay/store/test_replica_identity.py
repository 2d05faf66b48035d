"""One identity for all replicas, federation leases and the schema floor (migration 0007), on every backend;
and the identity decision table (relay/store/sql/identity.py ``plan_identity``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from relay.store.base import StartupRefusedError, Store
from relay.store.sql.identity import RecordedIdentity, contract_floor, plan_identity
from tests.relay.store import test_store_contract as contract
from tests.relay.store.postgres_db import fresh_database
from tests.relay.store.test_store_contract import Backend, open_store

backend = contract.backend  # every store test runs on SQLite and PostgreSQL

NOTHING = RecordedIdentity(None, None)
BOUND = RecordedIdentity("relay.example", "key-a", frozenset({"key-0"}))


# -- the decision table -------------------------------------------------------------------------


def test_first_start_records_name_current_and_retired_keys() -> None:
    plan = plan_identity(NOTHING, "relay.example", "relay.example", "key-a", ["key-0"])
    assert (plan.bind_name, plan.current_key_id, plan.retire) == ("relay.example", "key-a", ("key-0",))


def test_without_an_explicit_name_only_the_keys_are_recorded() -> None:
    plan = plan_identity(NOTHING, None, "127.0.0.1:8080", "key-a", [])
    assert (plan.bind_name, plan.current_key_id) == (None, "key-a")


@pytest.mark.parametrize(
    ("name", "effective", "message"),
    [
        ("other.example", "other.example", "this database belongs to relay relay.example; started as other.example"),
        (None, "127.0.0.1:8080", "belongs to relay relay.example; started as 127.0.0.1:8080 (no --name given)"),
    ],
)
def test_another_name_is_refused(name: str | None, effective: str, message: str) -> None:
    with pytest.raises(StartupRefusedError, match=re.escape(message)):
        plan_identity(BOUND, name, effective, "key-a", [])


def test_same_identity_changes_nothing_but_records_newly_listed_retired_keys() -> None:
    assert plan_identity(BOUND, "relay.example", "relay.example", "key-a", ["key-0"]).notes == ()
    plan = plan_identity(BOUND, "relay.example", "relay.example", "key-a", ["key-0", "key-x"])
    assert (plan.current_key_id, plan.retire) == (None, ("key-x",))


def test_another_key_is_refused_unless_the_rotation_file_retires_the_recorded_one() -> None:
    with pytest.raises(StartupRefusedError, match=r"relay key key-b is not the one recorded .* \(key-a\)"):
        plan_identity(BOUND, "relay.example", "relay.example", "key-b", [])
    plan = plan_identity(BOUND, "relay.example", "relay.example", "key-b", ["key-0", "key-a"])
    assert (plan.current_key_id, plan.retire) == ("key-b", ("key-a",))


def test_a_retired_key_is_refused_even_with_a_rotation_file() -> None:
    with pytest.raises(StartupRefusedError, match="relay key key-0 was retired for this database"):
        plan_identity(BOUND, "relay.example", "relay.example", "key-0", ["key-a"])


def test_contract_floor_is_read_from_the_migration_header() -> None:
    assert contract_floor("-- adds a table\nCREATE TABLE t (x INTEGER);") is None
    assert contract_floor("-- contract: 12\nDROP TABLE old;") == 12


# -- the store -------------------------------------------------------------------------------------


async def test_identity_is_bound_once_and_enforced(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        notes = await store.bind_identity("relay.example", "relay.example", "key-a", ["key-0"], 1)
        assert notes == [
            "relay name relay.example bound to this database",
            "relay key key-a recorded for this database",
        ]
        assert await store.bind_identity("relay.example", "relay.example", "key-a", ["key-0"], 2) == []
    async with open_store(backend, tmp_path) as store:  # a second start (another replica)
        with pytest.raises(
            StartupRefusedError, match=re.escape("belongs to relay relay.example; started as b.example")
        ):
            await store.bind_identity("b.example", "b.example", "key-a", [], 3)
        with pytest.raises(StartupRefusedError, match="relay key key-b is not the one recorded"):
            await store.bind_identity("relay.example", "relay.example", "key-b", [], 3)
        assert await store.bind_identity("relay.example", "relay.example", "key-b", ["key-a"], 4) == [
            "relay key rotated: key-a retired, key-b current"
        ]
        with pytest.raises(StartupRefusedError, match="relay key key-a was retired"):
            await store.bind_identity("relay.example", "relay.example", "key-a", [], 5)


async def test_replicas_starting_together_agree_on_one_identity(tmp_path: Path) -> None:
    """PostgreSQL only: one SQLite process has no concurrent first starts."""
    outcomes: list[str] = []
    with fresh_database() as url:
        async with (
            open_store(Backend("postgres", url), tmp_path) as one,
            open_store(Backend("postgres", url), tmp_path) as two,
        ):
            await _start_together(one, two, outcomes)
    assert sorted(outcomes) == ["bound", "refused"]


async def _start_together(one: Store, two: Store, outcomes: list[str]) -> None:
    async def start(store: Store, name: str) -> None:
        try:
            await store.bind_identity(name, name, "key-a", [], 1)
            outcomes.append("bound")
        except StartupRefusedError:
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start, one, "a.example")
        nursery.start_soon(start, two, "b.example")


async def test_a_lease_has_one_holder_until_released_or_expired(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        assert await store.federation_take_lease("b.example", "replica-1", 1_000, 30_000)
        assert not await store.federation_take_lease("b.example", "replica-2", 1_000, 30_000)
        assert await store.federation_take_lease("c.example", "replica-2", 1_000, 30_000)  # leases are per peer
        assert await store.federation_take_lease("b.example", "replica-1", 20_000, 30_000)  # renewed to 50_000
        assert not await store.federation_take_lease("b.example", "replica-2", 49_999, 30_000)
        assert await store.federation_take_lease("b.example", "replica-2", 50_000, 30_000)  # expired: passes on
        assert not await store.federation_take_lease("b.example", "replica-1", 50_001, 30_000)
        await store.federation_release_leases("replica-2")
        assert await store.federation_take_lease("b.example", "replica-1", 50_002, 30_000)
        assert await store.federation_take_lease("c.example", "replica-1", 50_002, 30_000)


async def test_concurrent_takers_of_a_free_lease_get_one_winner(backend: Backend, tmp_path: Path) -> None:
    won: list[str] = []
    async with open_store(backend, tmp_path) as store:

        async def take(holder: str) -> None:
            if await store.federation_take_lease("b.example", holder, 1_000, 30_000):
                won.append(holder)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(take, f"replica-{i}")
    assert len(won) == 1
