"""Migration 0008 (compact inbox and idempotency rows) upgrades a database written by the previous schema.

The database is built with the migrations before 0008 (whichever exist: the
test does not depend on 0007's content), filled with raw SQL in the old shape
— envelopes in flight, one acknowledged above them, live and expired
idempotency keys — then opened by the current store, which applies 0008.
Nothing in flight may be lost: every envelope reads back at its old cursor,
a retry of a live key answers the original result, a reused key is still a
conflict, and new cursors continue above every one handed out before.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from protocol.errors import ErrorCode, TetherlessError
from relay.store import StoredEnvelope
from relay.store import sqlite as sqlite_backend
from relay.store.base import InboxRecord
from relay.store.inbox_rules import FORGET_BUCKET_MS
from relay.store.sqlite import DB_FILE, _connect
from tests.relay.store.old_schema import postgres_before, sqlite_before
from tests.relay.store.postgres_db import fresh_database
from tests.relay.store.test_store_contract import MAX_INBOX, Backend, device, envelope, open_store

SENDER = "s" * 32
ALICE, BOB = device(1), device(2)
NOW = 10 * FORGET_BUCKET_MS
LATER = 1_000 * FORGET_BUCKET_MS
# Rows of the old ``envelopes`` table: (seq, recipient, envelope_id, sent_at_ms, expires_at_ms, ciphertext).
OLD_ENVELOPES = [
    (1, ALICE.device_id, b"A" * 16, NOW - 3, LATER, b"to alice 1"),
    (2, BOB.device_id, b"B" * 16, NOW - 2, LATER, b"to bob"),
    (3, ALICE.device_id, b"C" * 16, NOW - 1, LATER, b"to alice 2"),
]
ACKED_SEQ = 4  # handed out, then acknowledged: never to be reused
LIVE_KEY, EXPIRED_KEY = b"live-key-1", b"old-key-01"
LIVE_DIGEST = LIVE_KEY[:4] + b"ct"  # what tests' envelope() computes for body b"ct"


def _old_rows(placeholder: str) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements that write the old-shape data (``?`` or ``%s`` placeholders)."""

    def q(sql: str) -> str:
        return sql.replace("?", placeholder)

    rows: list[tuple[str, tuple[Any, ...]]] = [
        (q("INSERT INTO accounts (account_id, created_at_ms, list_version) VALUES (?, 1, 1)"), (ALICE.account_id,))
    ]
    for dev, queued in ((ALICE, 2), (BOB, 1)):
        rows.append(
            (
                q(
                    "INSERT INTO devices (device_id, account_id, sign_key, box_key, created_at_ms, queued)"
                    " VALUES (?, ?, ?, ?, 1, ?)"
                ),
                (dev.device_id, dev.account_id, dev.sign_key, dev.box_key, queued),
            )
        )
    for row in OLD_ENVELOPES:
        rows.append(
            (
                q(
                    "INSERT INTO envelopes (seq, recipient, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                ),
                row,
            )
        )
    for key, digest, forget_at in ((LIVE_KEY, LIVE_DIGEST, LATER), (EXPIRED_KEY, b"d" * 16, NOW - 1)):
        rows.append(
            (
                q(
                    "INSERT INTO idempotency (sender, idem_key, envelope_id, digest, sent_at_ms, forget_at_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                ),
                (SENDER, key, b"A" * 16, digest, NOW - 3, forget_at),
            )
        )
    return rows


def write_old_sqlite(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = sqlite_before(directory, 8, monkeypatch)
    with conn:
        for sql, params in _old_rows("?"):
            conn.execute(sql, params)
        # The acknowledged newest envelope: its seq was handed out, then the row deleted.
        conn.execute(
            "INSERT INTO envelopes (seq, recipient, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
            " VALUES (?, ?, ?, 1, ?, ?)",
            (ACKED_SEQ, ALICE.device_id, b"D" * 16, LATER, b"acked"),
        )
        conn.execute("DELETE FROM envelopes WHERE seq = ?", (ACKED_SEQ,))
    conn.close()


def write_old_postgres(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    postgres_before(url, 8, monkeypatch)
    with psycopg.connect(url) as conn:
        for sql, params in _old_rows("%s"):
            conn.execute(sql, params)
        # PostgreSQL takes cursors from devices.last_seq (per device): Alice's counter is past the acked one.
        conn.execute("UPDATE devices SET last_seq = %s WHERE device_id = %s", (ACKED_SEQ, ALICE.device_id))
        conn.execute("UPDATE devices SET last_seq = 2 WHERE device_id = %s", (BOB.device_id,))


@pytest.fixture(params=["sqlite", "postgres"])
def old_database(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """A database written by the schema before 0008, not yet upgraded."""
    if request.param == "sqlite":
        write_old_sqlite(tmp_path, monkeypatch)
        yield Backend("sqlite")
    else:
        with fresh_database() as url:
            write_old_postgres(url, monkeypatch)
            yield Backend("postgres", url)


def records(seq_and_rows: list[tuple[int, str, bytes, int, int, bytes]], who: str) -> list[InboxRecord]:
    return [InboxRecord(seq, env_id, sent, exp, ct) for seq, dev, env_id, sent, exp, ct in seq_and_rows if dev == who]


async def test_upgrade_keeps_envelopes_in_flight_and_their_cursors(old_database: Backend, tmp_path: Path) -> None:
    async with open_store(old_database, tmp_path) as store:
        assert await store.read_inbox(ALICE.device_id, 0, 10, NOW) == records(OLD_ENVELOPES, ALICE.device_id)
        assert await store.read_inbox(BOB.device_id, 0, 10, NOW) == records(OLD_ENVELOPES, BOB.device_id)
        assert await store.read_inbox(ALICE.device_id, 1, 10, NOW) == records(OLD_ENVELOPES[2:], ALICE.device_id)
        # A new envelope sorts after every cursor handed out before the upgrade, the acknowledged one too.
        await store.store_envelopes(SENDER, [envelope(ALICE, b"new-key-1")], NOW, MAX_INBOX, LATER)
        fresh = await store.read_inbox(ALICE.device_id, 3, 10, NOW)
        assert len(fresh) == 1
        assert fresh[0].cursor > ACKED_SEQ
        # Quotas and acknowledgement still count the migrated rows.
        assert await store.acknowledge(ALICE.device_id, 3, []) == 2
        assert await store.read_inbox(ALICE.device_id, 0, 10, NOW) == fresh


async def test_upgrade_keeps_live_idempotency_keys(old_database: Backend, tmp_path: Path) -> None:
    async with open_store(old_database, tmp_path) as store:
        retry = await store.store_envelopes(SENDER, [envelope(ALICE, LIVE_KEY)], NOW + 5, MAX_INBOX, LATER)
        assert retry == [StoredEnvelope(b"A" * 16, NOW - 3, True, ALICE.device_id)]
        assert len(await store.read_inbox(ALICE.device_id, 0, 10, NOW)) == 2  # nothing stored again
        with pytest.raises(TetherlessError) as refused:
            await store.store_envelopes(SENDER, [envelope(ALICE, LIVE_KEY, b"another body")], NOW + 6, MAX_INBOX, LATER)
        assert refused.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
        # Another sender's key space is its own.
        other = await store.store_envelopes("t" * 32, [envelope(ALICE, LIVE_KEY)], NOW + 7, MAX_INBOX, LATER)
        assert other[0].duplicate is False


async def test_upgrade_then_expiry_forgets_only_keys_past_their_time(old_database: Backend, tmp_path: Path) -> None:
    async with open_store(old_database, tmp_path) as store:
        report = await store.expire(NOW)
        assert report.idempotency_keys == 1  # the expired key; the live one stays
        again = await store.store_envelopes(SENDER, [envelope(ALICE, EXPIRED_KEY)], NOW + 1, MAX_INBOX, LATER)
        assert again[0].duplicate is False
        retry = await store.store_envelopes(SENDER, [envelope(ALICE, LIVE_KEY)], NOW + 2, MAX_INBOX, LATER)
        assert retry[0].duplicate is True


async def test_a_device_row_written_by_hand_after_the_upgrade_gets_a_number(
    old_database: Backend, tmp_path: Path
) -> None:
    carol = device(3)
    async with open_store(old_database, tmp_path) as store:
        await store.read_inbox(ALICE.device_id, 0, 1, NOW)  # the store is open: 0008 is applied
    sql = (
        "INSERT INTO devices (device_id, account_id, sign_key, box_key, created_at_ms) VALUES (?, ?, ?, ?, 1)",
        (carol.device_id, carol.account_id, carol.sign_key, carol.box_key),
    )
    if old_database.name == "sqlite":
        with sqlite3.connect(tmp_path / DB_FILE) as conn:
            conn.execute(*sql)
    else:
        with psycopg.connect(old_database.url) as pg:
            pg.execute(sql[0].replace("?", "%s"), sql[1])
    async with open_store(old_database, tmp_path) as store:
        await store.store_envelopes(SENDER, [envelope(carol, b"to-carol-1")], NOW, MAX_INBOX, LATER)
        assert [r.ciphertext for r in await store.read_inbox(carol.device_id, 0, 10, NOW)] == [b"ct"]
        assert len(await store.read_inbox(ALICE.device_id, 0, 10, NOW)) == 2  # not mixed up with another inbox


def test_sqlite_upgrade_leaves_no_old_table_and_a_readable_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_old_sqlite(tmp_path, monkeypatch)
    conn = _connect(tmp_path / DB_FILE, 8)
    sqlite_backend.migrate(conn)
    kinds = dict(conn.execute("SELECT name, type FROM sqlite_master WHERE name IN ('envelopes', 'idempotency')"))
    assert kinds == {"envelopes": "view"}
    rows = conn.execute("SELECT seq, recipient, envelope_id, sent_at_ms, expires_at_ms, ciphertext FROM envelopes")
    assert sorted(rows) == OLD_ENVELOPES
    conn.close()
    assert isinstance(conn, sqlite3.Connection)
