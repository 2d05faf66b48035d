"""The device-list, revocation and WebAuthn part of the Store contract, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.store import (
    ChallengeOutcome,
    CredentialUse,
    DeviceListUpdate,
    DeviceRecord,
    NewCredential,
    ReceivedEnvelope,
    ReceivedOutcome,
    Store,
)
from relay.store.base import PrekeyState, StoredPrekey
from tests.relay.store import test_store_contract as contract
from tests.relay.store.test_store_contract import FOREVER, MAX_INBOX, Backend, device, envelope, open_store

backend = contract.backend  # the contract's fixture: every test runs on SQLite and PostgreSQL

ACCOUNT = "a" * 32
CRED = NewCredential(credential_id=b"cred-1", public_key=b"cose-key-1", rp_id="relay.example")


def update(version: int, **changes: object) -> DeviceListUpdate:
    fields: dict[str, object] = {
        "account_id": ACCOUNT,
        "version": version,
        "signed": f"list-v{version}".encode(),
        "added": (),
        "removed": (),
    }
    fields.update(changes)
    return DeviceListUpdate(**fields)  # type: ignore[arg-type]


def use(credential: NewCredential, count: int) -> CredentialUse:
    return CredentialUse(credential.credential_id, credential.public_key, credential.rp_id, count)


async def account_with(store: Store, *extra: DeviceRecord) -> DeviceRecord:
    """An account (genesis device ``device(1)``) with ``extra`` devices added by version 2."""
    first = device(1)
    await store.create_account(ACCOUNT, first, b"list-v1", 1)
    if extra:
        await store.append_device_list(update(2, added=extra), 2)
    return first


async def expect(code: ErrorCode, call: object) -> None:
    with pytest.raises(TetherlessError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code is code


async def test_append_moves_the_head_and_conflicts_on_anything_but_head_plus_one(
    backend: Backend, tmp_path: Path
) -> None:
    async with open_store(backend, tmp_path) as store:
        await account_with(store)
        head = await store.get_device_list_head(ACCOUNT)
        assert head is not None
        assert (head.version, head.signed, head.removed_ids) == (1, b"list-v1", frozenset())
        second = device(2)
        committed = await store.append_device_list(update(2, added=[second]), 10)
        assert committed.devices == sorted([device(1).device_id, second.device_id])
        assert committed.revoked == []
        for version in (2, 4, 1):  # a replay of the head, a gap, an old version
            await expect(ErrorCode.DEVICE_LIST_CONFLICT, store.append_device_list(update(version), 11))
        await expect(ErrorCode.UNKNOWN_ACCOUNT, store.append_device_list(update(2, account_id="z" * 32), 11))
        assert await store.get_device_lists(ACCOUNT) == [b"list-v1", b"list-v2"]
        state = await store.device_stream_state(second.device_id)
        assert state is not None
        assert (state.account_id, state.revoked, state.list_version) == (ACCOUNT, False, 2)
        assert await store.get_device_list_head("z" * 32) is None


async def test_concurrent_appends_exactly_one_wins(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as first, open_store(backend, tmp_path / "second") as other:
        # SQLite: one process owns the file, so both writers share the store; PostgreSQL: two stores, one database.
        stores = [first, other] if backend.name == "postgres" else [first, first]
        await account_with(first)
        outcomes: list[str] = []

        async def attempt(store: Store, n: int) -> None:
            try:
                await store.append_device_list(update(2, signed=f"v2-by-{n}".encode(), added=[device(10 + n)]), 5)
                outcomes.append(f"won-{n}")
            except TetherlessError as exc:
                outcomes.append(exc.code.value)

        for _ in range(3):
            async with trio.open_nursery() as nursery:
                for n, store in enumerate(stores):
                    nursery.start_soon(attempt, store, n)
        # the first round has one winner; the later rounds find version 2 taken
        assert sorted(outcomes).count(ErrorCode.DEVICE_LIST_CONFLICT.value) == 5
        winner = [o for o in outcomes if o.startswith("won-")]
        assert len(winner) == 1
        blobs = await first.get_device_lists(ACCOUNT)
        assert blobs == [b"list-v1", f"v2-by-{winner[0][-1]}".encode()]
        loser = device(10 + (1 - int(winner[0][-1])))
        assert await first.get_device(loser.device_id) is None  # the loser's device was not added


async def test_counters_never_go_back(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        await account_with(store)
        await store.put_webauthn_credential(ACCOUNT, device(1).device_id, CRED, 5, 3)
        # the proof of possession must be above the registration's count
        await expect(
            ErrorCode.WEBAUTHN_REPLAYED,
            store.append_device_list(update(2, added_credentials=[CRED], assertions=[use(CRED, 5)]), 10),
        )
        await store.append_device_list(update(2, added_credentials=[CRED], assertions=[use(CRED, 6)]), 10)
        for stale in (6, 0, 3):
            await expect(
                ErrorCode.WEBAUTHN_REPLAYED, store.append_device_list(update(3, assertions=[use(CRED, stale)]), 11)
            )
        await store.append_device_list(update(3, assertions=[use(CRED, 9)]), 11)
        (stored,) = await store.get_webauthn_credentials(ACCOUNT)
        assert (stored.sign_count, stored.status, stored.registered_by) == (9, "active", device(1).device_id)
        # an authenticator without a counter: 0 after 0 is accepted, every time
        zero = NewCredential(b"cred-0", b"cose-key-0", "relay.example")
        await store.put_webauthn_credential(ACCOUNT, device(1).device_id, zero, 0, 12)
        await store.append_device_list(update(4, added_credentials=[zero], assertions=[use(zero, 0)]), 12)
        await store.append_device_list(update(5, assertions=[use(zero, 0), use(CRED, 10)]), 13)
        # a replayed counter of one credential rejects the whole version, the other's counter included
        await expect(
            ErrorCode.WEBAUTHN_REPLAYED,
            store.append_device_list(update(6, assertions=[use(zero, 0), use(CRED, 10)]), 14),
        )
        assert {c.credential_id: c.sign_count for c in await store.get_webauthn_credentials(ACCOUNT)} == {
            b"cred-0": 0,
            b"cred-1": 10,
        }
        # removing a credential deletes its counter
        await store.append_device_list(update(6, removed_credentials=[CRED.credential_id]), 15)
        assert [c.credential_id for c in await store.get_webauthn_credentials(ACCOUNT)] == [b"cred-0"]


async def test_added_credentials_must_be_pending_for_the_account_with_the_same_key(
    backend: Backend, tmp_path: Path
) -> None:
    async with open_store(backend, tmp_path) as store:
        await account_with(store)
        other_account = device(7, "o" * 32)
        await store.create_account(other_account.account_id, other_account, b"other-v1", 1)
        await store.put_webauthn_credential(other_account.account_id, other_account.device_id, CRED, 0, 2)
        # registered for another account only
        await expect(
            ErrorCode.WEBAUTHN_INVALID,
            store.append_device_list(update(2, added_credentials=[CRED], assertions=[use(CRED, 1)]), 3),
        )
        await store.put_webauthn_credential(ACCOUNT, device(1).device_id, CRED, 0, 2)
        swapped = NewCredential(CRED.credential_id, b"another-key", CRED.rp_id)
        await expect(
            ErrorCode.WEBAUTHN_INVALID,
            store.append_device_list(update(2, added_credentials=[swapped], assertions=[use(swapped, 1)]), 3),
        )
        assert await store.get_device_lists(ACCOUNT) == [b"list-v1"]
        await store.append_device_list(update(2, added_credentials=[CRED], assertions=[use(CRED, 1)]), 3)
        # an active credential cannot be registered again (its counter would reset)
        await expect(ErrorCode.WEBAUTHN_INVALID, store.put_webauthn_credential(ACCOUNT, "x" * 32, CRED, 0, 4))


async def test_revocation_is_atomic_with_the_version(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        lost = device(2)
        keeper = await account_with(store, lost)
        token = os.urandom(32)
        await store.create_session(token, lost.device_id, ACCOUNT, 3, FOREVER)
        await store.put_challenge(b"n" * 32, lost.device_id, FOREVER)
        await store.put_webauthn_registration(b"r" * 32, ACCOUNT, lost.device_id, FOREVER)
        await store.store_envelopes("s", [envelope(lost, b"k-1"), envelope(lost, b"k-2")], 4, MAX_INBOX, FOREVER)
        await store.put_webauthn_credential(ACCOUNT, keeper.device_id, CRED, 7, 4)
        prekeys = [
            StoredPrekey("x25519-signed", 1, b"p" * 32, 4, b"s" * 64),
            StoredPrekey("x25519-one-time", 2, b"q" * 32, 4, b"s" * 64),
        ]
        await store.put_prekeys(lost.device_id, prekeys, 100)

        # a version that would revoke, but fails its counter check, changes nothing
        failing = update(3, removed=[lost.device_id], added_credentials=[CRED], assertions=[use(CRED, 7)])
        await expect(ErrorCode.WEBAUTHN_REPLAYED, store.append_device_list(failing, 5))
        session = await store.get_session(token)
        assert session is not None
        assert session.revoked_at_ms is None
        assert len(await store.read_inbox(lost.device_id, 0, 10, 5)) == 2
        assert (await store.get_prekey_state(lost.device_id)).signed_prekey_id == 1
        record = await store.get_device(lost.device_id)
        assert record is not None
        assert record.revoked_at_ms is None

        committed = await store.append_device_list(update(3, removed=[lost.device_id]), 6)
        assert committed.revoked == [lost.device_id]
        assert committed.envelopes_deleted == 2
        assert lost.device_id in committed.devices  # revoked devices are woken too (their streams end)
        record = await store.get_device(lost.device_id)
        assert record is not None
        assert record.revoked_at_ms == 6
        session = await store.get_session(token)
        assert session is not None
        assert session.revoked_at_ms == 6
        assert await store.read_inbox(lost.device_id, 0, 10, 6) == []
        assert await store.get_prekey_state(lost.device_id) == PrekeyState(0, 0, None, None)
        assert (await store.consume_challenge(b"n" * 32, lost.device_id, 7)).outcome is ChallengeOutcome.UNKNOWN
        assert (
            await store.consume_webauthn_registration(b"r" * 32, ACCOUNT, lost.device_id, 7) is ChallengeOutcome.UNKNOWN
        )
        state = await store.device_stream_state(lost.device_id)
        assert state is not None
        assert state.revoked
        assert state.list_version == 3
        head = await store.get_device_list_head(ACCOUNT)
        assert head is not None
        assert head.removed_ids == frozenset({lost.device_id})

        # new envelopes to it are refused, locally and from other relays
        await expect(
            ErrorCode.RECIPIENT_REVOKED,
            store.store_envelopes("s", [envelope(lost, b"k-3")], 8, MAX_INBOX, FOREVER),
        )
        incoming = ReceivedEnvelope(os.urandom(16), lost.device_id, ACCOUNT, os.urandom(16), FOREVER, b"ct")
        outcomes = await store.federation_store_received("peer.example", [incoming], 8, MAX_INBOX, FOREVER)
        assert outcomes == [(ReceivedOutcome.RECIPIENT_REVOKED, lost.device_id)]
        # the keeper's inbox still works
        await store.store_envelopes("s", [envelope(keeper, b"k-4")], 9, MAX_INBOX, FOREVER)
        assert len(await store.read_inbox(keeper.device_id, 0, 10, 9)) == 1


async def test_adding_a_known_device_changes_nothing(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        stranger = device(9, "s" * 32)
        await store.create_account(stranger.account_id, stranger, b"s-v1", 1)
        await account_with(store)
        clash = DeviceRecord(stranger.device_id, ACCOUNT, stranger.sign_key, stranger.box_key, 2)
        await expect(ErrorCode.INVALID_DEVICE_LIST, store.append_device_list(update(2, added=[clash]), 2))
        assert await store.get_device_lists(ACCOUNT) == [b"list-v1"]
        head = await store.get_device_list_head(ACCOUNT)
        assert head is not None
        assert head.version == 1


async def test_registration_challenges_are_single_use_and_bound(backend: Backend, tmp_path: Path) -> None:
    async with open_store(backend, tmp_path) as store:
        first = await account_with(store)
        me = first.device_id
        await store.put_webauthn_registration(b"c" * 32, ACCOUNT, me, 100)
        assert await store.consume_webauthn_registration(b"c" * 32, ACCOUNT, "x" * 32, 50) is ChallengeOutcome.UNKNOWN
        assert await store.consume_webauthn_registration(b"c" * 32, "o" * 32, me, 50) is ChallengeOutcome.UNKNOWN
        assert await store.consume_webauthn_registration(b"d" * 32, ACCOUNT, me, 50) is ChallengeOutcome.UNKNOWN
        assert await store.consume_webauthn_registration(b"c" * 32, ACCOUNT, me, 50) is ChallengeOutcome.OK
        assert await store.consume_webauthn_registration(b"c" * 32, ACCOUNT, me, 51) is ChallengeOutcome.USED
        await store.put_webauthn_registration(b"e" * 32, ACCOUNT, me, 100)
        assert await store.consume_webauthn_registration(b"e" * 32, ACCOUNT, me, 100) is ChallengeOutcome.EXPIRED
        await store.put_webauthn_registration(b"f" * 32, ACCOUNT, me, 100)
        report = await store.expire(101)
        assert report.challenges >= 1
        assert await store.consume_webauthn_registration(b"f" * 32, ACCOUNT, me, 50) is ChallengeOutcome.UNKNOWN
