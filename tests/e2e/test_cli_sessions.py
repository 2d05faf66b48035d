"""The CLI uses v2 sessions for format-2 accounts (docs/crypto.md §8.5, §9, §14), end to end.

Real relay process, the real ``tetherless`` CLI in subprocesses. The relay's
view is read from its SQLite file; the devices' state from their own
``state.db`` (opened with their keystores, as the CLI does).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import trio

from protocol import codec, log
from protocol import session as sealed_v2
from protocol.client.keystore import Keystore
from protocol.client.sdk import RelayClient
from protocol.client.sessions import T_PROCESSED, T_STATE, Processed
from protocol.client.store import ClientStore
from protocol.client.sync import AccountKeyMessage
from protocol.device_list import FORMAT_1, FORMAT_2
from tests.e2e.test_equal_devices import cli, init_device, link_device, ok
from tests.relay_process import RelayProcess


def relay_envelopes(relay: RelayProcess) -> list[tuple[str, bytes]]:
    """(recipient device id, ciphertext) of every envelope the relay stores, in arrival order."""
    with sqlite3.connect(f"file:{relay.data_dir / 'relay.sqlite3'}?mode=ro", uri=True) as db:
        return [(r, bytes(c)) for r, c in db.execute("SELECT recipient, ciphertext FROM envelopes ORDER BY rowid")]


def device_id(address: str) -> str:
    return address.split(".", 1)[0]


def inner_kind(home: Path, ciphertext: bytes) -> int | None:
    """The v2 kind (1 prekey, 2 message) of an envelope to ``home``'s device, or None for a v1 payload."""
    keys = Keystore(home).load()
    sealed = sealed_v2.parse_inner(sealed_v2.open_outer(ciphertext, keys.box_private_key))
    return None if sealed is None else sealed.kind


def outbox_ciphertexts(home: Path) -> list[bytes]:
    db = Keystore(home).local_db()
    return [bytes(r[0]) for r in db.execute("SELECT ciphertext FROM outbox_envelopes ORDER BY local_id, n")]


def texts(home: Path) -> list[str]:
    out = ok(cli(home, "sync", "--json"))
    return [json.loads(line)["text"] for line in out.splitlines() if line.strip()]


