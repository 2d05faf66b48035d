"""Messages per second sealed and opened on a v2 session: the browser client (headless Chromium) next to the Python SDK.

    python -m bench.browser [--messages N] [--runs R] [--smoke] [--out FILE]

Pure CPU, no relay. Each run, for each implementation: a fresh session between
two in-process parties after one round trip (bench/crypto.py's helpers in
Python; web/test/bench/bench.ts in the page), then N messages of 200 bytes
sealed by one party (timed), then opened in order by the other (timed): the
ratchet path the CLI and the web client use, sealed sender and padding
included, fresh entropy from each platform's CSPRNG inside the timed loops.
The browser half is timed in the page with ``performance.now()`` and returned
to Python, so Playwright's round trips are not counted. Python and browser
runs alternate, so a change in machine load hits both; figures are medians of
R runs, messages per second both ways for both implementations, and the
browser/Python ratio (above 1: the browser is faster).

Needs node with web/node_modules (``make web``) to bundle the page script into
a temporary directory, Playwright (requirements/dev.txt) and Debian's chromium
(``TETHERLESS_CHROMIUM`` names another binary; never downloaded). Pinned to one
core with taskset when available (chromium's processes inherit it), as
bench/crypto.py is. Writes JSON to bench/results/browser-<time>.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import LOAD_CPU, ROOT, machine, pinned, summary, write_results
from bench.crypto import BODY, TTL_MS, _Device, _established, _rand, _seal
from protocol import session

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

WEB = ROOT / "web"
# Served by Playwright's router, never by a network listener: no port, no relay, no file:// quirks.
# localhost is a secure context, as the real client's origin is.
ORIGIN = "http://localhost"
PAGE = b'<!doctype html><meta charset="utf-8"><title>bench</title><script type="module" src="/bench.mjs"></script>'
WARMUP_MESSAGES = 100  # per implementation, before the timed runs: V8's JIT and Python's caches warm up
SMOKE_MESSAGES = 5


class BenchUnavailableError(RuntimeError):
    """A tool the browser half needs (node, web/node_modules, playwright, chromium) is missing."""


def chromium_path() -> str:
    """The system's chromium, by the rule tests/web/conftest.py uses (``TETHERLESS_CHROMIUM`` first)."""
    return os.environ.get("TETHERLESS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def python_run(messages: int) -> tuple[float, float]:
    """Seconds to seal ``messages`` messages on a fresh session, then to open them in order."""
    alice, bob = _Device(), _Device()
    state_a, state_b = _established(alice, bob)
    ciphertexts: list[bytes] = []
    start = time.perf_counter()
    for _ in range(messages):
        state_a, ciphertext = _seal(state_a, bob)
        ciphertexts.append(ciphertext)
    sealed_at = time.perf_counter()
    body = None
    for ciphertext in ciphertexts:
        sealed = session.parse_inner(session.open_outer(ciphertext, bob.identity_private))
        if sealed is None:
            raise RuntimeError("a v1 payload where a v2 one was sealed")
        state_b, content = session.decrypt(state_b, sealed, entropy=_rand(), now_ms=0, skipped_ttl_ms=TTL_MS)
        body = content.body
    opened_at = time.perf_counter()
    if body != BODY:  # outside the timed part: a bench of a broken path measures nothing
        raise RuntimeError("the last message did not open to what was sealed")
    return sealed_at - start, opened_at - sealed_at


def bundle() -> bytes:
    """web/test/bench/bench.ts bundled by the locked esbuild (into a temporary directory, read back)."""
    node = shutil.which("node")
    if node is None or not (WEB / "node_modules").is_dir():
        raise BenchUnavailableError("node and web/node_modules are needed to build the page script (make web)")
    with tempfile.TemporaryDirectory(prefix="tetherless-bench-browser-") as out:
        cmd = [node, "test/bench/build.mjs", out]
        proc = subprocess.run(cmd, cwd=WEB, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise BenchUnavailableError(f"building the page script failed:\n{proc.stderr[-3000:]}")
        return (Path(out) / "bench.mjs").read_bytes()


@contextmanager
def bench_page(script: bytes) -> Iterator[tuple[Page, str]]:
    """A headless chromium page with ``globalThis.tetherlessBench`` loaded; yields (page, browser version)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise BenchUnavailableError("playwright is not installed (it is in requirements/dev.txt)") from error
    executable = chromium_path()
    if not os.access(executable, os.X_OK):
        raise BenchUnavailableError(f"no chromium at {executable} (apt-get install chromium)")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

    def serve(route: Route) -> None:
        path = route.request.url.removeprefix(ORIGIN)
        if path == "/":
            route.fulfill(status=200, content_type="text/html; charset=utf-8", body=PAGE)
        elif path == "/bench.mjs":
            route.fulfill(status=200, content_type="text/javascript; charset=utf-8", body=script)
        else:
            route.fulfill(status=404, body=b"")

    # Chromium's sandbox cannot start as root (CI runs as root); as another user it stays on.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.route(f"{ORIGIN}/**", serve)
            page.goto(f"{ORIGIN}/")
            try:
                page.wait_for_function("globalThis.tetherlessBench !== undefined", timeout=60_000)
            except Exception as error:
                raise RuntimeError(f"the bench page did not load: {errors}") from error
            yield page, browser.version
        finally:
            browser.close()


def browser_run(page: Page, messages: int) -> tuple[float, float]:
    """Seconds to seal, then open, ``messages`` messages in the page (its own clock)."""
    result: dict[str, Any] = page.evaluate("(n) => globalThis.tetherlessBench.run(n)", messages)
    if result["messages"] != messages:
        raise RuntimeError(f"the page ran {result['messages']} messages, not {messages}")
    return float(result["seal_seconds"]), float(result["open_seconds"])


def _figures(timings: list[tuple[float, float]], messages: int) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for index, way in enumerate(("seal", "open")):
        seconds = [timing[index] for timing in timings]
        rates = [round(messages / s, 1) if s > 0 else float("inf") for s in seconds]
        figures[way] = {"messages_per_second": summary(rates), "runs": rates, "seconds": seconds}
    return figures


def run(messages: int, runs: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    script = bundle()
    py_timings: list[tuple[float, float]] = []
    web_timings: list[tuple[float, float]] = []
    with bench_page(script) as (page, version):
        user_agent: str = page.evaluate("navigator.userAgent")
        warmup = min(messages, WARMUP_MESSAGES)
        python_run(warmup)
        browser_run(page, warmup)
        for _ in range(runs):
            py_timings.append(python_run(messages))
            web_timings.append(browser_run(page, messages))
    python, browser = _figures(py_timings, messages), _figures(web_timings, messages)

    def ratio(way: str) -> float:
        web = browser[way]["messages_per_second"]["median"]
        return round(web / python[way]["messages_per_second"]["median"], 3)

    return {
        "kind": "browser",
        "machine": {**machine(), "chromium": version, "user_agent": user_agent},
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "pinned_cpu": os.sched_getaffinity(0) == {int(LOAD_CPU)},
        "messages": messages,
        "runs": runs,
        "body_bytes": len(BODY),
        "implementations": {"python": python, "browser": browser},
        "comparison": {"seal_browser_over_python": ratio("seal"), "open_browser_over_python": ratio("open")},
    }


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m bench.browser", description=doc.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000, help="messages sealed, then opened, per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help=f"1 run of {SMOKE_MESSAGES} messages (harness check only)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-pin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.runs < 1:
        parser.error("--messages and --runs must be at least 1")
    command = [sys.executable, "-m", "bench.browser", "--no-pin", *(argv if argv is not None else sys.argv[1:])]
    if not args.no_pin and not args.smoke and pinned(command, LOAD_CPU) != command:
        return subprocess.run(pinned(command, LOAD_CPU), check=False).returncode
    messages, runs = (SMOKE_MESSAGES, 1) if args.smoke else (args.messages, args.runs)
    try:
        report = run(messages, runs)
    except BenchUnavailableError as error:
        print(f"bench.browser: {error}", file=sys.stderr)
        return 2
    out = args.out or Path(__file__).resolve().parent / "results" / time.strftime(
        "browser-%Y%m%dT%H%M%SZ.json", time.gmtime()
    )
    path = write_results(report, out)
    impls = report["implementations"]
    print(f"{'implementation':<16} {'seal msg/s':>12} {'open msg/s':>12}   ({messages} messages, median of {runs})")
    for name, figures in impls.items():
        seal, opened = (figures[way]["messages_per_second"]["median"] for way in ("seal", "open"))
        print(f"{name:<16} {seal:>12.0f} {opened:>12.0f}")
    print(f"browser/python: {report['comparison']}  load average: {report['load_average']}")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
