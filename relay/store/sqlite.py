"""SQLite store for personal relays: WAL, ``synchronous=FULL``, one writer with group commit.

Writes go to one writer thread that owns the only write connection. It takes
every operation waiting in its queue (up to ``group_commit_max_ops``), runs
them in one transaction — each inside its own SAVEPOINT, so one failing
operation rolls back alone — commits once, and only then releases every
waiter. Under load many requests share one fsync; alone, a write costs one
commit as usual. Reads run on a small pool of reader connections in worker
threads. The trio loop never touches a connection.

The SQL itself is in ``relay/store/sql/``, shared with PostgreSQL; the
little that differs is :data:`relay.store.engine.SQLITE`.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from relay import metrics

from .base import StartupRefusedError, StoreUnavailableError
from .engine import SQLITE
from .inbox_rules import COMPACT_SCHEMA, content_digest, key_hash
from .sql import identity
from .sql.inbox import QueueCounts
from .sql.store import SQLStore

log = logging.getLogger("relay.store")
T = TypeVar("T")
C = TypeVar("C", bound=sqlite3.Connection)
DB_FILE = "relay.sqlite3"


# The shared SQL uses DELETE … RETURNING (SQLite 3.35, 2021).
MIN_SQLITE_VERSION = (3, 35, 0)


class _WriterConnection(sqlite3.Connection):
    """The writer's connection: it alone writes the file, so it keeps the inboxes' ``queued`` counts in memory
    (``sql/inbox.QueueCounts``; the writer tells them where its savepoints and transactions end)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue_counts = QueueCounts()


def _connect(path: Path, cache_mib: int) -> sqlite3.Connection:
    return _configure(_open(path, sqlite3.Connection), cache_mib)


def _connect_writer(path: Path, cache_mib: int) -> _WriterConnection:
    return _configure(_open(path, _WriterConnection), cache_mib)


def _open(path: Path, factory: type[C]) -> C:
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        raise StoreUnavailableError(f"SQLite {sqlite3.sqlite_version} is too old (3.35 or newer is needed)")
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0, factory=factory)


def _configure(conn: C, cache_mib: int) -> C:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA cache_size={-cache_mib * 1024}")
    conn.execute("PRAGMA temp_store=MEMORY")
    # Checkpoint every ~40 MB of WAL instead of ~4 MB: inbox index pages are
    # rewritten by many commits between checkpoints, so each is copied back
    # once, not ten times (raw batched inserts +17 %, docs/performance.md).
    conn.execute("PRAGMA wal_autocheckpoint=10000")
    # An acknowledgement leaves a tombstone with the envelope's digest (Engine.content_digest, migration 0009).
    conn.create_function("tetherless_content_digest", 1, content_digest, deterministic=True)
    return conn


