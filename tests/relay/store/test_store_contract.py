"""The Store contract, run against every backend: SQLite and PostgreSQL (one fresh database per test)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.store import (
    ChallengeOutcome,
    DeviceRecord,
    NewEnvelope,
    PostgresStore,
    SQLiteStore,
    Store,
    StoredEnvelope,
)
from relay.store.inbox_rules import COMPACT_SCHEMA
from relay.store.postgres import migrate_url
from tests.relay.store.postgres_db import fresh_database

MAX_INBOX = 100
FOREVER = 2**62

# "postgres-compact": PostgreSQL at the compact inbox schema floor (relay/store/sql/inbox.py), which a
# rolling upgrade reaches later; SQLite is there from migration 0009 on.
BACKENDS = ["sqlite", "postgres", "postgres-compact"]


@dataclass(frozen=True)
class Backend:
    name: str
    url: str = ""  # PostgreSQL: the test's own database


@asynccontextmanager
async def open_store(backend: Backend, tmp_path: Path) -> AsyncIterator[Store]:
    """A store on the test's database; a second call opens a second instance on the same database."""
    store: Store
    if backend.name == "postgres":
        store = await PostgresStore.open(backend.url, pool_min=1, pool_max=4)
    else:
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
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param.startswith("postgres"):
        with fresh_database() as url:
            if request.param == "postgres-compact":
                raise_code_floor(url, COMPACT_SCHEMA)
            yield Backend("postgres", url)
    else:
        yield Backend("sqlite")


