"""FIDO2 security keys from the command line (issue 14 point 4): ``device fido2 add|list|remove``,
``device approve|revoke --fido2`` and ``device link --account … --fido2``.

A real relay process and the real ``tetherless`` CLI in subprocesses, talking CTAP2 through python-fido2's
``Fido2Client`` to a software security key (tests/support/soft_ctap.py) whose state file plays the plugged-in
key: ``TETHERLESS_FIDO2_DEVICES`` names its factory, ``TETHERLESS_SOFT_CTAP`` its state. The account's policy
is set to "a hardware key must co-sign" (crypto.md §3.2), so every change below that succeeds needed the key.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.cose import ES256

from protocol import device_list
from protocol.client import devices
from protocol.client.fido2 import SecurityKey, SecurityKeyError
from protocol.client.keystore import DeviceKeys, Keystore
from protocol.client.sdk import RelayClient
from protocol.errors import ErrorCode, RemoteError, TetherlessError
from protocol.messages import (
    DeviceList,
    Policy,
    SignedDeviceList,
    WebAuthnAssertion,
    WebAuthnCredential,
    WebAuthnRegistration,
    WebAuthnRegistrationOptions,
)
from tests.e2e import offline_client
from tests.e2e.test_equal_devices import finish, start_link
from tests.relay_process import RelayProcess
from tests.support.soft_ctap import SoftCtapDevice

FACTORY = "tests.support.soft_ctap:devices"
TOUCH = "Touch your security key"


def cli(home: Path, *args: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with the software key ``key`` plugged in (none: no key at all)."""
    plugged = {"TETHERLESS_FIDO2_DEVICES": FACTORY, "TETHERLESS_SOFT_CTAP": str(key) if key is not None else ""}
    return offline_client.cli(home, *args, timeout=60, env=plugged)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int = 1) -> str:
    """The command failed with ``exit_code`` and said why in exactly one stderr line (no traceback)."""
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip() and line != TOUCH]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tetherless: error: "), lines
    return lines[0].removeprefix("tetherless: error: ")


def device_ids(home: Path) -> list[str]:
    return [d["device_id"] for d in json.loads(ok(cli(home, "device", "list", "--json")))["devices"]]


def link_with_approval(relay: RelayProcess, new_home: Path, approver: Path, key: Path) -> str:
    """``device link`` on ``new_home``, approved by ``device approve CODE --yes --fido2`` on ``approver``."""
    proc, code = start_link(relay, new_home)
    try:
        approved = cli(approver, "device", "approve", code, "--yes", "--fido2", key=key)
        returncode, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert ok(approved).startswith("approved"), approved
    assert TOUCH in approved.stderr
    assert returncode == 0, (out, err)
    return out.strip().splitlines()[-1]


def approved_by(dl: DeviceList, keys: DeviceKeys, assertion: WebAuthnAssertion) -> SignedDeviceList:
    return device_list.signed_list(dl, [device_list.approve(dl, keys.signing_key)], webauthn_assertions=[assertion])


async def require_key_policy(home: Path, key: Path) -> None:
    """Make the account's policy "a hardware key must co-sign" (this device + the key approve the change)."""
    keystore = Keystore(home)
    keys = keystore.load()
    async with RelayClient.connect(keys.relay_url, keys=keys, local_db=keystore.local_db()) as client:
        verified = await client.device_chain(keys.account_id)
        dl = device_list.next_version(
            verified.head, policy=Policy(threshold=1, require_webauthn=True), now_ms=int(time.time() * 1000)
        )
        assertion = devices.key_assertion(verified, dl, SecurityKey(SoftCtapDevice(key), keys.relay_url).get_assertion)
        await devices.post_version(client, approved_by(dl, keys, assertion))


async def post_revocation_with(home: Path, target: str, key: Path) -> None:
    """Post, through the SDK and without the client's own checks, a version revoking ``target`` that this
    device signs and the key ``key`` approves: what a client that did not check would send."""
    keystore = Keystore(home)
    keys = keystore.load()
    async with RelayClient.connect(keys.relay_url, keys=keys, local_db=keystore.local_db()) as client:
        head = (await client.device_chain(keys.account_id)).head
        dl = device_list.next_version(head, remove_device_ids=[target], now_ms=int(time.time() * 1000))
        assertion = SecurityKey(SoftCtapDevice(key), keys.relay_url).get_assertion(
            device_list.list_hash(dl), head.credentials
        )
        await devices.post_version(client, approved_by(dl, keys, assertion))


