"""The prekey and enrolment part of the Store contract, on every backend (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.store import Store
from relay.store.base import (
    PREKEY_LAST_RESORT,
    PREKEY_MLKEM_ONE_TIME,
    PREKEY_SIGNED,
    PREKEY_X25519_ONE_TIME,
    ClaimedBundle,
    PrekeyState,
    StoredPrekey,
)
from tests.relay.store import test_store_contract as contract
from tests.relay.store.test_store_contract import Backend, device, open_store, with_devices

backend = contract.backend  # the contract's fixture: every test runs on SQLite and PostgreSQL

HOUR_MS = 3_600_000


def key(kind: str, key_id: int, public: bytes | None = None) -> StoredPrekey:
    return StoredPrekey(kind, key_id, public or bytes([key_id % 256]) * 8, 1000 + key_id, b"sig-%d" % key_id)


def one_time(kind: str, ids: range) -> list[StoredPrekey]:
    return [key(kind, i) for i in ids]


FULL = [key(PREKEY_SIGNED, 1), key(PREKEY_LAST_RESORT, 1)]


def target(n: int) -> tuple[str, str]:
    dev = device(n)
    return (dev.account_id, dev.device_id)


async def test_upload_counts_and_replacement(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        dev = device(1)
        await with_devices(store, dev)
        assert await store.get_prekey_state(dev.device_id) == PrekeyState(0, 0, None, None)
        keys = [*FULL, *one_time(PREKEY_X25519_ONE_TIME, range(1, 4)), *one_time(PREKEY_MLKEM_ONE_TIME, range(1, 3))]
        state = await store.put_prekeys(dev.device_id, keys, 200)
        assert state == PrekeyState(3, 2, 1, 1)
        assert await store.get_prekey_state(dev.device_id) == state
        # a new signed prekey replaces the current one; the last-resort key stays
        state = await store.put_prekeys(dev.device_id, [key(PREKEY_SIGNED, 7)], 200)
        assert state == PrekeyState(3, 2, 7, 1)
        # a retried upload of stored keys is answered like the first
        assert await store.put_prekeys(dev.device_id, [key(PREKEY_SIGNED, 7), key(PREKEY_MLKEM_ONE_TIME, 2)], 200) == (
            state
        )


@pytest.mark.parametrize(
    "reuse",
    [
        key(PREKEY_SIGNED, 1),  # replaced by id 7: never again
        key(PREKEY_SIGNED, 7, b"another key"),  # the current id with another key
        key(PREKEY_X25519_ONE_TIME, 2, b"another key"),  # a stored one-time id with another key
        key(PREKEY_X25519_ONE_TIME, 1),  # an id below the highest one
    ],
)
async def test_reused_key_ids_are_refused_and_change_nothing(
    backend: Backend, tmp_path: Path, reuse: StoredPrekey
) -> None:
    async with open_store(backend, tmp_path) as store:
        dev = device(1)
        await with_devices(store, dev)
        await store.put_prekeys(dev.device_id, [*FULL, key(PREKEY_X25519_ONE_TIME, 2)], 200)
        before = await store.put_prekeys(dev.device_id, [key(PREKEY_SIGNED, 7)], 200)
        fresh = key(PREKEY_MLKEM_ONE_TIME, 50)
        with pytest.raises(TetherlessError) as info:
            await store.put_prekeys(dev.device_id, [fresh, reuse], 200)
        assert info.value.code is ErrorCode.PREKEY_INVALID
        assert await store.get_prekey_state(dev.device_id) == before  # the fresh key was not stored either


async def test_served_one_time_ids_are_never_reused(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        owner, claimer = device(1), device(2, "b" * 32)
        await with_devices(store, owner, claimer)
        await store.put_prekeys(owner.device_id, [*FULL, key(PREKEY_X25519_ONE_TIME, 1)], 200)
        (bundle,) = await store.claim_prekeys(claimer.account_id, [target(1)], 10, 3, HOUR_MS)
        assert bundle is not None
        assert bundle.one_time_prekey == key(PREKEY_X25519_ONE_TIME, 1)
        with pytest.raises(TetherlessError) as info:
            await store.put_prekeys(owner.device_id, [key(PREKEY_X25519_ONE_TIME, 1)], 200)
        assert info.value.code is ErrorCode.PREKEY_INVALID


async def test_one_time_cap_per_kind(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        dev = device(1)
        await with_devices(store, dev)
        await store.put_prekeys(dev.device_id, one_time(PREKEY_X25519_ONE_TIME, range(1, 5)), 5)
        with pytest.raises(TetherlessError) as info:
            await store.put_prekeys(dev.device_id, one_time(PREKEY_X25519_ONE_TIME, range(5, 7)), 5)
        assert info.value.code is ErrorCode.INVALID_FIELD
        # the other kind has its own cap
        state = await store.put_prekeys(dev.device_id, one_time(PREKEY_MLKEM_ONE_TIME, range(1, 6)), 5)
        assert state == PrekeyState(4, 5, None, None)


async def test_claim_serves_lowest_ids_then_last_resort(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        owner, claimer = device(1), device(2, "b" * 32)
        await with_devices(store, owner, claimer)
        await store.put_prekeys(
            owner.device_id,
            [*FULL, *one_time(PREKEY_X25519_ONE_TIME, range(3, 5)), key(PREKEY_MLKEM_ONE_TIME, 9)],
            200,
        )
        first, second, third = await store.claim_prekeys(claimer.account_id, [target(1)] * 3, 10, 3, HOUR_MS)
        assert first == ClaimedBundle(
            owner.device_id,
            owner.account_id,
            owner.box_key,
            key(PREKEY_SIGNED, 1),
            key(PREKEY_MLKEM_ONE_TIME, 9),
            key(PREKEY_X25519_ONE_TIME, 3),
        )
        assert second is not None
        assert third is not None
        assert (second.pq_prekey, second.one_time_prekey) == (
            key(PREKEY_LAST_RESORT, 1),
            key(PREKEY_X25519_ONE_TIME, 4),
        )
        assert (third.pq_prekey, third.one_time_prekey) == (key(PREKEY_LAST_RESORT, 1), None)  # exhausted
        assert await store.get_prekey_state(owner.device_id) == PrekeyState(0, 0, 1, 1)


async def test_claim_missing_devices_serve_nothing(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        full, no_signed, no_pq, claimer = device(1), device(2, "c" * 32), device(3, "d" * 32), device(4, "b" * 32)
        await with_devices(store, full, no_signed, no_pq, claimer)
        await store.put_prekeys(full.device_id, [*FULL, key(PREKEY_X25519_ONE_TIME, 1)], 200)
        await store.put_prekeys(no_signed.device_id, [key(PREKEY_LAST_RESORT, 1), key(PREKEY_X25519_ONE_TIME, 1)], 200)
        await store.put_prekeys(no_pq.device_id, [key(PREKEY_SIGNED, 1), key(PREKEY_X25519_ONE_TIME, 1)], 200)
        targets = [
            ("q" * 32, full.device_id),  # the right device under another account
            (no_signed.account_id, no_signed.device_id),
            (no_pq.account_id, no_pq.device_id),
            (full.account_id, "z" * 32),  # unknown
        ]
        assert await store.claim_prekeys(claimer.account_id, targets, 10, 3, HOUR_MS) == [None] * 4
        for dev in (full, no_signed, no_pq):
            assert (await store.get_prekey_state(dev.device_id)).x25519_one_time == 1  # nothing was served


async def test_per_pair_limit_and_its_window(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        owner, claimer, other = device(1), device(2, "b" * 32), device(3, "c" * 32)
        await with_devices(store, owner, claimer, other)
        await store.put_prekeys(
            owner.device_id,
            [*FULL, *one_time(PREKEY_X25519_ONE_TIME, range(1, 11)), *one_time(PREKEY_MLKEM_ONE_TIME, range(1, 11))],
            200,
        )
        served = await store.claim_prekeys(claimer.account_id, [target(1)] * 4, 1000, 3, HOUR_MS)
        assert [b.one_time_prekey is not None for b in served if b] == [True, True, True, False]
        assert [b.pq_prekey.kind for b in served if b] == [PREKEY_MLKEM_ONE_TIME] * 3 + [PREKEY_LAST_RESORT]
        # another claiming account has its own allowance
        (bundle,) = await store.claim_prekeys(other.account_id, [target(1)], 1001, 3, HOUR_MS)
        assert bundle is not None
        assert bundle.one_time_prekey is not None
        # the window ends an hour after the claims; expire() forgets them
        (bundle,) = await store.claim_prekeys(claimer.account_id, [target(1)], 1000 + HOUR_MS - 1, 3, HOUR_MS)
        assert bundle is not None
        assert bundle.one_time_prekey is None
        await store.expire(1000 + HOUR_MS)
        (bundle,) = await store.claim_prekeys(claimer.account_id, [target(1)], 1000 + HOUR_MS, 3, HOUR_MS)
        assert bundle is not None
        assert bundle.one_time_prekey is not None


async def test_concurrent_claims_never_serve_a_key_twice(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as one, open_store(backend, tmp_path) as two:
        owner = device(1)
        await with_devices(one, owner)
        await one.put_prekeys(
            owner.device_id,
            [*FULL, *one_time(PREKEY_X25519_ONE_TIME, range(1, 31)), *one_time(PREKEY_MLKEM_ONE_TIME, range(1, 31))],
            200,
        )
        served: list[ClaimedBundle] = []

        async def claim(store: Store, n: int) -> None:
            bundles = await store.claim_prekeys(f"{n:032d}".replace("0", "a"), [target(1)] * 2, 10, 3, HOUR_MS)
            served.extend(b for b in bundles if b is not None)

        # SQLite: two stores on one file are two writers (the file lock serialises them).
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(claim, one if n % 2 else two, n)
        assert len(served) == 40
        one_time_ids = [b.one_time_prekey.key_id for b in served if b.one_time_prekey is not None]
        pq_ids = [b.pq_prekey.key_id for b in served if b.pq_prekey.kind == PREKEY_MLKEM_ONE_TIME]
        assert sorted(one_time_ids) == list(range(1, 31))  # every key served exactly once
        assert sorted(pq_ids) == list(range(1, 31))
        assert await one.get_prekey_state(owner.device_id) == PrekeyState(0, 0, 1, 1)


async def test_delete_device_prekeys(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        dev, other = device(1), device(2, "c" * 32)
        await with_devices(store, dev, other)
        await store.put_prekeys(dev.device_id, [*FULL, key(PREKEY_X25519_ONE_TIME, 5)], 200)
        await store.put_prekeys(other.device_id, FULL, 200)
        assert await store.delete_device_prekeys(dev.device_id) == 3
        assert await store.get_prekey_state(dev.device_id) == PrekeyState(0, 0, None, None)
        assert await store.get_prekey_state(other.device_id) == PrekeyState(0, 0, 1, 1)
        assert await store.delete_device_prekeys(dev.device_id) == 0  # idempotent


# -- enrolments ---------------------------------------------------------------------------------------


async def test_enrolment_offer_proposal_lifecycle(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        lookup = b"L" * 10
        assert await store.get_enrolment(lookup) is None
        await store.create_enrolment(lookup, b"offer", 100, 700, 1300)
        with pytest.raises(TetherlessError) as info:
            await store.create_enrolment(lookup, b"other offer", 101, 701, 1301)
        assert info.value.code is ErrorCode.ENROLMENT_USED
        record = await store.get_enrolment(lookup)
        assert record is not None
        assert (record.offer, record.created_at_ms, record.expires_at_ms, record.proposal) == (b"offer", 100, 700, None)

        stored = await store.put_enrolment_proposal(lookup, b"proposal", "dev-a", 200)
        assert (stored.proposal, stored.proposer_device, stored.expires_at_ms) == (b"proposal", "dev-a", 700)
        # the same proposal by the same device again: an idempotent retry
        assert (await store.put_enrolment_proposal(lookup, b"proposal", "dev-a", 201)).proposal == b"proposal"
        for proposal, proposer in ((b"another", "dev-a"), (b"proposal", "dev-b")):
            with pytest.raises(TetherlessError) as info:
                await store.put_enrolment_proposal(lookup, proposal, proposer, 202)
            assert info.value.code is ErrorCode.ENROLMENT_USED
        record = await store.get_enrolment(lookup)
        assert record is not None
        assert (record.proposal, record.proposer_device) == (b"proposal", "dev-a")

        with pytest.raises(TetherlessError) as info:
            await store.put_enrolment_proposal(b"U" * 10, b"proposal", "dev-a", 200)
        assert info.value.code is ErrorCode.ENROLMENT_UNKNOWN


async def test_enrolment_expiry_and_sweep(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await store.create_enrolment(b"A" * 10, b"unanswered", 100, 700, 1300)
        await store.create_enrolment(b"B" * 10, b"answered", 100, 700, 1300)
        await store.put_enrolment_proposal(b"B" * 10, b"proposal", "dev", 600)
        with pytest.raises(TetherlessError) as info:
            await store.put_enrolment_proposal(b"A" * 10, b"late", "dev", 700)
        assert info.value.code is ErrorCode.ENROLMENT_EXPIRED
        assert (await store.get_enrolment(b"A" * 10)) is not None  # kept (answered as expired) until forgotten
        assert (await store.expire(1299)).enrolments == 0
        report = await store.expire(1300)
        assert report.enrolments == 1  # only offers that never got a proposal count as expired
        assert await store.get_enrolment(b"A" * 10) is None
        assert await store.get_enrolment(b"B" * 10) is None