def raise_code_floor(url: str, floor: int) -> None:
    """Migrate the PostgreSQL database and record ``floor``, as a contract migration would."""
    migrate_url(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE schema_compat SET min_code_schema = %s", (floor,))


Test = Callable[[Store], object]


async def test_account_create_and_duplicate(backend: Backend, tmp_path: Path) -> None:
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


async def test_challenge_is_single_use_and_expires(backend: Backend, tmp_path: Path) -> None:
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


async def test_sessions_revoke_one_or_all(backend: Backend, tmp_path: Path) -> None:
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


async def test_batch_is_atomic_and_ordered(backend: Backend, tmp_path: Path) -> None:
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


async def test_idempotency_duplicate_and_conflict(backend: Backend, tmp_path: Path) -> None:
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


async def test_idempotency_keys_outlive_acknowledgement_and_are_never_forgotten_early(
    backend: Backend, tmp_path: Path
) -> None:
    """A retry within the envelope's TTL returns the original result, acknowledged or not.

    0008 rows (PostgreSQL below the compact floor) are forgotten a whole hour bucket after ``forget_at``;
    in the compact schema a key points at its inbox row or tombstone and is forgotten with it, when the
    envelope expires (the service passes ``forget_at`` = now + the maximum TTL, never before the expiry).
    """
    hour = 3_600_000
    forget_at = 1_000 * hour + 123  # mid-bucket: keys are forgotten a whole hour bucket at a time
    expires = 900 * hour + 7
    async with open_store(backend, tmp_path) as store:
        compact = getattr(store, "compact_inbox", False)
        a = device(1)
        await with_devices(store, a)
        first = await store.store_envelopes("s", [envelope(a, b"keep-key", expires=expires)], 10, MAX_INBOX, forget_at)
        assert await store.acknowledge(a.device_id, 1, []) == 1  # the envelope is gone, its key is not
        assert await store.read_inbox(a.device_id, 0, 10, 0) == []
        with pytest.raises(TetherlessError) as reused:
            await store.store_envelopes("s", [envelope(a, b"keep-key", b"other")], 20, MAX_INBOX, FOREVER)
        assert reused.value.code is ErrorCode.IDEMPOTENCY_CONFLICT  # told apart after the acknowledgement too
        kept = (expires - 1,) if compact else (expires, forget_at - 1, forget_at, 1_001 * hour - 1)
        for now in kept:
            assert (await store.expire(now)).idempotency_keys == 0
            retry = await store.store_envelopes("s", [envelope(a, b"keep-key")], now, MAX_INBOX, FOREVER)
            assert retry == [StoredEnvelope(first[0].envelope_id, 10, True, a.device_id)]
        gone_at = expires if compact else 1_001 * hour
        report = await store.expire(gone_at)
        assert report.envelopes == 0  # a tombstone is not an envelope
        # The dangling pointer is deleted by this sweep or (SQLite) when its expiry hour has ended.
        later = await store.expire(901 * hour) if compact else report
        assert report.idempotency_keys + (later.idempotency_keys if compact else 0) == 1
        anew = await store.store_envelopes("s", [envelope(a, b"keep-key")], gone_at, MAX_INBOX, FOREVER)
        assert not anew[0].duplicate
        assert anew[0].envelope_id != first[0].envelope_id


async def test_quota_and_ack_and_expiry(backend: Backend, tmp_path: Path) -> None:
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


async def test_cursor_never_reused_after_deleting_newest(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        a = device(1)
        await with_devices(store, a)
        await store.store_envelopes("s", [envelope(a, b"first000")], 1, MAX_INBOX, FOREVER)
        newest = (await store.read_inbox(a.device_id, 0, 10, 0))[-1].cursor
        await store.acknowledge(a.device_id, newest, [])
        await store.store_envelopes("s", [envelope(a, b"second00")], 2, MAX_INBOX, FOREVER)
        assert (await store.read_inbox(a.device_id, 0, 10, 0))[0].cursor > newest


async def test_concurrent_writers_group_commit(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        a = device(1)
        await with_devices(store, a)

        async def send(i: int) -> None:
            await store.store_envelopes("s", [envelope(a, b"c%07d" % i)], i, 1000, FOREVER)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(send, i)
        assert len(await store.read_inbox(a.device_id, 0, 1000, 0)) == 200


async def test_closed_store_is_unavailable(backend: Backend, tmp_path: Path) -> None:
    from relay.store import StoreUnavailableError

    async with open_store(backend, tmp_path) as store:
        pass
    with pytest.raises(StoreUnavailableError):
        await store.get_device("x")


async def test_unstorable_ids_are_simply_unknown(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        assert await store.get_device("a\x00b") is None
        assert await store.get_device_lists("a\x00b") is None
        assert (await store.consume_challenge(b"n" * 32, "a\x00b", 1)).outcome is ChallengeOutcome.UNKNOWN
        assert await store.read_inbox("x", 2**63 - 1, 10, 0) == []  # the API caps cursors at 2**63 - 1
        assert await store.acknowledge("x", 2**63 - 1, []) == 0


# -- several store instances on one database (several relay processes) ------------------------


async def test_two_instances_readers_never_skip_and_cursors_follow_commit_order(
    backend: Backend, tmp_path: Path
) -> None:
    """Writers on two instances race into one inbox while a reader pages from its cursor: it sees every envelope."""
    async with open_store(backend, tmp_path) as one, open_store(backend, tmp_path) as two:
        a = device(1)
        await with_devices(one, a)
        total = 120
        seen: list[int] = []
        done = trio.Event()

        async def send(store: Store, i: int) -> None:
            await store.store_envelopes(f"s{i % 3}", [envelope(a, b"r%07d" % i)], i, 10_000, FOREVER)

        async def read() -> None:
            cursor = 0
            while True:
                finished = done.is_set()
                records = await two.read_inbox(a.device_id, cursor, 1000, 0)
                seen.extend(r.cursor for r in records)
                if records:
                    cursor = records[-1].cursor
                elif finished:
                    return
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as readers:
            readers.start_soon(read)
            async with trio.open_nursery() as writers:
                for i in range(total):
                    writers.start_soon(send, one if i % 2 else two, i)
            done.set()
        assert len(seen) == total, f"the reader skipped {total - len(seen)} envelopes"
        assert seen == sorted(seen)
        assert len(set(seen)) == total


async def test_two_instances_concurrent_identical_retries_store_once(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as one, open_store(backend, tmp_path) as two:
        a, b = device(1, "a" * 32), device(2, "b" * 32)
        await with_devices(one, a, b)
        batch = [envelope(a, b"same-key-1"), envelope(b, b"same-key-2")]
        results = []

        async def retry(store: Store) -> None:
            results.append(await store.store_envelopes("s", batch, 5, MAX_INBOX, FOREVER))

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(retry, one if i % 2 else two)
        assert sum(not r.duplicate for result in results for r in result) == 2
        assert {tuple(r.envelope_id for r in result) for result in results} == {tuple(e.envelope_id for e in batch)}
        assert len(await one.read_inbox(a.device_id, 0, 100, 0)) == 1
        assert len(await two.read_inbox(b.device_id, 0, 100, 0)) == 1


async def test_two_instances_racing_writers_respect_the_quota(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as one, open_store(backend, tmp_path) as two:
        a = device(1)
        await with_devices(one, a)
        outcomes: list[str] = []

        async def send(store: Store, i: int) -> None:
            try:
                await store.store_envelopes("s", [envelope(a, b"quota%04d" % i)], i, 10, FOREVER)
            except TetherlessError as exc:
                outcomes.append(str(exc.code))
            else:
                outcomes.append("ok")

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(send, one if i % 2 else two, i)
        assert outcomes.count("ok") == 10
        assert outcomes.count(str(ErrorCode.INBOX_FULL)) == 30
        assert len(await one.read_inbox(a.device_id, 0, 100, 0)) == 10


async def test_watch_inbox_commits_sees_commits_of_another_instance(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as one, open_store(backend, tmp_path) as two:
        a = device(1)
        await with_devices(one, a)
        woken: list[str] = []
        arrived = trio.Event()

        def notify(device_id: str) -> None:
            woken.append(device_id)
            arrived.set()

        async with trio.open_nursery() as nursery:
            await nursery.start(one.watch_inbox_commits, notify)
            await two.store_envelopes("s", [envelope(a, b"wake0001")], 1, MAX_INBOX, FOREVER)
            if backend.name == "sqlite":
                # One process owns a SQLite relay: it wakes its own streams, the watch only sleeps.
                await trio.sleep(0.2)
                assert woken == []
            else:
                with trio.fail_after(5):
                    await arrived.wait()
                assert woken == [a.device_id]
                # A rolled-back batch notifies nobody.
                woken.clear()
                with pytest.raises(TetherlessError):
                    await two.store_envelopes(
                        "s", [envelope(a, b"wake0002"), envelope(device(9), b"wake0003")], 2, MAX_INBOX, FOREVER
                    )
                await trio.sleep(0.5)
                assert woken == []
            nursery.cancel_scope.cancel()
