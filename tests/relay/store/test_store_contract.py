"""The Store contract, run against every backend (SQLite now; PostgreSQL joins the parametrisation)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.store import ChallengeOutcome, DeviceRecord, NewEnvelope, SQLiteStore, Store

MAX_INBOX = 100
FOREVER = 2**62

BACKENDS = ["sqlite"]


@asynccontextmanager
async def open_store(backend: str, tmp_path: Path) -> AsyncIterator[Store]:
    assert backend == "sqlite"
    store = await SQLiteStore.open(tmp_path)
    try:
        yield store
    finally:
        await store.close()


def device(n: int, account: str = "a" * 32) -> DeviceRecord:
    return DeviceRecord(
        device_id=f"{n:b}".rjust(32, "b").replace("0", "c").replace("1", "d"),
        account_id=account,
        sign_key=bytes([n]) * 32,
        box_key=bytes([n + 1]) * 32,
        created_at_ms=1,
    )


def envelope(recipient: DeviceRecord, key: bytes, body: bytes = b"ct", *, expires: int = FOREVER) -> NewEnvelope:
    return NewEnvelope(
        recipient_device=recipient.device_id,
        recipient_account=recipient.account_id,
        idempotency_key=key,
        digest=key[:4] + body[:12],
        envelope_id=os.urandom(16),
        expires_at_ms=expires,
        ciphertext=body,
    )


async def with_devices(store: Store, *devices: DeviceRecord) -> None:
    for dev in devices:
        await store.create_account(dev.account_id, dev, b"list", 1)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Test = Callable[[Store], object]


async def test_account_create_and_duplicate(backend: str, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        dev = device(1)
        await store.create_account(dev.account_id, dev, b"signed-list", 5)
        assert await store.get_device(dev.device_id) == DeviceRecord(
            dev.device_id, dev.account_id, dev.sign_key, dev.box_key, 5, None
        )
        assert await store.get_device_lists(dev.account_id) == [b"signed-list"]
        assert await store.get_device_lists("z" * 32) is None
        assert await store.get_device("z" * 32) is None
        with pytest.raises(TetherlessError) as info:
            await store.create_account(dev.account_id, dev, b"again", 6)
        assert info.value.code is ErrorCode.ACCOUNT_EXISTS
        assert await store.get_device_lists(dev.account_id) == [b"signed-list"]


async def test_challenge_is_single_use_and_expires(backend: str, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await store.put_challenge(b"n" * 32, "dev", expires_at_ms=100)
        await store.put_challenge(b"m" * 32, "dev", expires_at_ms=100)
        assert (await store.consume_challenge(b"n" * 32, "other", 50)).outcome is ChallengeOutcome.UNKNOWN
        ok = await store.consume_challenge(b"n" * 32, "dev", 50)
        assert (ok.outcome, ok.expires_at_ms) == (ChallengeOutcome.OK, 100)
        assert (await store.consume_challenge(b"n" * 32, "dev", 51)).outcome is ChallengeOutcome.USED
        assert (await store.consume_challenge(b"m" * 32, "dev", 100)).outcome is ChallengeOutcome.EXPIRED
        assert (await store.consume_challenge(b"m" * 32, "dev", 10)).outcome is ChallengeOutcome.USED
        assert (await store.consume_challenge(b"x" * 32, "dev", 10)).outcome is ChallengeOutcome.UNKNOWN


async def test_sessions_revoke_one_or_all(backend: str, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        for token in (b"t1", b"t2", b"t3"):
            await store.create_session(token, "dev", "acct", 1, 1000)
        await store.create_session(b"other", "dev2", "acct", 1, 1000)
        assert await store.revoke_sessions("dev", b"t1", 5) == 1
        assert await store.revoke_sessions("dev", b"t1", 6) == 0
        assert await store.revoke_sessions("dev2", b"t2", 6) == 0  # not its token
        session = await store.get_session(b"t1")
        assert session is not None
        assert session.revoked_at_ms == 5
        assert await store.revoke_sessions("dev", None, 7) == 2
        other = await store.get_session(b"other")
        assert other is not None
        assert other.revoked_at_ms is None
        assert await store.get_session(b"nope") is None


async def test_batch_is_atomic_and_ordered(backend: str, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        a, b = device(1, "a" * 32), device(2, "b" * 32)
        await with_devices(store, a, b)
        stored = await store.store_envelopes("s", [envelope(a, b"k1"), envelope(b, b"k2")], 10, MAX_INBOX, FOREVER)
        assert [s.duplicate for s in stored] == [False, False]
        ghost = device(3, "c" * 32)
        with pytest.raises(TetherlessError) as info:
            await store.store_envelopes("s", [envelope(a, b"k3"), envelope(ghost, b"k4")], 11, MAX_INBOX, FOREVER)
        assert info.value.code is ErrorCode.UNKNOWN_RECIPIENT
        inbox = await store.read_inbox(a.device_id, 0, 10, 0)
        assert [r.envelope_id for r in inbox] == [stored[0].envelope_id]  # k3 rolled back with k4
        cursors = []
        for i in range(5):
            await store.store_envelopes("s", [envelope(a, b"seq%06d" % i)], 20 + i, MAX_INBOX, FOREVER)
        cursors = [r.cursor for r in await store.read_inbox(a.device_id, 0, 100, 0)]
        assert cursors == sorted(cursors)
        assert len(set(cursors)) == 6


async def test_idempotency_duplicate_and_conflict(backend: str, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        a = device(1)
        await with_devices(store, a)
        first = await store.store_envelopes("s", [envelope(a, b"key12345")], 10, MAX_INBOX, FOREVER)
        again = await store.store_envelopes("s", [envelope(a, b"key12345")], 20, MAX_INBOX, FOREVER)
        assert again[0].duplicate
        assert again[0].envelope_id == first[0].envelope_id
        assert again[0].sent_at_ms == 10
        assert len(await store.read_inbox(a.device_id, 0, 10, 0)) == 1
        # Another sender may use the same key.
        other = await store.store_envelopes("t", [envelope(a, b"key12345")], 30, MAX_INBOX, FOREVER)
        assert not other[0].duplicate
        with pytest.raises(TetherlessError) as info:
            await store.store_envelopes("s", [envelope(a, b"key12345", b"different")], 40, MAX_INBOX, FOREVER)
        assert info.value.code is ErrorCode.IDEMPOTENCY_CONFLICT


async def test_quota_and_ack_and_expiry(backend: str, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        a = device(1)
        await with_devices(store, a)
        batch = [envelope(a, b"q%07d" % i, expires=1000 if i < 2 else FOREVER) for i in range(3)]
        await store.store_envelopes("s", batch, 10, 3, FOREVER)
        with pytest.raises(TetherlessError) as info:
            await store.store_envelopes("s", [envelope(a, b"overflow")], 11, 3, FOREVER)
        assert info.value.code is ErrorCode.INBOX_FULL
        inbox = await store.read_inbox(a.device_id, 0, 10, 0)
        # Expired envelopes are invisible before the sweep runs.
        assert len(await store.read_inbox(a.device_id, 0, 10, 1000)) == 1
        report = await store.expire(1000)
        assert report.envelopes == 2
        await store.store_envelopes("s", [envelope(a, b"fits-now")], 12, 3, FOREVER)
        assert await store.acknowledge(a.device_id, inbox[2].cursor, []) == 1
        remaining = await store.read_inbox(a.device_id, 0, 10, 0)
        assert len(remaining) == 1
        assert await store.acknowledge("someone-else", None, [remaining[0].envelope_id]) == 0
        assert await store.acknowledge(a.device_id, None, [remaining[0].envelope_id]) == 1
        assert await store.acknowledge(a.device_id, None, [remaining[0].envelope_id]) == 0


async def test_cursor_never_reused_after_deleting_newest(backend: str, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        a = device(1)
        await with_devices(store, a)
        await store.store_envelopes("s", [envelope(a, b"first000")], 1, MAX_INBOX, FOREVER)
        newest = (await store.read_inbox(a.device_id, 0, 10, 0))[-1].cursor
        await store.acknowledge(a.device_id, newest, [])
        await store.store_envelopes("s", [envelope(a, b"second00")], 2, MAX_INBOX, FOREVER)
        assert (await store.read_inbox(a.device_id, 0, 10, 0))[0].cursor > newest


async def test_concurrent_writers_group_commit(backend: str, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        a = device(1)
        await with_devices(store, a)

        async def send(i: int) -> None:
            await store.store_envelopes("s", [envelope(a, b"c%07d" % i)], i, 1000, FOREVER)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(send, i)
        assert len(await store.read_inbox(a.device_id, 0, 1000, 0)) == 200


async def test_closed_store_is_unavailable(backend: str, tmp_path: Path) -> None:
    from relay.store import StoreUnavailableError

    async with open_store(backend, tmp_path) as store:
        pass
    with pytest.raises(StoreUnavailableError):
        await store.get_device("x")
