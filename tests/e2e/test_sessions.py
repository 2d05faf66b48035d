"""v2 sessions end to end (docs/crypto.md §7-§10): two format-2 accounts over a real relay.

The relay-side view is read straight from the relay's SQLite file: what an
operator (adversary A1) holds after the messages were stored.
"""

from __future__ import annotations

import base64
import copy
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from protocol import codec, padding, payload, prekeys
from protocol import session as sealed_v2
from protocol.client.api import RelayApi
from protocol.client.devices import approve_link, finish_link, start_link
from protocol.client.keystore import DeviceKeys, Keystore
from protocol.client.localdb import LocalDB
from protocol.client.sdk import ReceivedMessage, RejectedMessage, RelayClient
from protocol.client.sessions import T_PROCESSED, T_STATE, MemoryStore, PrekeysUnavailableError, SessionManager
from protocol.device_list import FORMAT_1, FORMAT_2
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import _encode_id  # the id encoding itself, to search for the raw id bytes too
from protocol.messages import InboxPage
from protocol.payload import InvalidPayloadError
from protocol.session import SessionState
from protocol.signing import digest
from tests.e2e.http11 import Http11
from tests.e2e.offline_client import init_device, load, run_engine
from tests.relay_process import RelayProcess


@asynccontextmanager
async def v2_device(
    relay: RelayProcess, name: str, store: MemoryStore | LocalDB | None = None
) -> AsyncIterator[RelayClient]:
    async with RelayClient.connect(relay.url) as client:
        await client.register(name, list_format=FORMAT_2)
        await client.enable_sessions(store if store is not None else MemoryStore())
        yield client


def keys_of(client: RelayClient) -> DeviceKeys:
    assert client.keys is not None
    return client.keys


def manager(client: RelayClient) -> SessionManager:
    assert client.sessions is not None
    return client.sessions


async def raw_inbox(client: RelayClient) -> InboxPage:
    return await client.api.inbox_page(after=0)


def kinds(client: RelayClient, page: InboxPage) -> list[int]:
    result: list[int] = []
    for env in page.envelopes:
        sealed = sealed_v2.parse_inner(sealed_v2.open_outer(env.ciphertext, keys_of(client).box_private_key))
        assert sealed is not None, "expected a v2 payload"
        result.append(sealed.kind)
    return result


def relay_rows(relay: RelayProcess) -> list[tuple[str, bytes, bytes]]:
    """(recipient device id, envelope id, ciphertext) of every stored envelope."""
    with sqlite3.connect(f"file:{relay.data_dir / 'relay.sqlite3'}?mode=ro", uri=True) as db:
        return [
            (r, bytes(i), bytes(c))
            for r, i, c in db.execute("SELECT recipient, envelope_id, ciphertext FROM envelopes")
        ]


async def test_two_format2_accounts_talk_over_sessions(relay: RelayProcess) -> None:
    async with v2_device(relay, "alice") as alice, v2_device(relay, "bob") as bob:
        bob_address, alice_address = keys_of(bob).address, keys_of(alice).address
        counts = await bob.api.prekey_counts()
        assert (counts.x25519_one_time, counts.mlkem_one_time) == (50, 50)
        assert manager(bob).one_time_privates() == {prekeys.X25519_ONE_TIME: 50, prekeys.MLKEM_ONE_TIME: 50}

        await alice.send(bob_address, "first")
        await alice.send(bob_address, "second")
        assert kinds(bob, await raw_inbox(bob)) == [sealed_v2.KIND_PREKEY, sealed_v2.KIND_PREKEY]
        # The claim consumed one key of each one-time kind on the relay.
        counts = await bob.api.prekey_counts()
        assert (counts.x25519_one_time, counts.mlkem_one_time) == (49, 49)

        batch = await bob.fetch()
        assert [(type(i), getattr(i, "text", None), getattr(i, "sender", None)) for i in batch.items] == [
            (ReceivedMessage, "first", alice_address),
            (ReceivedMessage, "second", alice_address),
        ]
        # The one-time privates used were deleted on first use.
        assert manager(bob).one_time_privates() == {prekeys.X25519_ONE_TIME: 49, prekeys.MLKEM_ONE_TIME: 49}
        # A redelivery (fetch again, nothing acknowledged) gives the same messages, without a second decryption.
        again = await bob.fetch()
        assert [i.text for i in again.items if isinstance(i, ReceivedMessage)] == ["first", "second"]
        await bob.ack(up_to=batch.next_cursor)

        await bob.send(alice_address, "reply")
        assert kinds(alice, await raw_inbox(alice)) == [sealed_v2.KIND_MESSAGE]
        (reply,) = (await alice.fetch()).items
        assert isinstance(reply, ReceivedMessage)
        assert (reply.text, reply.sender) == ("reply", bob_address)
        await alice.ack(up_to=reply.cursor)

        # Alice has heard back: her later messages are ratchet messages, no new claim.
        await alice.send(bob_address, "third")
        assert kinds(bob, await raw_inbox(bob)) == [sealed_v2.KIND_MESSAGE]
        (third,) = (await bob.fetch()).items
        assert isinstance(third, ReceivedMessage)
        assert third.text == "third"
        counts = await bob.api.prekey_counts()
        assert (counts.x25519_one_time, counts.mlkem_one_time) == (49, 49)


