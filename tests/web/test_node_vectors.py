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

import re
from pathlib import Path

from tests.web.support import WEB, run_in_web

DIST = WEB / "dist"


def test_typescript_passes_the_shared_vectors(npm: str) -> None:
    output = run_in_web([npm, "test", "--silent"], "npm test (web/: tsc, then node --test over protocol/vectors)")
    # The spec reporter ends with "<info sign> tests N ... fail 0" lines: a run that found no tests must not pass.
    summary = dict(re.findall(r"^\S+ (tests|pass|fail) (\d+)$", output, re.MULTILINE))
    assert int(summary.get("tests", "0")) > 0, output[-3000:]
    assert summary.get("fail") == "0", output[-3000:]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_reproduces_the_committed_dist(npm: str, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    run_in_web([npm, "run", "--silent", "build", "--", str(out)], "npm run build")
    built, committed = _files(out), _files(DIST)
    assert built.keys() == committed.keys(), (
        f"web/dist/ files differ from a fresh build: {sorted(built)} vs {sorted(committed)}"
    )
    stale = [name for name in built if built[name] != committed[name]]
    assert not stale, f"web/dist/ is not what `npm run build` makes from these sources: {stale} (run `make web`)"
