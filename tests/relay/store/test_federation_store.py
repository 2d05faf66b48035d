"""The federation part of the Store contract (outbox, peer state, dedup, nonces), on every backend."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from relay.store import ReceivedEnvelope, ReceivedOutcome
from tests.relay.store import test_store_contract as contract
from tests.relay.store.test_store_contract import (
    FOREVER,
    MAX_INBOX,
    Backend,
    device,
    envelope,
    open_store,
    with_devices,
)

backend = contract.backend  # the contract's fixture: every test runs on SQLite and PostgreSQL


def received(dev_id: str, account: str, origin_id: bytes, *, body: bytes = b"ct") -> ReceivedEnvelope:
    return ReceivedEnvelope(
        origin_envelope_id=origin_id,
        recipient_device=dev_id,
        recipient_account=account,
        envelope_id=os.urandom(16),
        expires_at_ms=FOREVER,
        ciphertext=body,
    )


async def test_outbox_is_written_with_the_batch_and_settled(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        local = device(1)
        await with_devices(store, local)
        remote = msgspec.structs.replace(envelope(device(9, "r" * 32), b"key-remote"), remote_relay="b.example")
        stored = await store.store_envelopes("sender", [envelope(local, b"key-local"), remote], 10, MAX_INBOX, FOREVER)
        assert [s.duplicate for s in stored] == [False, False]
        # idempotent like local envelopes: the retry stores nothing new
        again = await store.store_envelopes("sender", [remote], 11, MAX_INBOX, FOREVER)
        assert again[0].duplicate
        assert again[0].envelope_id == remote.envelope_id
        assert len(await store.read_inbox(local.device_id, 0, 10, 10)) == 1

        (state,) = await store.federation_due_peers(20)
        assert (state.peer, state.queued, state.failures, state.next_attempt_at_ms) == ("b.example", 1, 0, 0)
        (record,) = await store.federation_outbox_batch("b.example", 20, 10)
        assert record.recipient == f"{device(9).device_id}.{'r' * 32}@b.example"
        assert (record.envelope_id, record.ciphertext, record.sent_at_ms) == (remote.envelope_id, b"ct", 10)

        await store.federation_peer_failed("b.example", "HTTP 503", 1, 1000, 30)
        (state,) = await store.federation_peer_states()
        assert (state.failures, state.next_attempt_at_ms, state.last_error) == (1, 1000, "HTTP 503")
        assert await store.federation_retry_now("b.example") == 1
        assert (await store.federation_peer_states())[0].next_attempt_at_ms == 0

        await store.federation_outbox_settle("b.example", [record.seq], [], 0, 40)
        assert await store.federation_outbox_batch("b.example", 50, 10) == []
        (state,) = await store.federation_peer_states()
        assert (state.queued, state.failures, state.delivered, state.last_success_at_ms) == (0, 0, 1, 40)
        assert await store.federation_due_peers(50) == []
        await store.federation_outbox_settle("b.example", [record.seq], [], 0, 41)  # idempotent
        assert (await store.federation_peer_states())[0].delivered == 1


async def test_deferred_envelopes_wait_and_expired_ones_go(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        target = device(9, "r" * 32)
        items = [
            msgspec.structs.replace(
                envelope(target, b"key-%d" % i, expires=1000 if i == 2 else FOREVER), remote_relay="b"
            )
            for i in range(3)
        ]
        await store.store_envelopes("sender", items, 10, MAX_INBOX, FOREVER)
        batch = await store.federation_outbox_batch("b", 20, 10)
        assert [r.envelope_id for r in batch] == [i.envelope_id for i in items]  # oldest first
        assert len(await store.federation_outbox_batch("b", 20, 2)) == 2
        await store.federation_outbox_settle("b", [], [batch[0].seq], 500, 20)
        assert [r.seq for r in await store.federation_outbox_batch("b", 100, 10)] == [batch[1].seq, batch[2].seq]
        assert (await store.federation_outbox_batch("b", 600, 10))[0].attempts == 1
        report = await store.expire(2000)
        assert report.federation == 1
        assert [r.seq for r in await store.federation_outbox_batch("b", 2000, 10)] == [batch[0].seq, batch[1].seq]


async def test_received_envelopes_are_deduplicated_per_origin(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        dev = device(1)
        await with_devices(store, dev)
        first = [received(dev.device_id, dev.account_id, b"1" * 16), received("z" * 32, dev.account_id, b"2" * 16)]
        outcomes = await store.federation_store_received("a.example", first, 10, MAX_INBOX, FOREVER)
        assert outcomes == [
            (ReceivedOutcome.STORED, dev.device_id),
            (ReceivedOutcome.UNKNOWN_RECIPIENT, "z" * 32),
        ]
        retry = [received(dev.device_id, dev.account_id, b"1" * 16), received(dev.device_id, dev.account_id, b"1" * 16)]
        assert [o for o, _ in await store.federation_store_received("a.example", retry, 11, MAX_INBOX, FOREVER)] == [
            ReceivedOutcome.DUPLICATE,
            ReceivedOutcome.DUPLICATE,
        ]
        # the same id from another origin is another envelope
        other = [received(dev.device_id, dev.account_id, b"1" * 16)]
        assert (await store.federation_store_received("c.example", other, 12, MAX_INBOX, FOREVER))[0][0] is (
            ReceivedOutcome.STORED
        )
        wrong_account = [received(dev.device_id, "q" * 32, b"3" * 16)]
        assert (await store.federation_store_received("a.example", wrong_account, 12, MAX_INBOX, FOREVER))[0][0] is (
            ReceivedOutcome.UNKNOWN_RECIPIENT
        )
        inbox = await store.read_inbox(dev.device_id, 0, 10, 13)
        assert len(inbox) == 2
        full = [received(dev.device_id, dev.account_id, b"4" * 16)]
        assert (await store.federation_store_received("a.example", full, 14, 2, FOREVER))[0][0] is (
            ReceivedOutcome.INBOX_FULL
        )
        # an INBOX_FULL envelope was not remembered: it can be delivered later
        assert (await store.federation_store_received("a.example", full, 15, MAX_INBOX, FOREVER))[0][0] is (
            ReceivedOutcome.STORED
        )
        # acknowledging keeps the quota count right for federated envelopes too
        assert await store.acknowledge(dev.device_id, 2**62, []) == 3


async def test_nonces_are_single_use_until_forgotten(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        assert await store.federation_remember_nonce("a.example", "nonce-1234567890", 100)
        assert not await store.federation_remember_nonce("a.example", "nonce-1234567890", 100)
        assert await store.federation_remember_nonce("c.example", "nonce-1234567890", 100)
        assert (await store.expire(100)).federation == 2
        assert await store.federation_remember_nonce("a.example", "nonce-1234567890", 200)