def test_no_security_key_is_one_line(relay: RelayProcess, tmp_path: Path) -> None:
    home = tmp_path / "a"
    ok(cli(home, "device", "init", "--relay", relay.url, "--no-recovery-key"))
    before = device_ids(home)
    for args in (
        ("device", "fido2", "add"),
        ("device", "revoke", before[0], "--yes", "--fido2"),
        ("device", "approve", "tl-aaaa-bbbb-cccc-dddd-eeee-ffff", "--yes", "--fido2"),
    ):
        assert one_line_error(cli(home, *args)) == "no FIDO2 security key found", args
    fresh = tmp_path / "fresh"
    account = ok(cli(home, "whoami", "--account")).strip()
    result = cli(fresh, "device", "link", "--relay", relay.url, "--account", account, "--fido2")
    assert one_line_error(result) == "no FIDO2 security key found"
    assert not fresh.exists() or not any(fresh.iterdir())  # no half-made home
    assert device_ids(home) == before


async def test_security_key_approves_links_and_revocations(relay: RelayProcess, tmp_path: Path) -> None:
    a, n, m = tmp_path / "a", tmp_path / "n", tmp_path / "m"
    key = tmp_path / "key.json"
    a_address = ok(cli(a, "device", "init", "--relay", relay.url, "--no-recovery-key")).strip()
    a_id = a_address.split(".", 1)[0]
    account = ok(cli(a, "whoami", "--account")).strip()

    # add: the key is touched (the prompt on stderr), then listed with its name and the relay's host as rp id
    added = cli(a, "device", "fido2", "add", "--name", "blue key", key=key)
    assert "added security key" in ok(added)
    assert TOUCH in added.stderr
    (listed,) = json.loads(ok(cli(a, "device", "fido2", "list", "--json")))["keys"]
    assert listed["name"] == "blue key"
    assert listed["rp_id"] == "127.0.0.1"
    assert listed["id"] == json.loads(key.read_text())["credential_id"]
    again = cli(a, "device", "fido2", "add", key=key)
    assert one_line_error(again) == "this security key is registered for the account already"

    await require_key_policy(a, key)
    assert "a hardware key must co-sign" in ok(cli(a, "device", "list"))

    # approve a linking device: only with the key does the new device accept the proposal and join
    n_address = link_with_approval(relay, n, a, key)
    n_id = n_address.split(".", 1)[0]
    assert sorted(device_ids(a)) == sorted([a_id, n_id])

    # revoke: this device's signature alone is not enough under the policy; with the key it is
    refused = one_line_error(cli(a, "device", "revoke", n_id, "--yes"))
    assert refused.startswith("policy_not_met"), refused
    assert ok(cli(a, "device", "revoke", n_id, "--yes", "--fido2", key=key)).startswith(f"revoked {n_id}")
    assert device_ids(a) == [a_id]

    # a fresh machine with only the key joins and retires the lost device A in the same version (crypto.md §5.3)
    joined = cli(m, "device", "link", "--relay", relay.url, "--account", account, "--fido2", "--revoke", a_id, key=key)
    m_address = ok(joined).strip().splitlines()[-1]
    assert TOUCH in joined.stderr
    assert device_ids(m) == [m_address.split(".", 1)[0]]
    assert cli(a, "device", "list").returncode == 4  # A is revoked

    # remove the key: asked at a terminal, --yes off one; the policy keeps needing a key, so not the last one
    key_id = listed["id"][:12]
    assert one_line_error(cli(m, "device", "fido2", "remove", key_id), exit_code=2).startswith(
        "`device fido2 remove` needs --yes"
    )
    last = one_line_error(cli(m, "device", "fido2", "remove", key_id, "--yes", "--fido2", key=key))
    assert last.startswith("invalid_device_list: the policy requires a hardware key"), last