def migrations() -> list[tuple[int, str]]:
    """Numbered migrations shipped with the package, in order."""
    found = []
    for entry in resources.files("relay.store.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def migrate(conn: sqlite3.Connection) -> list[int]:
    """Apply every migration not applied yet, each in its own transaction. Returns the versions applied."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at_ms INTEGER)")
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    # Migration 0008 rekeys idempotency rows by the hash the code uses; SQLite has no SHA-256 in SQL.
    conn.create_function("tetherless_key_hash", 2, key_hash, deterministic=True)
    applied = []
    for version, sql in migrations():
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(sql):
                conn.execute(statement)
            identity.raise_floor(conn, SQLITE, sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (?, ?)",
                (version, int(time.time() * 1000)),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied


def _split_sql(sql: str) -> list[str]:
    """The statements of a migration file; a ``CREATE TRIGGER … BEGIN …; END`` stays one statement."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    statements, pending = [], ""
    for part in "\n".join(lines).split(";"):
        pending = f"{pending};{part}" if pending else part
        text = pending.strip()
        if text.upper().startswith("CREATE TRIGGER") and not text.upper().endswith("END"):
            continue  # the semicolon ended a statement inside the trigger's body
        if text:
            statements.append(text)
        pending = ""
    return statements


@dataclass(eq=False)
class _WriteOp(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    token: trio.lowlevel.TrioToken
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None


class _Writer:
    """The single writer thread and its queue."""

    def __init__(self, conn: _WriterConnection, max_ops: int) -> None:
        self._conn = conn
        self._max_ops = max_ops
        self._queue: queue.SimpleQueue[_WriteOp[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tetherless-sqlite-writer", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def submit(self, op: _WriteOp[Any]) -> None:
        if self._closed:
            raise StoreUnavailableError("store is closed")
        metrics.store_write_queue.inc()
        self._queue.put(op)

    def stop(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_ops:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            metrics.store_write_queue.dec(len(batch))
            self._commit(batch)
        try:
            self._conn.queue_counts.save(self._conn)
        except sqlite3.Error as exc:  # the counts are loaded from the inbox at the next start anyway
            log.warning("could not save the inbox counts: %s", exc)
        self._conn.close()

    def _commit(self, batch: list[_WriteOp[Any]]) -> None:
        conn = self._conn
        counts = conn.queue_counts
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            counts.begin(conn.execute("PRAGMA data_version").fetchone()[0])
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    op.result = op.fn(conn)
                except Exception as exc:  # the op's own error: roll back this op only
                    conn.execute("ROLLBACK TO op")
                    counts.operation_failed()
                    op.error = exc
                else:
                    counts.operation_done()
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            counts.committed()
        except BaseException as exc:
            # Whatever ended the transaction early, the counts it changed are not what the file holds.
            counts.rolled_back()
            if not isinstance(exc, sqlite3.Error):
                raise
            log.error("group commit failed: %s", exc)
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for op in batch:
                if op.error is None:
                    op.error = StoreUnavailableError(f"commit failed: {exc}")
        metrics.store_commit_seconds.observe(time.perf_counter() - started)
        metrics.store_commit_ops.observe(len(batch))
        for op in batch:
            try:
                op.token.run_sync_soon(op.done.set)
            except trio.RunFinishedError:
                pass


class SQLiteStore(SQLStore):
    """The personal-relay store. Create with :meth:`open`; close with :meth:`close`.

    The ``Store`` methods and their SQL are in :class:`relay.store.sql.store.SQLStore`;
    this class runs them: writes on the group-commit writer, reads on the reader pool.
    """

    engine = SQLITE

    def __init__(self, path: Path, *, cache_mib: int = 64, readers: int = 4, group_commit_max_ops: int = 1000) -> None:
        self.path = path
        self._cache_mib = cache_mib
        self._reader_limiter = trio.CapacityLimiter(readers)
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self._reader_count = readers
        self._writer: _Writer | None = None
        self._max_ops = group_commit_max_ops

    @classmethod
    async def open(cls, data_dir: Path, **options: Any) -> SQLiteStore:
        """Open (creating and migrating as needed) the store under ``data_dir``."""
        store = cls(data_dir / DB_FILE, **options)
        await trio.to_thread.run_sync(store._open_sync)
        return store

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        conn = _connect_writer(self.path, self._cache_mib)
        applied = migrate(conn)
        if applied:
            log.info("applied migrations %s", applied)
        try:
            newer = identity.check_schema(conn, SQLITE, known=migrations()[-1][0])
        except StartupRefusedError:
            conn.close()
            raise
        if newer:
            log.warning("%s", newer)
        # Always true once 0009 is applied (its floor is 9: one process, no replica of an older version).
        self.compact_inbox = identity.code_floor(conn) >= COMPACT_SCHEMA
        self._writer = _Writer(conn, self._max_ops)
        self._writer.start()
        for _ in range(self._reader_count):
            reader = _connect(self.path, self._cache_mib)
            reader.execute("PRAGMA query_only=ON")
            self._all_readers.append(reader)
            self._readers.put(reader)

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            await trio.to_thread.run_sync(writer.stop)
        for reader in self._all_readers:
            reader.close()
        self._all_readers.clear()

    # -- plumbing ---------------------------------------------------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreUnavailableError("store is closed")
        op: _WriteOp[T] = _WriteOp(fn, trio.lowlevel.current_trio_token())
        self._writer.submit(op)
        await op.done.wait()
        if isinstance(op.error, sqlite3.Error):
            raise StoreUnavailableError(f"write failed: {op.error}") from op.error
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None:
            raise StoreUnavailableError("store is closed")

        def run() -> T:
            conn = self._readers.get()
            try:
                return fn(conn)
            finally:
                self._readers.put(conn)

        try:
            return await trio.to_thread.run_sync(run, limiter=self._reader_limiter)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"read failed: {exc}") from exc

    async def _snapshot(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def op(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        return await self._read(op)

    async def _watch(
        self,
        channel: str,
        notify: Callable[[str], None],
        task_status: trio.TaskStatus[None],
        listening: Callable[[bool], None] | None = None,
    ) -> None:
        """Sleep until cancelled: only this process writes the SQLite file, and it wakes its own streams (and
        clears its own session cache), so it hears everything (``listening(True)``) until the watch ends."""
        if self._writer is None:
            raise StoreUnavailableError("store is closed")
        if listening is not None:
            listening(True)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            if listening is not None:
                listening(False)

    # -- operations -------------------------------------------------------------------------

    async def backup(self, target: Path) -> None:
        """Copy the database to ``target`` with SQLite's online backup API (consistent while serving)."""

        def run() -> None:
            src = sqlite3.connect(self.path)
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
                src.close()

        await trio.to_thread.run_sync(run)
