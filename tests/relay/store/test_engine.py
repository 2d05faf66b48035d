"""The engine abstraction on real SQLite and PostgreSQL, and the races only PostgreSQL replicas can run into."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from relay.store import ReceivedEnvelope, ReceivedOutcome, StoredEnvelope, StoreUnavailableError
from relay.store.engine import POSTGRES, SQLITE, Engine
from relay.store.inbox_rules import forget_bucket, key_hash, stored_digest
from relay.store.postgres import migrate as migrate_postgres
from relay.store.sqlite import _connect
from relay.store.sqlite import migrate as migrate_sqlite
from tests.relay.store.postgres_db import fresh_database
from tests.relay.store.test_store_contract import (
    FOREVER,
    MAX_INBOX,
    Backend,
    device,
    envelope,
    open_store,
    with_devices,
)

PEER_COLUMNS = (("peer", "text"), ("failures", "int"))


@contextmanager
def engine_connection(name: str, tmp_path: Path) -> Iterator[tuple[Engine, Any]]:
    """A migrated database of either engine and a connection in autocommit mode."""
    if name == "postgres":
        with fresh_database() as url, psycopg.connect(url, autocommit=True) as pg:
            migrate_postgres(pg)
            yield POSTGRES, pg
    else:
        conn = _connect(tmp_path / "engine.sqlite3", 8)
        try:
            migrate_sqlite(conn)
            yield SQLITE, conn
        finally:
            conn.close()


@pytest.mark.parametrize("name", ["sqlite", "postgres"])
def test_bulk_writes_and_sets_of_values_beyond_one_sqlite_statement(name: str, tmp_path: Path) -> None:
    with engine_connection(name, tmp_path) as (e, conn):
        peers = [f"peer-{i:04d}" for i in range(1200)]  # more than one IN list (500) on SQLite
        assert e.insert_many(conn, "federation_peers", PEER_COLUMNS, [(p, 1) for p in peers[:1000]]) == 1000
        again = [(p, 2) for p in peers[900:]]  # 100 stored, 200 new
        assert e.insert_many(conn, "federation_peers", PEER_COLUMNS, again, on_conflict="ON CONFLICT DO NOTHING") == 200
        e.update_many(conn, "federation_peers", ("peer", "text"), (("failures", "int"),), [(p, 7) for p in peers[::2]])
        rows = e.fetch_in(conn, "SELECT peer, failures FROM federation_peers WHERE {one_of}", (), "peer", peers, "text")
        assert sorted(rows) == [(p, 7 if i % 2 == 0 else 1 if i < 1000 else 2) for i, p in enumerate(peers)]
        assert e.fetch_in(conn, "SELECT peer FROM federation_peers WHERE {one_of}", (), "peer", [], "text") == []
        deleted = e.execute_in(
            conn, "DELETE FROM federation_peers WHERE failures = ? AND {one_of}", (7,), "peer", peers, "text"
        )
        assert deleted == 600
        assert conn.execute("SELECT count(*) FROM federation_peers").fetchone()[0] == 600


@pytest.mark.parametrize("name", ["sqlite", "postgres"])
def test_rows_inserted_together_take_serial_values_in_list_order(name: str, tmp_path: Path) -> None:
    with engine_connection(name, tmp_path) as (e, conn):
        columns = (
            ("peer", "text"),
            ("envelope_id", "bytea"),
            ("recipient", "text"),
            ("sent_at_ms", "bigint"),
            ("expires_at_ms", "bigint"),
            ("ciphertext", "bytea"),
        )
        ids = [bytes([i]) * 16 for i in (9, 3, 7, 1)]
        e.insert_many(conn, "federation_outbox", columns, [("p", i, "r", 1, 2, b"c") for i in ids])
        stored = conn.execute("SELECT envelope_id FROM federation_outbox ORDER BY seq").fetchall()
        assert [bytes(row[0]) for row in stored] == ids


# -- PostgreSQL replicas: a race the row locks do not cover is retried, never answered wrongly ---------


def waiting_on_a_lock(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE NOT l.granted AND a.datname = current_database()"
        ).fetchone()
        return bool(row and row[0])


async def race(url: str, winner_sql: str, winner_params: tuple[Any, ...], loser: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``loser`` while another transaction holds an uncommitted ``winner_sql``; commit it once ``loser``
    waits on its row (so ``loser`` read before the commit and writes after it). Returns ``loser``'s result."""
    results: list[Any] = []

    async def run_loser() -> None:
        results.append(await loser())

    with psycopg.connect(url) as winner:  # a transaction until commit()
        winner.execute(winner_sql, winner_params)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_loser)
            # Polling the server's lock table: there is no event to wait on across processes.
            while not await trio.to_thread.run_sync(waiting_on_a_lock, url):  # noqa: ASYNC110
                await trio.sleep(0.01)
            winner.commit()
    return results[0]


async def test_postgres_send_losing_an_idempotency_race_answers_the_winners_result(tmp_path: Path) -> None:
    with fresh_database() as url:
        async with open_store(Backend("postgres", url), tmp_path) as store:
            a = device(1)
            await with_devices(store, a)
            mine = envelope(a, b"raced-key")
            result = await race(
                url,
                "INSERT INTO idempotency_keys (key_hash, envelope_id, digest, sent_at_ms, forget_hour)"
                " VALUES (%s, %s, %s, %s, %s)",
                (key_hash("s", mine.idempotency_key), b"t" * 16, stored_digest(mine.digest), 4, forget_bucket(FOREVER)),
                lambda: store.store_envelopes("s", [mine], 5, MAX_INBOX, FOREVER),
            )
            assert result == [StoredEnvelope(b"t" * 16, 4, True, a.device_id)]
            assert await store.read_inbox(a.device_id, 0, 10, 0) == []  # nothing stored twice


async def test_postgres_delivery_losing_a_dedup_race_answers_duplicate(tmp_path: Path) -> None:
    with fresh_database() as url:
        async with open_store(Backend("postgres", url), tmp_path) as store:
            a = device(1)
            await with_devices(store, a)
            env = ReceivedEnvelope(b"o" * 16, a.device_id, a.account_id, b"l" * 16, FOREVER, b"ct")
            result = await race(
                url,
                "INSERT INTO federation_received (origin, envelope_id, forget_at_ms) VALUES (%s, %s, %s)",
                ("relay.example", env.origin_envelope_id, FOREVER),
                lambda: store.federation_store_received("relay.example", [env], 5, MAX_INBOX, FOREVER),
            )
            assert result == [(ReceivedOutcome.DUPLICATE, a.device_id)]
            assert await store.read_inbox(a.device_id, 0, 10, 0) == []


def test_sqlite_older_than_returning_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 34, 1))
    with pytest.raises(StoreUnavailableError, match=r"3\.35"):
        _connect(tmp_path / "old.sqlite3", 8)
