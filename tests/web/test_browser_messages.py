"""The browser app (web/src/app) in headless chromium, served by a real relay, against the real ``tetherless`` CLI.

The browser creates an account through its UI (the controls' accessible names are the interface: "Relay URL",
"Create account", "To", "Message", "Send"; messages in the element with role ``log``; problems in role
``alert``), a CLI device and the browser exchange messages both ways, and a reload keeps the account, the
sessions and the history (IndexedDB, sealed under a non-extractable WebCrypto key). Screenshots of the main
screens go to build/screenshots/. Fails (not skips) without chromium under ``CI=true`` (conftest.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tests.e2e.test_equal_devices import account_of, cli, ok, sync_texts
from tests.web.support import BrowserAndCli, WatchedPage, create_account, localhost, screenshot, send

if TYPE_CHECKING:
    from playwright.sync_api import Route

# create_account and send moved to support.py; other test files import them from here too.
__all__ = ["create_account", "send"]

# What the page's IndexedDB holds: record names, the key's type and extractability, the state's first byte.
STORED = """async () => {
  const db = await new Promise((resolve, reject) => {
    const request = indexedDB.open("tetherless");
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  const store = db.transaction("device").objectStore("device");
  const get = (name) => new Promise((resolve) => { const r = store.get(name); r.onsuccess = () => resolve(r.result); });
  const key = await get("key");
  const state = await get("state");
  db.close();
  return {
    key: { type: key.constructor.name, extractable: key.extractable, algorithm: key.algorithm.name },
    state: { type: state.constructor.name, format: state[0], text: new TextDecoder().decode(state) },
    localStorage: localStorage.length,
  };
}"""


def test_browser_and_cli_exchange_messages_and_a_reload_keeps_the_account(browser_and_cli: BrowserAndCli) -> None:
    relay, watched, page = browser_and_cli.relay, browser_and_cli.watched, browser_and_cli.page
    cli_home, cli_address, address = browser_and_cli.cli_home, browser_and_cli.cli_address, browser_and_cli.address
    assert address.endswith(f"@{relay.name}")
    screenshot(page, "account")

    # Keys at rest: a non-extractable AES-GCM key and a sealed record; nothing in localStorage, no plaintext.
    stored = page.evaluate(STORED)
    assert stored["key"] == {"type": "CryptoKey", "extractable": False, "algorithm": "AES-GCM"}
    assert stored["state"]["type"] == "Uint8Array"
    assert stored["state"]["format"] == 1
    assert relay.name not in stored["state"]["text"]
    assert stored["localStorage"] == 0

    # CLI → browser: the app polls its inbox and shows the message in the log.
    ok(cli(cli_home, "send", address, "--text", "hello browser, 🌍"))
    ok(cli(cli_home, "sync"))
    log = page.get_by_role("log")
    log.get_by_text("hello browser, 🌍", exact=True).wait_for()
    assert cli_address in log.inner_text()

    # Browser → CLI, on the session the CLI started; the CLI's sync shows it.
    send(page, cli_address, "hello CLI")
    assert [(m["from"], m["text"]) for m in sync_texts(cli_home)] == [(address, "hello CLI")]
    screenshot(page, "messages")

    # Reload: the same account, the history, and the sessions (the ratchets continue both ways).
    page.reload()
    page.locator("#address").filter(has_text=address).wait_for()
    assert page.get_by_role("button", name="Create account").is_hidden()
    for text in ("hello browser, 🌍", "hello CLI"):
        log.get_by_text(text, exact=True).wait_for()
    ok(cli(cli_home, "send", account_of(address), "--text", "after your reload"))
    ok(cli(cli_home, "sync"))
    log.get_by_text("after your reload", exact=True).wait_for()
    send(page, account_of(cli_address), "after my reload")
    assert [(m["from"], m["text"]) for m in sync_texts(cli_home)] == [(address, "after my reload")]
    assert page.get_by_role("alert").is_hidden()
    watched.assert_clean()


def test_relay_problems_are_shown_and_a_second_tab_does_not_run_the_device(
    watched: WatchedPage, start_relay: Any
) -> None:
    relay = start_relay()
    page = watched.page
    origin = localhost(relay.url)
    create_account(page, origin)

    # An account the relay does not know: the relay's problem, by its stable code, in role alert.
    page.get_by_label("To").fill(f"{'a' * 32}@{relay.name}")
    page.get_by_label("Message").fill("to nobody")
    page.get_by_role("button", name="Send").click()
    alert = page.get_by_role("alert")
    alert.filter(has_text="unknown_account").wait_for()
    assert page.get_by_label("Message").input_value() == "to nobody"  # kept for another try
    screenshot(page, "error")

    # A second tab of the same browser profile: the first one holds the device's lock.
    second = page.context.new_page()
    second.goto(origin + "/")
    second.get_by_role("alert").filter(has_text="open in another tab").wait_for()
    assert second.get_by_role("button", name="Create account").is_hidden()
    assert second.locator("#address").inner_text() == ""
    second.close()

    # The relay goes away (this browser is online): the polling loop says so in words, and that nothing is
    # lost; the request and the browser's reason only in the console.
    relay.stop()
    alert.filter(has_text="Cannot reach the relay: it does not answer right now").wait_for()
    assert "wait in the outbox" in alert.inner_text()
    assert "Failed to fetch" not in alert.inner_text()
    assert "/v1/" not in alert.inner_text()
    assert any(line.startswith("no answer from the relay: ") for line in watched.info), watched.info


def test_a_tampered_device_list_is_refused_with_a_visible_error(browser_and_cli: BrowserAndCli) -> None:
    """The relay is the adversary: a chain changed on the way (one byte of it) is refused before any key is used."""
    page, origin = browser_and_cli.page, browser_and_cli.origin
    cli_home, cli_address = browser_and_cli.cli_home, browser_and_cli.cli_address
    account = account_of(cli_address).split("@")[0]

    def tamper(route: Route) -> None:
        real = route.fetch()
        body = bytearray(real.body())
        body[-5] ^= 0x01  # inside the head's last signature
        route.fulfill(response=real, body=bytes(body))

    page.route(f"{origin}/v1/accounts/{account}/devices", tamper)
    page.get_by_label("To").fill(cli_address)
    page.get_by_label("Message").fill("must not leave")
    page.get_by_role("button", name="Send").click()
    alert = page.get_by_role("alert")
    alert.filter(has_text="Refused: bad_signature").wait_for()
    screenshot(page, "refused-device-list")
    assert page.get_by_role("log").inner_text() == ""
    assert sync_texts(cli_home) == []

    # The honest chain again: the same message goes through.
    page.unroute(f"{origin}/v1/accounts/{account}/devices")
    page.get_by_role("button", name="Send").click()
    page.get_by_role("log").get_by_text("must not leave", exact=True).wait_for()
    assert [(m["from"], m["text"]) for m in sync_texts(cli_home)] == [
        (page.locator("#address").inner_text(), "must not leave")
    ]
