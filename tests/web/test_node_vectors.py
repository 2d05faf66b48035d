"""The browser client's protocol code (web/, TypeScript) against the shared vectors, and its committed build.

``npm test`` in web/ type-checks the TypeScript, compiles the tests and runs them with Node's test
runner over protocol/vectors/*.json (the same files tests/protocol/ checks the Python code against).
``npm run build`` into a temporary directory must reproduce the committed web/dist/ byte for byte: a
user's machine may have no Node, so the built assets are committed, and a stale or hand-edited build
fails here.

Needs node and npm: skipped without them, a failure under ``CI=true``. ``npm ci`` runs only when
web/node_modules is missing or older than web/package-lock.json.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[2] / "web"
DIST = WEB / "dist"
# npm keeps a copy of the lock file it installed from here; its age tells whether node_modules is current.
INSTALLED_LOCK = WEB / "node_modules" / ".package-lock.json"
NPM_TIMEOUT_SECONDS = 600
_NPM_ENV = {"npm_config_fund": "false", "npm_config_audit": "false", "npm_config_update_notifier": "false"}


def _npm() -> str:
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        message = "node and npm are not installed (the browser client's vector tests need them)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI must have them")
        pytest.skip(message)
    return npm


def _run(args: list[str], what: str) -> str:
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


def _installed_is_current() -> bool:
    lock = WEB / "package-lock.json"
    return INSTALLED_LOCK.exists() and INSTALLED_LOCK.stat().st_mtime >= lock.stat().st_mtime


@pytest.fixture(scope="module")
def npm() -> str:
    """npm, with web/node_modules installed from the lock file (once, also across xdist workers)."""
    npm = _npm()
    (WEB / "build").mkdir(exist_ok=True)
    with (WEB / "build" / ".npm-ci.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two workers must not run `npm ci` into one directory at once
        if not _installed_is_current():
            _run([npm, "ci", "--no-audit", "--no-fund"], "npm ci")
    return npm


def test_typescript_passes_the_shared_vectors(npm: str) -> None:
    output = _run([npm, "test", "--silent"], "npm test (web/: tsc, then node --test over protocol/vectors)")
    # The spec reporter ends with "<info sign> tests N ... fail 0" lines: a run that found no tests must not pass.
    summary = dict(re.findall(r"^\S+ (tests|pass|fail) (\d+)$", output, re.MULTILINE))
    assert int(summary.get("tests", "0")) > 0, output[-3000:]
    assert summary.get("fail") == "0", output[-3000:]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_reproduces_the_committed_dist(npm: str, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    _run([npm, "run", "--silent", "build", "--", str(out)], "npm run build")
    built, committed = _files(out), _files(DIST)
    assert built.keys() == committed.keys(), (
        f"web/dist/ files differ from a fresh build: {sorted(built)} vs {sorted(committed)}"
    )
    stale = [name for name in built if built[name] != committed[name]]
    assert not stale, f"web/dist/ is not what `npm run build` makes from these sources: {stale} (run `make web`)"