def test_cli_send_and_sync_use_sessions_and_persist_them(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice = init_device(relay, alice_home)
    bob = init_device(relay, bob_home)
    # `device init` published prekeys: nobody had to sync before the first message.
    sent = ok(cli(alice_home, "send", bob, "--text", "hello over a session")).split()
    assert len(sent) == 1

    stored = relay_envelopes(relay)
    assert [r for r, _ in stored] == [device_id(bob)]
    assert inner_kind(bob_home, stored[0][1]) == sealed_v2.KIND_PREKEY  # v2, the session's first message
    # The envelope posted is exactly the one stored in the outbox, in the transaction that advanced the ratchet.
    assert outbox_ciphertexts(alice_home) == [stored[0][1]]
    assert Keystore(alice_home).local_db().keys(T_STATE)

    assert texts(bob_home) == ["hello over a session"]
    bob_db = Keystore(bob_home).local_db()
    assert bob_db.keys(T_STATE)
    assert bob_db.keys(T_PROCESSED)

    # The reply goes on the session bob accepted: a ratchet message, not a new handshake.
    ok(cli(bob_home, "send", alice, "--text", "hello back"))
    reply = relay_envelopes(relay)[-1]
    assert reply[0] == device_id(alice)
    assert inner_kind(alice_home, reply[1]) == sealed_v2.KIND_MESSAGE
    assert texts(alice_home) == ["hello back"]

    # Both sides keep the session across processes: the next message is a ratchet message too.
    ok(cli(alice_home, "send", bob, "--text", "second"))
    assert inner_kind(bob_home, relay_envelopes(relay)[-1][1]) == sealed_v2.KIND_MESSAGE
    assert texts(bob_home) == ["second"]


def test_format2_recipient_without_prekeys_stays_queued_until_it_has_some(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, carol_home = tmp_path / "alice", tmp_path / "carol"
    init_device(relay, alice_home)

    async def register_without_prekeys() -> str:
        async with RelayClient.connect(relay.url) as client:
            keys = await client.register("carol", keystore=Keystore(carol_home), list_format=FORMAT_2)
        return keys.address

    carol = trio.run(register_without_prekeys)
    out = ok(cli(alice_home, "send", carol, "--text", "wait for me"))
    assert out.startswith("queued (waiting for prekeys: prekeys_unavailable")
    assert "local id 1" in out
    assert relay_envelopes(relay) == []  # never a v1 fallback

    (row,) = [json.loads(line) for line in ok(cli(alice_home, "outbox", "--json")).splitlines()]
    assert row["state"] == "retrying"  # waiting for prekeys: the entry's own state (account-log §10)
    assert row["attempts"] == 1
    assert "prekeys_unavailable" in row["last_error"]

    # A sync while carol still has no prekeys: still waiting, nothing sent, sync itself succeeds.
    ok(cli(alice_home, "sync"))
    assert relay_envelopes(relay) == []
    (row,) = [json.loads(line) for line in ok(cli(alice_home, "outbox", "--json")).splitlines()]
    assert row["state"] == "retrying"
    assert row["attempts"] == 2

    assert texts(carol_home) == []  # carol's first sync publishes her prekeys
    ok(cli(alice_home, "sync"))
    stored = relay_envelopes(relay)
    assert [r for r, _ in stored] == [device_id(carol)]
    assert inner_kind(carol_home, stored[0][1]) == sealed_v2.KIND_PREKEY
    assert texts(carol_home) == ["wait for me"]
    assert ok(cli(alice_home, "outbox", "--json")) == ""  # delivered and logged: nothing left to do


def test_format1_accounts_keep_v1(relay: RelayProcess, tmp_path: Path) -> None:
    old_home, new_home = tmp_path / "old", tmp_path / "new"
    old = ok(cli(old_home, "device", "init", "--relay", relay.url, "--list-format", str(FORMAT_1))).strip()
    new = init_device(relay, new_home)
    ok(cli(new_home, "send", old, "--text", "to a format-1 device"))
    assert inner_kind(old_home, relay_envelopes(relay)[-1][1]) is None  # v1 payload
    assert texts(old_home) == ["to a format-1 device"]
    ok(cli(old_home, "send", new, "--text", "from a format-1 device"))
    assert inner_kind(new_home, relay_envelopes(relay)[-1][1]) is None
    assert texts(new_home) == ["from a format-1 device"]


def test_sessions_across_two_relays_claim_remote_prekeys_through_federation(tmp_path: Path) -> None:
    from tests.e2e.test_federation import mesh

    ann_home, ben_home = tmp_path / "ann", tmp_path / "ben"
    with mesh(tmp_path, ["a.test", "b.test"]) as m:
        ann = init_device(m["a.test"], ann_home)
        ben = init_device(m["b.test"], ben_home)
        # ann's relay claims ben's bundle from b.test (POST /v1/prekeys/claim for a remote address).
        assert len(ok(cli(ann_home, "send", ben, "--text", "across relays")).split()) == 1
        got: list[str] = []
        for _ in range(100):  # federation delivers asynchronously; each sync is one bounded round
            got += texts(ben_home)
            if got:
                break
        assert got == ["across relays"]
        ok(cli(ben_home, "send", ann, "--text", "and back"))
        back: list[str] = []
        for _ in range(100):
            back += texts(ann_home)
            if back:
                break
        assert back == ["and back"]
    # Both ends kept their session: ann's database holds it, ben answered on it (no new handshake needed).
    assert Keystore(ann_home).local_db().keys(T_STATE)
    assert Keystore(ben_home).local_db().keys(T_STATE)


def account_key_messages(home: Path) -> list[AccountKeyMessage]:
    """The ``tetherless/account-key`` session messages this device opened (its processed-envelope table)."""
    db = Keystore(home).local_db()
    rows = [codec.decode(value, Processed) for _, value in db.items(T_PROCESSED)]
    return [codec.decode(r.body, AccountKeyMessage) for r in rows if r.content_type == log.ACCOUNT_KEY_CONTENT_TYPE]


def test_account_key_reaches_a_format_3_sibling_through_the_log_not_a_session(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """Account keys go to devices with an ML-KEM key as hybrid grants in the log (account-log.md §5.5);
    the ``tetherless/account-key`` session message is only for devices without one (format 2)."""
    d1_home, d2_home = tmp_path / "d1", tmp_path / "d2"
    init_device(relay, d1_home)
    link_device(relay, d2_home, d1_home)
    assert texts(d1_home) == []
    k1 = ClientStore(Keystore(d1_home).local_db()).epoch_key(1)
    assert k1 is not None
    assert texts(d2_home) == []
    assert account_key_messages(d2_home) == []  # nothing classical or session-borne was needed
    assert ClientStore(Keystore(d2_home).local_db()).epoch_key(1) == k1
    assert ok(cli(d2_home, "history", "--json")) == ""  # nor logged as one
