"""PostgreSQL store for organisation relays: several replicas share one database.

Every method runs its SQL in a worker thread (``trio.to_thread``, bounded by
a :class:`trio.CapacityLimiter` the size of the connection pool) on a
connection from a :class:`psycopg_pool.ConnectionPool`; the trio loop never
touches a connection. Each write method is one transaction with
``synchronous_commit=on``. Correctness between replicas comes from the
database alone — constraints, row locks and transactions, never an
in-process lock:

- idempotency: ``INSERT … ON CONFLICT DO NOTHING`` on the (sender, key)
  primary key, so concurrent identical retries store one envelope (the
  loser's transaction is retried and answers with the winner's result);
- cursors and quotas: a sender locks the recipients' ``devices`` rows
  (sorted, so batches never deadlock each other), takes the next cursor
  values from ``devices.last_seq`` and checks ``queued``, so writers to one
  inbox commit in cursor order and never exceed the quota
  (docs/decisions/0003-postgres-cursors.md);
- wake-ups: ``pg_notify('tetherless_inbox', device_id)`` inside the send
  transaction, delivered to every replica's listener only on commit.

The SQL is in ``relay/store/sql/``, shared with SQLite; the little that
differs is :data:`relay.store.engine.POSTGRES`. This module holds the
connection pool, transactions, the LISTEN side of wake-ups, migrations and
the copy from SQLite.

Deadlocks, serialisation failures and lost races the SQL detects
(:class:`~relay.store.engine.RetryTransaction`) are retried a few times; other database failures raise
:class:`StoreUnavailableError`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import psycopg.errors
import psycopg_pool
import trio

from protocol.errors import ErrorCode, TetherlessError

from .base import StoreUnavailableError
from .engine import INBOX_CHANNEL, POSTGRES, RetryTransaction
from .inbox_rules import COMPACT_SCHEMA
from .sql import identity
from .sql.store import SQLStore

log = logging.getLogger("relay.store")
T = TypeVar("T")

# pg_advisory_lock key held while migrating ("tetherls" in ASCII), so replicas starting together don't race.
MIGRATION_LOCK_KEY = 0x7465746865726C73
RETRIES = 5
LISTEN_POLL_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 5.0
# A listener only reads, so a peer that vanished without a reset would go unnoticed for as long as TCP keeps
# the socket: keepalive probes after 5 s of silence, 3 of them 2 s apart, notice it in about 11 s (a lost
# revocation listener must be noticed: docs/decisions/0013-revocation-across-replicas.md).
_LISTENER_CONNECTION: dict[str, Any] = {
    "autocommit": True,
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
}
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure, RetryTransaction)


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and messages)."""
    url = re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


# -- migrations -------------------------------------------------------------------------


