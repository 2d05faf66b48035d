"""The browser as one of an account's equal devices (issue 16), in headless chromium against a real relay and the
real ``tetherless`` CLI:

- "Link this device": the browser shows a link code and its fingerprint, the CLI approves it (``device approve
  CODE``, which shows the same fingerprint and grants the account's history), and the browser verifies the
  proposal and the chain from the genesis, joins, and replays the history from the account log — messages the
  CLI device sent and received before the browser existed appear in the element with role ``log``;
- the browser approves a new CLI device ("Link code of a new device", "Check code", "Approve device") and grants
  it the account's history (a v2 key record the browser writes, which the Python client verifies and opens); the
  new device then sends, receives and shows the history from before it existed;
- what the browser sends and receives it writes to the account log (message-sent / message-received records
  signed by the browser), so the CLI device of the same account shows both in ``history --json``;
- a revoked browser device says so and cannot send;
- after sign-out, an account created in the same page approves devices into itself (not the wiped one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.e2e.test_equal_devices import (
    FINGERPRINTS,
    account_of,
    cli,
    finish,
    init_device,
    ok,
    start_link,
    sync_texts,
)
from tests.web.conftest import WatchedPage, localhost, screenshot
from tests.web.test_browser_messages import create_account, send

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.relay_process import RelayProcess


def _account_with_history(relay: RelayProcess, tmp_path: Path) -> tuple[Path, str, Path, str]:
    """CLI device A and another account's device B; B writes to A, A answers: A's log holds both."""
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a_address, b_address = init_device(relay, a_home), init_device(relay, b_home)
    ok(cli(b_home, "send", account_of(a_address), "--text", "from B before the browser"))
    ok(cli(a_home, "sync"))
    ok(cli(a_home, "send", account_of(b_address), "--text", "from A before the browser"))
    ok(cli(a_home, "sync"))
    return a_home, a_address, b_home, b_address


def _link_browser(page: Page, origin: str, approver: Path) -> str:
    """The browser's "Link this device", approved by ``approver`` with the CLI; the browser's address."""
    page.goto(origin + "/")
    page.get_by_label("Relay URL").wait_for()
    page.get_by_role("button", name="Link this device").click()
    code_shown = page.locator("#link-code").filter(has_text="tl-")
    code_shown.wait_for()
    code = code_shown.inner_text()
    fingerprint = page.locator("#link-fingerprint").inner_text()
    screenshot(page, "link")
    approved = ok(cli(approver, "device", "approve", code, "--yes", "--timeout", "60", timeout=90))
    assert fingerprint in approved  # both screens show the same fingerprint
    address = page.locator("#address")
    address.filter(has_text="@").wait_for()
    return address.inner_text()


def _linked(page: Page, relay: RelayProcess, tmp_path: Path) -> tuple[Path, str, Path, str, str]:
    """A CLI account with history and the browser linked to it: A's home and address, B's, the browser's."""
    a_home, a_address, b_home, b_address = _account_with_history(relay, tmp_path)
    return a_home, a_address, b_home, b_address, _link_browser(page, localhost(relay.url), a_home)


