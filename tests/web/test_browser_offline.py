"""Offline first and a safe shared computer (issue 16 items 3 and 4), in headless chromium against a real relay and CLI.

- The service worker (web/src/sw.ts → dist/sw.js) serves the app shell offline under a cache named after the
  build's content hash; it never caches an answer of the relay's API; a new build replaces the old cache.
- With the browser context offline, a reload shows the account and its history (state from IndexedDB), a sent
  message waits in the outbox (visible, and still there after another offline reload), and after reconnecting
  it is delivered to the CLI device; a message the CLI sent meanwhile arrives too.
- Sign-out (with a confirmation) deletes this browser's copy of the device: no ``tetherless`` database, no
  cache, no service worker; the app is back at the start screen and a new account can be made.
- A second tab of the same profile does not run the device (the Web Lock): it says it is inactive and makes no
  request to the relay, and it takes over, with the same ratchets, only when the first tab is closed.

Screenshots go to build/screenshots/ (conftest.screenshot). Fails (not skips) without chromium under ``CI=true``.
"""

from __future__ import annotations

import hashlib
import shutil
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.e2e.test_equal_devices import account_of, cli, ok, sync_texts
from tests.relay_process import RelayProcess
from tests.web.support import ROOT, BrowserAndCli, WatchedPage, compose, localhost, outbox_item, screenshot, send

if TYPE_CHECKING:
    from playwright.sync_api import Page, Request

# compose, outbox_item and send moved to support.py; other test files import them from here too.
__all__ = ["compose", "outbox_item", "send"]

DIST = ROOT / "web" / "dist"
SHELL = ("app.js", "index.html", "styles.css")  # the files whose bytes name the cache (web/scripts/build.mjs)

# Every cache of the origin, and the paths each holds.
CACHES = """async () => {
  const found = {};
  for (const name of await caches.keys()) {
    const cache = await caches.open(name);
    found[name] = (await cache.keys()).map((request) => new URL(request.url).pathname).sort();
  }
  return found;
}"""
# Resolves once the origin's only cache is the one named (the new worker installed it and dropped the others).
UNTIL_ONLY_CACHE = """async (name) => {
  for (;;) {
    const names = await caches.keys();
    if (names.length === 1 && names[0] === name) return;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}"""
# What sign-out must leave behind: nothing of ours.
LEFT_BEHIND = """async () => ({
  databases: (await indexedDB.databases()).map((db) => db.name),
  caches: await caches.keys(),
  workers: (await navigator.serviceWorker.getRegistrations()).length,
  localStorage: localStorage.length,
})"""


def shell_cache_name(files: dict[str, bytes]) -> str:
    """The cache name web/scripts/build.mjs derives from the shell's bytes."""
    digest = hashlib.sha256()
    for name in SHELL:
        digest.update(f"{name}\0{len(files[name])}\0".encode())
        digest.update(files[name])
    return "tetherless-shell-" + digest.hexdigest()[:16]


def served_cache_name(relay: RelayProcess) -> str:
    """:func:`shell_cache_name` of the build ``relay`` serves (read at its start; web/dist may change since)."""
    files = {}
    for name in SHELL:
        with urllib.request.urlopen(f"{relay.url}/{name}", timeout=10) as answer:
            files[name] = answer.read()
    return shell_cache_name(files)


def wait_controlled(page: Page) -> None:
    """Until the service worker has installed the shell and controls the page."""
    page.wait_for_function("() => navigator.serviceWorker.controller !== null")


