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
import re
import time
from pathlib import Path
from typing import Any

from tests.e2e.test_equal_devices import account_of, cli, ok, sync_texts
from tests.web.support import (
    BrowserInCliAccount,
    WatchedPage,
    approve_in_browser,
    create_account,
    localhost,
    screenshot,
    send,
)


def test_browser_links_to_a_cli_account_and_replays_its_history(browser_in_cli_account: BrowserInCliAccount) -> None:
    linked = browser_in_cli_account
    page, address = linked.page, linked.address
    a_home, a_address, b_home = linked.cli_home, linked.cli_address, linked.other_home
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
    browser_in_cli_account: BrowserInCliAccount, tmp_path: Path
) -> None:
    linked = browser_in_cli_account
    page, a_address = linked.page, linked.cli_address
    b_home, b_address = linked.other_home, linked.other_address
    c_home = tmp_path / "c"
    c_address = approve_in_browser(page, linked.relay, c_home)
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
    browser_in_cli_account: BrowserInCliAccount,
) -> None:
    linked = browser_in_cli_account
    page = linked.page
    ok(cli(linked.cli_home, "device", "revoke", linked.address.split(".", 1)[0], "--yes"))
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
    c_address = approve_in_browser(page, relay, tmp_path / "c", shot=False)
    # The new device joined the account made after the sign-out, approved by that account's device.
    assert account_of(c_address) == account_of(second)
    # "Approved: device …", then "… joined; it was granted the account's history" once this account has a key.
    page.locator("#approve-request").filter(has_text=re.compile(r"Approved: device|joined")).wait_for()
    assert page.get_by_role("alert").is_hidden()
    watched.assert_clean()


def _history_texts(home: Path) -> dict[str, dict[str, Any]]:
    """``home``'s history after a sync, by text."""
    ok(cli(home, "sync"))
    entries = [json.loads(line) for line in ok(cli(home, "history", "--json")).splitlines() if line.strip()]
    return {str(e.get("text")): e for e in entries}


def test_what_the_browser_sends_and_receives_reaches_the_cli_device_through_the_log(
    browser_in_cli_account: BrowserInCliAccount,
) -> None:
    linked = browser_in_cli_account
    page, address, a_home = linked.page, linked.address, linked.cli_home
    b_home, b_address = linked.other_home, linked.other_address
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
