"""SQLStore is abstract: a backend must supply its five hooks, and both backends do."""

from __future__ import annotations

import pytest

from relay.store import PostgresStore, SQLiteStore
from relay.store.sql.store import SQLStore

HOOKS = {"_write", "_read", "_snapshot", "_watch", "close"}


def test_the_hooks_are_abstract_and_both_backends_supply_them() -> None:
    assert SQLStore.__abstractmethods__ == HOOKS
    assert not SQLiteStore.__abstractmethods__
    assert not PostgresStore.__abstractmethods__


def test_a_backend_missing_a_hook_cannot_be_made() -> None:
    class Incomplete(SQLStore):
        async def _write(self, fn):  # type: ignore[no-untyped-def]
            return fn(None)

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]
