"""Throw-away PostgreSQL databases for tests.

The server comes from ``TETHERLESS_TEST_DATABASE`` (a role with CREATEDB).
When none is reachable the tests skip with a message — except in CI
(``CI=true``), where they fail: CI must not silently skip PostgreSQL.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

DEFAULT_URL = "postgresql://tetherless:tetherless@127.0.0.1:5432/tetherless"


def server_url() -> str:
    return os.environ.get("TETHERLESS_TEST_DATABASE") or DEFAULT_URL


@functools.cache
def _unreachable_reason() -> str | None:
    try:
        with psycopg.connect(server_url(), connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def require_server() -> str:
    """The server URL; skips (fails under CI=true) when no server is reachable."""
    reason = _unreachable_reason()
    if reason is not None:
        message = (
            f"PostgreSQL not reachable at TETHERLESS_TEST_DATABASE ({reason}); "
            "start one (see .ci/run) to run the PostgreSQL tests"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return server_url()


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@contextmanager
def fresh_database(prefix: str = "tl_test") -> Iterator[str]:
    """A new empty database (URL), dropped afterwards even if connections remain."""
    admin = require_server()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(admin, name)
    finally:
        drop_database(admin, name)


def drop_database(server_url: str, name: str, *, attempts: int = 20) -> None:
    """``DROP DATABASE … WITH (FORCE)``, retried while an autovacuum worker holds the database.

    FORCE terminates the other sessions, but a role without ``pg_signal_backend`` may not terminate an
    autovacuum worker (it has no role): PostgreSQL 15 answers InsufficientPrivilege. That worker finishes in
    moments, so retry briefly (seen on a loaded machine; .ci/run also grants ``pg_signal_backend``).
    """
    for attempt in range(attempts):
        try:
            with psycopg.connect(server_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.errors.InsufficientPrivilege:
            if attempt == attempts - 1:
                raise
            time.sleep(0.25)
