"""``tetherless device policy``: show and set who must approve device-list changes (crypto.md §3.2).

A real relay process and the real CLI in subprocesses, with the software CTAP2 key of tests/support/soft_ctap.py
plugged in through ``TETHERLESS_FIDO2_DEVICES`` (as tests/e2e/test_fido2_cli.py). A policy change is a device-list
version like any other: it is approved under the policy it replaces, so loosening needs what the current policy
needs — checked by this client before it touches the key or sends anything, and by the relay (and every other
client's chain verification) whatever a client sends.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from protocol import device_list
from protocol.client import devices
from protocol.client.keystore import Keystore
from protocol.client.sdk import RelayClient
from protocol.errors import ErrorCode, RemoteError
from protocol.messages import Policy
from tests.e2e.test_equal_devices import link_device
from tests.e2e.test_fido2_cli import TOUCH, cli, ok, one_line_error
from tests.relay_process import RelayProcess


def listing(home: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(ok(cli(home, "device", "list", "--json")))
    return result


def policy(home: Path) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(ok(cli(home, "device", "policy", "--json")))
    return shown


def new_account(relay: RelayProcess, home: Path, key: Path | None = None) -> None:
    ok(cli(home, "device", "init", "--relay", relay.url, "--no-recovery-key"))
    if key is not None:
        assert "added security key" in ok(cli(home, "device", "fido2", "add", key=key))


def test_show_and_nonsense_is_one_line_before_anything_changes(relay: RelayProcess, tmp_path: Path) -> None:
    home = tmp_path / "a"
    new_account(relay, home)
    shown = ok(cli(home, "device", "policy"))
    assert "policy: any one device" in shown
    assert "approvers: 1 device(s), 0 hardware key(s)" in shown
    assert policy(home) == {
        "account": ok(cli(home, "whoami", "--account")).strip(),
        "version": listing(home)["version"],
        "threshold": 1,
        "require_webauthn": False,
        "require_user_verification": False,
        "approvers": {"devices": 1, "hardware_keys": 0},
    }
    version = listing(home)["version"]
    for args, words in (
        (("--require-fido2",), "no hardware key"),
        (("--user-verification",), "no hardware key"),
        (("--threshold", "2"), "above the account's 1 approvers"),
        (("--fido2",), "go with a change"),
        (("--yes",), "go with a change"),
        (("--threshold", "1", "--json"), "--json goes with showing"),
    ):
        line = one_line_error(cli(home, "device", "policy", *args), exit_code=2)
        assert words in line, (args, line)
    for bad in ("0", "-1", "two"):
        result = cli(home, "device", "policy", "--threshold", bad)
        assert result.returncode == 2, result
        assert "a number of approvals" in result.stderr
    assert listing(home)["version"] == version  # nothing was posted
    same = ok(cli(home, "device", "policy", "--threshold", "1", "--no-require-fido2"))
    assert "nothing changed" in same
    assert listing(home)["version"] == version


def test_a_threshold_no_change_could_gather_is_refused(relay: RelayProcess, tmp_path: Path) -> None:
    """Two devices and no key: threshold 2 is within the protocol's rule, but every later change would need both
    devices' signatures on one version, which no command gathers: refused rather than locking the list."""
    home, other = tmp_path / "a", tmp_path / "b"
    new_account(relay, home)
    link_device(relay, other, home)
    line = one_line_error(cli(home, "device", "policy", "--threshold", "2"), exit_code=2)
    assert "at most 1" in line
    assert "a hardware key adds one" in line
    assert policy(home)["threshold"] == 1


