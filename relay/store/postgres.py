"""PostgreSQL store for organisation relays: several replicas share one database.

Every method runs its SQL in a worker thread (``trio.to_thread``, bounded by
a :class:`trio.CapacityLimiter` the size of the connection pool) on a
connection from a :class:`psycopg_pool.ConnectionPool`; the trio loop never
touches a connection. Each write method is one transaction with
``synchronous_commit=on``. Correctness between replicas comes from the
database alone — constraints, row locks and transactions, never an
in-process lock:

- idempotency: ``INSERT … ON CONFLICT DO NOTHING`` on the (sender, key)
  primary key, so concurrent identical retries store one envelope;
- cursors and quotas: a sender locks the recipients' ``devices`` rows
  (sorted, so batches never deadlock each other), takes the next cursor
  values from ``devices.last_seq`` and checks ``queued``, so writers to one
  inbox commit in cursor order and never exceed the quota
  (docs/decisions/0003-postgres-cursors.md);
- wake-ups: ``pg_notify('tetherless_inbox', device_id)`` inside the send
  transaction, delivered to every replica's listener only on commit.

Deadlocks and serialisation failures (possible only between unusual
concurrent batches) are retried a few times; other database failures raise
:class:`StoreUnavailableError`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
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

from . import devices_sql as devsql
from . import log_sql
from . import postgres_federation as fed
from . import postgres_prekeys as pk
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

log = logging.getLogger("relay.store")
T = TypeVar("T")

NOTIFY_CHANNEL = "tetherless_inbox"
# pg_advisory_lock key held while migrating ("tetherls" in ASCII), so replicas starting together don't race.
MIGRATION_LOCK_KEY = 0x7465746865726C73
MAX_I64 = 2**63 - 1
RETRIES = 5
LISTEN_POLL_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 5.0
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and messages)."""
    url = re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


def _clamp(value: int) -> int:
    """Cursors beyond the BIGINT range behave like its ends (no 5xx for absurd input)."""
    return max(-MAX_I64, min(value, MAX_I64))


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
                conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at_ms) VALUES (%s, %s)",
                    (version, int(time.time() * 1000)),
                )
            applied.append(version)
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


