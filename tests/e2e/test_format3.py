"""Device-list format 3 end to end (issue 12 point 0, docs/crypto.md §3.6): a real relay refuses an
integration's approval, and a format-2 account made by the CLI is upgraded and keeps exchanging messages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgspec

from protocol import codec, handshake
from protocol.client.keystore import Keystore
from protocol.device_list import FORMAT_2, FORMAT_3, approve, device_entry, next_version, signed_list
from protocol.messages import DeviceEntry, DeviceListChain, Policy
from tests.e2e.http11 import Http11, login
from tests.e2e.test_device_lists import Account, Device, now_ms
from tests.e2e.test_equal_devices import account_of, cli, link_device, ok, relay_db, sync_texts
from tests.relay_process import RelayProcess


def kem_of(device: Device) -> bytes:
    return handshake.mlkem_public(hashlib.sha512(bytes(device.signing_key)).digest())


def entry3(device: Device, role: str = "device", scopes: tuple[str, ...] = ()) -> DeviceEntry:
    return device_entry(
        bytes(device.signing_key.verify_key),
        bytes(device.box_key.public_key),
        added_at_ms=now_ms(),
        kem_key=kem_of(device),
        role=role,  # type: ignore[arg-type]
        scopes=scopes,  # type: ignore[arg-type]
    )


def upgraded_with_integration(http: Http11, relay: RelayProcess) -> tuple[Account, Device]:
    """A format-2 account upgraded to format 3 over the wire, then given an integration (send only)."""
    account = Account(http, relay.name)
    first = account.first
    dl = next_version(account.head, format=FORMAT_3, set_kem_keys={first.device_id: kem_of(first)}, now_ms=now_ms())
    account.accept(signed_list(dl, [approve(dl, first.signing_key)]))
    bot = Device()
    dl = next_version(account.head, add_devices=[entry3(bot, "integration", ("send",))], now_ms=now_ms())
    account.accept(signed_list(dl, [approve(dl, first.signing_key), approve(dl, bot.signing_key)]))
    return account, bot


def test_the_relay_refuses_an_integrations_signature_on_a_list_change(relay: RelayProcess) -> None:
    http = Http11(relay.url)
    account, bot = upgraded_with_integration(http, relay)
    assert account.head.format == FORMAT_3
    intruder = Device()
    dl = next_version(account.head, add_devices=[entry3(intruder)], now_ms=now_ms())
    # Approved by the integration alone, and by the integration beside the real device: refused alike.
    account.refuse(
        signed_list(dl, [approve(dl, bot.signing_key), approve(dl, intruder.signing_key)]), 403, "policy_not_met"
    )
    both = [approve(dl, k.signing_key) for k in (account.first, bot, intruder)]
    account.refuse(signed_list(dl, both), 403, "policy_not_met")
    policy = next_version(account.head, policy=Policy(threshold=1, require_user_verification=True), now_ms=now_ms())
    account.refuse(signed_list(policy, [approve(policy, bot.signing_key)]), 403, "policy_not_met")
    # Back to format 2 is refused; an added device without a kem_key too.
    back = next_version(account.head, format=FORMAT_2, now_ms=now_ms())
    back = msgspec.structs.replace(
        back, devices=[msgspec.structs.replace(d, kem_key=b"", role="device", scopes=[]) for d in back.devices]
    )
    account.refuse(signed_list(back, [approve(back, account.first.signing_key)]), 422, "invalid_device_list")
    bare = next_version(account.head, add_devices=[intruder.entry()], now_ms=now_ms())
    account.refuse(
        signed_list(bare, [approve(bare, account.first.signing_key), approve(bare, intruder.signing_key)]),
        422,
        "invalid_device_list",
    )
    # The integration is still a device of the account for everything else: it logs in.
    assert login(http, bot.peer(account.id, relay.name)).startswith("tls1_")
    # The real device approves the same addition; the served chain verifies, with the roles as signed.
    account.accept(signed_list(dl, [approve(dl, k.signing_key) for k in (account.first, intruder)]))
    chain = account.verify()
    roles = {d.device_id: (d.role, d.scopes) for d in chain.versions[-1].device_list.devices}
    assert roles[bot.device_id] == ("integration", ["send"])
    assert roles[intruder.device_id] == ("device", [])


def test_a_format_2_account_made_by_the_cli_is_upgraded_and_keeps_messaging(
    relay: RelayProcess, tmp_path: Path
) -> None:
    a_home, b_home, c_home = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a = ok(cli(a_home, "device", "init", "--relay", relay.url, "--list-format", "2", "--no-recovery-key")).strip()
    b = ok(cli(b_home, "device", "init", "--relay", relay.url, "--no-recovery-key")).strip()
    assert Keystore(a_home).load().kem_seed == b""  # made as before format 3: no ML-KEM key in the home
    listing = json.loads(ok(cli(a_home, "device", "list", "--json")))
    assert listing["format"] == FORMAT_2
    assert json.loads(ok(cli(b_home, "device", "list", "--json")))["format"] == FORMAT_3
    ok(cli(a_home, "send", account_of(b), "--text", "before, from a"))
    ok(cli(b_home, "send", account_of(a), "--text", "before, from b"))
    assert [m["text"] for m in sync_texts(b_home)] == ["before, from a"]
    assert [m["text"] for m in sync_texts(a_home)] == ["before, from b"]

    out = ok(cli(a_home, "device", "upgrade"))
    assert "upgraded to format 3" in out
    kem_seed = Keystore(a_home).load().kem_seed
    assert len(kem_seed) == handshake.MLKEM_SEED_BYTES
    listing = json.loads(ok(cli(a_home, "device", "list", "--json")))
    assert (listing["format"], listing["version"]) == (FORMAT_3, 2)
    assert [(d["role"], d["kem_key"]) for d in listing["devices"]] == [("device", True)]
    assert "already" in ok(cli(a_home, "device", "upgrade"))  # idempotent: nothing posted
    assert json.loads(ok(cli(a_home, "device", "list", "--json")))["version"] == 2

    # The published key is the one the home keeps, as every verifier sees it.
    chain = codec.decode(
        Http11(relay.url).get(f"/v1/accounts/{account_of(a).split('@')[0]}/devices", accept=codec.MSGPACK).body,
        DeviceListChain,
    )
    assert chain.versions[-1].device_list.devices[0].kem_key == handshake.mlkem_public(kem_seed)

    ok(cli(a_home, "send", account_of(b), "--text", "after, from a"))
    ok(cli(b_home, "send", account_of(a), "--text", "after, from b"))
    assert [m["text"] for m in sync_texts(b_home)] == ["after, from a"]
    assert [m["text"] for m in sync_texts(a_home)] == ["after, from b"]

    # A new device joins the upgraded account with its own ML-KEM key (carried in the MAC-protected offer).
    c = link_device(relay, c_home, a_home)
    listing = json.loads(ok(cli(c_home, "device", "list", "--json")))
    assert listing["format"] == FORMAT_3
    assert {d["address"]: d["kem_key"] for d in listing["devices"]} == {a: True, c: True}
    assert Keystore(c_home).load().kem_seed
    ok(cli(b_home, "send", account_of(a), "--text", "to both"))
    assert [m["text"] for m in sync_texts(c_home)][-1:] == ["to both"]


def test_a_link_upgrades_a_format_2_account(relay: RelayProcess, tmp_path: Path) -> None:
    """The next list change made by an upgraded client upgrades the list too (no explicit command)."""
    a_home, c_home = tmp_path / "a", tmp_path / "c"
    a = ok(cli(a_home, "device", "init", "--relay", relay.url, "--list-format", "2", "--no-recovery-key")).strip()
    c = link_device(relay, c_home, a_home)
    listing = json.loads(ok(cli(a_home, "device", "list", "--json")))
    assert (listing["format"], listing["version"]) == (FORMAT_3, 2)
    assert {d["address"]: d["kem_key"] for d in listing["devices"]} == {a: True, c: True}


def test_every_client_refuses_a_version_the_relay_inserted_with_an_integrations_approval(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """The relay (its database) appends a version adding its own device, signed by the account's integration
    (say its key leaked from a bot host): the account's devices and its correspondents refuse the chain."""
    a_home, other_home = tmp_path / "a", tmp_path / "other"
    a = ok(cli(a_home, "device", "init", "--relay", relay.url, "--no-recovery-key")).strip()
    ok(cli(other_home, "device", "init", "--relay", relay.url, "--no-recovery-key"))
    account_id = account_of(a).split("@")[0]
    first = Keystore(a_home).load().signing_key
    http = Http11(relay.url)
    head = codec.decode(http.get(f"/v1/accounts/{account_id}/devices", accept=codec.MSGPACK).body, DeviceListChain)
    bot = Device()
    dl = next_version(
        head.versions[-1].device_list, add_devices=[entry3(bot, "integration", ("receive",))], now_ms=now_ms()
    )
    answer = http.msgpack(
        "POST",
        f"/v1/accounts/{account_id}/devices",
        {"signed": signed_list(dl, [approve(dl, first), approve(dl, bot.signing_key)])},
    )
    assert answer.status == 201, answer.body
    ok(cli(other_home, "send", account_of(a), "--text", "before the insert"))  # verifies (and pins) version 2
    assert "role integration (receive)" in ok(cli(a_home, "device", "list"))

    relays_device = Device()
    forged = next_version(dl, add_devices=[entry3(relays_device)], now_ms=now_ms())
    signed = signed_list(forged, [approve(forged, bot.signing_key), approve(forged, relays_device.signing_key)])
    conn = relay_db(relay)
    try:
        conn.execute(
            "INSERT INTO device_lists (account_id, version, signed, stored_at_ms) VALUES (?, ?, ?, ?)",
            (account_id, forged.version, codec.encode(signed), now_ms()),
        )
    finally:
        conn.close()

    for result in (cli(a_home, "device", "list"), cli(other_home, "send", account_of(a), "--text", "after")):
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "rejected" in result.stderr
        assert "role integration" in result.stderr
        assert result.stderr.count("\n") == 1  # one line, no traceback
