"""Browser fixtures: Debian's chromium, headless, driven by Playwright — and relays that serve the client.

Playwright (Python, requirements/dev.txt) never downloads a browser here:
``PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1`` is set and chromium is the system's
(``apt-get install chromium``; ``.ci/run`` installs it, ``TETHERLESS_CHROMIUM``
names another binary). Without playwright or chromium the browser tests
skip, and under ``CI=true`` they fail instead.

Pages are opened at ``http://localhost:PORT``, not ``127.0.0.1``: both are
secure contexts (WebCrypto works without TLS), but only a host name is a
valid WebAuthn relying-party id, and the client's hardware-key approval
will need one. Chromium resolves ``localhost`` to the loopback address
itself, whatever /etc/hosts says.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.relay_process import RelayProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM = os.environ.get("TETHERLESS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Recorded in every page before its own scripts run: each CSP violation the browser reports.
_RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.effectiveDirective} ${event.blockedURI}`);
});
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must have it (.ci/run installs Debian's chromium)")
    pytest.skip(reason)


def localhost(url: str) -> str:
    """``url`` of a relay on 127.0.0.1 with ``localhost`` as its host (see the module docstring)."""
    return url.replace("://127.0.0.1:", "://localhost:", 1)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Headless chromium (the system's), shared by the session's tests; each test opens its own context."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (it is in requirements/dev.txt)")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    # Chromium's sandbox cannot start as root (CI runs as root); as another user it stays on.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class WatchedPage:
    """A page in a fresh browser context, with everything it reported: console, uncaught errors, CSP."""

    page: Page
    console: list[str] = field(default_factory=list)  # "type: text" of error and warning messages
    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    failed: list[str] = field(default_factory=list)  # "status url" of every answer >= 400 (the console omits the url)

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


@pytest.fixture
def watched(browser: Browser) -> Iterator[WatchedPage]:
    context = browser.new_context()
    page = context.new_page()
    watched = WatchedPage(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            watched.console.append(f"{message.type}: {message.text} ({message.location.get('url', '')})")

    page.on("console", on_console)
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    page.on("response", lambda r: watched.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.add_init_script(_RECORD_VIOLATIONS)
    try:
        yield watched
    finally:
        context.close()


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Any]:
    """Start relays with settings (``start_relay(name, env={...})``); all are stopped and checked afterwards."""
    started: list[RelayProcess] = []

    def start(name: str = "relay", env: dict[str, str] | None = None, args: list[str] | None = None) -> RelayProcess:
        process = RelayProcess(tmp_path / name, env=env, extra_args=args)
        process.start()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            assert process.stop() == 0, process.logs()[-2000:]
            assert "Traceback" not in process.logs()


def screenshot(page: Page, name: str) -> Path:
    """Write ``build/screenshots/NAME.png`` (the issue's screenshots of the main screens)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