async def test_relay_stores_no_sender_and_no_plaintext_only_bucket_sizes(relay: RelayProcess) -> None:
    async with v2_device(relay, "alice") as alice, v2_device(relay, "bob") as bob:
        alice_keys, bob_address = keys_of(alice), keys_of(bob).address
        secrets = [f"secret-{i}-{os.urandom(6).hex()}" for i in range(3)]
        await alice.send(bob_address, secrets[0] + "x" * 150)  # ~200 bytes: prekey message
        (first,) = (await bob.fetch()).items
        await bob.ack(up_to=first.cursor)
        await bob.send(alice_address := alice_keys.address, "ok")
        (ok,) = (await alice.fetch()).items
        await alice.ack(up_to=ok.cursor)
        await alice.send(bob_address, secrets[1] + "y" * 150)  # ~200 bytes: ratchet message
        await alice.send(bob_address, secrets[2] + "z" * 3000)  # a 4 KiB bucket

        rows = [r for r in relay_rows(relay) if r[0] == keys_of(bob).device_id]
        assert len(rows) == 2
        raw_device = digest("device-id", alice_keys.sign_public_key)[:20]
        assert _encode_id(raw_device) == alice_keys.device_id
        forbidden = [
            alice_keys.device_id.encode(),
            alice_keys.device_id.upper().encode(),
            base64.b32encode(raw_device),
            raw_device,
            alice_address.encode(),
            alice_keys.account_id.encode(),
            alice_keys.sign_public_key,
            alice_keys.box_public_key,
        ] + [s.encode() for s in secrets]
        for recipient, envelope_id, ciphertext in rows:
            for needle in forbidden:
                for column in (recipient.encode(), envelope_id, ciphertext):
                    assert needle not in column
        sizes = sorted(len(c) for _, _, c in rows)
        assert sizes == [payload.SEAL_OVERHEAD_BYTES + 512, payload.SEAL_OVERHEAD_BYTES + 4096]
        assert all(padding.is_bucket(n - payload.SEAL_OVERHEAD_BYTES) for n in sizes)
        # And the first message, already acknowledged, was a session start in the 2 KiB bucket: check on
        # a new pair while it is still stored.
        async with v2_device(relay, "carol") as carol:
            await carol.send(bob_address, "hi")
            rows = [r for r in relay_rows(relay) if r[0] == keys_of(bob).device_id]
            assert sorted(len(c) for _, _, c in rows)[-1] == payload.SEAL_OVERHEAD_BYTES + 4096
            assert payload.SEAL_OVERHEAD_BYTES + 2048 in [len(c) for _, _, c in rows]


