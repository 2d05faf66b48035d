"""What the browser tests repeat: drive the app's UI; a relay with a CLI device and a browser device.

The UI helpers use only the controls' accessible names (issue 16: "Relay URL", "Create account", "Link this
device", "To", "Message", "Send"; messages in role ``log``, problems in role ``alert``) and the ids the
screens document (``#address``, ``#link-code``, ``#link-fingerprint``, ``#approve-request``).

The setups (:func:`browser_beside_cli`, :func:`browser_linked_to_cli`) are what the fixtures of the same
purpose in tests/web/conftest.py (``browser_and_cli``, ``browser_in_cli_account``) return; a test that needs
other relay settings calls them itself with a relay it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.e2e.test_equal_devices import FINGERPRINTS, account_of, cli, finish, init_device, ok, start_link

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from tests.relay_process import RelayProcess

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "build" / "screenshots"
WEB = ROOT / "web"
NPM_TIMEOUT_SECONDS = 600
_NPM_ENV = {"npm_config_fund": "false", "npm_config_audit": "false", "npm_config_update_notifier": "false"}
# How long the Node peer may take to answer one command (a link waits for the other side's approval).
PEER_ANSWER_TIMEOUT_SECONDS = 120


def localhost(url: str) -> str:
    """``url`` of a relay on 127.0.0.1 with ``localhost`` as its host (see conftest.py's docstring)."""
    return url.replace("://127.0.0.1:", "://localhost:", 1)


def screenshot(page: Page, name: str) -> Path:
    """Write ``build/screenshots/NAME.png`` (the issue's screenshots of the main screens)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@dataclass
class WatchedPage:
    """A page in a fresh browser context, with everything it reported: console, uncaught errors, CSP."""

    page: Page
    console: list[str] = field(default_factory=list)  # "type: text" of error and warning messages
    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    failed: list[str] = field(default_factory=list)  # "status url" of every answer >= 400 (the console omits the url)
    info: list[str] = field(default_factory=list)  # the text of every console.info message

    def csp_violations(self) -> list[str]:
        """``directive blocked-uri`` of every ``securitypolicyviolation`` event of the current document."""
        found: Any = self.page.evaluate("window.__cspViolations")
        return list(found)

    def assert_clean(self) -> None:
        """No console error or warning, no uncaught error, no CSP violation."""
        assert self.failed == [], self.failed
        assert self.console == [], self.console
        assert self.errors == [], self.errors
        assert self.csp_violations() == []


# -- the UI ---------------------------------------------------------------------------------------------------


def create_account(page: Page, origin: str) -> str:
    """Open the app at ``origin``, create an account with the UI; the address it shows."""
    page.goto(origin + "/")
    relay_url = page.get_by_label("Relay URL")
    relay_url.wait_for()
    assert relay_url.input_value() == origin  # prefilled with the serving origin
    screenshot(page, "start")
    page.get_by_role("button", name="Create account").click()
    address = page.locator("#address")
    address.filter(has_text="@").wait_for()
    return address.inner_text()


def compose(page: Page, to: str, text: str) -> None:
    """Fill in To and Message and press Send (without waiting for anything)."""
    page.get_by_label("To", exact=True).fill(to)
    page.get_by_label("Message", exact=True).fill(text)
    page.get_by_role("button", name="Send", exact=True).click()


def send(page: Page, to: str, text: str) -> None:
    """Send with the UI and wait until the relay accepted it (the text is then in the log, the field empty)."""
    compose(page, to, text)
    page.get_by_role("log").get_by_text(text, exact=True).wait_for()
    assert page.get_by_label("Message", exact=True).input_value() == ""


def outbox_item(page: Page, text: str) -> Any:
    """The entry of the outbox ("Outbox: not sent yet") that holds ``text``."""
    return page.get_by_role("list", name="Outbox: not sent yet").get_by_role("listitem").filter(has_text=text)


def link_browser(page: Page, origin: str, approver: Path) -> str:
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


def approve_in_browser(page: Page, relay: RelayProcess, new_home: Path, *, shot: bool = True) -> str:
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


# -- the setups -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrowserAndCli:
    """A relay serving the app; a CLI device; the browser page, on ``origin``, with its own account or linked.

    ``address``: the browser's; ``cli_home`` / ``cli_address``: the CLI device, of another account
    (:func:`browser_beside_cli`).
    """

    relay: RelayProcess
    watched: WatchedPage
    origin: str
    address: str
    cli_home: Path
    cli_address: str

    @property
    def page(self) -> Page:
        return self.watched.page


@dataclass(frozen=True)
class BrowserInCliAccount(BrowserAndCli):
    """:class:`BrowserAndCli` where the browser joined the CLI device's account (:func:`browser_linked_to_cli`);
    ``other_home`` / ``other_address``: a device of a second CLI account, which wrote to the first."""

    other_home: Path
    other_address: str


def browser_beside_cli(relay: RelayProcess, watched: WatchedPage, tmp_path: Path) -> BrowserAndCli:
    """A CLI device (``tmp_path``/cli) and a browser account created with the UI, both on ``relay``."""
    cli_home = tmp_path / "cli"
    cli_address = init_device(relay, cli_home)
    origin = localhost(relay.url)
    address = create_account(watched.page, origin)
    return BrowserAndCli(relay, watched, origin, address, cli_home, cli_address)


def browser_linked_to_cli(relay: RelayProcess, watched: WatchedPage, tmp_path: Path) -> BrowserInCliAccount:
    """CLI device A (``tmp_path``/a) with history — B (another account, ``tmp_path``/b) wrote "from B before the
    browser", A answered "from A before the browser" — and the browser linked into A's account, approved by A."""
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a_address, b_address = init_device(relay, a_home), init_device(relay, b_home)
    ok(cli(b_home, "send", account_of(a_address), "--text", "from B before the browser"))
    ok(cli(a_home, "sync"))
    ok(cli(a_home, "send", account_of(b_address), "--text", "from A before the browser"))
    ok(cli(a_home, "sync"))
    origin = localhost(relay.url)
    address = link_browser(watched.page, origin, a_home)
    return BrowserInCliAccount(relay, watched, origin, address, a_home, a_address, b_home, b_address)


# -- node ------------------------------------------------------------------------------------------------------


def find_npm() -> str:
    """npm's path; skips without node and npm, fails under ``CI=true`` (CI must have them)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        message = "node and npm are not installed (the browser client's Node tests need them)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must have them")
        pytest.skip(message)
    return npm


def run_in_web(args: list[str], what: str) -> str:
    """Run ``args`` in web/; its output. A failure fails the test with the output's end."""
    result = subprocess.run(
        args,
        cwd=WEB,
        env={**os.environ, **_NPM_ENV},
        capture_output=True,
        text=True,
        timeout=NPM_TIMEOUT_SECONDS,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"{what} failed (exit {result.returncode}):\n{output[-6000:]}")
    return output


class NodePeer:
    """One Node process running web/test/interop/peer.ts (TypeScript devices); one JSON command in, one JSON answer
    out. :meth:`must` fails the test on an error answer; :meth:`ask` returns it (``ok`` false, ``code``)."""

    def __init__(self, script: Path, log_path: Path) -> None:
        self.log = log_path.open("w")
        self.proc = subprocess.Popen(
            ["node", str(script)],
            cwd=WEB,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the node peer exited (code {self.proc.poll()}); stderr in {self.log.name}"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def must(self, **command: Any) -> dict[str, Any]:
        answer = self.ask(**command)
        assert answer["ok"], answer
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=PEER_ANSWER_TIMEOUT_SECONDS)
        finally:
            self.proc.stdout.close()
            self.log.close()