class PostgresStore:
    """The organisation-relay store. Create with :meth:`open`; close with :meth:`close`."""

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

    # -- accounts and devices ------------------------------------------------------------

    async def create_account(
        self, account_id: str, device: DeviceRecord, signed_device_list: bytes, now_ms: int
    ) -> None:
        def op(conn: psycopg.Connection[Any]) -> None:
            created = conn.execute(
                "INSERT INTO accounts (account_id, created_at_ms, list_version) VALUES (%s, %s, 1)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (account_id, now_ms),
            ).fetchone()
            if created is None:
                raise TetherlessError(ErrorCode.ACCOUNT_EXISTS, "an account with this genesis key exists")
            conn.execute(
                "INSERT INTO device_lists (account_id, version, signed, stored_at_ms) VALUES (%s, 1, %s, %s)",
                (account_id, signed_device_list, now_ms),
            )
            added = conn.execute(
                "INSERT INTO devices (device_id, account_id, sign_key, box_key, created_at_ms)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                (device.device_id, account_id, device.sign_key, device.box_key, now_ms),
            ).fetchone()
            if added is None:
                raise TetherlessError(ErrorCode.ACCOUNT_EXISTS, "an account with this genesis key exists")

        await self._run(op)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        if "\x00" in device_id:  # PostgreSQL text cannot hold NUL, so no such device exists
            return None

        def op(conn: psycopg.Connection[Any]) -> DeviceRecord | None:
            row = conn.execute(
                "SELECT device_id, account_id, sign_key, box_key, created_at_ms, revoked_at_ms"
                " FROM devices WHERE device_id = %s",
                (device_id,),
            ).fetchone()
            return DeviceRecord(*row) if row else None

        return await self._run(op, transaction=False)

    async def get_device_lists(self, account_id: str) -> list[bytes] | None:
        if "\x00" in account_id:
            return None

        def op(conn: psycopg.Connection[Any]) -> list[bytes] | None:
            rows = conn.execute(
                "SELECT signed FROM device_lists WHERE account_id = %s ORDER BY version", (account_id,)
            ).fetchall()
            return [bytes(row[0]) for row in rows] or None

        return await self._run(op, transaction=False)

    # -- authentication --------------------------------------------------------------

    async def put_challenge(self, nonce: bytes, device_id: str, expires_at_ms: int) -> None:
        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO challenges (nonce, device_id, expires_at_ms) VALUES (%s, %s, %s)",
                (nonce, device_id, expires_at_ms),
            )

        await self._run(op)

    async def consume_challenge(self, nonce: bytes, device_id: str, now_ms: int) -> ConsumedChallenge:
        if "\x00" in device_id:
            return ConsumedChallenge(ChallengeOutcome.UNKNOWN)

        def op(conn: psycopg.Connection[Any]) -> ConsumedChallenge:
            # FOR UPDATE: two replicas consuming the same nonce serialise; the second sees it used.
            row = conn.execute(
                "SELECT device_id, expires_at_ms, used_at_ms FROM challenges WHERE nonce = %s FOR UPDATE", (nonce,)
            ).fetchone()
            if row is None or row[0] != device_id:
                return ConsumedChallenge(ChallengeOutcome.UNKNOWN)
            _, expires_at_ms, used_at_ms = row
            if used_at_ms is not None:
                return ConsumedChallenge(ChallengeOutcome.USED, expires_at_ms)
            conn.execute("UPDATE challenges SET used_at_ms = %s WHERE nonce = %s", (now_ms, nonce))
            if expires_at_ms <= now_ms:
                return ConsumedChallenge(ChallengeOutcome.EXPIRED, expires_at_ms)
            return ConsumedChallenge(ChallengeOutcome.OK, expires_at_ms)

        return await self._run(op)

    async def create_session(
        self, token_hash: bytes, device_id: str, account_id: str, created_at_ms: int, expires_at_ms: int
    ) -> None:
        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "INSERT INTO sessions (token_hash, device_id, account_id, created_at_ms, expires_at_ms)"
                " VALUES (%s, %s, %s, %s, %s)",
                (token_hash, device_id, account_id, created_at_ms, expires_at_ms),
            )

        await self._run(op)

    async def get_session(self, token_hash: bytes) -> SessionRecord | None:
        def op(conn: psycopg.Connection[Any]) -> SessionRecord | None:
            row = conn.execute(
                "SELECT device_id, account_id, expires_at_ms, revoked_at_ms FROM sessions WHERE token_hash = %s",
                (token_hash,),
            ).fetchone()
            return SessionRecord(*row) if row else None

        return await self._run(op, transaction=False)

    async def revoke_sessions(self, device_id: str, token_hash: bytes | None, now_ms: int) -> int:
        def op(conn: psycopg.Connection[Any]) -> int:
            if token_hash is None:
                cur = conn.execute(
                    "UPDATE sessions SET revoked_at_ms = %s WHERE device_id = %s AND revoked_at_ms IS NULL",
                    (now_ms, device_id),
                )
            else:
                cur = conn.execute(
                    "UPDATE sessions SET revoked_at_ms = %s"
                    " WHERE token_hash = %s AND device_id = %s AND revoked_at_ms IS NULL",
                    (now_ms, token_hash, device_id),
                )
            return cur.rowcount

        return await self._run(op)

    # -- inboxes ------------------------------------------------------------------------

    async def store_envelopes(
        self, sender_device: str, envelopes: Sequence[NewEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[StoredEnvelope]:
        """Store a batch in one transaction (see :meth:`relay.store.base.Store.store_envelopes`).

        A constant number of round trips per batch: lock the recipients' rows
        (sorted), claim every idempotency key at once, insert the fresh
        envelopes with cursors taken from the locked rows, update the rows,
        notify. Idempotent per (sender, key), also across replicas.
        """
        if not envelopes:
            return []

        def op(conn: psycopg.Connection[Any]) -> list[StoredEnvelope]:
            recipients = sorted({env.recipient_device for env in envelopes})
            locked = {
                row[0]: row[1:]
                for row in conn.execute(
                    "SELECT device_id, account_id, revoked_at_ms, queued, last_seq FROM devices"
                    " WHERE device_id = ANY(%s::text[]) ORDER BY device_id FOR UPDATE",
                    (recipients,),
                )
            }
            claimed = {
                bytes(row[0])
                for row in conn.execute(
                    "INSERT INTO idempotency (sender, idem_key, envelope_id, digest, sent_at_ms, forget_at_ms)"
                    " SELECT %s, k, e, d, %s, %s FROM unnest(%s::bytea[], %s::bytea[], %s::bytea[]) AS t(k, e, d)"
                    " ON CONFLICT DO NOTHING RETURNING idem_key",
                    (
                        sender_device,
                        now_ms,
                        forget_at_ms,
                        [env.idempotency_key for env in envelopes],
                        [env.envelope_id for env in envelopes],
                        [env.digest for env in envelopes],
                    ),
                )
            }
            earlier: dict[bytes, tuple[bytes, bytes, int]] = {}
            if len(claimed) < len(envelopes):
                # Keys stored before (committed by this or another replica, or earlier in this batch).
                earlier = {
                    bytes(row[0]): (bytes(row[1]), bytes(row[2]), row[3])
                    for row in conn.execute(
                        "SELECT idem_key, envelope_id, digest, sent_at_ms FROM idempotency"
                        " WHERE sender = %s AND idem_key = ANY(%s::bytea[])",
                        (sender_device, [env.idempotency_key for env in envelopes]),
                    )
                }
            results: list[StoredEnvelope] = []
            fresh: list[tuple[str, int, NewEnvelope]] = []
            counters: dict[str, list[int]] = {}  # device -> [queued, last_seq] as this batch changes them
            outbox: list[NewEnvelope] = []
            for env in envelopes:
                key = env.idempotency_key
                if key in claimed:
                    claimed.discard(key)  # a repeated key later in the batch is a duplicate of this one
                else:
                    envelope_id, digest, sent_at_ms = earlier[key]
                    if digest != env.digest:
                        raise TetherlessError(
                            ErrorCode.IDEMPOTENCY_CONFLICT, "idempotency key already used for another envelope"
                        )
                    results.append(StoredEnvelope(envelope_id, sent_at_ms, True, env.recipient_device))
                    continue
                if env.remote_relay:  # for another relay: the federation outbox, in this transaction
                    outbox.append(env)
                    results.append(StoredEnvelope(env.envelope_id, now_ms, False, env.recipient_device))
                    continue
                dev = locked.get(env.recipient_device)
                if dev is None or dev[0] != env.recipient_account:
                    raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "no such device on this relay")
                if dev[1] is not None:
                    raise TetherlessError(ErrorCode.RECIPIENT_REVOKED, "the recipient device was revoked")
                counter = counters.setdefault(env.recipient_device, [dev[2], dev[3]])
                if counter[0] >= max_inbox:
                    raise TetherlessError(ErrorCode.INBOX_FULL, "the recipient's inbox is full")
                counter[0] += 1
                counter[1] += 1
                fresh.append((env.recipient_device, counter[1], env))
                results.append(StoredEnvelope(env.envelope_id, now_ms, False, env.recipient_device))
            if fresh:
                conn.execute(
                    "INSERT INTO envelopes (recipient, seq, envelope_id, sent_at_ms, expires_at_ms, ciphertext)"
                    " SELECT r, s, e, %s, x, c FROM unnest("
                    "%s::text[], %s::bigint[], %s::bytea[], %s::bigint[], %s::bytea[]) AS t(r, s, e, x, c)",
                    (
                        now_ms,
                        [r for r, _, _ in fresh],
                        [s for _, s, _ in fresh],
                        [e.envelope_id for _, _, e in fresh],
                        [e.expires_at_ms for _, _, e in fresh],
                        [e.ciphertext for _, _, e in fresh],
                    ),
                )
                devices = sorted(counters)
                conn.execute(
                    "UPDATE devices SET queued = t.q, last_seq = t.s"
                    " FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS t(d, q, s) WHERE device_id = t.d",
                    (devices, [counters[d][0] for d in devices], [counters[d][1] for d in devices]),
                )
                # Delivered to every listening replica when (and only if) this transaction commits.
                conn.execute(
                    "SELECT pg_notify(%s, d) FROM unnest(%s::text[]) AS d", (NOTIFY_CHANNEL, devices)
                ).fetchall()
            fed.insert_outbox(conn, outbox, now_ms)
            return results

        return await self._run(op)

    async def read_inbox(self, device_id: str, after: int, limit: int, now_ms: int) -> list[InboxRecord]:
        def op(conn: psycopg.Connection[Any]) -> list[InboxRecord]:
            rows = conn.execute(
                "SELECT seq, envelope_id, sent_at_ms, expires_at_ms, ciphertext FROM envelopes"
                " WHERE recipient = %s AND seq > %s AND expires_at_ms > %s ORDER BY seq LIMIT %s",
                (device_id, _clamp(after), _clamp(now_ms), max(0, min(limit, MAX_I64))),
            ).fetchall()
            return [InboxRecord(row[0], bytes(row[1]), row[2], row[3], bytes(row[4])) for row in rows]

        return await self._run(op, transaction=False)

    async def acknowledge(self, device_id: str, up_to: int | None, envelope_ids: Sequence[bytes]) -> int:
        def op(conn: psycopg.Connection[Any]) -> int:
            deleted = conn.execute(
                "DELETE FROM envelopes WHERE recipient = %s AND (seq <= %s OR envelope_id = ANY(%s::bytea[]))",
                (device_id, _clamp(up_to) if up_to is not None else None, list(envelope_ids)),
            ).rowcount
            if deleted:
                conn.execute(
                    "UPDATE devices SET queued = GREATEST(queued - %s, 0) WHERE device_id = %s", (deleted, device_id)
                )
            return deleted

        return await self._run(op)

    async def expire(self, now_ms: int) -> ExpiryReport:
        def op(conn: psycopg.Connection[Any]) -> ExpiryReport:
            per_device = conn.execute(
                "WITH gone AS (DELETE FROM envelopes WHERE expires_at_ms <= %s RETURNING recipient),"
                " counts AS (SELECT recipient, count(*) AS n FROM gone GROUP BY recipient)"
                " UPDATE devices SET queued = GREATEST(queued - counts.n, 0) FROM counts"
                " WHERE devices.device_id = counts.recipient RETURNING counts.n",
                (_clamp(now_ms),),
            ).fetchall()
            challenges = conn.execute("DELETE FROM challenges WHERE expires_at_ms <= %s", (_clamp(now_ms),)).rowcount
            sessions = conn.execute("DELETE FROM sessions WHERE expires_at_ms <= %s", (_clamp(now_ms),)).rowcount
            keys = conn.execute("DELETE FROM idempotency WHERE forget_at_ms <= %s", (_clamp(now_ms),)).rowcount
            federation = fed.expire_federation(conn, _clamp(now_ms))
            challenges += devsql.expire_devices(
                conn, log_sql.POSTGRES, _clamp(now_ms)
            )  # WebAuthn registration ceremonies
            enrolments = pk.expire_prekeys_and_enrolments(conn, _clamp(now_ms))
            return ExpiryReport(
                sum(n for (n,) in per_device), challenges, sessions, keys, federation, enrolments=enrolments
            )

        return await self._run(op)

    # -- federation (SQL in postgres_federation.py) ---------------------------------------------

    async def federation_due_peers(self, now_ms: int) -> list[PeerState]:
        return await self._run(lambda conn: fed.due_peers(conn, _clamp(now_ms)), transaction=False)

    async def federation_outbox_batch(self, peer: str, now_ms: int, limit: int) -> list[OutboxRecord]:
        return await self._run(lambda conn: fed.outbox_batch(conn, peer, _clamp(now_ms), limit), transaction=False)

    async def federation_outbox_settle(
        self, peer: str, done: Sequence[int], deferred: Sequence[int], deferred_until_ms: int, now_ms: int
    ) -> None:
        await self._run(lambda conn: fed.outbox_settle(conn, peer, done, deferred, deferred_until_ms, now_ms))

    async def federation_peer_failed(
        self, peer: str, error: str, failures: int, next_attempt_at_ms: int, now_ms: int
    ) -> None:
        await self._run(lambda conn: fed.peer_failed(conn, peer, error, failures, next_attempt_at_ms, now_ms))

    async def federation_peer_states(self) -> list[PeerState]:
        return await self._run(fed.peer_states, transaction=False)

    async def federation_retry_now(self, peer: str | None) -> int:
        return await self._run(lambda conn: fed.retry_now(conn, peer))

    async def federation_remember_nonce(self, origin: str, nonce: str, forget_at_ms: int) -> bool:
        return await self._run(lambda conn: fed.remember_nonce(conn, origin, nonce, _clamp(forget_at_ms)))

    async def federation_store_received(
        self, origin: str, envelopes: Sequence[ReceivedEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[tuple[ReceivedOutcome, str]]:
        def op(conn: psycopg.Connection[Any]) -> list[tuple[ReceivedOutcome, str]]:
            results, grown = fed.store_received(conn, origin, envelopes, now_ms, max_inbox, _clamp(forget_at_ms))
            if grown:
                conn.execute("SELECT pg_notify(%s, d) FROM unnest(%s::text[]) AS d", (NOTIFY_CHANNEL, grown)).fetchall()
            return results

        return await self._run(op)

    # -- device lists v2, revocation, WebAuthn (SQL in devices_sql.py) -----------------------

    async def get_device_list_head(self, account_id: str) -> DeviceListHead | None:
        if "\x00" in account_id:
            return None
        return await self._run(lambda conn: devsql.device_list_head(conn, log_sql.POSTGRES, account_id=account_id))

    async def append_device_list(self, update: DeviceListUpdate, now_ms: int) -> DeviceListCommitted:
        def op(conn: psycopg.Connection[Any]) -> DeviceListCommitted:
            committed = devsql.append_device_list(conn, log_sql.POSTGRES, update=update, now_ms=now_ms)
            # Every device of the account (revoked ones too) wakes on every replica, on commit only.
            conn.execute(
                "SELECT pg_notify(%s, d) FROM unnest(%s::text[]) AS d", (NOTIFY_CHANNEL, committed.devices)
            ).fetchall()
            return committed

        return await self._run(op)

    async def device_stream_state(self, device_id: str) -> DeviceStreamState | None:
        return await self._run(
            lambda conn: devsql.device_stream_state(conn, log_sql.POSTGRES, device_id=device_id), transaction=False
        )

    async def put_webauthn_registration(
        self, challenge: bytes, account_id: str, device_id: str, expires_at_ms: int
    ) -> None:
        await self._run(
            lambda conn: devsql.put_registration(
                conn,
                log_sql.POSTGRES,
                challenge=challenge,
                account_id=account_id,
                device_id=device_id,
                expires_at_ms=expires_at_ms,
            )
        )

    async def consume_webauthn_registration(
        self, challenge: bytes, account_id: str, device_id: str, now_ms: int
    ) -> ChallengeOutcome:
        return await self._run(
            lambda conn: devsql.consume_registration(
                conn, log_sql.POSTGRES, challenge=challenge, account_id=account_id, device_id=device_id, now_ms=now_ms
            )
        )

    async def put_webauthn_credential(
        self, account_id: str, device_id: str, credential: NewCredential, sign_count: int, now_ms: int
    ) -> None:
        await self._run(
            lambda conn: devsql.put_credential(
                conn,
                log_sql.POSTGRES,
                account_id=account_id,
                device_id=device_id,
                credential=credential,
                sign_count=sign_count,
                now_ms=now_ms,
            )
        )

    async def get_webauthn_credentials(self, account_id: str) -> list[StoredCredential]:
        return await self._run(
            lambda conn: devsql.credentials(conn, log_sql.POSTGRES, account_id=account_id), transaction=False
        )

    # -- account log (SQL in log_sql.py) ----------------------------------------------------

    async def append_log(
        self,
        account_id: str,
        records: Sequence[NewLogRecord],
        expected_head: int | None,
        now_ms: int,
        max_bytes: int,
    ) -> LogAppendOutcome:
        return await self._run(
            lambda conn: log_sql.append(conn, log_sql.POSTGRES, account_id, records, expected_head, now_ms, max_bytes)
        )

    async def read_log(
        self, account_id: str, after: int, limit: int, max_bytes: int, full_parts: bool
    ) -> LogPageRecord:
        def op(conn: psycopg.Connection[Any]) -> LogPageRecord:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")  # one snapshot
            return log_sql.read(conn, log_sql.POSTGRES, account_id, _clamp(after), limit, max_bytes, full_parts)

        return await self._run(op)

    async def log_snapshot(self, account_id: str) -> LogSnapshotInfo | None:
        def op(conn: psycopg.Connection[Any]) -> LogSnapshotInfo | None:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return log_sql.snapshot(conn, log_sql.POSTGRES, account_id)

        return await self._run(op)

    async def read_snapshot_parts(
        self, account_id: str, snapshot_id: bytes, after: int, limit: int, max_bytes: int
    ) -> LogPageRecord:
        def op(conn: psycopg.Connection[Any]) -> LogPageRecord:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            return log_sql.snapshot_parts(
                conn, log_sql.POSTGRES, account_id, snapshot_id, _clamp(after), limit, max_bytes
            )

        return await self._run(op)

    async def get_log_retention(self, account_id: str) -> LogRetentionRecord:
        return await self._run(lambda conn: log_sql.get_retention(conn, log_sql.POSTGRES, account_id))

    async def set_log_retention(self, account_id: str, days: int | None, now_ms: int) -> LogRetentionRecord:
        return await self._run(lambda conn: log_sql.set_retention(conn, log_sql.POSTGRES, account_id, days, now_ms))

    async def sweep_log(self, now_ms: int, batch: int) -> LogSweepReport:
        deleted, emptied, more = 0, 0, False
        accounts = await self._run(lambda conn: log_sql.sweep_accounts(conn, log_sql.POSTGRES), transaction=False)
        for account_id in accounts:
            report = await self._run(
                partial(log_sql.sweep_account, d=log_sql.POSTGRES, account_id=account_id, now_ms=now_ms, batch=batch)
            )
            deleted, emptied, more = deleted + report.deleted, emptied + report.emptied, more or report.more
        return LogSweepReport(deleted, emptied, more)

    async def note_revocation(self, account_id: str, device_list_version: int) -> None:
        await self._run(lambda conn: log_sql.note_revocation(conn, log_sql.POSTGRES, account_id, device_list_version))

    async def watch_log_commits(
        self, notify: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call ``notify(account_id)`` for every log append of any replica (``NOTIFY tetherless_log``);
        runs until cancelled. Same behaviour as :meth:`watch_inbox_commits`."""
        await self._watch(log_sql.LOG_NOTIFY_CHANNEL, notify, task_status)

    # -- prekeys and enrolment (SQL in postgres_prekeys.py) ------------------------------------------

    async def put_prekeys(self, device_id: str, prekeys: Sequence[StoredPrekey], max_one_time: int) -> PrekeyState:
        return await self._run(lambda conn: pk.put_prekeys(conn, device_id, prekeys, max_one_time))

    async def get_prekey_state(self, device_id: str) -> PrekeyState:
        return await self._run(lambda conn: pk.prekey_state(conn, device_id), transaction=False)

    async def claim_prekeys(
        self,
        claimer_account: str,
        targets: Sequence[tuple[str, str]],
        now_ms: int,
        one_time_limit: int,
        window_ms: int,
    ) -> list[ClaimedBundle | None]:
        return await self._run(
            lambda conn: pk.claim_prekeys(conn, claimer_account, targets, _clamp(now_ms), one_time_limit, window_ms)
        )

    async def delete_device_prekeys(self, device_id: str) -> int:
        return await self._run(lambda conn: pk.delete_device_prekeys(conn, device_id))

    async def create_enrolment(
        self, lookup_id: bytes, offer: bytes, created_at_ms: int, expires_at_ms: int, forget_at_ms: int
    ) -> None:
        await self._run(
            lambda conn: pk.create_enrolment(
                conn, lookup_id, offer, created_at_ms, _clamp(expires_at_ms), _clamp(forget_at_ms)
            )
        )

    async def get_enrolment(self, lookup_id: bytes) -> EnrolmentRecord | None:
        return await self._run(lambda conn: pk.get_enrolment(conn, lookup_id), transaction=False)

    async def put_enrolment_proposal(
        self, lookup_id: bytes, proposal: bytes, proposer_device: str, now_ms: int
    ) -> EnrolmentRecord:
        return await self._run(
            lambda conn: pk.put_enrolment_proposal(conn, lookup_id, proposal, proposer_device, _clamp(now_ms))
        )

    # -- cross-replica wake-ups ---------------------------------------------------------------

    async def watch_inbox_commits(
        self, notify: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call ``notify(device_id)`` (in the trio thread) for every inbox commit of any replica; runs until cancelled.

        A dedicated connection LISTENs in a worker thread and reconnects with
        backoff (notifications sent while disconnected are lost: streams'
        heartbeat re-read covers them). ``task_status.started()`` is called
        once the first LISTEN is in place. Raises :class:`StoreUnavailableError`
        only when the store is closed. Cancellation stops the listener.
        """
        await self._watch(NOTIFY_CHANNEL, notify, task_status)

    async def _watch(self, channel: str, notify: Callable[[str], None], task_status: trio.TaskStatus[None]) -> None:
        """LISTEN on ``channel`` and call ``notify(payload)`` in the trio thread (see watch_inbox_commits)."""
        if self._pool is None:
            raise StoreUnavailableError("store is closed")
        token = trio.lowlevel.current_trio_token()
        stop, done = threading.Event(), threading.Event()
        with self._listeners_lock:
            self._listeners.append((stop, done))
        listening = trio.Event()

        def deliver(device_id: str | None) -> None:
            try:
                token.run_sync_soon(listening.set if device_id is None else (lambda: notify(device_id)))
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
                await listening.wait()
                task_status.started()
        finally:
            stop.set()

    def _listen(
        self,
        deliver: Callable[[str | None], None],
        stop: threading.Event,
        done: threading.Event,
        *,
        channel: str = NOTIFY_CHANNEL,
    ) -> None:
        backoff = 0.1
        try:
            while not stop.is_set():
                try:
                    with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                        conn.execute(f"LISTEN {channel}")
                        deliver(None)
                        backoff = 0.1
                        while not stop.is_set():
                            for note in conn.notifies(timeout=LISTEN_POLL_SECONDS):
                                deliver(note.payload)
                except psycopg.Error as exc:
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
        "added_in_version", "revoked_in_version",
    ),
    "challenges": ("nonce", "device_id", "expires_at_ms", "used_at_ms"),
    "sessions": ("token_hash", "device_id", "account_id", "created_at_ms", "expires_at_ms", "revoked_at_ms"),
    "envelopes": ("seq", "recipient", "envelope_id", "sent_at_ms", "expires_at_ms", "ciphertext"),
    "idempotency": ("sender", "idem_key", "envelope_id", "digest", "sent_at_ms", "forget_at_ms"),
    "federation_outbox": (
        "seq", "peer", "envelope_id", "recipient", "sent_at_ms", "expires_at_ms", "ciphertext", "attempts",
        "not_before_ms",
    ),
    "federation_peers": (
        "peer", "failures", "next_attempt_at_ms", "last_attempt_at_ms", "last_success_at_ms", "last_error",
        "delivered",
    ),
    "federation_received": ("origin", "envelope_id", "forget_at_ms"),
    "federation_nonces": ("origin", "nonce", "forget_at_ms"),
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
                    "SELECT max(v) FROM (SELECT seq AS v FROM sqlite_sequence WHERE name = 'envelopes'"
                    " UNION ALL SELECT max(seq) FROM envelopes)"
                ).fetchone()
                conn.execute("UPDATE devices SET last_seq = %s", ((high[0] if high else None) or 0,))
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
