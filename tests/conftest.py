"""Shared test plumbing.

- ``async def test_*`` functions run under ``trio.run`` (no plugin needed).
- ``relay`` starts a real ``tetherless serve`` process on 127.0.0.1 (see tests/relay_process.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.relay_process import RelayProcess


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        funcargs = pyfuncitem.funcargs
        args = {name: funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        trio.run(functools.partial(pyfuncitem.obj, **args))
        return True
    return None


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    """A running relay with a fresh data directory; stopped (and checked for a clean exit) afterwards."""
    process = RelayProcess(tmp_path / "relay-data")
    process.start()
    try:
        yield process
    finally:
        process.stop()


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)