def migrations() -> list[tuple[int, str]]:
    """PostgreSQL migrations shipped with the package (same version numbers as SQLite's), in order."""
    found = []
    for entry in resources.files("relay.store.migrations").joinpath("postgres").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Apply every migration not applied yet, each in its own transaction, under an advisory lock.

    ``conn`` must be in autocommit mode. Replicas starting at once wait for
    each other here; the loser finds everything applied. Returns the versions
    this call applied. Idempotent.
    """
    locked = conn.execute("SELECT pg_try_advisory_lock(%s::bigint)", (MIGRATION_LOCK_KEY,)).fetchone()
    if not (locked and locked[0]):
        log.warning("waiting for another replica to finish migrating the database")
        conn.execute("SELECT pg_advisory_lock(%s::bigint)", (MIGRATION_LOCK_KEY,))
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL)"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        applied = []
        for version, sql in migrations():
            if version in done:
                continue
            with conn.transaction():
                conn.execute(sql.encode())  # no parameters: several statements in one call
                identity.raise_floor(conn, POSTGRES, sql)
                conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (%s, %s)",
                    (version, int(time.time() * 1000)),
                )
            applied.append(version)
        newer = identity.check_schema(conn, POSTGRES, known=migrations()[-1][0])
        if newer:
            log.warning("%s", newer)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s::bigint)", (MIGRATION_LOCK_KEY,))


def migrate_url(url: str) -> list[int]:
    """Connect to ``url`` and :func:`migrate`. Raises :class:`StoreUnavailableError` (no password in it)."""
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            return migrate(conn)
    except psycopg.Error as exc:
        raise StoreUnavailableError(f"cannot migrate {redact_url(url)}: {exc}") from exc


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET synchronous_commit = on")


# -- the store ----------------------------------------------------------------------------


class PostgresStore(SQLStore):
    """The organisation-relay store. Create with :meth:`open`; close with :meth:`close`.

    The ``Store`` methods and their SQL are in :class:`relay.store.sql.store.SQLStore`;
    this class runs each in one transaction on a pooled connection.
    """

    engine = POSTGRES

    def __init__(self, url: str, *, pool_min: int = 2, pool_max: int = 10, pool_timeout_seconds: float = 10.0) -> None:
        self.url = url
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._pool_timeout = pool_timeout_seconds
        self._pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] | None = None
        self._limiter = trio.CapacityLimiter(pool_max)
        self._listeners: list[tuple[threading.Event, threading.Event]] = []  # (stop, done)
        self._listeners_lock = threading.Lock()

    @classmethod
    async def open(cls, url: str, **options: Any) -> PostgresStore:
        """Connect, apply migrations, and fill the pool.

        Raises :class:`StoreUnavailableError` (message without the password)
        when the database cannot be reached or migrated.
        """
        store = cls(url, **options)
        await trio.to_thread.run_sync(store._open_sync)
        return store

    def _open_sync(self) -> None:
        applied = migrate_url(self.url)
        if applied:
            log.info("applied PostgreSQL migrations %s to %s", applied, redact_url(self.url))
        try:
            pool: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
                self.url,
                min_size=self._pool_min,
                max_size=self._pool_max,
                kwargs={"autocommit": True, "connect_timeout": 10},
                configure=_configure,
                check=psycopg_pool.ConnectionPool.check_connection,
                timeout=self._pool_timeout,
                name="tetherless",
                open=False,
            )
            pool.open(wait=True, timeout=self._pool_timeout)
            # Read once: the floor reaches the compact schema by a contract migration, which replicas of this
            # version see at their next start (docs/decisions/0009-compact-idempotency.md).
            with pool.connection() as conn:
                self.compact_inbox = identity.code_floor(conn) >= COMPACT_SCHEMA
        except psycopg.Error as exc:
            raise StoreUnavailableError(f"cannot open {redact_url(self.url)}: {exc}") from exc
        self._pool = pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        with self._listeners_lock:
            listeners = list(self._listeners)
        for stop, _ in listeners:
            stop.set()

        def shut() -> None:
            for _, done in listeners:
                done.wait(timeout=5)
            if pool is not None:
                pool.close()

        await trio.to_thread.run_sync(shut)

    # -- plumbing ---------------------------------------------------------------------

    async def _run(self, fn: Callable[[psycopg.Connection[Any]], T], *, transaction: bool = True) -> T:
        """Run ``fn`` on a pooled connection in a worker thread, in one transaction unless told otherwise.

        Deadlocks and serialisation failures are retried (the transaction
        rolled back first). Cancellation abandons the wait; the thread
        finishes (committing or not) and returns its connection.
        """
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError("store is closed")

        def run() -> T:
            for attempt in range(RETRIES):
                try:
                    with pool.connection() as conn:
                        if not transaction:
                            return fn(conn)
                        with conn.transaction():
                            return fn(conn)
                except _RETRYABLE:
                    if attempt == RETRIES - 1:
                        raise
                    time.sleep(0.005 * 2**attempt)
            raise AssertionError("unreachable")

        try:
            return await trio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)
        except psycopg.DataError as exc:  # e.g. a NUL character in a text value: the input's fault
            raise TetherlessError(ErrorCode.INVALID_FIELD, "a value cannot be stored") from exc
        except psycopg.Error as exc:  # includes psycopg_pool.PoolTimeout / PoolClosed
            raise StoreUnavailableError(f"database error: {type(exc).__name__}: {exc}") from exc
        except RetryTransaction as exc:  # lost the same race RETRIES times: a transient overload
            raise StoreUnavailableError(f"database busy: {exc}") from exc

    async def _write(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        return await self._run(fn)

    async def _read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        return await self._run(fn, transaction=False)

    async def _snapshot(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        def op(conn: psycopg.Connection[Any]) -> T:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return fn(conn)

        return await self._run(op)

    # -- cross-replica wake-ups ---------------------------------------------------------------

    async def _watch(
        self,
        channel: str,
        notify: Callable[[str], None],
        task_status: trio.TaskStatus[None],
        listening: Callable[[bool], None] | None = None,
    ) -> None:
        """LISTEN on ``channel`` and call ``notify(payload)`` in the trio thread (see watch_inbox_commits);
        ``listening`` hears when notices can and cannot be lost (see watch_session_revocations)."""
        if self._pool is None:
            raise StoreUnavailableError("store is closed")
        token = trio.lowlevel.current_trio_token()
        stop, done = threading.Event(), threading.Event()
        with self._listeners_lock:
            self._listeners.append((stop, done))
        started = trio.Event()
        up, ended = False, False

        # In the trio thread. The listener thread is abandoned on cancellation and may still report after
        # the watch ended: nothing reaches the caller then, above all not a late "listening".
        def state(now_up: bool) -> None:
            nonlocal up
            if ended or now_up == up:
                return
            up = now_up
            if listening is not None:
                listening(now_up)
            if now_up:
                started.set()

        def notice(payload: str) -> None:
            if not ended:
                notify(payload)

        def deliver(item: str | bool) -> None:  # in the listener thread
            try:
                token.run_sync_soon(partial(state, item) if isinstance(item, bool) else partial(notice, item))
            except trio.RunFinishedError:
                stop.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        trio.to_thread.run_sync,
                        partial(self._listen, channel=channel),
                        deliver,
                        stop,
                        done,
                        abandon_on_cancel=True,
                    )
                )
                await started.wait()
                task_status.started()
        finally:
            stop.set()
            if up and listening is not None:
                listening(False)
            ended = True

    def _listen(
        self,
        deliver: Callable[[str | bool], None],
        stop: threading.Event,
        done: threading.Event,
        *,
        channel: str = INBOX_CHANNEL,
    ) -> None:
        """``deliver(payload)`` for each notice; ``deliver(True)`` once LISTEN is in effect (again), ``deliver(False)``
        when its connection failed after that (notices sent until the next ``True`` are lost). Blocking."""
        backoff = 0.1
        up = False
        try:
            while not stop.is_set():
                try:
                    with psycopg.connect(
                        self.url, **_LISTENER_CONNECTION, application_name=f"tetherless {channel}"
                    ) as conn:
                        conn.execute(f"LISTEN {channel}")
                        up = True
                        deliver(True)
                        backoff = 0.1
                        while not stop.is_set():
                            for note in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                                deliver(note.payload)
                except psycopg.Error as exc:
                    if up:
                        up = False
                        deliver(False)
                    log.warning("%s listener lost its connection (%s); reconnecting in %.1f s", channel, exc, backoff)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, RECONNECT_MAX_SECONDS)
        finally:
            done.set()
            with self._listeners_lock:
                self._listeners = [entry for entry in self._listeners if entry[1] is not done]


# -- copying a personal relay into PostgreSQL ------------------------------------------------

# Every table of a relay, with the columns both backends have (SQLite's column list).
TABLES: dict[str, tuple[str, ...]] = {
    "accounts": ("account_id", "created_at_ms", "list_version"),
    "device_lists": ("account_id", "version", "signed", "stored_at_ms"),
    "devices": (
        "device_id", "account_id", "sign_key", "box_key", "created_at_ms", "revoked_at_ms", "queued",
        "added_in_version", "revoked_in_version", "device_no",
    ),
    "challenges": ("nonce", "device_id", "expires_at_ms", "used_at_ms"),
    "sessions": ("token_hash", "device_id", "account_id", "created_at_ms", "expires_at_ms", "revoked_at_ms"),
    "inbox": ("seq", "recipient_no", "envelope_id", "sent_at_ms", "expires_at_ms", "ciphertext"),
    "idempotency_keys": ("key_hash", "envelope_id", "digest", "sent_at_ms", "forget_hour"),
    "idempotency_refs": ("key_hash", "recipient_no", "seq"),
    "federation_outbox": (
        "seq", "peer", "envelope_id", "recipient", "sent_at_ms", "expires_at_ms", "ciphertext", "attempts",
        "not_before_ms", "failed_at_ms", "failure",
    ),
    "federation_peers": (
        "peer", "failures", "next_attempt_at_ms", "last_attempt_at_ms", "last_success_at_ms", "last_error",
        "delivered",
    ),
    "federation_received": ("origin", "envelope_id", "forget_at_ms"),
    "federation_nonces": ("origin", "nonce", "forget_at_ms"),
    "relay_identity": ("id", "relay_name", "bound_at_ms"),
    "relay_key_ids": ("key_id", "status", "recorded_at_ms"),
    "log_heads": (
        "account_id", "head", "horizon", "bytes", "epoch", "epoch_device_list_version", "rekey_after_version",
        "retention_days", "retention_updated_at_ms", "snapshot_position",
    ),
    "log_records": (
        "account_id", "position", "record_id", "kind", "epoch", "committed_at_ms", "snapshot_id", "covers", "parts",
        "device_list_version", "size", "ciphertext",
    ),
    "webauthn_credentials": (
        "account_id", "credential_id", "public_key", "rp_id", "sign_count", "status", "registered_by",
        "registered_at_ms",
    ),
    "webauthn_registrations": ("challenge", "account_id", "device_id", "expires_at_ms", "used_at_ms"),
    "prekeys": ("device_id", "kind", "key_id", "public_key", "created_at_ms", "signature"),
    "prekey_ids": ("device_id", "kind", "max_key_id"),
    "prekey_claims": ("claimer_account", "device_id", "kind", "claimed_at_ms", "forget_at_ms"),
    "enrolments": (
        "lookup_id", "offer", "created_at_ms", "expires_at_ms", "forget_at_ms", "proposal", "proposer_device",
        "proposed_at_ms",
    ),
    # Blob metadata (migration 0011); the bytes stay where blob_storage keeps them (docs/blobs.md "Operations").
    "blob_uploads": (
        "upload_id", "account_id", "device_id", "length", "upload_offset", "sha256", "capability_hash",
        "storage_state", "lease_holder", "lease_until_ms", "created_at_ms", "expires_at_ms", "blob_id",
    ),
    "blobs": ("blob_id", "account_id", "sha256", "length", "storage_key", "created_at_ms", "expires_at_ms"),
    "blob_capabilities": ("blob_id", "capability_hash"),
    "blob_trash": ("storage_key", "storage_state", "queued_at_ms"),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class TableCopy:
    table: str
    rows: int
    checksum: str  # order-independent: sum of SHA-256 of each row, mod 2**256, hex


class MigrationError(Exception):
    """The copy cannot be made (target not empty, schema versions differ, verification failed)."""


def _row_digest(row: Iterable[object]) -> int:
    h = hashlib.sha256()
    for value in row:
        if value is None:
            h.update(b"N")
        elif isinstance(value, int):
            h.update(b"I%d;" % value)
        elif isinstance(value, str):
            data = value.encode()
            h.update(b"S%d:" % len(data) + data)
        elif isinstance(value, bytes | memoryview):
            data = bytes(value)
            h.update(b"B%d:" % len(data) + data)
        else:
            raise MigrationError(f"unexpected value type {type(value).__name__}")
    return int.from_bytes(h.digest(), "big")


def _checksum(rows: Iterable[Iterable[object]]) -> tuple[int, str]:
    count, total = 0, 0
    for row in rows:
        count += 1
        total = (total + _row_digest(row)) % 2**256
    return count, f"{total:064x}"


def copy_from_sqlite(sqlite_path: Path, url: str) -> list[TableCopy]:
    """Copy a personal relay's SQLite database into an empty PostgreSQL database, in one transaction.

    The relay must be stopped. Cursors stay valid: envelopes keep their
    ``seq``, and every device's counter starts above the highest cursor the
    SQLite relay ever handed out, so new envelopes sort after every cursor a
    client may hold. Verifies per-table row counts and checksums before
    committing. Raises :class:`MigrationError` (nothing committed) when the
    target holds data, the source schema differs, or verification fails;
    :class:`StoreUnavailableError` when a database cannot be used.
    """
    source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    try:
        source.execute("BEGIN")  # one read snapshot for the whole copy
        versions = [row[0] for row in source.execute("SELECT version FROM schema_migrations ORDER BY version")]
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            migrate(conn)
            target_versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
            if versions != target_versions:
                raise MigrationError(f"schema versions differ: SQLite {versions}, PostgreSQL {target_versions}")
            with conn.transaction():
                conn.execute("LOCK TABLE " + ", ".join(TABLES) + " IN EXCLUSIVE MODE")
                for table in TABLES:
                    if conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone():
                        raise MigrationError(f"target database is not empty (table {table} has rows)")
                report = []
                for table, columns in TABLES.items():
                    cols = ", ".join(columns)
                    with conn.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                        for row in source.execute(f"SELECT {cols} FROM {table}"):
                            copy.write_row(row)
                    want = _checksum(source.execute(f"SELECT {cols} FROM {table}"))
                    with conn.cursor(name=f"verify_{table}") as verify:
                        got = _checksum(verify.execute(f"SELECT {cols} FROM {table}"))
                    if want != got:
                        raise MigrationError(
                            f"{table}: copied {got[0]} rows (checksum {got[1][:16]}),"
                            f" expected {want[0]} (checksum {want[1][:16]})"
                        )
                    report.append(TableCopy(table, *want))
                high = source.execute(
                    "SELECT max(v) FROM (SELECT seq AS v FROM sqlite_sequence WHERE name = 'inbox'"
                    " UNION ALL SELECT max(seq) FROM inbox)"
                ).fetchone()
                conn.execute("UPDATE devices SET last_seq = %s", ((high[0] if high else None) or 0,))
                # SQLite's writer keeps the inboxes' queued counts in memory (sql/inbox.QueueCounts): the column
                # it copied is stale; PostgreSQL keeps it in the table, counted here from the rows copied.
                conn.execute(
                    "UPDATE devices SET queued ="
                    " (SELECT count(*) FROM inbox WHERE inbox.recipient_no = devices.device_no)"
                )
                # Devices keep their numbers (inbox rows name them); new ones are numbered above.
                conn.execute(
                    "SELECT setval(pg_get_serial_sequence('devices', 'device_no'),"
                    " (SELECT COALESCE(max(device_no), 0) + 1 FROM devices), false)"
                )
                # The copy holds tombstones and pointers (migration 0009): no replica of an older version may
                # run on it, so it takes the source's floor and with it the compact inbox.
                floor = source.execute("SELECT min_code_schema FROM schema_compat WHERE id = 1").fetchone()
                conn.execute(
                    "UPDATE schema_compat SET min_code_schema = greatest(min_code_schema, %s) WHERE id = 1",
                    (floor[0] if floor else 0,),
                )
                # Outbox rows keep their seq; new ones continue above them.
                conn.execute(
                    "SELECT setval(pg_get_serial_sequence('federation_outbox', 'seq'),"
                    " (SELECT COALESCE(max(seq), 0) + 1 FROM federation_outbox), false)"
                )
            return report
    except psycopg.Error as exc:
        raise StoreUnavailableError(f"{redact_url(url)}: {type(exc).__name__}: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreUnavailableError(f"{sqlite_path}: {exc}") from exc
    finally:
        source.close()
