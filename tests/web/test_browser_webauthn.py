"""Security keys in the browser (issue 16: "WebAuthn approval through Chromium's virtual authenticator"), in headless
chromium against a real relay and the real ``tetherless`` CLI.

The relay listens on ``localhost:PORT``, so its name is ``localhost:PORT`` and its WebAuthn rp id defaults to
``localhost`` (the name's host): the one rp id the page at ``http://localhost:PORT`` may use (an IP address is
no rp id). Chromium's virtual authenticator (CDP ``WebAuthn.addVirtualAuthenticator``: CTAP2 over USB, resident
keys, user verification) plays the plugged-in key; presence is simulated, so every request is "touched".

- "Add security key": the browser registers a key and adds it to its account's list (approved by itself, with the
  key's proof of possession); the Python client verifies that version when it fetches the account's chain;
- "Approve with security key": the browser approves a new CLI device with the key; the CLI device verifies the
  key's assertion (the Python client accepts the browser-made WebAuthn approval), joins, sends and receives;
  "Revoke … with security key" removes it again;
- a policy that requires a key (set with the key in the same version): "Approve device" without the key is
  refused by the browser before anything is sent, and a CLI device's approval without the key is refused;
- a relay whose ``register/complete`` answer names another credential is refused (nothing is added);
- a list change approved by another device's key (the CLI's, through python-fido2 and a software key) verifies in
  the browser; the same change with its assertion altered by the relay is refused with a visible error.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor

from protocol import codec
from protocol.messages import DeviceListChain, WebAuthnCredential
from tests.e2e import offline_client
from tests.e2e.test_equal_devices import FINGERPRINTS, account_of, cli, finish, init_device, ok, start_link, sync_texts
from tests.web.support import WatchedPage, create_account, link_browser, localhost, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import CDPSession, Page, Route

    from tests.relay_process import RelayProcess

SOFT_KEY_FACTORY = "tests.support.soft_ctap:devices"


def key_relay(start_relay: Any) -> RelayProcess:
    """A relay named ``localhost:PORT``: its default rp id is ``localhost`` (relay/services/devices.py)."""
    relay: RelayProcess = start_relay(args=["--listen", "localhost:0"])
    assert relay.name.startswith("localhost:"), relay.name
    assert relay.url.startswith("http://localhost:"), relay.url
    return relay


def virtual_key(page: Page, cdp: CDPSession | None = None) -> tuple[CDPSession, str]:
    """Plug (another) Chromium virtual authenticator into ``page``; the CDP session and the authenticator's id."""
    if cdp is None:
        cdp = page.context.new_cdp_session(page)
        cdp.send("WebAuthn.enable", {"enableUI": False})
    added = cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "usb",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )
    return cdp, str(added["authenticatorId"])


def add_key(page: Page, *, require: bool = False) -> None:
    """ "Add security key" (with "Require a security key for every device change" when ``require``)."""
    if require:
        page.get_by_label("Require a security key for every device change").check()
    page.get_by_role("button", name="Add security key").click()
    page.locator("#key-state").filter(has_text="added to your account").wait_for()
    page.get_by_role("list", name="Security keys").get_by_role("listitem").filter(has_text="for localhost").wait_for()


def alert(page: Page, text: str) -> str:
    """Wait for the alert to say ``text``; the whole alert."""
    shown = page.get_by_role("alert")
    shown.filter(has_text=text).wait_for()
    return shown.inner_text()


def check_code(page: Page, code: str) -> None:
    page.get_by_label("Link code of a new device").fill(code)
    page.get_by_role("button", name="Check code").click()
    page.locator("#approve-request").filter(has_text=FINGERPRINTS[code]).wait_for()


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.kill()
    return proc.communicate()


def approve_with_key(page: Page, relay: RelayProcess, home: Path, *, shot: str = "") -> str:
    """``device link`` on ``home``; the browser approves it with its security key. The new device's address."""
    proc, code = start_link(relay, home)
    try:
        check_code(page, code)
        if shot:
            screenshot(page, shot)
        page.get_by_role("button", name="Approve with security key").click()
        rc, out, err = finish(proc, timeout=90)
    finally:
        stop(proc)
    assert rc == 0, (out, err)  # the CLI verified the proposal: the chain, the browser's signature, the key's assertion
    return out.strip().splitlines()[-1]


def served_chain(relay: RelayProcess, account_id: str) -> DeviceListChain:
    """The account's chain as the relay serves it (MessagePack, like the clients fetch it)."""
    request = urllib.request.Request(f"{relay.url}/v1/accounts/{account_id}/devices", headers={"accept": codec.MSGPACK})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return codec.decode(answer.read(), DeviceListChain, codec.MSGPACK)


def listed_devices(home: Path) -> list[str]:
    return [d["device_id"] for d in json.loads(ok(cli(home, "device", "list", "--json")))["devices"]]


