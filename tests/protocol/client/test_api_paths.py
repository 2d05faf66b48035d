"""Relay route paths are written in one place: protocol/client/api.py (issue 14 point 1).

import-linter checks imports, not string contents, so this test reads the client's source instead: a string
literal (docstrings and comments excepted) that holds a relay path outside api.py fails it. A new request goes
into :class:`protocol.client.api.RelayApi` as a method; callers use ``client.api.<route>(…)``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PATH_MARKERS = ("/v1/", "/v1?", "/.well-known/", "/federation/v1")
#: The layer itself. http.py carries no route.
ALLOWED = {"protocol/client/api.py"}
#: Not migrated yet (helper E's engine split, issue 14): the lead moves these onto ``client.api`` and removes them
#: from this set. The test fails for any other file, and for a file here that no longer needs to be here.
PENDING: set[str] = set()


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string nodes that are docstrings (the first statement of a module, class or function)."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def route_literals(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every string literal in ``source`` that holds a relay path (f-strings included)."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    hits: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            if any(marker in text or text.startswith(marker.rstrip("/?")) for marker in PATH_MARKERS):
                hits.append((node.lineno, text))
    return hits


def _client_sources() -> list[Path]:
    return sorted([*(ROOT / "protocol" / "client").rglob("*.py"), *(ROOT / "tetherless_cli").rglob("*.py")])


def test_only_the_request_layer_writes_relay_paths() -> None:
    offenders: dict[str, list[tuple[int, str]]] = {}
    for path in _client_sources():
        name = path.relative_to(ROOT).as_posix()
        hits = route_literals(path.read_text(encoding="utf-8"))
        if hits and name not in ALLOWED:
            offenders[name] = hits
    unexpected = {name: hits for name, hits in offenders.items() if name not in PENDING}
    assert not unexpected, f"relay paths outside protocol/client/api.py (add a RelayApi method): {unexpected}"
    stale = PENDING - set(offenders)
    assert not stale, f"{sorted(stale)} no longer write relay paths: remove them from PENDING"


def test_the_scan_finds_paths_and_ignores_docstrings() -> None:
    source = '''"""GET /v1/inbox is documented here."""
def f(after):
    """POST /v1/messages too."""
    return client.get(f"/v1/log?after={after}"), "/.well-known/tetherless", "/v1/prekeys"
'''
    found = sorted(text for _, text in route_literals(source))
    assert found == ["/.well-known/tetherless", "/v1/log?after=", "/v1/prekeys"]
    assert route_literals((ROOT / "protocol" / "client" / "api.py").read_text(encoding="utf-8"))
