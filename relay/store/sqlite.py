"""SQLite store for personal relays: WAL, ``synchronous=FULL``, one writer with group commit.

Writes go to one writer thread that owns the only write connection. It takes
every operation waiting in its queue (up to ``group_commit_max_ops``), runs
them in one transaction — each inside its own SAVEPOINT, so one failing
operation rolls back alone — commits once, and only then releases every
waiter. Under load many requests share one fsync; alone, a write costs one
commit as usual. Reads run on a small pool of reader connections in worker
threads. The trio loop never touches a connection.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar

import trio

from protocol.errors import ErrorCode, TetherlessError
from relay import metrics

from . import devices_sql as devsql
from . import log_sql
from . import sqlite_federation as fed
from . import sqlite_prekeys as pk
from .base import (
    ChallengeOutcome,
    ClaimedBundle,
    ConsumedChallenge,
    DeviceListCommitted,
    DeviceListHead,
    DeviceListUpdate,
    DeviceRecord,
    DeviceStreamState,
    EnrolmentRecord,
    ExpiryReport,
    InboxRecord,
    LogAppendOutcome,
    LogPageRecord,
    LogRetentionRecord,
    LogSnapshotInfo,
    LogSweepReport,
    NewCredential,
    NewEnvelope,
    NewLogRecord,
    OutboxRecord,
    PeerState,
    PrekeyState,
    ReceivedEnvelope,
    ReceivedOutcome,
    SessionRecord,
    StoredCredential,
    StoredEnvelope,
    StoredPrekey,
    StoreUnavailableError,
)
from .sqlite_federation import expire_federation as _expire_federation
from .sqlite_federation import insert_outbox as _insert_outbox

log = logging.getLogger("relay.store")
T = TypeVar("T")
DB_FILE = "relay.sqlite3"


def _connect(path: Path, cache_mib: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA cache_size={-cache_mib * 1024}")
    conn.execute("PRAGMA temp_store=MEMORY")
    # Checkpoint every ~40 MB of WAL instead of ~4 MB: inbox index pages are
    # rewritten by many commits between checkpoints, so each is copied back
    # once, not ten times (raw batched inserts +17 %, docs/performance.md).
    conn.execute("PRAGMA wal_autocheckpoint=10000")
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
    applied = []
    for version, sql in migrations():
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split_sql(sql):
                conn.execute(statement)
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
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


@dataclass(eq=False)
class _WriteOp(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    token: trio.lowlevel.TrioToken
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None


class _Writer:
    """The single writer thread and its queue."""

    def __init__(self, conn: sqlite3.Connection, max_ops: int) -> None:
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
        self._conn.close()

    def _commit(self, batch: list[_WriteOp[Any]]) -> None:
        conn = self._conn
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    op.result = op.fn(conn)
                except Exception as exc:  # the op's own error: roll back this op only
                    conn.execute("ROLLBACK TO op")
                    op.error = exc
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
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


class SQLiteStore:
    """The personal-relay store. Create with :meth:`open`; close with :meth:`close`."""

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
        conn = _connect(self.path, self._cache_mib)
        applied = migrate(conn)
        if applied:
            log.info("applied migrations %s", applied)
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

    # -- accounts and devices ------------------------------------------------------------

    async def create_account(
        self, account_id: str, device: DeviceRecord, signed_device_list: bytes, now_ms: int
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            exists = conn.execute("SELECT 1 FROM accounts WHERE account_id = ?", (account_id,)).fetchone()
            if exists or conn.execute("SELECT 1 FROM devices WHERE device_id = ?", (device.device_id,)).fetchone():
                raise TetherlessError(ErrorCode.ACCOUNT_EXISTS, "an account with this genesis key exists")
            conn.execute(
                "INSERT INTO accounts (account_id, created_at_ms, list_version) VALUES (?, ?, 1)",
                (account_id, now_ms),
            )
            conn.execute(
                "INSERT INTO device_lists (account_id, version, signed, stored_at_ms) VALUES (?, 1, ?, ?)",
                (account_id, signed_device_list, now_ms),
            )
            conn.execute(
                "INSERT INTO devices (device_id, account_id, sign_key, box_key, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                (device.device_id, account_id, device.sign_key, device.box_key, now_ms),
            )

        await self._write(op)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        def op(conn: sqlite3.Connection) -> DeviceRecord | None:
            row = conn.execute(
                "SELECT device_id, account_id, sign_key, box_key, created_at_ms, revoked_at_ms"
                " FROM devices WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            return DeviceRecord(*row) if row else None

        return await self._read(op)

    async def get_device_lists(self, account_id: str) -> list[bytes] | None:
        def op(conn: sqlite3.Connection) -> list[bytes] | None:
            rows = conn.execute(
                "SELECT signed FROM device_lists WHERE account_id = ? ORDER BY version", (account_id,)
            ).fetchall()
            return [row[0] for row in rows] or None

        return await self._read(op)

    # -- authentication --------------------------------------------------------------

    async def put_challenge(self, nonce: bytes, device_id: str, expires_at_ms: int) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO challenges (nonce, device_id, expires_at_ms) VALUES (?, ?, ?)",
                (nonce, device_id, expires_at_ms),
            )
        )

    async def consume_challenge(self, nonce: bytes, device_id: str, now_ms: int) -> ConsumedChallenge:
        def op(conn: sqlite3.Connection) -> ConsumedChallenge:
            row = conn.execute(
                "SELECT device_id, expires_at_ms, used_at_ms FROM challenges WHERE nonce = ?", (nonce,)
            ).fetchone()
            if row is None or row[0] != device_id:
                return ConsumedChallenge(ChallengeOutcome.UNKNOWN)
            _, expires_at_ms, used_at_ms = row
            if used_at_ms is not None:
                return ConsumedChallenge(ChallengeOutcome.USED, expires_at_ms)
            conn.execute("UPDATE challenges SET used_at_ms = ? WHERE nonce = ?", (now_ms, nonce))
            if expires_at_ms <= now_ms:
                return ConsumedChallenge(ChallengeOutcome.EXPIRED, expires_at_ms)
            return ConsumedChallenge(ChallengeOutcome.OK, expires_at_ms)

        return await self._write(op)

    async def create_session(
        self, token_hash: bytes, device_id: str, account_id: str, created_at_ms: int, expires_at_ms: int
    ) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT INTO sessions (token_hash, device_id, account_id, created_at_ms, expires_at_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (token_hash, device_id, account_id, created_at_ms, expires_at_ms),
            )
        )

    async def get_session(self, token_hash: bytes) -> SessionRecord | None:
        def op(conn: sqlite3.Connection) -> SessionRecord | None:
            row = conn.execute(
                "SELECT device_id, account_id, expires_at_ms, revoked_at_ms FROM sessions WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            return SessionRecord(*row) if row else None

        return await self._read(op)

    async def revoke_sessions(self, device_id: str, token_hash: bytes | None, now_ms: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            if token_hash is None:
                cur = conn.execute(
                    "UPDATE sessions SET revoked_at_ms = ? WHERE device_id = ? AND revoked_at_ms IS NULL",
                    (now_ms, device_id),
                )
            else:
                cur = conn.execute(
                    "UPDATE sessions SET revoked_at_ms = ?"
                    " WHERE token_hash = ? AND device_id = ? AND revoked_at_ms IS NULL",
                    (now_ms, token_hash, device_id),
                )
            return cur.rowcount

        return await self._write(op)

    # -- inboxes ------------------------------------------------------------------------

    async def store_envelopes(
        self, sender_device: str, envelopes: Sequence[NewEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[StoredEnvelope]:
        def op(conn: sqlite3.Connection) -> list[StoredEnvelope]:
            results: list[StoredEnvelope] = []
            recipients: dict[str, int] = {}  # device -> queued count, as this batch changes it
            added: dict[str, int] = {}
            # Local rows are inserted with two executemany calls after the loop (one
            # statement per envelope cost more than SQLite's own work); ``pending``
            # stands in for them when a key repeats within this batch.
            envelope_rows: list[tuple[str, bytes, int, int, bytes]] = []
            idempotency_rows: list[tuple[str, bytes, bytes, bytes, int, int]] = []
            pending: dict[bytes, tuple[bytes, bytes, int]] = {}
            for env in envelopes:
                row = (
                    pending.get(env.idempotency_key)
                    or conn.execute(
                        "SELECT envelope_id, digest, sent_at_ms FROM idempotency WHERE sender = ? AND idem_key = ?",
                        (sender_device, env.idempotency_key),
                    ).fetchone()
                )
                if row is not None:
                    if row[1] != env.digest:
                        raise TetherlessError(
                            ErrorCode.IDEMPOTENCY_CONFLICT, "idempotency key already used for another envelope"
                        )
                    results.append(StoredEnvelope(row[0], row[2], True, env.recipient_device))
                    continue
                if env.remote_relay:
                    _insert_outbox(conn, sender_device, env, now_ms, forget_at_ms)
                    results.append(StoredEnvelope(env.envelope_id, now_ms, False, env.recipient_device))
                    continue
                queued = recipients.get(env.recipient_device)
                if queued is None:
                    dev = conn.execute(
                        "SELECT account_id, revoked_at_ms, queued FROM devices WHERE device_id = ?",
                        (env.recipient_device,),
                    ).fetchone()
                    if dev is None or dev[0] != env.recipient_account:
                        raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "no such device on this relay")
                    if dev[1] is not None:
                        raise TetherlessError(ErrorCode.RECIPIENT_REVOKED, "the recipient device was revoked")
                    queued = dev[2]
                if queued >= max_inbox:
                    raise TetherlessError(ErrorCode.INBOX_FULL, "the recipient's inbox is full")
                recipients[env.recipient_device] = queued + 1
                added[env.recipient_device] = added.get(env.recipient_device, 0) + 1
                envelope_rows.append((env.recipient_device, env.envelope_id, now_ms, env.expires_at_ms, env.ciphertext))
                idempotency_rows.append(
                    (sender_device, env.idempotency_key, env.envelope_id, env.digest, now_ms, forget_at_ms)
                )
                pending[env.idempotency_key] = (env.envelope_id, env.digest, now_ms)
                results.append(StoredEnvelope(env.envelope_id, now_ms, False, env.recipient_device))
            # In list order, so cursors follow the order of the request.
            conn.executemany(
                "INSERT INTO envelopes (recipient, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
                " VALUES (?, ?, ?, ?, ?)",
                envelope_rows,
            )
            conn.executemany(
                "INSERT INTO idempotency (sender, idem_key, envelope_id, digest, sent_at_ms, forget_at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                idempotency_rows,
            )
            conn.executemany(
                "UPDATE devices SET queued = queued + ? WHERE device_id = ?", [(n, d) for d, n in added.items()]
            )
            return results

        return await self._write(op)

    async def read_inbox(self, device_id: str, after: int, limit: int, now_ms: int) -> list[InboxRecord]:
        def op(conn: sqlite3.Connection) -> list[InboxRecord]:
            rows = conn.execute(
                "SELECT seq, envelope_id, sent_at_ms, expires_at_ms, ciphertext FROM envelopes"
                " WHERE recipient = ? AND seq > ? AND expires_at_ms > ? ORDER BY seq LIMIT ?",
                (device_id, after, now_ms, limit),
            ).fetchall()
            return [InboxRecord(*row) for row in rows]

        return await self._read(op)

    async def acknowledge(self, device_id: str, up_to: int | None, envelope_ids: Sequence[bytes]) -> int:
        def op(conn: sqlite3.Connection) -> int:
            deleted = 0
            if up_to is not None:
                deleted += conn.execute(
                    "DELETE FROM envelopes WHERE recipient = ? AND seq <= ?", (device_id, up_to)
                ).rowcount
            for chunk_start in range(0, len(envelope_ids), 500):
                chunk = list(envelope_ids[chunk_start : chunk_start + 500])
                marks = ",".join("?" * len(chunk))
                deleted += conn.execute(
                    f"DELETE FROM envelopes WHERE recipient = ? AND envelope_id IN ({marks})", (device_id, *chunk)
                ).rowcount
            if deleted:
                conn.execute("UPDATE devices SET queued = MAX(queued - ?, 0) WHERE device_id = ?", (deleted, device_id))
            return deleted

        return await self._write(op)

    async def expire(self, now_ms: int) -> ExpiryReport:
        def op(conn: sqlite3.Connection) -> ExpiryReport:
            per_device = conn.execute(
                "SELECT recipient, count(*) FROM envelopes WHERE expires_at_ms <= ? GROUP BY recipient", (now_ms,)
            ).fetchall()
            envelopes = conn.execute("DELETE FROM envelopes WHERE expires_at_ms <= ?", (now_ms,)).rowcount
            conn.executemany(
                "UPDATE devices SET queued = MAX(queued - ?, 0) WHERE device_id = ?", [(n, d) for d, n in per_device]
            )
            challenges = conn.execute("DELETE FROM challenges WHERE expires_at_ms <= ?", (now_ms,)).rowcount
            sessions = conn.execute("DELETE FROM sessions WHERE expires_at_ms <= ?", (now_ms,)).rowcount
            keys = conn.execute("DELETE FROM idempotency WHERE forget_at_ms <= ?", (now_ms,)).rowcount
            federation = _expire_federation(conn, now_ms)
            challenges += devsql.expire_devices(conn, log_sql.SQLITE, now_ms)  # WebAuthn registration ceremonies
            enrolments = pk.expire_prekeys_and_enrolments(conn, now_ms)
            return ExpiryReport(envelopes, challenges, sessions, keys, federation, enrolments=enrolments)

        return await self._write(op)

    # -- federation (SQL in sqlite_federation.py) ------------------------------------------

    async def federation_due_peers(self, now_ms: int) -> list[PeerState]:
        return await self._read(partial(fed.due_peers, now_ms=now_ms))

    async def federation_outbox_batch(self, peer: str, now_ms: int, limit: int) -> list[OutboxRecord]:
        return await self._read(partial(fed.outbox_batch, peer=peer, now_ms=now_ms, limit=limit))

    async def federation_outbox_settle(
        self, peer: str, done: Sequence[int], deferred: Sequence[int], deferred_until_ms: int, now_ms: int
    ) -> None:
        await self._write(
            partial(
                fed.outbox_settle,
                peer=peer,
                done=done,
                deferred=deferred,
                deferred_until_ms=deferred_until_ms,
                now_ms=now_ms,
            )
        )

    async def federation_peer_failed(
        self, peer: str, error: str, failures: int, next_attempt_at_ms: int, now_ms: int
    ) -> None:
        await self._write(
            partial(
                fed.peer_failed,
                peer=peer,
                error=error,
                failures=failures,
                next_attempt_at_ms=next_attempt_at_ms,
                now_ms=now_ms,
            )
        )

    async def federation_peer_states(self) -> list[PeerState]:
        return await self._read(fed.peer_states)

    async def federation_retry_now(self, peer: str | None) -> int:
        return await self._write(partial(fed.retry_now, peer=peer))

    async def federation_remember_nonce(self, origin: str, nonce: str, forget_at_ms: int) -> bool:
        return await self._write(partial(fed.remember_nonce, origin=origin, nonce=nonce, forget_at_ms=forget_at_ms))

    async def federation_store_received(
        self, origin: str, envelopes: Sequence[ReceivedEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[tuple[ReceivedOutcome, str]]:
        return await self._write(
            partial(
                fed.store_received,
                origin=origin,
                envelopes=envelopes,
                now_ms=now_ms,
                max_inbox=max_inbox,
                forget_at_ms=forget_at_ms,
            )
        )

    async def watch_inbox_commits(
        self, notify: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Sleep until cancelled: only this process writes the SQLite file, and it wakes its own streams."""
        if self._writer is None:
            raise StoreUnavailableError("store is closed")
        task_status.started()
        await trio.sleep_forever()

    # -- device lists v2, revocation, WebAuthn (SQL in devices_sql.py) ---------------------------

    async def get_device_list_head(self, account_id: str) -> DeviceListHead | None:
        return await self._read(partial(devsql.device_list_head, d=log_sql.SQLITE, account_id=account_id))

    async def append_device_list(self, update: DeviceListUpdate, now_ms: int) -> DeviceListCommitted:
        return await self._write(partial(devsql.append_device_list, d=log_sql.SQLITE, update=update, now_ms=now_ms))

    async def device_stream_state(self, device_id: str) -> DeviceStreamState | None:
        return await self._read(partial(devsql.device_stream_state, d=log_sql.SQLITE, device_id=device_id))

    async def put_webauthn_registration(
        self, challenge: bytes, account_id: str, device_id: str, expires_at_ms: int
    ) -> None:
        await self._write(
            partial(
                devsql.put_registration,
                d=log_sql.SQLITE,
                challenge=challenge,
                account_id=account_id,
                device_id=device_id,
                expires_at_ms=expires_at_ms,
            )
        )

    async def consume_webauthn_registration(
        self, challenge: bytes, account_id: str, device_id: str, now_ms: int
    ) -> ChallengeOutcome:
        return await self._write(
            partial(
                devsql.consume_registration,
                d=log_sql.SQLITE,
                challenge=challenge,
                account_id=account_id,
                device_id=device_id,
                now_ms=now_ms,
            )
        )

    async def put_webauthn_credential(
        self, account_id: str, device_id: str, credential: NewCredential, sign_count: int, now_ms: int
    ) -> None:
        await self._write(
            partial(
                devsql.put_credential,
                d=log_sql.SQLITE,
                account_id=account_id,
                device_id=device_id,
                credential=credential,
                sign_count=sign_count,
                now_ms=now_ms,
            )
        )

    async def get_webauthn_credentials(self, account_id: str) -> list[StoredCredential]:
        return await self._read(partial(devsql.credentials, d=log_sql.SQLITE, account_id=account_id))

    # -- account log (SQL in log_sql.py) ----------------------------------------------------

    async def _read_tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn`` in one read transaction (one snapshot of the database)."""

        def op(conn: sqlite3.Connection) -> T:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")

        return await self._read(op)

    async def append_log(
        self,
        account_id: str,
        records: Sequence[NewLogRecord],
        expected_head: int | None,
        now_ms: int,
        max_bytes: int,
    ) -> LogAppendOutcome:
        return await self._write(
            lambda conn: log_sql.append(conn, log_sql.SQLITE, account_id, records, expected_head, now_ms, max_bytes)
        )

    async def read_log(
        self, account_id: str, after: int, limit: int, max_bytes: int, full_parts: bool
    ) -> LogPageRecord:
        return await self._read_tx(
            lambda conn: log_sql.read(conn, log_sql.SQLITE, account_id, after, limit, max_bytes, full_parts)
        )

    async def log_snapshot(self, account_id: str) -> LogSnapshotInfo | None:
        return await self._read_tx(lambda conn: log_sql.snapshot(conn, log_sql.SQLITE, account_id))

    async def read_snapshot_parts(
        self, account_id: str, snapshot_id: bytes, after: int, limit: int, max_bytes: int
    ) -> LogPageRecord:
        return await self._read_tx(
            lambda conn: log_sql.snapshot_parts(conn, log_sql.SQLITE, account_id, snapshot_id, after, limit, max_bytes)
        )

    async def get_log_retention(self, account_id: str) -> LogRetentionRecord:
        return await self._read(lambda conn: log_sql.get_retention(conn, log_sql.SQLITE, account_id))

    async def set_log_retention(self, account_id: str, days: int | None, now_ms: int) -> LogRetentionRecord:
        return await self._write(lambda conn: log_sql.set_retention(conn, log_sql.SQLITE, account_id, days, now_ms))

    async def sweep_log(self, now_ms: int, batch: int) -> LogSweepReport:
        deleted, emptied, more = 0, 0, False
        for account_id in await self._read(lambda conn: log_sql.sweep_accounts(conn, log_sql.SQLITE)):
            report = await self._write(
                partial(log_sql.sweep_account, d=log_sql.SQLITE, account_id=account_id, now_ms=now_ms, batch=batch)
            )
            deleted, emptied, more = deleted + report.deleted, emptied + report.emptied, more or report.more
        return LogSweepReport(deleted, emptied, more)

    async def note_revocation(self, account_id: str, device_list_version: int) -> None:
        await self._write(lambda conn: log_sql.note_revocation(conn, log_sql.SQLITE, account_id, device_list_version))

    async def watch_log_commits(
        self, notify: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Sleep until cancelled: only this process writes the SQLite file, and it wakes its own streams."""
        if self._writer is None:
            raise StoreUnavailableError("store is closed")
        task_status.started()
        await trio.sleep_forever()

    # -- prekeys and enrolment (SQL in sqlite_prekeys.py) ----------------------------------------

    async def put_prekeys(self, device_id: str, prekeys: Sequence[StoredPrekey], max_one_time: int) -> PrekeyState:
        return await self._write(
            partial(pk.put_prekeys, device_id=device_id, prekeys=prekeys, max_one_time=max_one_time)
        )

    async def get_prekey_state(self, device_id: str) -> PrekeyState:
        return await self._read(partial(pk.prekey_state, device_id=device_id))

    async def claim_prekeys(
        self,
        claimer_account: str,
        targets: Sequence[tuple[str, str]],
        now_ms: int,
        one_time_limit: int,
        window_ms: int,
    ) -> list[ClaimedBundle | None]:
        return await self._write(
            partial(
                pk.claim_prekeys,
                claimer_account=claimer_account,
                targets=targets,
                now_ms=now_ms,
                one_time_limit=one_time_limit,
                window_ms=window_ms,
            )
        )

    async def delete_device_prekeys(self, device_id: str) -> int:
        return await self._write(partial(pk.delete_device_prekeys, device_id=device_id))

    async def create_enrolment(
        self, lookup_id: bytes, offer: bytes, created_at_ms: int, expires_at_ms: int, forget_at_ms: int
    ) -> None:
        await self._write(
            partial(
                pk.create_enrolment,
                lookup_id=lookup_id,
                offer=offer,
                created_at_ms=created_at_ms,
                expires_at_ms=expires_at_ms,
                forget_at_ms=forget_at_ms,
            )
        )

    async def get_enrolment(self, lookup_id: bytes) -> EnrolmentRecord | None:
        return await self._read(partial(pk.get_enrolment, lookup_id=lookup_id))

    async def put_enrolment_proposal(
        self, lookup_id: bytes, proposal: bytes, proposer_device: str, now_ms: int
    ) -> EnrolmentRecord:
        return await self._write(
            partial(
                pk.put_enrolment_proposal,
                lookup_id=lookup_id,
                proposal=proposal,
                proposer_device=proposer_device,
                now_ms=now_ms,
            )
        )

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
