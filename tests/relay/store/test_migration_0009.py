"""Migration 0009 (idempotency keys as pointers, tombstones, expiry by cursor range) upgrades a database
written by schema 0008 with messages in flight, on both engines, and loses none.

The database is built with the migrations before 0009 and filled with raw SQL in
0008's shape — envelopes in flight for two devices, one acknowledged above them,
live and expired idempotency keys — then opened by the current store. On
PostgreSQL it is opened twice: right after the (expand-only) migration, when the
code still writes 0008 rows for replicas of the previous version, and after the
floor reached the compact schema, as the contract step of a later release does.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.store import StoredEnvelope
from relay.store import postgres as postgres_backend
from relay.store import sqlite as sqlite_backend
from relay.store.base import InboxRecord
from relay.store.inbox_rules import COMPACT_SCHEMA, FORGET_BUCKET_MS, key_hash
from relay.store.sqlite import DB_FILE, _connect
from tests.relay.store.old_schema import postgres_before, sqlite_before
from tests.relay.store.postgres_db import fresh_database
from tests.relay.store.test_store_contract import MAX_INBOX, Backend, device, envelope, open_store, raise_code_floor

SENDER = "s" * 32
ALICE, BOB = device(1), device(2)
NOW = 10 * FORGET_BUCKET_MS
SOON = 20 * FORGET_BUCKET_MS  # the first envelope's expiry
LATER = 1_000 * FORGET_BUCKET_MS
# 0008 inbox rows: (seq, device, envelope_id, sent_at_ms, expires_at_ms, ciphertext).
IN_FLIGHT = [
    (1, ALICE, b"A" * 16, NOW - 3, SOON, b"to alice 1"),
    (2, BOB, b"B" * 16, NOW - 2, LATER, b"to bob"),
    (3, ALICE, b"C" * 16, NOW - 1, LATER, b"to alice 2"),
]
ACKED_SEQ = 4  # handed out, then acknowledged: never to be reused
LIVE_KEY, EXPIRED_KEY = b"live-key-1", b"old-key-01"


def _rows_0008(q: Any) -> list[tuple[str, tuple[Any, ...]]]:
    """Statements writing 0008-shape data; ``q`` adapts the placeholders. Devices are numbered 1, 2."""
    rows: list[tuple[str, tuple[Any, ...]]] = [
        (q("INSERT INTO accounts (account_id, created_at_ms, list_version) VALUES (?, 1, 1)"), (ALICE.account_id,))
    ]
    for no, dev, queued in ((1, ALICE, 2), (2, BOB, 1)):
        rows.append(
            (
                q(
                    "INSERT INTO devices (device_id, account_id, sign_key, box_key, created_at_ms, queued, device_no)"
                    " VALUES (?, ?, ?, ?, 1, ?, ?)"
                ),
                (dev.device_id, dev.account_id, dev.sign_key, dev.box_key, queued, no),
            )
        )
    for seq, dev, env_id, sent, expires, ct in IN_FLIGHT:
        rows.append(
            (
                q(
                    "INSERT INTO inbox (seq, recipient_no, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                ),
                (seq, 1 if dev is ALICE else 2, env_id, sent, expires, ct),
            )
        )
    # The tests' envelope() digest for body b"ct" is key[:4] + b"ct"; 0008 rows keep 8 bytes of it.
    for key, forget_hour in ((LIVE_KEY, LATER // FORGET_BUCKET_MS), (EXPIRED_KEY, NOW // FORGET_BUCKET_MS - 1)):
        rows.append(
            (
                q(
                    "INSERT INTO idempotency_keys (key_hash, envelope_id, digest, sent_at_ms, forget_hour)"
                    " VALUES (?, ?, ?, ?, ?)"
                ),
                (key_hash(SENDER, key), b"A" * 16, (key[:4] + b"ct")[:8], NOW - 3, forget_hour),
            )
        )
    return rows


def write_0008_sqlite(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = sqlite_before(directory, 9, monkeypatch)
    with conn:
        for sql, params in _rows_0008(lambda sql: sql):
            conn.execute(sql, params)
        conn.execute(
            "INSERT INTO inbox (seq, recipient_no, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
            " VALUES (?, 1, ?, 1, ?, ?)",
            (ACKED_SEQ, b"D" * 16, LATER, b"acked"),
        )
        conn.execute("DELETE FROM inbox WHERE seq = ?", (ACKED_SEQ,))
    conn.close()


def write_0008_postgres(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    postgres_before(url, 9, monkeypatch)
    with psycopg.connect(url) as conn:
        for sql, params in _rows_0008(lambda sql: sql.replace("?", "%s")):
            conn.execute(sql, params)
        conn.execute("UPDATE devices SET last_seq = %s WHERE device_id = %s", (ACKED_SEQ, ALICE.device_id))
        conn.execute("UPDATE devices SET last_seq = 2 WHERE device_id = %s", (BOB.device_id,))


@pytest.fixture(params=["sqlite", "postgres", "postgres-compact"])
def database_0008(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """A database written by schema 0008, not yet upgraded ("postgres-compact": upgraded, floor raised)."""
    if request.param == "sqlite":
        write_0008_sqlite(tmp_path, monkeypatch)
        yield Backend("sqlite")
        return
    with fresh_database() as url:
        write_0008_postgres(url, monkeypatch)
        if request.param == "postgres-compact":
            raise_code_floor(url, COMPACT_SCHEMA)
        yield Backend("postgres", url)


def records(who: Any) -> list[InboxRecord]:
    return [InboxRecord(seq, env_id, sent, exp, ct) for seq, dev, env_id, sent, exp, ct in IN_FLIGHT if dev is who]


async def test_envelopes_in_flight_keep_their_cursors_and_new_ones_sort_after(
    database_0008: Backend, tmp_path: Path
) -> None:
    async with open_store(database_0008, tmp_path) as store:
        assert await store.read_inbox(ALICE.device_id, 0, 10, NOW) == records(ALICE)
        assert await store.read_inbox(BOB.device_id, 0, 10, NOW) == records(BOB)
        await store.store_envelopes(SENDER, [envelope(ALICE, b"new-key-1")], NOW, MAX_INBOX, LATER)
        fresh = await store.read_inbox(ALICE.device_id, 3, 10, NOW)
        assert len(fresh) == 1
        assert fresh[0].cursor > ACKED_SEQ
        assert await store.acknowledge(ALICE.device_id, 3, []) == 2
        assert await store.read_inbox(ALICE.device_id, 0, 10, NOW) == fresh
        assert await store.read_inbox(BOB.device_id, 0, 10, NOW) == records(BOB)  # another inbox untouched


async def test_keys_written_by_0008_still_answer_and_new_keys_survive_acknowledgement(
    database_0008: Backend, tmp_path: Path
) -> None:
    async with open_store(database_0008, tmp_path) as store:
        retry = await store.store_envelopes(SENDER, [envelope(ALICE, LIVE_KEY)], NOW + 5, MAX_INBOX, LATER)
        assert retry == [StoredEnvelope(b"A" * 16, NOW - 3, True, ALICE.device_id)]
        with pytest.raises(TetherlessError) as refused:
            await store.store_envelopes(SENDER, [envelope(ALICE, LIVE_KEY, b"another body")], NOW + 6, MAX_INBOX, LATER)
        assert refused.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
        sent = await store.store_envelopes(SENDER, [envelope(BOB, b"after-the-upgrade")], NOW + 7, MAX_INBOX, LATER)
        newest = (await store.read_inbox(BOB.device_id, 0, 10, NOW))[-1].cursor
        assert await store.acknowledge(BOB.device_id, newest, []) == 2
        again = await store.store_envelopes(SENDER, [envelope(BOB, b"after-the-upgrade")], NOW + 8, MAX_INBOX, LATER)
        assert again == [StoredEnvelope(sent[0].envelope_id, NOW + 7, True, BOB.device_id)]
        assert await store.read_inbox(BOB.device_id, 0, 10, NOW) == []


async def test_expiry_after_the_upgrade_reaches_migrated_rows(database_0008: Backend, tmp_path: Path) -> None:
    async with open_store(database_0008, tmp_path) as store:
        report = await store.expire(SOON)
        assert report.envelopes == 1  # Alice's first envelope, found through the migrated expiry data
        assert report.idempotency_keys == 1  # the expired 0008 key; the live one stays
        assert await store.read_inbox(ALICE.device_id, 0, 10, NOW) == records(ALICE)[1:]
        again = await store.store_envelopes(SENDER, [envelope(ALICE, EXPIRED_KEY)], SOON, MAX_INBOX, LATER)
        assert again[0].duplicate is False
        retry = await store.store_envelopes(SENDER, [envelope(ALICE, LIVE_KEY)], SOON, MAX_INBOX, LATER)
        assert retry[0].duplicate is True
        # The migrated rows left expire; Bob's queued count comes back to zero (a full inbox would refuse).
        assert (await store.expire(LATER + 1)).envelopes == 2
        sent = await store.store_envelopes(
            SENDER, [envelope(BOB, b"q%07d" % i) for i in range(MAX_INBOX)], LATER + 2, MAX_INBOX, 2 * LATER
        )
        assert len(sent) == MAX_INBOX


def test_sqlite_upgrade_replaces_the_expiry_index_by_cursor_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_0008_sqlite(tmp_path, monkeypatch)
    conn = _connect(tmp_path / DB_FILE, 8)
    sqlite_backend.migrate(conn)
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'inbox'")}
    assert "inbox_expiry" not in indexes
    buckets = sorted(conn.execute("SELECT expiry_hour, first_seq, last_seq FROM inbox_expiry_buckets"))
    assert buckets == [(SOON // FORGET_BUCKET_MS, 1, 1), (LATER // FORGET_BUCKET_MS, 2, 3)]
    assert conn.execute("SELECT min_code_schema FROM schema_compat").fetchone()[0] == COMPACT_SCHEMA
    conn.close()
    assert isinstance(conn, sqlite3.Connection)


async def test_a_copy_into_postgresql_keeps_pointers_tombstones_and_the_compact_floor(tmp_path: Path) -> None:
    """``tetherless migrate --to postgres://…`` of a relay at 0009: the copy takes the SQLite floor (no replica
    of an older version runs on a new database), so its retries are answered from pointers and tombstones."""
    async with open_store(Backend("sqlite"), tmp_path) as store:
        await store.create_account(ALICE.account_id, ALICE, b"list", 1)
        acked = await store.store_envelopes(SENDER, [envelope(ALICE, b"acked-key")], NOW, MAX_INBOX, LATER)
        await store.acknowledge(ALICE.device_id, (await store.read_inbox(ALICE.device_id, 0, 1, NOW))[0].cursor, [])
        live = await store.store_envelopes(SENDER, [envelope(ALICE, b"live-key")], NOW + 1, MAX_INBOX, LATER)
    with fresh_database() as url:
        report = await trio.to_thread.run_sync(postgres_backend.copy_from_sqlite, tmp_path / DB_FILE, url)
        assert {t.table: t.rows for t in report}["idempotency_refs"] == 2
        async with open_store(Backend("postgres", url), tmp_path) as pg:
            assert getattr(pg, "compact_inbox", None) is True
            for key, first in ((b"acked-key", acked), (b"live-key", live)):
                retry = await pg.store_envelopes(SENDER, [envelope(ALICE, key)], NOW + 5, MAX_INBOX, LATER)
                assert retry == [StoredEnvelope(first[0].envelope_id, first[0].sent_at_ms, True, ALICE.device_id)]
            with pytest.raises(TetherlessError) as refused:
                await pg.store_envelopes(SENDER, [envelope(ALICE, b"acked-key", b"x")], NOW + 6, MAX_INBOX, LATER)
            assert refused.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
            assert [r.ciphertext for r in await pg.read_inbox(ALICE.device_id, 0, 10, NOW)] == [b"ct"]