async def test_cloned_or_foreign_key_refused_by_client_and_relay(relay: RelayProcess, tmp_path: Path) -> None:
    a, n = tmp_path / "a", tmp_path / "n"
    key, clone = tmp_path / "key.json", tmp_path / "clone.json"
    ok(cli(a, "device", "init", "--relay", relay.url, "--no-recovery-key"))
    ok(cli(a, "device", "fido2", "add", key=key))
    await require_key_policy(a, key)
    shutil.copy(key, clone)  # the clone's counter stays where the original's was
    n_id = link_with_approval(relay, n, a, key).split(".", 1)[0]  # the original signs on: its counter advances
    before = device_ids(a)

    # a cloned key: its counter is not above the one the chain carries
    cloned = one_line_error(cli(a, "device", "revoke", n_id, "--yes", "--fido2", key=clone))
    assert cloned.startswith("webauthn_replayed: refused the security key's approval, not sent: sign counter"), cloned
    state = json.loads(clone.read_text())
    state["counter"] = 0  # rewind it for the relay too (its own counter only ever rises)
    clone.write_text(json.dumps(state))
    with pytest.raises(RemoteError) as replayed:
        await post_revocation_with(a, n_id, clone)
    assert replayed.value.code is ErrorCode.WEBAUTHN_REPLAYED

    # a key that signs for another rp id
    foreign = tmp_path / "foreign.json"
    state = json.loads(key.read_text())
    state["sign_rp_id"] = "evil.example"
    foreign.write_text(json.dumps(state))
    wrong = one_line_error(cli(a, "device", "revoke", n_id, "--yes", "--fido2", key=foreign))
    assert wrong.startswith("webauthn_invalid: refused the security key's approval, not sent: rpIdHash"), wrong
    with pytest.raises(RemoteError) as invalid:
        await post_revocation_with(a, n_id, foreign)
    assert invalid.value.code is ErrorCode.WEBAUTHN_INVALID

    assert device_ids(a) == before  # nothing was revoked
    # and the real key still works afterwards: the refusals stored no counter
    assert ok(cli(a, "device", "revoke", n_id, "--yes", "--fido2", key=key)).startswith(f"revoked {n_id}")


def test_key_of_another_account_is_one_line(relay: RelayProcess, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    other = tmp_path / "other.json"
    ok(cli(a, "device", "init", "--relay", relay.url, "--no-recovery-key"))
    ok(cli(a, "device", "fido2", "add", key=tmp_path / "key.json"))
    ok(cli(b, "device", "init", "--relay", relay.url, "--no-recovery-key"))
    ok(cli(b, "device", "fido2", "add", key=other))
    (own,) = device_ids(a)
    refused = one_line_error(cli(a, "device", "revoke", own, "--yes", "--fido2", key=other))
    assert refused == "this security key holds none of the account's hardware keys"
    assert device_ids(a) == [own]


async def test_relay_cannot_redirect_the_key(
    relay: RelayProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay is the adversary: registration options naming another site's rp id are refused before the key
    is touched, and a relay answering with a credential of its own (its key under our credential id) is refused
    before the list is signed. The relay's answers are rewritten in the SDK's request layer."""
    a = tmp_path / "a"
    ok(cli(a, "device", "init", "--relay", relay.url, "--no-recovery-key"))
    keystore = Keystore(a)
    keys = keystore.load()
    async with RelayClient.connect(keys.relay_url, keys=keys, local_db=keystore.local_db()) as client:
        api = client.api
        honest_begin, honest_complete = api.webauthn_register_begin, api.webauthn_register_complete
        version = (await client.device_chain(keys.account_id)).head.version

        async def foreign_rp_id() -> WebAuthnRegistrationOptions:
            return msgspec.structs.replace(await honest_begin(), rp_id="example.org")

        device = SoftCtapDevice(tmp_path / "key.json")
        key = SecurityKey(device, keys.relay_url)
        monkeypatch.setattr(api, "webauthn_register_begin", foreign_rp_id)
        with pytest.raises(SecurityKeyError, match=re.escape("rp id 'example.org' is not valid for the relay")):
            await devices.add_credential(client, key.make_credential, key.get_assertion)
        assert device.touches == 0
        assert not (tmp_path / "key.json").exists()

        async def swapped_key(registration: WebAuthnRegistration) -> WebAuthnCredential:
            relays_own = ES256.from_cryptography_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            return msgspec.structs.replace(
                await honest_complete(registration), public_key=cbor.encode(dict(relays_own))
            )

        monkeypatch.setattr(api, "webauthn_register_begin", honest_begin)
        monkeypatch.setattr(api, "webauthn_register_complete", swapped_key)
        with pytest.raises(TetherlessError, match="another credential than the security key created") as swapped:
            await devices.add_credential(client, key.make_credential, key.get_assertion)
        assert swapped.value.code is ErrorCode.WEBAUTHN_INVALID
        monkeypatch.setattr(api, "webauthn_register_complete", honest_complete)
        assert (await client.device_chain(keys.account_id)).head.version == version  # nothing was posted