def test_offline_reload_and_send_then_delivered_after_reconnecting(browser_and_cli: BrowserAndCli) -> None:
    relay, watched, page = browser_and_cli.relay, browser_and_cli.watched, browser_and_cli.page
    cli_home, cli_address, address = browser_and_cli.cli_home, browser_and_cli.cli_address, browser_and_cli.address
    context = page.context
    send(page, cli_address, "sent online")
    assert [m["text"] for m in sync_texts(cli_home)] == ["sent online"]
    wait_controlled(page)

    # The shell, and only the shell, is cached, under the build's hash.
    shell = {served_cache_name(relay): ["/", "/app.js", "/index.html", "/styles.css"]}
    assert page.evaluate(CACHES) == shell

    # Offline: a reload is served by the service worker; the account and history come from IndexedDB.
    context.set_offline(True)
    page.reload()
    page.locator("#address").filter(has_text=address).wait_for()
    log = page.get_by_role("log")
    log.get_by_text("sent online", exact=True).wait_for()
    page.get_by_text("Offline: messages you send wait in the outbox").wait_for()
    # The alert says it in words (offline, the relay cannot be reached, messages wait); the failed request and
    # the browser's "Failed to fetch" only in the console.
    alert = page.get_by_role("alert")
    alert.filter(has_text="Offline: this device has no network connection").wait_for()
    said = alert.inner_text()
    assert "the relay cannot be reached" in said
    assert "Messages you send wait in the outbox and go out when the connection returns." in said
    assert "Failed to fetch" not in said
    assert "/v1/" not in said
    assert any(line.startswith("no answer from the relay: POST /v1/") for line in watched.info), watched.info
    screenshot(page, "offline")

    # A message sent offline waits in the outbox (queued without the network), and survives a reload.
    compose(page, account_of(cli_address), "written offline")
    waiting = outbox_item(page, "written offline")
    waiting.filter(has_text="waiting").wait_for()
    assert page.get_by_label("Message", exact=True).input_value() == ""
    assert log.get_by_text("written offline").count() == 0
    screenshot(page, "offline-outbox")
    page.reload()
    outbox_item(page, "written offline").filter(has_text="waiting").wait_for()
    assert sync_texts(cli_home) == []  # nothing left the browser

    # Meanwhile the CLI writes to the browser; reconnecting delivers both ways.
    ok(cli(cli_home, "send", account_of(address), "--text", "while you were away"))
    context.set_offline(False)
    log.get_by_text("written offline", exact=True).wait_for()
    log.get_by_text("while you were away", exact=True).wait_for()
    outbox_item(page, "written offline").wait_for(state="detached")
    assert page.get_by_role("list", name="Outbox: not sent yet").is_hidden()
    assert [(m["from"], m["text"]) for m in sync_texts(cli_home)] == [(address, "written offline")]
    page.get_by_text("Checking for new messages every").wait_for()
    page.get_by_role("alert").wait_for(state="hidden")

    # Still no answer of the relay in any cache.
    assert page.evaluate(CACHES) == shell