async def test_forward_secrecy_captured_ciphertexts_resist_a_later_state_copy(relay: RelayProcess) -> None:
    async with v2_device(relay, "alice") as alice, v2_device(relay, "bob") as bob:
        bob_address, alice_address = keys_of(bob).address, keys_of(alice).address
        for text in ("one", "two"):
            await alice.send(bob_address, text)
        captured = [(i, c) for r, i, c in relay_rows(relay) if r == keys_of(bob).device_id]
        assert len(captured) == 2
        items = (await bob.fetch()).items
        assert [i.text for i in items if isinstance(i, ReceivedMessage)] == ["one", "two"]
        await bob.ack(up_to=items[-1].cursor)
        await bob.send(alice_address, "ack")
        (item,) = (await alice.fetch()).items
        await alice.ack(up_to=item.cursor)
        await alice.send(bob_address, "three")
        (three,) = (await bob.fetch()).items
        assert isinstance(three, ReceivedMessage)

        # The attacker copies Bob's whole state now (A4), minus the opened-message cache, which is
        # history, not keys: the session state and the prekey privates left must not open the captures.
        stolen_store = copy.deepcopy(manager(bob).store)
        assert isinstance(stolen_store, MemoryStore)
        for key in stolen_store.keys(T_PROCESSED):
            stolen_store.delete(T_PROCESSED, key)
        stolen = SessionManager(keys_of(bob), stolen_store)
        entry = next(e for e in await bob.devices(keys_of(alice).account_id) if e.device_id == keys_of(alice).device_id)
        for envelope_id, ciphertext in captured:
            sealed = sealed_v2.parse_inner(sealed_v2.open_outer(ciphertext, keys_of(bob).box_private_key))
            assert sealed is not None
            with pytest.raises(InvalidPayloadError):
                stolen.open(sealed, envelope_id=envelope_id, sender=entry)
            # Not with the raw ratchet states either.
            for key in stolen_store.keys(T_STATE):
                raw = stolen_store.get(T_STATE, key)
                assert raw is not None
                with pytest.raises(InvalidPayloadError):
                    sealed_v2.decrypt(
                        codec.decode(raw, SessionState), sealed, entropy=os.urandom(32), now_ms=0, skipped_ttl_ms=10**9
                    )


async def test_sessions_survive_a_restart_through_the_local_database(relay: RelayProcess, tmp_path: Path) -> None:
    dek = os.urandom(32)
    db = LocalDB.open(tmp_path / "bob-home", dek)
    async with v2_device(relay, "alice") as alice:
        async with v2_device(relay, "bob", db) as bob:
            bob_keys = keys_of(bob)
            await alice.send(bob_keys.address, "before restart")
            (item,) = (await bob.fetch()).items
            assert isinstance(item, ReceivedMessage)
            await bob.ack(up_to=item.cursor)
        db.close()
        # A new process: the same keys, the reopened database; the session and its chain go on.
        reopened = LocalDB.open(tmp_path / "bob-home", dek)
        try:
            async with RelayClient.connect(relay.url, keys=bob_keys, local_db=reopened) as bob_again:
                await bob_again.enable_sessions()
                assert manager(bob_again).has_session(keys_of(alice).address)
                await bob_again.send(keys_of(alice).address, "after restart")
                assert kinds(alice, await raw_inbox(alice)) == [sealed_v2.KIND_MESSAGE]  # no new session
                (reply,) = (await alice.fetch()).items
                assert isinstance(reply, ReceivedMessage)
                assert reply.text == "after restart"
        finally:
            reopened.close()
        # The rows are sealed: the state file holds no session key material in the clear.
        raw = (tmp_path / "bob-home" / "state.db").read_bytes()
        assert b"before restart" not in raw


async def test_format2_sender_never_falls_back_to_v1_without_prekeys(relay: RelayProcess) -> None:
    async with v2_device(relay, "alice") as alice, RelayClient.connect(relay.url) as bob:
        await bob.register("bob without prekeys", list_format=FORMAT_2)
        with pytest.raises(PrekeysUnavailableError) as err:
            await alice.send(keys_of(bob).address, "hello")
        assert err.value.missing == [keys_of(bob).address]
        assert relay_rows(relay) == []  # nothing was sent