def test_browser_adds_a_key_approves_a_cli_device_with_it_and_revokes_it(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    relay = key_relay(start_relay)
    page = watched.page
    b_home = tmp_path / "b"
    b_address = init_device(relay, b_home)  # a device of another account, to talk to
    origin = localhost(relay.url)
    address = create_account(page, origin)
    virtual_key(page)
    add_key(page)
    assert "Your account has 1 security key" in page.locator("#key-policy").inner_text()
    screenshot(page, "security-keys")
    # The Python client verifies the browser's chain, with the version its key approved, before it sends.
    ok(cli(b_home, "send", account_of(address), "--text", "to the browser with a key"))
    page.get_by_role("log").get_by_text("to the browser with a key", exact=True).wait_for()

    c_home = tmp_path / "c"
    c_address = approve_with_key(page, relay, c_home, shot="approve-with-key")
    assert account_of(c_address) == account_of(address)
    page.locator("#approve-request").filter(has_text="granted the account's history").wait_for()
    # C works: it sends to B and receives B's answer; it lists the browser's key from the verified chain.
    ok(cli(c_home, "send", account_of(b_address), "--text", "from C, approved by the browser's key"))
    assert "from C, approved by the browser's key" in [m["text"] for m in sync_texts(b_home)]
    ok(cli(b_home, "send", c_address, "--text", "to C"))
    assert "to C" in [m["text"] for m in sync_texts(c_home)]
    keys = ok(cli(c_home, "device", "fido2", "list", "--json"))
    assert '"rp_id": "localhost"' in keys.replace('":"', '": "'), keys

    # Revoke C with the key: C is refused from then on, and B's Python client verifies the key-approved removal.
    c_device = c_address.split(".", 1)[0]
    devices = page.get_by_role("list", name="Devices")
    devices.get_by_role("listitem").filter(has_text=c_device[:4]).wait_for()
    fingerprint = " ".join(re.findall(".{1,4}", c_device))
    page.get_by_role("button", name=f"Revoke device {fingerprint} with security key").click()
    page.get_by_role("button", name=f"Confirm: revoke device {fingerprint}").click()  # asked first: no way back
    page.locator("#key-state").filter(has_text="revoked").wait_for()
    refused = cli(c_home, "sync")
    assert refused.returncode != 0
    assert "revoked" in refused.stderr, refused.stderr
    # The versions the browser wrote carry its key's assertions: the key (version 2, proof of possession), C's
    # approval (version 3, with C's self-signature) and C's removal (version 4).
    versions = served_chain(relay, account_of(address).split("@", 1)[0]).versions
    assert [len(v.webauthn_assertions) for v in versions] == [0, 1, 1, 1]
    assert c_device not in [d.device_id for d in versions[-1].device_list.devices]
    ok(cli(b_home, "send", account_of(address), "--text", "after the revocation"))
    page.get_by_role("log").get_by_text("after the revocation", exact=True).wait_for()
    assert page.get_by_role("alert").is_hidden(), page.get_by_role("alert").inner_text()


def test_a_policy_that_requires_a_key_refuses_approvals_without_it(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    relay = key_relay(start_relay)
    page = watched.page
    address = create_account(page, localhost(relay.url))
    virtual_key(page)
    add_key(page, require=True)
    page.locator("#key-policy").filter(has_text="a security key must co-sign every change").wait_for()

    # Without the key, the browser refuses before anything is sent: the new device gets no proposal.
    c_home = tmp_path / "c"
    proc, code = start_link(relay, c_home)
    try:
        check_code(page, code)
        page.get_by_role("button", name="Approve device", exact=True).click()
        shown = alert(page, "policy_not_met")
        assert "requires a security key" in shown, shown
        screenshot(page, "key-required")
        # With the key, the same request goes through.
        page.get_by_role("button", name="Approve with security key").click()
        rc, out, err = finish(proc, timeout=90)
    finally:
        stop(proc)
    assert rc == 0, (out, err)
    c_address = out.strip().splitlines()[-1]

    # A CLI device of the account approving without the key (it has none): the new device refuses the proposal
    # (its chain check: the policy requires the key's co-signature), so it never joins.
    d_home = tmp_path / "d"
    proc, code = start_link(relay, d_home)
    try:
        cli(c_home, "device", "approve", code, "--yes", "--timeout", "5")
        rc, out, err = finish(proc, timeout=90)
    finally:
        stop(proc)
    assert rc != 0, (out, err)
    assert "policy_not_met" in err, err
    assert sorted(listed_devices(c_home)) == sorted([address.split(".", 1)[0], c_address.split(".", 1)[0]])


def _swap_public_key(route: Route) -> None:
    """The malicious relay: ``register/complete`` answers the registered credential with another public key."""
    response = route.fetch()
    credential = codec.decode(response.body(), WebAuthnCredential, codec.MSGPACK)
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    attacker = {1: 2, 3: -7, -1: 1, -2: point.x.to_bytes(32, "big"), -3: point.y.to_bytes(32, "big")}  # ES256 COSE
    swapped = msgspec.structs.replace(credential, public_key=cbor.encode(attacker))
    route.fulfill(response=response, body=codec.encode(swapped, codec.MSGPACK))


def test_a_relay_that_answers_another_credential_is_refused(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    relay = key_relay(start_relay)
    page = watched.page
    create_account(page, localhost(relay.url))
    virtual_key(page)
    page.route("**/v1/webauthn/register/complete", _swap_public_key)
    page.get_by_role("button", name="Add security key").click()
    shown = alert(page, "another credential than the security key created")
    assert shown.startswith("Refused: webauthn_invalid"), shown
    screenshot(page, "key-refused")
    page.unroute("**/v1/webauthn/register/complete")
    # Nothing was added: the verified list still has no key.
    page.locator("#key-policy").filter(has_text="no security key").wait_for()


def _tamper_assertion(route: Route) -> None:
    """The malicious relay: the chain's WebAuthn assertions carry one flipped signature byte."""
    response = route.fetch()
    chain = codec.decode(response.body(), DeviceListChain, codec.MSGPACK)
    versions = []
    for signed in chain.versions:
        assertions = [
            msgspec.structs.replace(a, signature=a.signature[:-1] + bytes([a.signature[-1] ^ 1]))
            for a in signed.webauthn_assertions
        ]
        versions.append(msgspec.structs.replace(signed, webauthn_assertions=assertions))
    tampered = msgspec.structs.replace(chain, versions=versions)
    route.fulfill(response=response, body=codec.encode(tampered, codec.MSGPACK))


def test_a_change_approved_by_the_cli_key_verifies_in_the_browser_and_a_bad_assertion_is_refused(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    relay = key_relay(start_relay)
    page = watched.page
    key = tmp_path / "soft-key.json"
    plugged = {"TETHERLESS_FIDO2_DEVICES": SOFT_KEY_FACTORY, "TETHERLESS_SOFT_CTAP": str(key)}

    def key_cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return offline_client.cli(home, *args, timeout=60, env=plugged)

    a_home = tmp_path / "a"
    init_device(relay, a_home)
    ok(key_cli(a_home, "device", "fido2", "add"))  # the CLI's key: origin https://localhost:PORT, rp id localhost
    link_browser(page, localhost(relay.url), a_home)
    # A new device approved by A with its key (python-fido2's assertion): the browser verifies and lists it.
    c_home = tmp_path / "c"
    proc, code = start_link(relay, c_home)
    try:
        ok(key_cli(a_home, "device", "approve", code, "--yes", "--fido2"))
        rc, out, err = finish(proc, timeout=90)
    finally:
        stop(proc)
    assert rc == 0, (out, err)
    c_device = out.strip().splitlines()[-1].split(".", 1)[0]
    devices = page.get_by_role("list", name="Devices")
    devices.get_by_role("listitem").filter(has_text=c_device[:4]).wait_for(timeout=30_000)
    assert page.get_by_role("alert").is_hidden(), page.get_by_role("alert").inner_text()

    # The relay alters the assertions it serves: the browser refuses the chain and says so.
    page.route(re.compile(r".*/v1/accounts/[a-z2-7]{32}/devices$"), _tamper_assertion)
    shown = alert(page, "webauthn_invalid")
    assert shown.startswith("Refused: webauthn_invalid"), shown
    page.locator("#key-policy").filter(has_text="did not verify").wait_for()  # nothing from that list is shown
    assert page.get_by_role("list", name="Devices").get_by_role("listitem").count() == 0
    screenshot(page, "refused-key-assertion")


def test_an_ip_address_origin_cannot_use_security_keys(watched: WatchedPage, start_relay: Any) -> None:
    """Opened at ``http://127.0.0.1:PORT`` (the relay's default name): its rp id is an IP address, which WebAuthn
    refuses; the browser says what to do instead of failing inside ``navigator.credentials``."""
    relay: RelayProcess = start_relay()
    page = watched.page
    assert relay.url.startswith("http://127.0.0.1:")
    create_account(page, relay.url)
    virtual_key(page)
    page.get_by_role("button", name="Add security key").click()
    shown = alert(page, "Security keys cannot be used on this page")
    assert "webauthn_rp_id" in shown, shown


def test_a_key_that_is_not_the_accounts_is_said_plainly(watched: WatchedPage, start_relay: Any, tmp_path: Path) -> None:
    """The account's key is unplugged and another one plugged in: the approval fails with a sentence and nothing
    is sent (the new device still waits for a proposal)."""
    relay = key_relay(start_relay)
    page = watched.page
    create_account(page, localhost(relay.url))
    cdp, listed = virtual_key(page)
    add_key(page)
    cdp.send("WebAuthn.removeVirtualAuthenticator", {"authenticatorId": listed})
    virtual_key(page, cdp)  # a key that holds none of the account's credentials
    proc, code = start_link(relay, tmp_path / "c")
    try:
        check_code(page, code)
        page.get_by_role("button", name="Approve with security key").click()
        shown = alert(page, "No security key approved")
        assert "not one of your account's keys" in shown, shown
        assert proc.poll() is None  # no proposal was made: the new device still waits
    finally:
        stop(proc)