def test_tighten_then_loosen_with_the_key(relay: RelayProcess, tmp_path: Path) -> None:
    home, key = tmp_path / "a", tmp_path / "key.json"
    new_account(relay, home, key)

    # tightening needs what the current policy needs (this device alone) and asks nothing, also off a terminal
    tightened = cli(home, "device", "policy", "--require-fido2", key=key)
    assert "policy: any one device, a hardware key must co-sign; device list version" in ok(tightened)
    assert TOUCH not in tightened.stderr  # the current policy did not need the key
    assert (policy(home)["require_webauthn"], policy(home)["threshold"]) == (True, 1)

    # from now on the key must co-sign: without --fido2 a change is refused before the relay sees it
    version = listing(home)["version"]
    refused = cli(home, "device", "policy", "--threshold", "2", key=key)
    assert "needs a hardware key's approval (--fido2)" in one_line_error(refused)
    assert TOUCH not in refused.stderr
    stronger = cli(home, "device", "policy", "--threshold", "2", "--fido2", key=key)
    assert "policy: 2 approvals, a hardware key must co-sign" in ok(stronger)
    assert TOUCH in stronger.stderr
    assert listing(home)["version"] == version + 1

    # loosening off a terminal needs --yes: nothing is read from the key or sent without it
    version = listing(home)["version"]
    unasked = cli(home, "device", "policy", "--no-require-fido2", "--threshold", "1", "--fido2", key=key)
    assert "needs --yes" in one_line_error(unasked, exit_code=2)
    assert TOUCH not in unasked.stderr
    # with --yes but without the key the current policy is not met: refused here, the key untouched
    keyless = cli(home, "device", "policy", "--no-require-fido2", "--threshold", "1", "--yes", key=key)
    assert one_line_error(keyless).startswith("policy_not_met: the current policy needs a hardware key")
    assert listing(home)["version"] == version

    loosened = cli(home, "device", "policy", "--no-require-fido2", "--threshold", "1", "--yes", "--fido2", key=key)
    assert "policy: any one device; device list version" in ok(loosened)
    assert (policy(home)["require_webauthn"], policy(home)["threshold"]) == (False, 1)


def test_user_verification_binds_the_key(relay: RelayProcess, tmp_path: Path) -> None:
    """With user verification required, an approval by a key that does not verify its user (the software key
    never sets UV) is refused by this client before anything is sent; this device alone may still loosen it
    back, since the policy does not require the key."""
    home, key = tmp_path / "a", tmp_path / "key.json"
    new_account(relay, home, key)
    ok(cli(home, "device", "policy", "--user-verification", key=key))
    assert policy(home)["require_user_verification"] is True
    version = listing(home)["version"]
    line = one_line_error(cli(home, "device", "policy", "--require-fido2", "--fido2", key=key))
    assert line.startswith("webauthn_invalid: refused the security key's approval, not sent")
    assert listing(home)["version"] == version
    ok(cli(home, "device", "policy", "--no-user-verification", "--yes", key=key))
    assert policy(home)["require_user_verification"] is False


async def loosen_with_device_only(home: Path, new_policy: Policy) -> None:
    """What a client without this client's checks would post: a version loosening the policy, approved by
    this device alone."""
    keystore = Keystore(home)
    keys = keystore.load()
    async with RelayClient.connect(keys.relay_url, keys=keys, local_db=keystore.local_db()) as client:
        head = (await client.device_chain(keys.account_id)).head
        dl = device_list.next_version(head, policy=new_policy, now_ms=int(time.time() * 1000))
        await devices.post_version(client, device_list.signed_list(dl, [device_list.approve(dl, keys.signing_key)]))


@pytest.mark.parametrize(
    ("tighten", "loosened"),
    [
        (("--require-fido2",), Policy()),  # the key must co-sign: this device alone cannot drop that
        (("--threshold", "2", "--fido2"), Policy(threshold=1)),  # two approvals: one cannot lower it to one
    ],
)
async def test_the_relay_refuses_a_loosening_the_current_policy_did_not_approve(
    relay: RelayProcess, tmp_path: Path, tighten: tuple[str, ...], loosened: Policy
) -> None:
    home, key = tmp_path / "a", tmp_path / "key.json"
    new_account(relay, home, key)
    ok(cli(home, "device", "policy", *tighten, key=key))
    before = listing(home)
    with pytest.raises(RemoteError) as refused:
        await loosen_with_device_only(home, loosened)
    assert refused.value.code is ErrorCode.POLICY_NOT_MET
    assert listing(home) == before
