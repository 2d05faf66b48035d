"""Equal devices, end to end (issue 3 acceptance): link codes, hardware keys, revocation, tamper detection.

Real relay processes, the real ``tetherless`` CLI in subprocesses and the
real SDK over real sockets. The software FIDO2 authenticator
(tests/support/soft_authenticator.py) stands in for a hardware key: it
produces the same bytes a platform authenticator would.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import nacl.public
import nacl.signing
import pytest
import trio

from protocol import codec, device_list, enrolment
from protocol.client import devices
from protocol.client.chains import DeviceListRejectedError
from protocol.client.keystore import Keystore
from protocol.client.sdk import RelayClient
from protocol.errors import ErrorCode, RemoteError, TetherlessError
from protocol.messages import (
    DeviceEntry,
    EnrolmentProposal,
    SignedDeviceList,
    WebAuthnAssertion,
    WebAuthnCredential,
    WebAuthnRegistration,
    WebAuthnRegistrationOptions,
)
from tests.relay_process import RelayProcess
from tests.support.soft_authenticator import SoftAuthenticator

ROOT = Path(__file__).resolve().parents[2]


# -- helpers ------------------------------------------------------------------------------------


def cli(home: Path, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def init_device(relay: RelayProcess, home: Path) -> str:
    """A new format-2 account (recovery key written next to the home); returns the device address."""
    out = ok(cli(home, "device", "init", "--relay", relay.url, "--recovery-key-file", str(recovery_file(home))))
    return out.strip()


def recovery_file(home: Path) -> Path:
    return home.parent / f"{home.name}.recovery"


def start_link(relay: RelayProcess, home: Path) -> tuple[subprocess.Popen[str], str]:
    """Start ``device link`` and read the link code from its first stdout line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), "device", "link", "--relay", relay.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    code = proc.stdout.readline().strip()
    assert code.startswith("tl-"), (code, proc.stderr.read() if proc.stderr else "")
    fingerprint = proc.stdout.readline().strip()  # read here: communicate() skips the text buffer
    assert fingerprint.startswith("fingerprint: ")
    FINGERPRINTS[code] = fingerprint.removeprefix("fingerprint: ")
    return proc, code


FINGERPRINTS: dict[str, str] = {}


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def link_device(relay: RelayProcess, new_home: Path, approver_home: Path) -> str:
    """Enrol ``new_home`` into the approver's account with the CLI (link code + approve); its address."""
    proc, code = start_link(relay, new_home)
    try:
        approved = ok(cli(approver_home, "device", "approve", code, "--yes"))
        assert "approved" in approved
        rc, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert rc == 0, (out, err)
    assert FINGERPRINTS[code] in approved  # both screens show the same fingerprint of the new device
    return out.strip().splitlines()[-1]


def account_of(address: str) -> str:
    return address.split(".", 1)[1]


def sync_texts(home: Path) -> list[dict[str, object]]:
    out = ok(cli(home, "sync", "--json"))
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def sent_to(home: Path, message_id: str) -> list[str]:
    """The devices the sender's history says message ``message_id`` reached."""
    entries = [json.loads(line) for line in ok(cli(home, "history", "--json")).splitlines() if line.strip()]
    (entry,) = [e for e in entries if e.get("message_id") == message_id]
    return sorted(entry["recipients"])