async def test_format1_recipients_keep_v1_and_v1_payloads_still_open(relay: RelayProcess) -> None:
    async with v2_device(relay, "alice") as alice, RelayClient.connect(relay.url) as old:
        await old.register("old", list_format=FORMAT_1)
        await alice.send(keys_of(old).address, "to a v1 account")
        (item,) = (await old.fetch()).items  # opened by the v1 cipher: a v1 payload
        assert isinstance(item, ReceivedMessage)
        assert item.text == "to a v1 account"
        await old.send(keys_of(alice).address, "from a v1 account")
        (back,) = (await alice.fetch()).items  # alice dispatches on the first byte (§14)
        assert isinstance(back, ReceivedMessage)
        assert (back.text, back.sender) == ("from a v1 account", keys_of(old).address)


async def test_substituted_prekey_is_detected(relay: RelayProcess) -> None:
    async with v2_device(relay, "alice") as alice, v2_device(relay, "bob") as bob:
        bob_keys = keys_of(bob)
        # Bob's relay answers a bundle whose signed prekey is not Bob's (A1): simulate by rewriting the row.
        with sqlite3.connect(relay.data_dir / "relay.sqlite3") as db:
            changed = db.execute(
                "UPDATE prekeys SET public_key = ? WHERE device_id = ? AND kind = 'x25519-signed'",
                (os.urandom(32), bob_keys.device_id),
            ).rowcount
        assert changed == 1
        with pytest.raises(TetherlessError) as err:
            await alice.send(bob_keys.address, "hello")
        assert err.value.code is ErrorCode.PREKEY_INVALID
        assert [r for r in relay_rows(relay) if r[0] == bob_keys.device_id] == []


def messages_posts(relay: RelayProcess) -> float:
    """How many POST /v1/messages the relay has answered, from its own metrics."""
    text = Http11(relay.url).get("/metrics", accept="*/*").body.decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("relay_http_requests_total{") and 'route="/v1/messages"' in line and 'method="POST"' in line
    )


async def test_fan_out_reaches_every_device_of_both_accounts_in_one_batch(relay: RelayProcess, tmp_path: Path) -> None:
    async with (
        v2_device(relay, "alice-phone") as phone,
        v2_device(relay, "bob") as bob,
        RelayClient.connect(relay.url) as laptop,
    ):
        pending = await start_link(laptop)
        await approve_link(phone, pending.code)
        laptop_keys = await finish_link(laptop, pending, keystore=Keystore(tmp_path / "laptop", passphrase="pw"))
        await laptop.enable_sessions()  # adopts the prekeys it offered while linking, adds one-time keys
        assert laptop.local_db is not None
        phone_keys, bob_keys = keys_of(phone), keys_of(bob)
        # The phone cached its list before the laptop joined (30 s, or until a device_list stream event).
        await phone.devices(phone_keys.account_id, fresh=True)

        before = messages_posts(relay)
        sent = await phone.send(bob_keys.account_address, "to bob, copied to my laptop")
        assert messages_posts(relay) == before + 1  # one atomic batch
        assert sorted(s.recipient for s in sent) == sorted([bob_keys.address, laptop_keys.address])
        for device in (bob, laptop):
            (item,) = (await device.fetch()).items
            assert isinstance(item, ReceivedMessage)
            assert (item.text, item.sender) == ("to bob, copied to my laptop", phone_keys.address)
            await device.ack(up_to=item.cursor)

        # Bob answers the account: both of Alice's devices get it.
        sent = await bob.send(phone_keys.account_address, "hi both")
        assert sorted(s.recipient for s in sent) == sorted([phone_keys.address, laptop_keys.address])
        for device in (phone, laptop):
            (item,) = (await device.fetch()).items
            assert isinstance(item, ReceivedMessage)
            assert (item.text, item.sender) == ("hi both", bob_keys.address)