def test_a_new_build_replaces_the_cached_shell(watched: WatchedPage, start_relay: Any, tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    shutil.copytree(DIST, dist)
    relay = start_relay(env={"TETHERLESS_WEB_DIST": str(dist)})
    page = watched.page
    page.goto(localhost(relay.url) + "/")
    wait_controlled(page)
    old = served_cache_name(relay)
    assert list(page.evaluate(CACHES)) == [old]

    # "Deploy" another build: a changed stylesheet, and the service worker naming the new hash (what
    # build.mjs writes), served after a restart on the same port.
    relay.stop()
    (dist / "styles.css").write_bytes((dist / "styles.css").read_bytes() + b"/* next build */\n")
    new = shell_cache_name({name: (dist / name).read_bytes() for name in SHELL})
    worker = (dist / "sw.js").read_text()
    assert old.removeprefix("tetherless-shell-") in worker
    (dist / "sw.js").write_text(
        worker.replace(old.removeprefix("tetherless-shell-"), new.removeprefix("tetherless-shell-"))
    )
    relay.start()

    page.reload()  # the browser checks sw.js on navigation, installs the new worker, which drops the old cache
    page.evaluate(UNTIL_ONLY_CACHE, new)
    page.reload()
    css = page.evaluate("() => fetch('./styles.css').then((r) => r.text())")
    assert css.endswith("/* next build */\n")
    page.context.set_offline(True)
    page.reload()
    page.get_by_role("heading", name="Tetherless").wait_for()
    assert page.evaluate("() => fetch('./styles.css').then((r) => r.text())").endswith("/* next build */\n")


def test_sign_out_erases_the_device_from_this_browser(browser_and_cli: BrowserAndCli) -> None:
    relay, watched, page = browser_and_cli.relay, browser_and_cli.watched, browser_and_cli.page
    cli_home, cli_address, address = browser_and_cli.cli_home, browser_and_cli.cli_address, browser_and_cli.address
    send(page, cli_address, "before signing out")
    wait_controlled(page)
    before = page.evaluate(LEFT_BEHIND)
    assert before["databases"] == ["tetherless"]
    assert before["caches"] == [served_cache_name(relay)]
    assert before["workers"] == 1

    # The button asks first; Cancel keeps everything.
    page.get_by_role("button", name="Sign out").click()
    confirm = page.get_by_role("region", name="Sign out and erase this device from this browser?")
    confirm.wait_for()
    assert "stays in your account's device list" in confirm.inner_text()
    screenshot(page, "sign-out")
    confirm.get_by_role("button", name="Cancel").click()
    confirm.wait_for(state="hidden")
    assert page.evaluate(LEFT_BEHIND) == before

    page.get_by_role("button", name="Sign out").click()
    confirm.get_by_role("button", name="Erase this device").click()
    page.get_by_role("button", name="Create account").wait_for()
    page.get_by_text("Signed out: this browser no longer holds").wait_for()
    assert page.locator("#address").inner_text() == ""
    assert page.locator("#log").inner_text() == ""
    assert page.evaluate(LEFT_BEHIND) == {"databases": [], "caches": [], "workers": 0, "localStorage": 0}
    screenshot(page, "signed-out")

    # A reload starts from nothing; a new account is a new device with new keys.
    page.reload()
    page.get_by_role("button", name="Create account").wait_for()
    assert page.locator("#address").inner_text() == ""
    page.get_by_role("button", name="Create account").click()
    page.locator("#address").filter(has_text="@").wait_for()
    assert page.locator("#address").inner_text() != address
    assert page.get_by_role("log").inner_text() == ""
    # The old device is still in its account's list (sign-out does not revoke): the CLI can still write to it.
    ok(cli(cli_home, "send", address, "--text", "to the signed-out device"))
    assert page.get_by_role("alert").is_hidden()
    watched.assert_clean()


def test_a_second_tab_stays_inactive_until_the_first_one_closes(browser_and_cli: BrowserAndCli) -> None:
    first, origin = browser_and_cli.page, browser_and_cli.origin
    cli_home, cli_address, address = browser_and_cli.cli_home, browser_and_cli.cli_address, browser_and_cli.address
    send(first, cli_address, "from the first tab")

    second = first.context.new_page()
    requests: list[str] = []

    def record(request: Request) -> None:
        if "/v1/" in request.url:
            requests.append(request.url)

    second.on("request", record)
    second.goto(origin + "/")
    second.get_by_role("alert").filter(has_text="open in another tab").wait_for()
    second.get_by_text("Inactive: another tab runs this device.").wait_for()
    screenshot(second, "second-tab")

    # The device runs in the first tab only: it receives; the second shows nothing and asks the relay nothing.
    ok(cli(cli_home, "send", account_of(address), "--text", "to the one running tab"))
    first.get_by_role("log").get_by_text("to the one running tab", exact=True).wait_for()
    assert second.get_by_role("button", name="Create account").is_hidden()
    assert second.locator("#address").inner_text() == ""
    assert second.locator("#log").inner_text() == ""
    assert requests == []

    # The first tab closes: the second takes the lock and continues the same device (the same ratchets).
    first.close()
    second.locator("#address").filter(has_text=address).wait_for()
    second.get_by_role("alert").wait_for(state="hidden")
    second.get_by_role("log").get_by_text("to the one running tab", exact=True).wait_for()
    send(second, account_of(cli_address), "from the second tab")
    assert [(m["from"], m["text"]) for m in sync_texts(cli_home)] == [
        (address, "from the first tab"),
        (address, "from the second tab"),
    ]
    ok(cli(cli_home, "send", account_of(address), "--text", "answer to the second tab"))
    second.get_by_role("log").get_by_text("answer to the second tab", exact=True).wait_for()