def relay_db(relay: RelayProcess) -> sqlite3.Connection:
    conn = sqlite3.connect(relay.data_dir / "relay.sqlite3", timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def soft_assertion(authenticator: SoftAuthenticator) -> devices.AssertionProvider:
    def provide(challenge: bytes, credentials: Sequence[WebAuthnCredential]) -> WebAuthnAssertion:
        assert any(c.credential_id == authenticator.credential_id for c in credentials)
        return authenticator.get_assertion(challenge)

    return provide


async def register_soft_key(home: Path) -> SoftAuthenticator:
    """From an enrolled device: register a software FIDO2 credential and add it to the account's list."""
    keystore = Keystore(home)
    keys = keystore.load()
    holder: list[SoftAuthenticator] = []

    def make(options: WebAuthnRegistrationOptions) -> WebAuthnRegistration:
        authenticator = SoftAuthenticator(options.rp_id)
        holder.append(authenticator)
        return authenticator.make_credential(options.challenge)

    def assert_with_new(challenge: bytes, credentials: Sequence[WebAuthnCredential]) -> WebAuthnAssertion:
        return holder[0].get_assertion(challenge)

    async with RelayClient.connect(keys.relay_url, keys=keys, local_db=keystore.local_db()) as client:
        credential = await devices.add_credential(client, make, assert_with_new)
    assert credential.credential_id == holder[0].credential_id
    return holder[0]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - diagnostics
        proc.kill()
        proc.communicate()


def follow(home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), "sync", "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


# -- (a) three equal devices -------------------------------------------------------------------


def test_three_equal_devices_link_code_then_hardware_key_with_the_others_offline(
    relay: RelayProcess, tmp_path: Path
) -> None:
    d1_home, d2_home, d3_home, other_home = (tmp_path / n for n in ("d1", "d2", "d3", "other"))
    d1 = init_device(relay, d1_home)
    account = account_of(d1)
    assert ok(cli(d1_home, "whoami", "--account")).strip() == account
    assert recovery_file(d1_home).read_text().startswith("tlr-")

    # Second device: link code shown by the new device, approved by the first, over the CLI.
    d2 = link_device(relay, d2_home, d1_home)
    assert account_of(d2) == account
    assert d2 != d1

    # The first device registers a hardware key (software FIDO2) and adds it to the list.
    authenticator = trio.run(register_soft_key, d1_home)

    # Both devices are running, then go offline (their processes stop).
    followers = [follow(d1_home), follow(d2_home)]
    time.sleep(1.0)
    for proc in followers:
        stop(proc)

    # Third device: approved by the hardware key alone, while no other device runs.
    async def join_third() -> str:
        keystore = Keystore(d3_home)
        async with RelayClient.connect(relay.url) as client:
            keys = await devices.join_with_authenticator(
                client, account, soft_assertion(authenticator), keystore=keystore, name="d3"
            )
        return keys.address

    d3 = trio.run(join_third)
    assert account_of(d3) == account

    listing = json.loads(ok(cli(d3_home, "device", "list", "--json")))
    assert listing["account"] == account
    assert {d["address"] for d in listing["devices"]} == {d1, d2, d3}
    assert [d["this_device"] for d in listing["devices"] if d["address"] == d3] == [True]
    assert len(listing["credentials"]) == 1
    assert listing["recovery_key"] is True
    plain = ok(cli(d2_home, "device", "list"))
    assert f"device {d2.split('.')[0]}" in plain
    assert "(this device)" in plain

    # A device of another account writes to the account address: every device reads it.
    init_device(relay, other_home)
    sent = ok(cli(other_home, "send", account, "--text", "hello, all of you")).strip()
    assert len(sent.split()) == 1, sent  # the message id (docs/cli.md): one for all three devices
    assert len(sent_to(other_home, sent)) == 3
    for home in (d1_home, d2_home, d3_home):
        got = [(m["text"], m["message_id"]) for m in sync_texts(home)]
        assert ("hello, all of you", sent) in got, home.name

    # Each device sees what its siblings sent (fan-out to the sender's own devices).
    other = ok(cli(other_home, "whoami")).strip()
    ok(cli(d3_home, "send", other, "--text", "from the third"))
    assert "from the third" in [m["text"] for m in sync_texts(other_home)]
    for home in (d1_home, d2_home):
        synced = [m["text"] for m in sync_texts(home)]
        history = [json.loads(line) for line in ok(cli(home, "history", "--json")).splitlines() if line.strip()]
        assert "from the third" in synced + [m["text"] for m in history], home.name


# -- (b) revocation ----------------------------------------------------------------------------------


def test_revoked_device_cannot_authenticate_and_gets_nothing_new(relay: RelayProcess, tmp_path: Path) -> None:
    d1_home, d2_home, other_home = tmp_path / "d1", tmp_path / "d2", tmp_path / "other"
    d1 = init_device(relay, d1_home)
    d2 = link_device(relay, d2_home, d1_home)
    account = account_of(d1)
    init_device(relay, other_home)
    ok(cli(other_home, "send", account, "--text", "before"))
    assert [m["text"] for m in sync_texts(d2_home)] == ["before"]

    revoked = ok(cli(d1_home, "device", "revoke", d2, "--yes"))
    assert d2.split(".")[0] in revoked

    sent = ok(cli(other_home, "send", account, "--text", "after")).strip()
    assert sent_to(other_home, sent) == [d1]  # only d1 is a recipient now

    result = cli(d2_home, "sync")
    assert result.returncode == 4, (result.stdout, result.stderr)
    assert "device_revoked" in result.stderr
    assert "after" not in result.stdout

    async def authenticate_as_revoked() -> None:
        keys = Keystore(d2_home).load()
        async with RelayClient.connect(relay.url, keys=keys) as client:
            await client.authenticate()

    with pytest.raises(RemoteError) as caught:
        trio.run(authenticate_as_revoked)
    assert caught.value.code is ErrorCode.DEVICE_REVOKED

    # A direct send to the revoked device is refused before anything is encrypted for it.
    direct = cli(other_home, "send", d2, "--text", "psst")
    assert direct.returncode == 1
    assert "unknown_recipient" in direct.stderr or "recipient_revoked" in direct.stderr

    listing = json.loads(ok(cli(d1_home, "device", "list", "--json")))
    assert [d["address"] for d in listing["devices"]] == [d1]
    assert [m["text"] for m in sync_texts(d1_home)] == ["before", "after"]

    # Revoking oneself works too; afterwards this device stops with exit code 4.
    d3_home = tmp_path / "d3"
    d3 = link_device(relay, d3_home, d1_home)
    ok(cli(d3_home, "device", "revoke", d3.split(".")[0], "--yes"))
    after_self = cli(d3_home, "device", "list")
    assert after_self.returncode == 4
    assert "revoked" in after_self.stderr


# -- (c) a relay that edits device lists --------------------------------------------------------------


def _tamper(relay: RelayProcess, account: str, change: str) -> None:
    """Rewrite the newest stored version of the account's list in the relay's own database."""
    conn = relay_db(relay)
    try:
        version, blob = conn.execute(
            "SELECT version, signed FROM device_lists WHERE account_id = ? ORDER BY version DESC LIMIT 1", (account,)
        ).fetchone()
        if change == "rollback":  # withhold the newest version: clients pinned it (crypto.md §3.5)
            conn.execute("DELETE FROM device_lists WHERE account_id = ? AND version = ?", (account, version))
            return
        signed = codec.decode(blob, SignedDeviceList)
        dl = signed.device_list
        if change == "add":
            key = bytes(nacl.signing.SigningKey.generate().verify_key)
            box = bytes(nacl.public.PrivateKey.generate().public_key)
            extra = device_list.device_entry(key, box, added_at_ms=dl.created_at_ms)
            devices_after = sorted([*dl.devices, extra], key=lambda d: d.device_id)
        else:  # swap the identity (box) key of the last device
            swapped = DeviceEntry(
                device_id=dl.devices[-1].device_id,
                sign_key=dl.devices[-1].sign_key,
                box_key=bytes(nacl.public.PrivateKey.generate().public_key),
                added_at_ms=dl.devices[-1].added_at_ms,
            )
            devices_after = [*dl.devices[:-1], swapped]
        forged = msgspec.structs.replace(signed, device_list=msgspec.structs.replace(dl, devices=devices_after))
        conn.execute(
            "UPDATE device_lists SET signed = ? WHERE account_id = ? AND version = ?",
            (codec.encode(forged), account, version),
        )
    finally:
        conn.close()


@pytest.mark.parametrize("change", ["add", "swap", "rollback"])
def test_device_list_tampered_in_the_relay_database_is_rejected_by_every_client(
    relay: RelayProcess, tmp_path: Path, change: str
) -> None:
    d1_home, d2_home, other_home = tmp_path / "d1", tmp_path / "d2", tmp_path / "other"
    d1 = init_device(relay, d1_home)
    link_device(relay, d2_home, d1_home)
    account = account_of(d1)
    account_id = account.split("@")[0]
    init_device(relay, other_home)
    ok(cli(other_home, "send", account, "--text", "before the edit"))  # the sender has verified the list once
    for home in (d1_home, d2_home):
        assert "version 2" in ok(cli(home, "device", "list"))  # each device pins version 2 (its mark)

    _tamper(relay, account_id, change)

    for home in (d1_home, d2_home):
        result = cli(home, "device", "list")
        assert result.returncode == 1, (home.name, result.stdout, result.stderr)
        assert f"device list of {account_id}" in result.stderr
        assert "rejected" in result.stderr
        assert result.stderr.count("\n") == 1  # one line, no traceback
    if change == "rollback":
        # Only clients that verified the newest version can tell it was withheld.
        listing = cli(d1_home, "device", "list")
        assert "below the verified version" in listing.stderr
    else:
        sent = cli(other_home, "send", account, "--text", "after the edit")
        assert sent.returncode == 1, (sent.stdout, sent.stderr)
        assert "rejected" in sent.stderr, (sent.stdout, sent.stderr)

    async def sdk_view() -> None:
        keystore = Keystore(d2_home)
        keys = keystore.load()
        async with RelayClient.connect(relay.url, keys=keys, local_db=keystore.local_db()) as client:
            await client.device_chain(account_id)

    with pytest.raises(DeviceListRejectedError, match="rejected"):
        trio.run(sdk_view)


# -- (d) bad input ----------------------------------------------------------------------------------


def test_malformed_unknown_expired_and_used_link_codes(relay: RelayProcess, tmp_path: Path) -> None:
    d1_home = tmp_path / "d1"
    init_device(relay, d1_home)

    malformed = cli(d1_home, "device", "approve", "tl-this-is-not-a-code!", "--yes")
    assert malformed.returncode == 2
    assert "not a link code" in malformed.stderr

    unknown = cli(d1_home, "device", "approve", enrolment.link_code_text(os.urandom(15)), "--yes")
    assert unknown.returncode == 1
    assert "code does not match" in unknown.stderr

    # Expired: the relay's clock says the offer is past its 10 minutes.
    proc, code = start_link(relay, tmp_path / "late")
    try:
        conn = relay_db(relay)
        try:
            conn.execute("UPDATE enrolments SET expires_at_ms = 1")
        finally:
            conn.close()
        expired = cli(d1_home, "device", "approve", code, "--yes")
        assert expired.returncode == 1
        assert "enrolment_expired" in expired.stderr
    finally:
        proc.kill()
        proc.communicate()

    # Used: a second approval of a code that already brought a device in.
    proc, code = start_link(relay, tmp_path / "d2")
    ok(cli(d1_home, "device", "approve", code, "--yes"))
    rc, _, err = finish(proc)
    assert rc == 0, err
    again = cli(d1_home, "device", "approve", code, "--yes")
    assert again.returncode == 1
    assert "enrolment_used" in again.stderr
    assert not (tmp_path / "late").joinpath("keystore.tlk").exists()


def test_link_with_a_wrong_home_or_no_passphrase(relay: RelayProcess, tmp_path: Path) -> None:
    d1_home = tmp_path / "d1"
    init_device(relay, d1_home)
    taken = cli(d1_home, "device", "link", "--relay", relay.url)
    assert taken.returncode == 1
    assert "already exists" in taken.stderr
    env = {k: v for k, v in os.environ.items() if k != "TETHERLESS_PASSPHRASE"}
    result = subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "--home", str(tmp_path / "n"), "device", "link", "--relay", relay.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "--passphrase-file" in result.stderr
    assert result.stdout == ""


def test_approval_by_a_revoked_device_is_refused(relay: RelayProcess, tmp_path: Path) -> None:
    d1_home, d2_home = tmp_path / "d1", tmp_path / "d2"
    d1 = init_device(relay, d1_home)
    d2 = link_device(relay, d2_home, d1_home)
    ok(cli(d1_home, "device", "revoke", d2, "--yes"))

    # Through the CLI the revoked device cannot even fetch the offer.
    proc, code = start_link(relay, tmp_path / "n1")
    try:
        by_revoked = cli(d2_home, "device", "approve", code, "--yes")
        assert by_revoked.returncode == 4
        assert "device_revoked" in by_revoked.stderr
    finally:
        proc.kill()
        proc.communicate()

    # A proposal signed by the revoked device's key (relayed by a current device) is refused by the new device.
    async def forged_approval() -> None:
        d1_keystore, d2_keys = Keystore(d1_home), Keystore(d2_home).load()
        d1_keys = d1_keystore.load()
        async with (
            RelayClient.connect(relay.url) as newcomer,
            RelayClient.connect(relay.url, keys=d1_keys, local_db=d1_keystore.local_db()) as current,
        ):
            pending = await devices.start_link(newcomer)
            head = (await current.device_chain(d1_keys.account_id)).head
            entry = device_list.device_entry(
                pending._device.sign_key,
                pending._device.box_key,
                added_at_ms=head.created_at_ms,
                kem_key=pending._device.kem_key,
            )
            dl = device_list.next_version(head, add_devices=[entry], now_ms=head.created_at_ms + 1)
            signed = device_list.signed_list(dl, [device_list.approve(dl, d2_keys.signing_key)])
            tag = enrolment.approval_tag(
                pending._secret, pending.relay, dl.account_id, dl.version, device_list.list_hash(dl)
            )
            await current.api.enrolment_propose(
                enrolment.lookup_id_text(pending.lookup_id), EnrolmentProposal(signed=signed, approval_tag=tag)
            )
            await devices.finish_link(newcomer, pending, keystore=Keystore(tmp_path / "n2"), poll_seconds=0.2)

    with pytest.raises(TetherlessError) as caught:
        trio.run(forged_approval)
    assert caught.value.code is ErrorCode.BAD_SIGNATURE
    assert "proposal rejected" in caught.value.detail
    assert not (tmp_path / "n2" / "keystore.tlk").exists()
    listing = json.loads(ok(cli(d1_home, "device", "list", "--json")))
    assert [d["address"] for d in listing["devices"]] == [d1]


def test_recovery_key_adds_a_device_and_retires_the_lost_one(relay: RelayProcess, tmp_path: Path) -> None:
    d1_home, d2_home = tmp_path / "d1", tmp_path / "d2"
    d1 = init_device(relay, d1_home)
    account = account_of(d1)
    wrong = cli(
        d2_home,
        "device",
        "link",
        "--relay",
        relay.url,
        "--account",
        account,
        "--recovery-key",
        stdin="tlr-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa\n",
    )
    assert wrong.returncode == 2
    assert "recovery key" in wrong.stderr
    joined = ok(
        cli(
            d2_home,
            "device",
            "link",
            "--relay",
            relay.url,
            "--account",
            account,
            "--recovery-key",
            "--recovery-key-file",
            str(recovery_file(d1_home)),
            "--revoke",
            d1.split(".")[0],
        )
    )
    d2 = joined.strip().splitlines()[-1]
    assert account_of(d2) == account
    listing = json.loads(ok(cli(d2_home, "device", "list", "--json")))
    assert [d["address"] for d in listing["devices"]] == [d2]
    assert cli(d1_home, "device", "list").returncode == 4

    # A new recovery key replaces the old one; the old one no longer works.
    fresh = ok(cli(d2_home, "device", "recovery-key")).splitlines()[0]
    assert fresh.startswith("tlr-")
    stale = cli(
        tmp_path / "d3",
        "device",
        "link",
        "--relay",
        relay.url,
        "--account",
        account,
        "--recovery-key",
        "--recovery-key-file",
        str(recovery_file(d1_home)),
    )
    assert stale.returncode == 1
    assert "not the account's current recovery key" in stale.stderr
    assert not (tmp_path / "d3" / "keystore.tlk").exists()