async def test_replayed_prekey_message_is_rejected(relay: RelayProcess) -> None:
    async with v2_device(relay, "alice") as alice, v2_device(relay, "bob") as bob:
        bob_keys = keys_of(bob)
        # A malicious relay (A1) hands out no one-time prekeys: the session starts on the signed and the
        # last-resort keys only, so no private key is deleted on first use and a replay of this session
        # start would open again — only the transcript replay cache (crypto.md §7.3 step 5) stops it.
        with sqlite3.connect(relay.data_dir / "relay.sqlite3") as db:
            db.execute(
                "DELETE FROM prekeys WHERE device_id = ? AND kind IN (?, ?)",
                (bob_keys.device_id, prekeys.X25519_ONE_TIME, prekeys.MLKEM_ONE_TIME),
            )
        await alice.send(bob_keys.address, "only once")
        ((_, envelope_id, ciphertext),) = [r for r in relay_rows(relay) if r[0] == bob_keys.device_id]
        sealed = sealed_v2.parse_inner(sealed_v2.open_outer(ciphertext, bob_keys.box_private_key))
        assert sealed is not None
        start = sealed_v2.prekey_message(sealed)
        assert (start.one_time_prekey_id, start.pq_last_resort) == (None, True)
        (item,) = (await bob.fetch()).items
        assert isinstance(item, ReceivedMessage)
        await bob.ack(up_to=item.cursor)

        async def replay() -> RejectedMessage:
            # The relay stores the captured session start again, as a new envelope (a new id, so the
            # processed-envelope cache does not apply).
            with sqlite3.connect(relay.data_dir / "relay.sqlite3") as db:
                tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "inbox" in tables:  # schema 8: rows name their recipient by devices.device_no
                    db.execute(
                        "INSERT INTO inbox (recipient_no, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
                        " SELECT device_no, ?, 1, 4102444800000, ? FROM devices WHERE device_id = ?",
                        (os.urandom(16), ciphertext, bob_keys.device_id),
                    )
                else:
                    db.execute(
                        "INSERT INTO envelopes (recipient, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
                        " VALUES (?, ?, 1, 4102444800000, ?)",
                        (bob_keys.device_id, os.urandom(16), ciphertext),
                    )
            assert envelope_id not in [r[1] for r in relay_rows(relay)]  # the original was acknowledged
            (replayed,) = (await bob.fetch()).items
            assert isinstance(replayed, RejectedMessage)
            await bob.ack(up_to=replayed.cursor)
            return replayed

        # While Bob still has the session, the replay lands on it and its message key is gone.
        replayed = await replay()
        assert replayed.code is ErrorCode.MALFORMED_BODY
        # Once the session is gone (evicted by newer sessions with Alice, MAX_SESSIONS_PER_PEER, or
        # deleted), the replay runs the responder's handshake again, which succeeds: the replay cache of
        # transcript hashes is what refuses it.
        assert manager(bob).store.delete(T_STATE, sealed.session_id)
        assert not manager(bob).has_session(keys_of(alice).address)
        replayed = await replay()
        assert replayed.code is ErrorCode.MALFORMED_BODY
        assert "replayed session start" in replayed.detail
        assert not manager(bob).has_session(keys_of(alice).address)


async def test_sync_reuses_the_stored_session_token_and_renews_a_revoked_one_once(
    relay: RelayProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sync`` authenticates only when the home holds no good token (issue 14): the next ``sync`` reuses the one
    the last stored; a token the relay has revoked meanwhile is replaced once, and that ``sync`` still succeeds."""
    home = tmp_path / "a"
    init_device(relay.url, home, "a")
    made: list[object] = []
    real = RelayApi.authenticate

    async def counting(api: RelayApi) -> object:
        made.append(await real(api))
        return made[-1]

    monkeypatch.setattr(RelayApi, "authenticate", counting)
    assert await run_engine(home) == 0
    first = len(made)
    assert await run_engine(home) == 0
    assert len(made) == first  # the stored token, no new session
    ks, keys, store = load(home)
    store.db.close()
    ks.close()
    async with RelayClient.connect(relay.url, keys=keys) as other:  # another client of this device
        await other.api.revoke_sessions(all_sessions=True)  # the home's stored token dies with the others
    revoked = len(made)
    assert await run_engine(home) == 0
    assert len(made) == revoked + 1  # refused once, a new session, the sync went through
