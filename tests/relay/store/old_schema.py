"""Databases at an earlier schema, for migration tests: migrated with the migrations below a version only."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.store import postgres as postgres_backend
from relay.store import sqlite as sqlite_backend
from relay.store.sqlite import DB_FILE, _connect


def _below(module: Any, version: int) -> Any:
    every = module.migrations()
    return lambda: [(number, sql) for number, sql in every if number < version]


def sqlite_before(directory: Path, version: int, monkeypatch: pytest.MonkeyPatch) -> sqlite3.Connection:
    """The relay's SQLite file in ``directory`` with the migrations before ``version``; an open connection."""
    with monkeypatch.context() as patch:
        patch.setattr(sqlite_backend, "migrations", _below(sqlite_backend, version))
        conn = _connect(directory / DB_FILE, 8)
        sqlite_backend.migrate(conn)
    return conn


def postgres_before(url: str, version: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PostgreSQL database at ``url`` with the migrations before ``version``."""
    with monkeypatch.context() as patch:
        patch.setattr(postgres_backend, "migrations", _below(postgres_backend, version))
        with psycopg.connect(url, autocommit=True) as conn:
            postgres_backend.migrate(conn)
