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

Fixtures: ``browser`` (session), ``watched`` (a page in a fresh context, with what it reported),
``start_relay`` (relays with settings, stopped and checked after the test); the shared setups
``browser_and_cli`` (a CLI device and a browser account on one relay) and ``browser_in_cli_account`` (the
browser linked into a CLI account with history), built by tests/web/support.py, which also holds the UI
helpers (``create_account``, ``send``, ``link_browser``, ``approve_in_browser`` …); for Node: ``npm`` and
``node_peer_script`` (the TypeScript client as a Node process: support.NodePeer).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.relay_process import RelayProcess
from tests.web.support import (
    ROOT,
    SCREENSHOTS,
    WEB,
    BrowserAndCli,
    BrowserInCliAccount,
    WatchedPage,
    browser_beside_cli,
    browser_linked_to_cli,
    find_npm,
    localhost,
    run_in_web,
    screenshot,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage

# Defined in support.py (which the fixtures below use); imported from here by tests written before it.
__all__ = ["ROOT", "SCREENSHOTS", "WatchedPage", "localhost", "screenshot"]

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

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


@pytest.fixture
def watched(browser: Browser) -> Iterator[WatchedPage]:
    context = browser.new_context()
    page = context.new_page()
    watched = WatchedPage(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            watched.console.append(f"{message.type}: {message.text} ({message.location.get('url', '')})")
        elif message.type == "info":
            watched.info.append(message.text)

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


@pytest.fixture
def browser_and_cli(watched: WatchedPage, start_relay: Any, tmp_path: Path) -> BrowserAndCli:
    """A relay (``start_relay()``), a CLI device of its own account at ``tmp_path``/cli, and the browser page
    (``watched``) with an account created through the UI: :func:`tests.web.support.browser_beside_cli`.

    Fields: ``relay``, ``watched``, ``page``, ``origin`` (``http://localhost:PORT``), ``address`` (the
    browser's), ``cli_home``, ``cli_address``. For other relay settings, start the relay with ``start_relay``
    and call ``browser_beside_cli(relay, watched, tmp_path)`` in the test.
    """
    return browser_beside_cli(start_relay(), watched, tmp_path)


@pytest.fixture
def browser_in_cli_account(watched: WatchedPage, start_relay: Any, tmp_path: Path) -> BrowserInCliAccount:
    """A relay, CLI device A (``cli_home``/``cli_address``) whose account already has history with B, a CLI device
    of another account (``other_home``/``other_address``), and the browser linked into A's account, approved by
    A with ``tetherless device approve``: :func:`tests.web.support.browser_linked_to_cli`. ``address`` is the
    browser's. The history: B wrote "from B before the browser", A answered "from A before the browser"."""
    return browser_linked_to_cli(start_relay(), watched, tmp_path)


# npm keeps a copy of the lock file it installed from here; its age tells whether node_modules is current.
INSTALLED_LOCK = WEB / "node_modules" / ".package-lock.json"


def _installed_is_current() -> bool:
    lock = WEB / "package-lock.json"
    return INSTALLED_LOCK.exists() and INSTALLED_LOCK.stat().st_mtime >= lock.stat().st_mtime


@pytest.fixture(scope="session")
def npm() -> str:
    """npm, with web/node_modules installed from the lock file (``npm ci`` only when it is missing or older than
    the lock file; once, also across xdist workers: a file lock). Skips without node, fails under ``CI=true``."""
    npm = find_npm()
    (WEB / "build").mkdir(exist_ok=True)
    with (WEB / "build" / ".npm-ci.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two workers must not run `npm ci` into one directory at once
        if not _installed_is_current():
            run_in_web([npm, "ci", "--no-audit", "--no-fund"], "npm ci")
    return npm


@pytest.fixture(scope="session")
def node_peer_script(npm: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """web/test/interop/peer.ts bundled with its packages into a directory of this session (of this xdist worker)
    alone, by web/test/interop/build.mjs: ``npm test`` (tests/web/test_node_vectors.py), which empties web/build/,
    may run at the same time in another worker. Run it with :class:`tests.web.support.NodePeer`.

    ``TETHERLESS_NODE_PEER`` names a peer built elsewhere instead (a mutant of the TypeScript code, to watch the
    differential tests fail: web/test/interop/build.mjs DIR from a changed copy of web/)."""
    prebuilt = os.environ.get("TETHERLESS_NODE_PEER")
    if prebuilt:
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("node-peer")
    run_in_web(["node", "test/interop/build.mjs", str(out)], "bundling the node peer (web/test/interop/build.mjs)")
    script = out / "peer.mjs"
    assert script.exists()
    return script