def _approve_in_browser(page: Page, relay: RelayProcess, new_home: Path, *, shot: bool = True) -> str:
    """A new CLI device at ``new_home`` shows a link code; the browser checks and approves it. Its address."""
    proc, code = start_link(relay, new_home)
    try:
        page.get_by_label("Link code of a new device").fill(code)
        page.get_by_role("button", name="Check code").click()
        request = page.locator("#approve-request").filter(has_text=FINGERPRINTS[code])
        request.wait_for()  # the browser shows the fingerprint the new device shows
        if shot:
            screenshot(page, "approve")
        page.get_by_role("button", name="Approve device").click()
        rc, out, err = finish(proc, timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert rc == 0, (out, err)
    return out.strip().splitlines()[-1]


def test_browser_links_to_a_cli_account_and_replays_its_history(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    page = watched.page
    a_home, a_address, b_home, _b_address, address = _linked(page, start_relay(), tmp_path)
    assert account_of(address) == account_of(a_address)
    log = page.get_by_role("log")
    log.get_by_text("from B before the browser", exact=True).wait_for()
    log.get_by_text("from A before the browser", exact=True).wait_for()
    screenshot(page, "history")
    # The device list the browser joined verifies on the CLI too, and the browser is an equal device: B's
    # next message to the account reaches it.
    listed = ok(cli(a_home, "device", "list"))
    assert address.split(".", 1)[0] in listed
    ok(cli(b_home, "send", account_of(a_address), "--text", "after the browser joined"))
    log.get_by_text("after the browser joined", exact=True).wait_for()
    assert page.get_by_role("alert").is_hidden()


def test_browser_approves_a_new_cli_device_which_then_sends_and_receives(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    relay = start_relay()
    page = watched.page
    _a_home, a_address, b_home, b_address, _address = _linked(page, relay, tmp_path)
    c_home = tmp_path / "c"
    c_address = _approve_in_browser(page, relay, c_home)
    page.locator("#approve-request").filter(has_text="granted the account's history").wait_for()
    assert account_of(c_address) == account_of(a_address)
    # C is a device of the account: it sends to B and receives B's answer.
    ok(cli(c_home, "send", account_of(b_address), "--text", "from C, approved by the browser"))
    assert "from C, approved by the browser" in [m["text"] for m in sync_texts(b_home)]
    ok(cli(b_home, "send", c_address, "--text", "to C"))
    synced = cli(c_home, "sync")
    assert synced.returncode == 0, synced.stderr
    assert "warning" not in synced.stderr, synced.stderr  # the browser's grant record verified and opened in Python
    shown = ok(cli(c_home, "history", "--json"))
    # The history from before C existed, through the browser's grant: B's message and A's answer.
    for text in ("from B before the browser", "from A before the browser", "to C"):
        assert f'"{text}"' in shown, shown


def test_a_revoked_browser_device_shows_it_is_revoked_and_cannot_send(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    page = watched.page
    a_home, _a_address, _b_home, _b_address, address = _linked(page, start_relay(), tmp_path)
    ok(cli(a_home, "device", "revoke", address.split(".", 1)[0], "--yes"))
    page.locator("#device-state").filter(has_text="This device is revoked").wait_for()
    assert page.get_by_role("button", name="Send").is_disabled()
    screenshot(page, "revoked")


def test_after_sign_out_a_new_account_approves_devices_into_itself(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    """Sign out, then "Create account" in the same page: the device screens use the new device, not the wiped one."""
    relay = start_relay()
    page = watched.page
    first = create_account(page, localhost(relay.url))
    page.get_by_role("button", name="Sign out").click()
    page.get_by_role("button", name="Erase this device").click()
    page.get_by_text("Signed out: this browser no longer holds").wait_for()
    page.get_by_role("button", name="Create account").click()
    address = page.locator("#address")
    address.filter(has_text="@").wait_for()
    second = address.inner_text()
    assert account_of(second) != account_of(first)
    c_address = _approve_in_browser(page, relay, tmp_path / "c", shot=False)
    # The new device joined the account made after the sign-out, approved by that account's device.
    assert account_of(c_address) == account_of(second)
    page.locator("#approve-request").filter(has_text="Approved: device").wait_for()
    assert page.get_by_role("alert").is_hidden()
    watched.assert_clean()


def _history_texts(home: Path) -> dict[str, dict[str, Any]]:
    """``home``'s history after a sync, by text."""
    ok(cli(home, "sync"))
    entries = [json.loads(line) for line in ok(cli(home, "history", "--json")).splitlines() if line.strip()]
    return {str(e.get("text")): e for e in entries}


def test_what_the_browser_sends_and_receives_reaches_the_cli_device_through_the_log(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    page = watched.page
    a_home, _a_address, b_home, b_address, address = _linked(page, start_relay(), tmp_path)
    page.get_by_role("log").get_by_text("from A before the browser", exact=True).wait_for()  # holds the key
    # To B's account and from B to the browser's own device address: A gets neither envelope.
    send(page, account_of(b_address), "from the browser to B")
    assert "from the browser to B" in [m["text"] for m in sync_texts(b_home)]
    ok(cli(b_home, "send", address, "--text", "from B to the browser only"))
    page.get_by_role("log").get_by_text("from B to the browser only", exact=True).wait_for()
    # The browser appends its records at its next poll (every 2 s): A reads them from the log.
    wanted = {"from the browser to B", "from B to the browser only"}
    for _attempt in range(30):
        shown = _history_texts(a_home)
        if wanted <= shown.keys():
            break
        time.sleep(1)
    assert wanted <= shown.keys(), sorted(shown)
    assert shown["from the browser to B"]["direction"] == "sent", shown
    assert shown["from B to the browser only"]["direction"] == "received", shown
    synced = cli(a_home, "sync")
    assert "warning" not in synced.stderr, synced.stderr  # the browser's signed records verified in Python
    assert page.get_by_role("alert").is_hidden()
