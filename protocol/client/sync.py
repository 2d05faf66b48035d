"""The sync engine of the offline-first client (docs/account-log.md §10-§11).

One :class:`SyncEngine` per device and process. :meth:`SyncEngine.run` is the
supervisor: ``Connecting → CatchingUp → Live`` (with ``follow``) or
``Stopped`` once quiescent (without), and ``Backoff`` on any transport error,
5xx or 429, with "full jitter" ``uniform(0, min(max_backoff, 0.5 s · 2^attempt))``
(``Retry-After`` a floor; ``attempt`` resets after 30 s live). 403
``device_revoked`` ends in ``RevokedError`` (:attr:`SyncOutcome.REVOKED`). A TLS set-up error
(``TLSSetupError``: untrusted certificate, ``http://`` vs ``https://``) is not retried: waiting fixes nothing.

One *drain* step (``CatchingUp``; repeated until nothing changes):

1. **log reader**: page ``GET /v1/log`` from the ``log`` cursor; key records
   are applied first (epoch keys from grants), then records in position
   order, each page in one local transaction with the cursor (§10 "Read").
   A record whose epoch key this device does not hold yet stops the cursor;
   the reader keeps paging for key records and resumes once the key arrives.
2. **epochs**: no key record in the whole log → create epoch 1 (``expected_head``
   = cursor); current devices without a grant → a grant-only record.
3. **inbox reader**: page the inbox; each page in one transaction: upsert the
   messages, enqueue their ``message-received`` records in ``log_pending``,
   advance ``inbox_received``.
4. **outbox flusher**: ``queued → sealed`` (envelopes sealed once and stored),
   ``sealed → posted`` (``POST /v1/messages`` with the stored idempotency keys
   and bytes; the ``message-sent`` record and the local message row in the same
   transaction as the receipts).
5. **log appender**: ``log_pending`` in ``seq`` order, in batches, encrypted
   under the newest epoch key; on 201 one transaction drops them, sets the
   messages' positions and marks the outbox rows ``logged``.
6. **acker**: ``POST /v1/inbox/ack up_to`` the highest cursor whose messages
   are all logged (custody rule D5), then ``inbox_acked``.

``Live`` runs the inbox stream (items are applied as they arrive), the log
stream (a record wakes the drain step) and a pump that runs the drain step
on every wake-up and at least every ``poll_seconds`` (which also picks up
messages another process, e.g. ``tetherless send``, put in the outbox).

Every cursor and queue is in ``state.db``; after any interruption, including
``kill -9``, the engine resumes from the last committed transaction: sealed
envelopes are re-posted with the same keys (the relay answers ``duplicate``),
pending records are re-appended (same record ids: ``duplicate``), un-acked
envelopes are redelivered and deduplicated by ``(sender_device, message_uid)``.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import trio

from .. import codec, device_list, handshake, hybrid, log, recovery
from ..errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError, error_from_problem
from ..ids import Address
from ..messages import (
    AppendRequest,
    AppendResponse,
    DeviceEntry,
    LogHeartbeat,
    LogPage,
    LogRecord,
    LogRecordIn,
    OutboundEnvelope,
    SendRequest,
    SendResponse,
)
from . import outbox, snapshots  # snapshots: the log-snapshots hook (read_log)
from .chains import DeviceRevokedError
from .http import TransportError
from .keystore import DeviceKeys
from .localdb import StateRolledBackError
from .outbox import describe as _describe
from .sdk import Outgoing, ReceivedMessage, RejectedMessage, RelayClient
from .sessions import PrekeysUnavailableError
from .store import ClientStore, EpochInfo, HistoryMessage, OutboxEntry, decode_plaintext, encode_plaintext

logger = logging.getLogger(__name__)

LIVE_RESET_SECONDS: Final = 30.0
DEVICE_LIST_REFRESH_SECONDS: Final = 30.0
_LOG_PAGE: Final = 500
_APPEND_BATCH: Final = 200
_POST_BATCH: Final = 100
# The recovery backup key this device backs up to (account-log.md §5.7): a sealed key-value table of state.db.
RECOVERY_BACKUP_TABLE: Final = "recovery_backup"
#: Per-writer counters in ``log_counters`` (account-log.md §4.6, §5.1 v3): highest ``writer_seq`` applied, and a
#: removed writer's close-out mark + 1 from the rotation that removed it.
_HIGH_WATER: Final = "writer_hw:"
_CLOSED: Final = "writer_closed:"
#: Scheduled rotation (account-log.md §5.3): a new epoch after this many records or this age, whichever first.
DEFAULT_ROTATE_AFTER_RECORDS: Final = 1000
DEFAULT_ROTATE_AFTER_SECONDS: Final = 7 * 86400.0

States = ("stopped", "connecting", "catching_up", "live", "backoff", "revoked")

#: The supervisor's transition table (§11). Anything else is a bug.
TRANSITIONS: Final[dict[tuple[str, str], str]] = {
    ("stopped", "start"): "connecting",
    ("connecting", "connected"): "catching_up",
    ("connecting", "failed"): "backoff",
    ("catching_up", "caught_up"): "live",
    ("catching_up", "failed"): "backoff",
    ("live", "failed"): "backoff",
    ("live", "quiescent"): "stopped",
    ("backoff", "timer"): "connecting",
    **{(s, "cancel"): "stopped" for s in ("connecting", "catching_up", "live", "backoff")},
    **{(s, "revoked"): "revoked" for s in ("connecting", "catching_up", "live", "backoff")},
}


class SyncOutcome(enum.Enum):
    """How :meth:`SyncEngine.run` ended (the command line maps each to its exit code, tetherless_cli.messages).

    Per-entry outbox failures are not outcomes: they stay on their entries (account-log.md §10)."""

    DONE = "done"  # quiescent: everything that could be done now is done
    HOME_UNREACHABLE = "home_unreachable"  # the home relay stayed unreachable (or refused the log) past the timeout
    REVOKED = "revoked"  # this device was removed from its account's device list


class RevokedError(Exception):
    """403 ``device_revoked``: stop syncing for good."""


class RetryError(Exception):
    """A failure that a reconnect may fix (transport, 5xx, 429); ``retry_after`` is a floor in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class LogRekeyError(RetryError):
    """``log_rekey_required`` (client side, account-log.md §5.4): the newest epoch may not be written under
    (a removed device holds it, or it is due for rotation) and the relay did not accept the new epoch's key
    record. Nothing is appended; the outbox and pending records stay; the engine retries after a backoff."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"log_rekey_required: {reason}")


def backoff_delay(attempt: int, rng: random.Random, max_backoff: float = 60.0, floor: float | None = None) -> float:
    """Full jitter: ``uniform(0, min(max_backoff, 0.5 · 2^attempt))``, at least ``floor``."""
    delay = rng.uniform(0, min(max_backoff, 0.5 * 2 ** min(attempt, 30)))
    return max(delay, floor or 0.0)


@dataclass
class Status:
    state: str = "stopped"
    attempt: int = 0
    delay_s: float = 0.0
    reason: str = ""
    log_cursor: int = 0
    log_head: int = 0
    inbox: int = 0
    outbox: int = 0
    pending: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class SyncEngine:
    """See the module doc. ``on_message`` is called (after the commit) for each newly stored received message."""

    def __init__(
        self,
        keys: DeviceKeys,
        store: ClientStore,
        *,
        on_message: Callable[[HistoryMessage, int | None, bytes | None], None] | None = None,
        on_status: Callable[[Status], None] | None = None,
        rng: random.Random | None = None,
        max_backoff: float = 60.0,
        poll_seconds: float = 1.0,
        random_bytes: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
        request_timeout_seconds: float = 20.0,
        holdback_seconds: float = 6 * 3600.0,
        rotate_after_records: int = DEFAULT_ROTATE_AFTER_RECORDS,
        rotate_after_seconds: float = DEFAULT_ROTATE_AFTER_SECONDS,
    ) -> None:
        self.keys = keys
        self.store = store
        self.on_message = on_message
        self.on_status = on_status
        self.rng = rng or random.Random()
        self.max_backoff = max_backoff
        self.poll_seconds = poll_seconds
        self.random_bytes = random_bytes
        self.wall_clock = wall_clock
        self.request_timeout = request_timeout_seconds
        self.holdback_seconds = holdback_seconds
        self.status = Status()
        self.client: RelayClient | None = None
        self.log_head = 0
        self.blocked_on_key = False
        self.blocked_on_rotation = False
        self.rollback_checked = False  # the log was read once before anything is sealed (crypto.md §13.2)
        self.read_upto = 0  # the last log position read_log paged (held records included)
        self.rejected = 0
        self.last_failure = ""  # the reason of the last retried failure (the CLI's error line on giving up)
        self.refusals: list[str] = []  # per record refused (§4.6, §5.4) or epoch without a key (§5.5), for the CLI
        # The same, structured for ``sync --json``: {"warning": code, "detail": line} (account-log.md §18.1).
        self.warnings: list[dict[str, str]] = []
        self._held_marks: dict[str, int] = {}  # removed writers' records waiting for the rotation (§5.1 v3)
        self._assigned_seqs: dict[bytes, int] = {}  # writer_seq given to a pending record in this process
        # At least one record and one second: a rotation must never make its own epoch due at once.
        self.rotate_after_records = max(1, rotate_after_records)
        self.rotate_after_seconds = max(1.0, rotate_after_seconds)
        self._kick = trio.Event()
        self._chain: tuple[int, list[DeviceEntry]] | None = None
        self._list_format = device_list.FORMAT_1
        self._chain_at = 0.0
        self._rekey_needed = False
        self._stale_appends = 0
        self._stale_epochs = 0
        self._waited: set[int] = set()  # outbox entries that waited in this run: their backoff applies
        # Destination relays found unreachable in this run, with the verdict and until when (ms) entries to them wait.
        self._unreachable: dict[str, tuple[outbox.Transient, int]] = {}
        self._limits_noted = False  # the home relay's envelope size limit was remembered (outbox.check_body)
        # Recovery backup (account-log.md §5.7): the keys derived from the recovery secret, only while a command
        # that holds it runs (init, recovery-key, link --recovery-key); never stored.
        self.recovery: recovery.RecoveryKeys | None = None
        self.recovered_epochs: set[int] = set()
        self._backup_conflicts = 0

    # -- supervisor ----------------------------------------------------------------------------

    def _transition(self, event: str, **info: Any) -> None:
        state = TRANSITIONS.get((self.status.state, event))
        if state is None:
            raise AssertionError(f"no transition from {self.status.state} on {event}")
        self.status.state = state
        self.status.reason = str(info.get("reason", ""))
        self.status.delay_s = float(info.get("delay_s", 0.0))
        self._report()
        if self.on_status is not None:
            self.on_status(self.status)

    def _report(self) -> None:
        s = self.status
        s.log_cursor = self.store.cursor("log")
        s.log_head = max(self.log_head, s.log_cursor)
        s.inbox = self.store.cursor("inbox_received")
        s.outbox = len(self.store.outbox(("queued", "sealed", "posted")))
        s.pending = self.store.pending_count()

    async def run(self, *, follow: bool, timeout: float | None = None) -> SyncOutcome:
        """Run until quiescent (``follow`` False) or cancelled; retry transient failures with backoff.

        Returns :attr:`SyncOutcome.DONE` when quiescent, :attr:`~SyncOutcome.HOME_UNREACHABLE` when the next retry
        would pass ``timeout`` (seconds, without ``follow``; :attr:`last_failure` says why), and
        :attr:`~SyncOutcome.REVOKED` when this device was revoked. Raises ``TLSSetupError`` at once (the URL or the
        trusted CA is wrong: not retried), ``StateRolledBackError``, and what a non-transient relay answer raises.
        Not idempotent in effect (it sends, receives and logs) but safe to run again: every step commits before
        the next. Cancellation stops at once; the local state is that of the last committed step."""
        started = trio.current_time()
        self._transition("start")
        attempt = 0
        try:
            while True:
                live_since: float | None = None
                try:
                    async with RelayClient.connect(
                        self.keys.relay_url,
                        keys=self.keys,
                        max_attempts=1,
                        request_timeout_seconds=self.request_timeout,
                        local_db=self.store.db,
                    ) as client:
                        self.client = client
                        await self._guard(client.authenticate())
                        await self.enable_sessions()
                        self._transition("connected")
                        await self.drain()
                        self._transition("caught_up")
                        live_since = trio.current_time()
                        if not follow:
                            self._transition("quiescent")
                            return SyncOutcome.DONE
                        await self._live()
                except RetryError as exc:
                    self.last_failure = str(exc)
                    if live_since is not None and trio.current_time() - live_since >= LIVE_RESET_SECONDS:
                        attempt = 0
                    attempt += 1
                    delay = backoff_delay(attempt, self.rng, self.max_backoff, exc.retry_after)
                    self.status.attempt = attempt
                    self._transition("failed", reason=str(exc), delay_s=round(delay, 3))
                    if not follow and timeout is not None and trio.current_time() - started + delay > timeout:
                        self._transition("cancel", reason="relay unreachable")
                        return SyncOutcome.HOME_UNREACHABLE
                    await trio.sleep(delay)
                    self._transition("timer")
                finally:
                    self.client = None
        except RevokedError:
            self._transition("revoked", reason="device revoked")
            return SyncOutcome.REVOKED
        except trio.Cancelled:
            if self.status.state not in ("stopped", "revoked"):
                self.status.state = "stopped"
                self.status.reason = "cancelled"
                self._report()
            raise

    async def _guard(self, awaitable: Any) -> Any:
        """Await a relay call, turning every ``retryable`` error (docs/cli.md "Errors": transport errors, 5xx,
        429, ``unavailable``) into :class:`RetryError` and ``device_revoked`` into :class:`RevokedError`; the rest
        stays as it is — a TLS set-up error among them (retrying does not fix a wrong URL scheme or an untrusted
        certificate)."""
        try:
            return await awaitable
        except TransportError as exc:
            if not exc.retryable:
                raise
            raise RetryError(str(exc) or type(exc).__name__) from exc
        except RemoteError as exc:
            if exc.code is ErrorCode.DEVICE_REVOKED:
                raise RevokedError() from exc
            if exc.retryable:
                raise RetryError(exc.code.value, exc.retry_after_seconds) from exc
            raise
        except DeviceRevokedError as exc:  # our own verified device list no longer has this device
            raise RevokedError() from exc
        except UnknownRemoteError as exc:
            if exc.retryable:
                raise RetryError(f"HTTP {exc.http_status}") from exc
            raise

    @asynccontextmanager
    async def connected(
        self, *, drain: bool = False, max_attempts: int = 2, request_timeout_seconds: float = 60.0
    ) -> AsyncIterator[RelayClient]:
        """``async with engine.connected(drain=…) as client:`` — one connection to the home relay for a single
        command (``log snapshot``, ``log retention``), authenticated, and with ``drain`` the log read and one
        drain step done first; the engine's relay calls (snapshots, retention) use it until the block ends.

        Unlike :meth:`run` nothing is retried beyond the client's ``max_attempts``: raises :class:`RetryError`
        (transport error, 5xx, 429: the relay is unreachable for now), :class:`RevokedError`, ``TLSSetupError``
        (not retried), and the other errors of the steps. Not idempotent when ``drain`` (it syncs); cancellation
        closes the connection and leaves the local state of the last committed step."""
        async with RelayClient.connect(
            self.keys.relay_url,
            keys=self.keys,
            max_attempts=max_attempts,
            request_timeout_seconds=request_timeout_seconds,
            local_db=self.store.db,
        ) as client:
            self.client = client
            try:
                await self._guard(client.authenticate())
                if drain:
                    await self.enable_sessions()
                    await self.drain()
                yield client
            finally:
                self.client = None

    async def _call(self, method: str, path: str, body: Any, response_type: type[Any]) -> Any:
        assert self.client is not None
        return await self._guard(self.client._call(method, path, body, response_type))

    # -- live ------------------------------------------------------------------------------------

    async def _live(self) -> None:
        failure: list[BaseException] = []
        async with trio.open_nursery() as nursery:

            async def worker(fn: Callable[[], Any]) -> None:
                try:
                    await fn()
                except (RetryError, RevokedError) as exc:
                    failure.append(exc)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(worker, self._inbox_stream)
            nursery.start_soon(worker, self._log_stream)
            nursery.start_soon(worker, self._pump)
        if failure:
            raise failure[0]

    async def _pump(self) -> None:
        last = trio.current_time()
        while True:
            with trio.move_on_after(self.poll_seconds) as waited:
                await self._kick.wait()
            self._kick = trio.Event()
            if waited.cancelled_caught and not self._local_work() and trio.current_time() - last < 30:
                continue  # idle: the streams wake us for remote changes
            last = trio.current_time()
            await self.drain(inbox=False)  # the inbox stream delivers; paging it too would only poll

    def _local_work(self) -> bool:
        """Whether something queued locally (perhaps by another process) waits for the relay."""
        return bool(
            self.store.outbox(("queued", "sealed", "posted"))
            or self.store.pending_count()
            or self.store.ack_point() > self.store.cursor("inbox_acked")
        )

    async def _inbox_stream(self) -> None:
        assert self.client is not None
        async with self.client.stream(after=self.store.cursor("inbox_received"), idle_timeout_seconds=30) as inbox:
            while True:
                try:
                    item = await inbox.__anext__()
                except (RemoteError, UnknownRemoteError) as exc:
                    await self._guard(_raise(exc))
                    raise
                self._apply_inbox([item], item.cursor)
                self._kick.set()

    async def _log_stream(self) -> None:
        client = self.client
        assert client is not None
        conn = await self._guard(client._conn())
        token = await self._guard(client._token())
        after = self.store.cursor("log")
        try:
            async with conn.stream(
                "GET",
                f"/v1/log/stream?after={after}",
                [("accept", codec.MSGPACK), ("authorization", f"Bearer {token}")],
                timeout=self.request_timeout,
                chunk_timeout=90,
            ) as response:
                if response.status != 200:
                    body = await response.read(1024 * 1024)
                    await self._guard(_raise(error_from_problem(response.status, body)))
                    return
                decoder = codec.StreamDecoder(LogRecord | LogHeartbeat, codec.MSGPACK)
                async for chunk in response:
                    for item in decoder.feed(chunk):
                        if isinstance(item, LogRecord):
                            self.log_head = max(self.log_head, item.position)
                            if item.position > self.store.cursor("log"):
                                self._kick.set()
                        elif item.head > self.store.cursor("log"):
                            self.log_head = max(self.log_head, item.head)
                            self._kick.set()
        except TransportError as exc:
            raise RetryError(f"log stream: {exc}") from exc
        raise RetryError("the relay ended the log stream")

    # -- one drain step --------------------------------------------------------------------------

    async def enable_sessions(self) -> None:
        """Format-2 accounts use v2 sessions (crypto.md §7-§9): state in this home's LocalDB, prekeys
        published or topped up now. Format-1 accounts keep v1 sealed boxes."""
        client = self.client
        assert client is not None
        if self.keys.list_format >= device_list.FORMAT_2 and client.sessions is None:
            await self._guard(client.enable_sessions(self.store.db))
        if not self.rollback_checked:
            # Before any session seals: this device's own later records in the log are the evidence that
            # survives a restore of the whole home (crypto.md §13.2); read_log raises StateRolledBackError.
            await self.read_log()
            self.rollback_checked = True

    async def drain(self, *, inbox: bool = True) -> None:
        """Repeat read-log / epochs / inbox / outbox / append / ack until nothing changes."""
        client = self.client
        if client is not None and client.sessions is not None and client.sessions.prekeys_dirty:
            await self._guard(client.maintain_prekeys())  # one-time prekeys were used (crypto.md §7.2)
        while True:
            changed = await self.read_log()
            changed |= await self.ensure_epoch()
            changed |= await self.ensure_recovery_backup()
            if inbox:
                changed |= await self.read_inbox()
            changed |= await self.flush_outbox()
            changed |= await self.append_pending()
            await self.ack()
            self._report()
            if not changed:
                return

    async def device_list(self, fresh: bool = False) -> tuple[int, list[DeviceEntry]]:
        """(version, verified devices) of this account's latest device list."""
        if self._chain is None or fresh or trio.current_time() - self._chain_at > DEVICE_LIST_REFRESH_SECONDS:
            assert self.client is not None
            verified = await self._guard(self.client.device_chain(self.keys.account_id))
            self._chain = (verified.head.version, verified.devices)
            self._list_format = verified.head.format
            self._chain_at = trio.current_time()
        return self._chain

    async def _list_at(self, version: int) -> list[DeviceEntry] | None:
        """The verified devices of version ``version`` of this account's list (None: no such version)."""
        assert self.client is not None
        devices: list[DeviceEntry] | None = await self._guard(self.client.list_at(self.keys.account_id, version))
        return devices

    # -- log reading ---------------------------------------------------------------------------------

    async def read_log(self) -> bool:
        """Page the log from the cursor to the head and apply it. True if the cursor moved."""
        # log-snapshots hook (protocol/client/snapshots.py, §6.3): start from the newest snapshot, note retention gaps.
        moved = await snapshots.before_read(self)
        await self.device_list()  # the verified list judges writers (§4.6)
        self.blocked_on_rotation = False
        self._held_marks = {}
        start = self.store.cursor("log")
        buffered: list[LogRecord] = []
        after = start
        while True:
            page: LogPage = await self._call("GET", f"/v1/log?after={after}&limit={_LOG_PAGE}", None, LogPage)
            self.log_head = page.head
            if not self._positions_dense(after, page):
                break  # the rest up to the head is gone: never page forever on a relay that dropped it
            if page.records:
                await self._apply_keys([r for r in page.records if r.kind == "key"])
                buffered += page.records
                buffered = self._apply_records(buffered)
            after = max(after, page.next_after)
            if not page.more:
                break
        # A record held for a rotation (§4.6 "wait") is not a missing key: ensure_epoch must go on and rotate,
        # conditioned on the head read here (every key record up to it is applied), not on the held-back cursor.
        self.blocked_on_key = bool(buffered) and not self.blocked_on_rotation
        if self.blocked_on_key:  # never silent emptiness: the relay may have dropped this device's grant (§5.5)
            line = (
                f"no key for epoch {buffered[0].epoch}: {len(buffered)} log record(s) from position "
                f"{buffered[0].position} wait until a device of this account grants it"
            )
            self._warn("log_key_missing", line)
        self.read_upto = max(after, self.store.cursor("log"))
        moved |= await snapshots.after_read(self)  # log-snapshots hook: load a pending snapshot once its key is here
        return moved or self.store.cursor("log") != start

    def _positions_dense(self, after: int, page: LogPage) -> bool:
        """Warn (``log_records_missing``) about positions above the horizon that the page skips: the log is dense
        there (account-log.md L1; emptied snapshot parts keep their positions), so the relay deleted or withholds
        them. Withholding cannot be prevented, only made visible. False when the page holds nothing although the
        relay claims more up to its head: the reader stops there instead of asking again forever."""
        previous = after
        for record in page.records:
            if record.position - 1 > max(previous, page.horizon):
                self._missing(max(previous, page.horizon) + 1, record.position - 1)
            previous = max(previous, record.position)
        if page.records or not page.more:
            return True
        if page.head > max(after, page.horizon):
            self._missing(max(after, page.horizon) + 1, page.head)
        return False

    def _missing(self, first: int, last: int) -> None:
        self._warn(
            "log_records_missing",
            f"log_records_missing: log positions {first}-{last} are missing below the relay's head: "
            "the relay deleted or withholds them",
        )

    async def _verified_key_record(self, record: LogRecord) -> tuple[log.AnyKeyRecord, list[DeviceEntry]]:
        """Decode a ``key`` record and check it against the verified list of its ``device_list_version`` (§5.1).

        Judged against the list in force when it was written: its creator may be revoked since. A v1 rotation
        (it wraps the previous key) and a v2 rotation must grant exactly that list's (grant-receiving) devices;
        epoch-1 v1 and grant-only records a subset. Raises :class:`~protocol.log.InvalidRecordError`.
        """
        key_record = log.decode_any_key_record(record.ciphertext)
        version = key_record.body.device_list_version
        if record.device_list_version is not None and record.device_list_version != version:
            raise log.InvalidRecordError(
                ErrorCode.BAD_SIGNATURE, "key record names another device list version than its header"
            )
        devices = await self._list_at(version)
        if devices is None:
            raise log.InvalidRecordError(
                ErrorCode.BAD_SIGNATURE, f"key record names device list version {version}, which does not exist"
            )
        if isinstance(key_record, log.KeyEpochRecordV2):
            log.verify_key_record_v2(key_record, account_id=self.keys.account_id, epoch=record.epoch, devices=devices)
        else:
            log.verify_key_record(
                key_record,
                account_id=self.keys.account_id,
                epoch=record.epoch,
                devices=devices,
                grant_only=not key_record.body.prev_key_wrap,
            )
        return key_record, devices

    def _granted_keys(self, key_record: log.AnyKeyRecord) -> dict[int, bytes]:
        """The epoch keys a verified key record grants this device (empty: none, or through a session)."""
        if isinstance(key_record, log.KeyEpochRecordV2):
            keys = log.unwrap_grant_v2(
                key_record,
                device_id=self.keys.device_id,
                box_private_key=self.keys.box_private_key,
                kem_seed=self.keys.kem_seed,
            )
            return keys or {}
        key = log.unwrap_grant(key_record, device_id=self.keys.device_id, box_private_key=self.keys.box_private_key)
        return {} if key is None else {key_record.body.epoch: key}

    async def _apply_keys(self, records: list[LogRecord]) -> None:
        """Apply verified key records: grants, commitments, this device's keys and each epoch's facts (§5.4).

        A record that does not verify is refused (counted, reported) and skipped; so is a rotation that
        names an older device-list version than the epoch before it (§5.4 "clients enforce").
        """
        for record in records:
            if (backup := log.decode_recovery_backup(record.ciphertext)) is not None:
                await self._apply_recovery_backup(record, backup)
                continue
            try:
                key_record, devices = await self._verified_key_record(record)
                keys = self._granted_keys(key_record)
                body = key_record.body
                creates = record.epoch == 1 or (
                    key_record.body.rotation
                    if isinstance(key_record, log.KeyEpochRecordV2)
                    else bool(key_record.body.prev_key_wrap)
                )
                previous = self.store.epoch_info(record.epoch - 1)
                if creates and previous is not None and body.device_list_version < previous.list_version:
                    raise log.InvalidRecordError(
                        ErrorCode.BAD_SIGNATURE, "key record names an older device list than the epoch before it"
                    )
            except TetherlessError as exc:
                self._refuse(record, exc)
                continue
            fmt = 2 if isinstance(key_record, log.KeyEpochRecordV2) else 1
            by_id = {d.device_id: d for d in devices}
            granted = [g.device_id for g in body.grants]
            with self.store.transaction():
                self.store.add_grants(record.epoch, granted)
                if isinstance(key_record, log.KeyEpochRecordV2):
                    for c in key_record.body.commitments:
                        self.store.put_commitment(c.epoch, c.commitment)
                    for mark in key_record.closed:  # v3: the first rotation that removed a writer closes it
                        if not self.store.counter(_CLOSED + mark.device_id):
                            self.store.advance_counter(_CLOSED + mark.device_id, mark.last_seq + 1)
                else:
                    self.store.put_commitment(record.epoch, key_record.body.key_commitment)
                info = self.store.epoch_info(record.epoch)
                writers = {g: by_id[g].sign_key for g in granted}
                if info is None and creates:
                    info = EpochInfo(
                        epoch=record.epoch,
                        record_format=fmt,
                        position=record.position,
                        list_version=body.device_list_version,
                        created_at_ms=body.created_at_ms,
                        writers=writers,
                    )
                elif info is not None:
                    info = msgspec.structs.replace(info, writers={**info.writers, **writers})
                if info is not None:
                    self.store.put_epoch_info(info)
                offered = self.store.session_key(record.epoch)
                if offered is not None:  # a key that came through a session, checked against the record now
                    self.store.drop_session_key(record.epoch)
                    if record.epoch not in keys and self._matches_commitment(record.epoch, offered):
                        keys[record.epoch] = offered
                for epoch, key in sorted(keys.items()):
                    if epoch == record.epoch or self._matches_commitment(epoch, key):
                        self.store.put_epoch_key(epoch, key, record.record_id)
                if fmt == 1 and record.epoch in keys:
                    self._unwrap_chain(record.epoch, keys[record.epoch], body, record.record_id)

    def _unwrap_chain(self, epoch: int, key: bytes, body: Any, record_id: bytes) -> None:
        """Legacy v1 epochs: ``K[n]`` unwraps ``K[n-1]`` … through ``prev_key_wrap`` (v2 epochs are independent)."""
        wrap, current = body.prev_key_wrap, key
        while wrap and epoch > 1 and self.store.epoch_key(epoch - 1) is None:
            current = log.unwrap_previous_key(current, wrap, account_id=self.keys.account_id, epoch=epoch)
            epoch -= 1
            self.store.put_epoch_key(epoch, current, record_id)
            wrap = b""  # older wraps are in older key records, applied as they are read

    def _matches_commitment(self, epoch: int, key: bytes) -> bool:
        return log.key_commitment(self.keys.account_id, epoch, key) == self.store.commitment(epoch)

    def _refuse(self, record: LogRecord, exc: TetherlessError) -> None:
        """A record this client will not trust (§5.4, §4.6): skipped, counted and reported, never applied."""
        line = f"refused log record at position {record.position} (epoch {record.epoch}): {_describe(exc)}"
        self.rejected += 1
        self._warn(exc.code.value, line)

    def _warn(self, code: str, line: str) -> None:
        """Report ``line`` once per run (stderr, and ``sync --json``) under the stable ``code`` (§18.1)."""
        if line in self.refusals:
            return
        logger.warning("%s", line)
        self.refusals.append(line)
        self.warnings.append({"warning": code, "detail": line})

    def _apply_records(self, records: list[LogRecord]) -> list[LogRecord]:
        """Apply records in order, in one transaction (:meth:`ClientStore.page`) with the cursor moved past the
        last one applied; return the ones waiting (for an epoch key, or for the rotation after a removed writer's
        last records, see :meth:`_open_event`). Every record is checked on its own; what is batched is the
        bookkeeping: epoch keys opened once per page, per-epoch record counts and the cursor written once.
        An exception (a tampered row, a rolled-back home) or a cancellation leaves the store and the cursor as
        before the page."""
        new_messages: list[HistoryMessage] = []
        infos = {i.epoch: i for i in self.store.epoch_infos()}
        keys: dict[int, bytes | None] = {}  # no key is written while a page applies (_apply_keys ran before)
        counted: dict[int, int] = {}
        waiting: list[LogRecord] = []
        applied: int | None = None
        with self.store.page():
            for index, record in enumerate(records):
                if record.kind in ("event", "state"):
                    if record.epoch not in keys:
                        keys[record.epoch] = self.store.epoch_key(record.epoch)
                    key = keys[record.epoch]
                    if key is None:
                        waiting = records[index:]  # the cursor stays before this record
                        break
                    try:
                        opened = self._open_event(record, key, infos)
                    except TetherlessError as exc:
                        self._refuse(record, exc)
                    else:
                        if opened is None:
                            self.blocked_on_rotation = True
                            self._note_held_ahead(records[index + 1 :], infos)
                            waiting = records[index:]
                            break
                        counted[record.epoch] = counted.get(record.epoch, 0) + 1
                        self._apply_plaintext(record, opened[0], new_messages, writer=opened[1])
                applied = record.position
            for epoch, count in counted.items():
                self.store.advance_counter(f"epoch_records:{epoch}", count)
            if applied is not None:
                self.store.set_cursor("log", applied)
            self._release_held()
        for message in new_messages:
            if self.on_message is not None and message.direction == "received":
                self.on_message(message, None, None)
        return waiting

    def _note_held_ahead(self, records: list[LogRecord], infos: dict[int, EpochInfo]) -> None:
        """Raise the close-out marks of removed writers to their highest record in ``records`` (the rest of the
        page after the first one waiting for the rotation): the rotation this device is about to write must close
        each removed writer after *all* of its records that precede the rotation in the log, not after the first
        one read, or its later pre-removal records would be refused as written after it. Reads only; a record
        that does not open is left to be refused when it is applied. A removed writer's records beyond this page
        are not seen (the rotation then closes it earlier, and those records are refused: account-log.md §18)."""
        current = self._chain[1] if self._chain is not None else None
        if current is None:
            return
        present = {d.device_id for d in current}
        for record in records:
            info = infos.get(record.epoch)
            key = self.store.epoch_key(record.epoch) if record.kind in ("event", "state") else None
            if key is None or info is None or info.record_format < 2:
                continue
            if any(i.epoch > record.epoch and i.position < record.position for i in infos.values()):
                continue  # refused as stale when applied
            try:
                plaintext = self._open_signed(record, key, info)
            except TetherlessError:
                continue
            writer = plaintext.writer_device
            if writer not in present:
                self._held_marks[writer] = max(self._held_marks.get(writer, 0), plaintext.writer_seq)

    def _open_signed(self, record: LogRecord, key: bytes, info: EpochInfo) -> log.LogPlaintext:
        """Open a signed (v2-epoch) record with ``key``, its signature checked against the epoch's writers.
        Raises ``bad_signature`` / ``malformed_body`` (:class:`TetherlessError`). Pure over its arguments."""
        return log.open_signed_record(
            key,
            record.ciphertext,
            writers=info.writers,
            account_id=self.keys.account_id,
            record_id=record.record_id,
            epoch=record.epoch,
            kind=record.kind,
        )

    def _open_event(
        self, record: LogRecord, key: bytes, infos: dict[int, EpochInfo]
    ) -> tuple[log.LogPlaintext, str | None] | None:
        """Open an ``event``/``state`` record and decide whether to trust it (account-log.md §4.6, §5.4).

        Returns ``(plaintext, writer)`` (writer None: a legacy unsigned record under a v1 epoch, shown as
        unauthenticated), or None when the record must wait: its writer is no longer in the verified list
        and no later epoch exists yet, so whether it was written before the removal is decided by where the
        rotation lands (this device writes it in ``ensure_epoch``). Raises ``log_epoch_stale`` for a record
        under an epoch older than one created before it in the log (a replayed or injected old-epoch record),
        ``bad_signature`` when the writer does not hold the epoch, ``malformed_body`` when it does not open.
        """
        newer = [i for i in infos.values() if i.epoch > record.epoch and i.position < record.position]
        if newer:
            raise TetherlessError(
                ErrorCode.LOG_EPOCH_STALE,
                f"written under epoch {record.epoch} after epoch {min(i.epoch for i in newer)} was created",
            )
        info = infos.get(record.epoch)
        if info is None or info.record_format < 2:
            # A legacy epoch (v1 key records): unsigned records, accepted and flagged unauthenticated.
            plaintext = log.open_record(
                key,
                record.ciphertext,
                account_id=self.keys.account_id,
                record_id=record.record_id,
                epoch=record.epoch,
                kind=record.kind,
            )
            return plaintext, None
        plaintext = self._open_signed(record, key, info)
        if plaintext.writer_device == self.keys.device_id and plaintext.writer_seq > self.store.counter("writer_seq"):
            raise StateRolledBackError(
                f"the account log holds record #{plaintext.writer_seq} written by this device, which remembers "
                f"writing only {self.store.counter('writer_seq')}: this home was restored from an older copy, and "
                "sending on its sessions would reuse ratchet keys. " + StateRolledBackError.RECOVERY
            )
        writer, seq = plaintext.writer_device, plaintext.writer_seq
        closed = self.store.counter(_CLOSED + writer)  # the close-out mark + 1 (§5.1 v3); 0: not closed
        if closed and seq > closed - 1:
            raise TetherlessError(
                ErrorCode.LOG_EPOCH_STALE,
                f"record #{seq} of {writer}, whose removal closed it at #{closed - 1}: written after the rotation",
            )
        current = self._chain[1] if self._chain is not None else None
        removed = current is not None and writer not in {d.device_id for d in current}
        if removed and not any(i.epoch > record.epoch for i in infos.values()):
            self._held_marks[writer] = max(self._held_marks.get(writer, 0), seq)  # the rotation closes it here
            return None
        self._check_writer_seq(record, writer, seq)
        return plaintext, writer

    def _check_writer_seq(self, record: LogRecord, writer: str, seq: int) -> None:
        """Per-writer ``writer_seq`` order (account-log.md §4.6 "writer order"), kept as ``writer_hw:<device>``.

        A record at or below its writer's high-water mark that is not one this device already applied (a replay
        of the same record id is harmless) is refused ``log_epoch_stale``: an honest writer appends in order, so
        the relay reordered it. A jump above the mark is flagged ``log_writer_gap`` (records withheld, or lost
        to benign races, §18.1) and applied: withholding cannot be prevented, only made visible.
        """
        high = self.store.counter(_HIGH_WATER + writer)
        if seq <= high:
            if self.store.message(record.record_id) is not None:
                return
            raise TetherlessError(
                ErrorCode.LOG_EPOCH_STALE,
                f"record #{seq} of {writer} after its #{high}: the relay reordered or replayed its records",
            )
        if high and seq > high + 1 and writer != self.keys.device_id:
            self._warn(
                "log_writer_gap",
                f"log_writer_gap: records #{high + 1}-#{seq - 1} of device {writer} are missing before log "
                f"position {record.position}: the relay may withhold them",
            )
        self.store.advance_counter(_HIGH_WATER + writer, seq - high)

    def _apply_plaintext(
        self, record: LogRecord, plaintext: log.LogPlaintext, new: list[HistoryMessage], *, writer: str | None
    ) -> None:
        body = plaintext.body
        if isinstance(body, log.MessageSent):
            sender, direction, recipients, relay_ms = body.sender, "sent", body.recipients, body.relay_sent_at_ms
        elif isinstance(body, log.MessageReceived):
            sender, direction, recipients, relay_ms = body.sender, "received", [body.recipient], body.relay_sent_at_ms
        else:
            return
        sender_device = Address.parse(sender).device
        fields: dict[str, Any] = {
            "msg_key": record.record_id,
            "message_uid": body.message_uid,
            "sender_device": sender_device,
            "direction": direction,
            "pair_seq": body.pair_seq,
            "sent_at_ms": body.sent_at_ms,
            "relay_sent_at_ms": relay_ms,
            "via": "log",
            "sender": sender,
            "recipients": recipients,
            "content_type": body.content_type,
            "body": body.body,
            "log_position": record.position,
            "late": bool(getattr(body, "late", False)),
        }
        if self.store.upsert_message(**fields):
            self.store.set_writer(record.record_id, writer)
            new.append(HistoryMessage(**fields, writer=writer, authenticated=writer is not None))
        if self.store.is_pending(record.record_id):
            # Another device logged it first (or our own append whose answer we lost): done here.
            self._mark_logged(record.record_id, record.position)

    def _mark_logged(self, record_id: bytes, position: int) -> None:
        row = self.store.db.execute(
            "SELECT outbox_local_id FROM log_pending WHERE record_id = ?", (record_id,)
        ).fetchone()
        self.store.drop_pending(record_id)
        self.store.set_position(record_id, position)
        if row and row[0] is not None:
            self.store.set_outbox_state(int(row[0]), "logged")

    # -- epochs ------------------------------------------------------------------------------------

    async def ensure_epoch(self) -> bool:
        """Create epoch 1 when the log has no key record; rotate when the newest epoch may no longer be written
        under (:meth:`rotation_reason`: a removed device holds it, the account moves to v2 key records, or the
        schedule is due); else grant every epoch key this device holds to grant-receiving devices without one.

        Format-2+ accounts write v2 key records (hybrid grants, independent epoch keys, §5.1 v2); a format-1
        account keeps v1 records (it has no post-quantum channel at all). Returns True when the log changed
        or must be read again (a ``409`` on the append: someone else wrote first or a revocation is pending).
        """
        if self.blocked_on_key and self.store.key_epochs_seen() > 0:
            return False  # waiting for a device that holds the key to grant it
        epoch = self.store.key_epochs_seen()
        version, devices = await self.device_list(fresh=epoch == 0 or self._rekey_needed)
        self._rekey_needed = False
        v2 = self._list_format >= device_list.FORMAT_2
        receiving = [d for d in devices if not v2 or device_list.receives_account_key_grants(d)]
        if epoch == 0:
            return await self._write_key_record(1, {1: self.random_bytes(log.KEY_BYTES)}, version, receiving, v2)
        held = self.store.epoch_key(epoch)
        if held is None:
            return False
        granted = self.store.granted(epoch)
        missing = [d for d in receiving if d.device_id not in granted]
        # A new device gets every epoch this device holds in one grant, so it can read the whole history (§5.5).
        history = {e: k for e in range(1, epoch + 1) if (k := self.store.epoch_key(e)) is not None}
        if self.rotation_reason(epoch, devices) is not None:
            # A device that joined since ``epoch`` was created would otherwise get only the new epoch: the
            # rotation then carries the older keys too (to every device it grants; they check commitments).
            older = history if v2 and missing else {}
            return await self._write_key_record(
                epoch + 1,
                {**older, epoch + 1: self.random_bytes(log.KEY_BYTES)},
                version,
                receiving,
                v2,
                closed=self._close_out_marks(devices) if v2 else None,
            )
        if not missing:
            return False
        if not v2:
            return await self._write_key_record(epoch, {epoch: held}, version, missing, v2)
        return await self._write_key_record(epoch, history, version, missing, v2)

    def _close_out_marks(self, devices: list[DeviceEntry]) -> dict[str, int]:
        """What a rotation commits to (account-log.md §5.1 v3): for each writer of a known epoch that is no longer
        in the verified list ``devices`` and not closed yet, the highest ``writer_seq`` of its records before the
        rotation (applied, or read and waiting for this rotation). Readers refuse its records beyond the mark,
        wherever the relay places them."""
        present = {d.device_id for d in devices}
        writers = {w for info in self.store.epoch_infos() for w in info.writers}
        return {
            w: max(self.store.counter(_HIGH_WATER + w), self._held_marks.get(w, 0))
            for w in sorted(writers - present)
            if not self.store.counter(_CLOSED + w)
        }

    def history_granted(self, device_id: str) -> bool:
        """Whether ``device_id`` is named by a grant of the newest epoch this device knows (account-log.md §5.5).

        A grant-only or rotation record names every device it hands the keys to (a format-2 entry without an
        ML-KEM key with an empty wrap: its keys travel through its session), so after :meth:`ensure_epoch`
        wrote one, this is what an approver checks before reporting the new device's history as granted.
        """
        epoch = self.store.key_epochs_seen()
        return epoch > 0 and device_id in self.store.granted(epoch)

    def rotation_reason(self, epoch: int, devices: list[DeviceEntry]) -> str | None:
        """Why nothing more may be written under ``epoch`` (None: it may). Pure over the store and ``devices``.

        - a device that was granted ``epoch`` is not in the verified list ``devices`` any more (a revocation:
          every device of an epoch's list version is granted, so this is also "the epoch's list version
          predates the latest revocation of a device that holds it");
        - the account's list is format 2 or later and ``epoch`` is a legacy (v1 key record) epoch;
        - the schedule: ``rotate_after_records`` records or ``rotate_after_seconds`` since it was created.
        """
        present = {d.device_id for d in devices}
        removed = self.store.granted(epoch) - present
        if removed:
            return f"epoch {epoch} was granted to {len(removed)} device(s) no longer in the device list"
        info = self.store.epoch_info(epoch)
        if self._list_format >= device_list.FORMAT_2 and (info is None or info.record_format < 2):
            return f"epoch {epoch} uses legacy (v1) key grants"
        if info is None:
            return None
        if self.store.counter(f"epoch_records:{epoch}") >= self.rotate_after_records:
            return f"epoch {epoch} reached {self.rotate_after_records} records"
        if self.wall_clock() * 1000 - info.created_at_ms >= self.rotate_after_seconds * 1000:
            return f"epoch {epoch} is older than {self.rotate_after_seconds:g} s"
        return None

    async def _write_key_record(
        self,
        epoch: int,
        keys: dict[int, bytes],
        version: int,
        devices: list[DeviceEntry],
        v2: bool,
        *,
        closed: dict[str, int] | None = None,
    ) -> bool:
        """Append one key record (``expected_head`` = the cursor) granting ``keys`` to ``devices``.

        ``epoch`` not yet held here: a new epoch (epoch 1 or a rotation) with the fresh key ``keys[epoch]``,
        granted to exactly ``devices`` (this device among them). Otherwise a grant-only record. v2 grants
        wrap to each device's ML-KEM and X25519 keys; a device without an ML-KEM key gets the keys through
        its v2 session only (never a classical sealed box). ``closed``: the removed writers' close-out marks a
        rotation commits to (a v3 record when not empty). Raises :class:`RetryError` after 3 refusals in a row.
        """
        creating = self.store.epoch_key(epoch) is None
        created_at_ms = int(self.wall_clock() * 1000)
        if v2:
            randomness = []
            for device in devices:
                if device.kem_key:
                    kem_ct, kem_ss = handshake.encapsulate(device.kem_key)
                    randomness.append((self.random_bytes(32), kem_ct, kem_ss))
            ciphertext = log.make_key_record_v2(
                self.keys.signing_key,
                account_id=self.keys.account_id,
                creator_device=self.keys.device_id,
                epoch=epoch,
                keys=keys,
                rotation=creating,
                device_list_version=version,
                devices=devices,
                created_at_ms=created_at_ms,
                wrap_randomness=randomness,
                closed=closed,
            )
        else:
            previous = self.store.epoch_key(epoch - 1) if creating and epoch > 1 else None
            ciphertext = log.make_key_record(
                self.keys.signing_key,
                account_id=self.keys.account_id,
                creator_device=self.keys.device_id,
                epoch=epoch,
                key=keys[epoch],
                device_list_version=version,
                devices=devices,
                created_at_ms=created_at_ms,
                ephemeral_keys=[self.random_bytes(32) for _ in devices],
                previous_key=previous,
                wrap_nonce=self.random_bytes(log.NONCE_BYTES) if previous is not None else b"",
            )
        record_id = self.random_bytes(16)
        request = AppendRequest(
            records=[
                LogRecordIn(
                    record_id=record_id,
                    kind="key",
                    epoch=epoch,
                    ciphertext=ciphertext,
                    device_list_version=version,
                )
            ],
            expected_head=max(self.store.cursor("log"), self.read_upto),
        )
        try:
            response: AppendResponse = await self._call("POST", "/v1/log", request, AppendResponse)
        except RemoteError as exc:
            if exc.code in (ErrorCode.LOG_CONFLICT, ErrorCode.LOG_EPOCH_STALE, ErrorCode.LOG_REKEY_REQUIRED):
                # Someone else wrote first, or a revocation we have not seen yet needs a new epoch:
                # read the log and the device list again, then decide again; never spin on it.
                self._rekey_needed = True
                self._stale_epochs += 1
                if self._stale_epochs > 3:
                    self._stale_epochs = 0
                    raise LogRekeyError(
                        f"the relay answered {exc.code.value} to the key record for epoch {epoch}"
                    ) from exc
                return True
            raise
        self._stale_epochs = 0
        if creating:  # a new epoch we created; the record grants it to us too
            with self.store.transaction():
                self.store.put_epoch_key(epoch, keys[epoch], b"")
                self.store.add_grants(epoch, [d.device_id for d in devices])
                self.store.put_commitment(epoch, log.key_commitment(self.keys.account_id, epoch, keys[epoch]))
                self.store.put_epoch_info(
                    EpochInfo(
                        epoch=epoch,
                        record_format=2 if v2 else 1,
                        position=response.results[0].position,
                        list_version=version,
                        created_at_ms=created_at_ms,
                        writers={d.device_id: d.sign_key for d in devices},
                    )
                )
        for e, key in sorted(keys.items()):
            session_only = [d for d in devices if not (v2 and d.kem_key)]
            await self._send_account_key(e, key, version, session_only)
        return True

    # -- recovery backup (account-log.md §5.7) -------------------------------------------------------------

    async def _apply_recovery_backup(self, record: LogRecord, backup: log.RecoveryBackupRecord) -> None:
        """Check a recovery backup record; note it when it backs up to the current list's recovery key; open it
        when this engine holds that recovery key (a device enrolled by the recovery key alone).

        A backup that does not verify is refused like a key record (counted, reported, skipped): a writer that is
        not a role-``device`` entry of its list version, a key the list does not commit to, a list version older
        than its epoch's, or an epoch older than one created before it (a removed device's late backup).
        """
        assert self.client is not None
        body = backup.backup
        try:
            version = body.device_list_version
            devices = await self._list_at(version)
            committed = await self._guard(self.client.recovery_backup_hash_at(self.keys.account_id, version))
            if devices is None or committed is None:
                raise log.InvalidRecordError(
                    ErrorCode.BAD_SIGNATURE,
                    f"recovery backup names device list version {version}, which does not exist",
                )
            info = self.store.epoch_info(record.epoch)
            if info is None:
                raise log.InvalidRecordError(ErrorCode.BAD_SIGNATURE, "recovery backup for an epoch with no key record")
            newer = self.store.epoch_info(record.epoch + 1)
            if newer is not None and newer.position < record.position:
                raise log.InvalidRecordError(
                    ErrorCode.LOG_EPOCH_STALE, f"recovery backup under epoch {record.epoch} after a newer epoch"
                )
            log.verify_recovery_backup(
                backup,
                account_id=self.keys.account_id,
                epoch=record.epoch,
                devices=devices,
                backup_key_hash=committed,
                epoch_list_version=info.list_version,
            )
            opened: dict[int, bytes] = {}
            if self.recovery is not None and committed == self._recovery_hash():
                opened = log.open_recovery_backup(backup, self.recovery)
        except TetherlessError as exc:
            self._refuse(record, exc)
            return
        current, _ = await self.device_list()
        current_hash = await self._guard(self.client.recovery_backup_hash_at(self.keys.account_id, current))
        with self.store.transaction():
            for epoch, key in sorted(opened.items()):
                if self.store.epoch_key(epoch) is None and self._matches_commitment(epoch, key):
                    self.store.put_epoch_key(epoch, key, record.record_id)
                    self.recovered_epochs.add(epoch)
            if committed == current_hash:
                remember_recovery_backup_key(self.store, body.recipient, backed_up_epoch=record.epoch)

    def backed_up_epoch(self, key_hash: bytes) -> int:
        """The newest epoch a verified backup in the log wraps to the recovery key with hash ``key_hash`` (0: none
        known to this device)."""
        note = _backup_note(self.store)
        return note.backed_up_epoch if note is not None and note.key_hash == key_hash else 0

    def _recovery_hash(self) -> bytes:
        assert self.recovery is not None
        return recovery.backup_key_hash(recovery.backup_recipient(self.recovery))

    async def ensure_recovery_backup(self) -> bool:
        """Back the newest epoch's key (with every older key this device holds) up to the recovery key the current
        list commits to, unless a verified backup of that epoch to that key is in the log (account-log.md §5.7).

        The backup public keys come from the recovery keys this engine holds (``device recovery-key``, ``device
        link --recovery-key``), else from the ones remembered by ``device init`` or from the newest verified
        backup record (:func:`remember_recovery_backup_key`); when the list commits to a key this device does not
        know (a replacement whose backup failed) nothing can be written and ``sync`` says so once. Idempotent (a
        deterministic record id); returns True when it appended or must read again. Raises what the relay calls
        raise (:class:`RetryError` for transport failures). Cancellation: an append whose answer was lost is
        found again by its record id on the next run.
        """
        epoch = self.store.key_epochs_seen()
        if self._list_format < device_list.FORMAT_2 or epoch == 0 or self.blocked_on_key:
            return False
        if self.store.epoch_key(epoch) is None:
            return False
        version, devices = await self.device_list()
        assert self.client is not None
        wanted = await self._guard(self.client.recovery_backup_hash_at(self.keys.account_id, version))
        own = next((d for d in devices if d.device_id == self.keys.device_id), None)
        if not wanted or own is None or own.role != device_list.ROLE_DEVICE:
            return False
        if self.backed_up_epoch(wanted) >= epoch:
            return False
        recipient = self._backup_recipient(wanted)
        if recipient is None:
            line = (
                "recovery backup: the device list's recovery key has no backup record, so epoch "
                f"{epoch} is not backed up; run `tetherless device recovery-key` to make a new recovery key"
            )
            self._warn("recovery_backup_missing", line)
            return False
        held = {e: k for e in range(1, epoch + 1) if (k := self.store.epoch_key(e)) is not None}
        kem_ct, kem_ss = handshake.encapsulate(recipient.kem_public)
        ciphertext = log.make_recovery_backup(
            self.keys.signing_key,
            account_id=self.keys.account_id,
            writer_device=self.keys.device_id,
            epoch=epoch,
            keys=held,
            device_list_version=version,
            recipient=recipient,
            created_at_ms=int(self.wall_clock() * 1000),
            ephemeral_private_key=self.random_bytes(32),
            kem_ciphertext=kem_ct,
            kem_shared_secret=kem_ss,
        )
        record = LogRecordIn(
            record_id=log.recovery_backup_id(self.keys.account_id, epoch, wanted),
            kind="key",
            epoch=epoch,
            ciphertext=ciphertext,
            device_list_version=version,
        )
        # The relay takes key-kind records only at the head this device has read (account-log.md §3.2).
        request = AppendRequest(records=[record], expected_head=max(self.store.cursor("log"), self.read_upto))
        try:
            await self._call("POST", "/v1/log", request, AppendResponse)
        except RemoteError as exc:
            if exc.code not in (ErrorCode.LOG_CONFLICT, ErrorCode.LOG_EPOCH_STALE, ErrorCode.LOG_REKEY_REQUIRED):
                raise
            # Someone appended first, or a newer epoch exists or is due: read (and rotate), then decide again;
            # never spin on it: after three refusals in a row the next sync tries again.
            self._backup_conflicts += 1
            if self._backup_conflicts > 3:
                self._backup_conflicts = 0
                self._warn(
                    "recovery_backup_not_written",
                    f"recovery backup of epoch {epoch} not written: the relay answered {exc.code.value}",
                )
                return False
            return True
        self._backup_conflicts = 0
        with self.store.transaction():
            remember_recovery_backup_key(self.store, recipient, backed_up_epoch=epoch)
        return True

    def _backup_recipient(self, wanted: bytes) -> hybrid.HybridRecipient | None:
        """The recovery backup public keys whose hash is ``wanted``: derived from the recovery keys this engine
        holds, or remembered from ``device init`` / a verified backup record; never keys of another hash."""
        if self.recovery is not None and self._recovery_hash() == wanted:
            return recovery.backup_recipient(self.recovery)
        note = _backup_note(self.store)
        if note is None or note.key_hash != wanted:
            return None
        return hybrid.HybridRecipient(x25519_public=note.x25519_public, kem_public=note.kem_public)

    # -- inbox ----------------------------------------------------------------------------------------

    async def read_inbox(self) -> bool:
        assert self.client is not None
        changed = False
        while True:
            batch = await self._guard(self.client.fetch(after=self.store.cursor("inbox_received")))
            if batch.items or batch.next_cursor > self.store.cursor("inbox_received"):
                self._apply_inbox(batch.items, batch.next_cursor)
                changed = True
            if not batch.more:
                return changed

    def _apply_inbox(self, items: list[Any], next_cursor: int) -> None:
        new: list[tuple[HistoryMessage, int, bytes]] = []
        with self.store.page():  # the page and inbox_received together, or neither (§10 "Receive")
            for item in items:
                if isinstance(item, RejectedMessage):
                    # Acknowledged with the page (one bad message never blocks the others), never silent.
                    self.rejected += 1
                    self._warn(
                        item.warning,
                        f"refused message (envelope {item.id.hex()}, inbox cursor {item.cursor}): "
                        f"{item.warning}: {item.code.value}: {item.detail}",
                    )
                    continue
                assert isinstance(item, ReceivedMessage)
                if item.content_type == log.ACCOUNT_KEY_CONTENT_TYPE:
                    self._account_key_received(item)
                    continue
                message = self._received(item)
                is_new = self.store.upsert_message(
                    msg_key=message.msg_key,
                    message_uid=message.message_uid,
                    sender_device=message.sender_device,
                    direction="received",
                    pair_seq=message.pair_seq,
                    sent_at_ms=message.sent_at_ms,
                    relay_sent_at_ms=message.relay_sent_at_ms,
                    via="inbox",
                    sender=message.sender,
                    recipients=message.recipients,
                    content_type=message.content_type,
                    body=message.body,
                    inbox_seen=True,
                )
                self.store.set_writer(message.msg_key, self.keys.device_id)  # this device logs it (§9)
                row = self.store.db.execute(
                    "SELECT log_position FROM history_messages WHERE msg_key = ?", (message.msg_key,)
                ).fetchone()
                if row is not None and row[0] is None and not self.store.is_pending(message.msg_key):
                    # Logged only in pair_seq order (§9): held back until its predecessors are here.
                    self.store.hold(message.msg_key, item.cursor)
                if is_new:
                    new.append((message, item.cursor, item.id))
            self.store.set_cursor("inbox_received", max(next_cursor, self.store.cursor("inbox_received")))
            self._release_held()
        for message, cursor, envelope_id in new:
            if self.on_message is not None:
                self.on_message(message, cursor, envelope_id)

    def _account_key_received(self, item: ReceivedMessage) -> None:
        """A ``tetherless/account-key`` session message (crypto.md §12): an epoch key from a sibling device.

        Accepted only from a current device of this account (the SDK verified the sender against the
        verified list) and only if it matches the ``key_commitment`` of that epoch's verified key record;
        when the record is not read yet, the key waits in ``log_session_keys`` for it (``_apply_keys``).
        Never shown, never logged; acknowledged with the rest of the page.
        """
        try:
            if Address.parse(item.sender).account != self.keys.account_id:
                raise ValueError("from another account")
            grant = codec.decode(item.body, AccountKeyMessage)
            if grant.epoch < 1 or len(grant.key) != log.KEY_BYTES:
                raise ValueError("malformed")
        except (ValueError, TetherlessError) as exc:
            logger.warning("ignoring an account-key message from %s: %s", item.sender, exc)
            self.rejected += 1
            return
        commitment = self.store.commitment(grant.epoch)
        if commitment is None:
            self.store.offer_session_key(grant.epoch, grant.key)
        elif log.key_commitment(self.keys.account_id, grant.epoch, grant.key) == commitment:
            self.store.put_epoch_key(grant.epoch, grant.key, b"session")
        else:
            logger.warning("ignoring an account-key message from %s: key does not match its commitment", item.sender)
            self.rejected += 1

    async def _send_account_key(self, epoch: int, key: bytes, version: int, devices: list[DeviceEntry]) -> None:
        """Send ``K[epoch]`` to the account's other ``devices`` through their sessions (crypto.md §12).

        Best effort: the key record's grants in the log stay the durable path (account-log.md §17), so a
        device without prekeys, an unreachable relay or an expired envelope loses nothing.
        """
        client = self.client
        if client is None or client.sessions is None:
            return
        body = codec.encode(AccountKeyMessage(epoch=epoch, key=key, list_version=version))
        relay = Address.parse(self.keys.address).relay
        for device in devices:
            if device.device_id == self.keys.device_id:
                continue
            address = str(Address(account=self.keys.account_id, relay=relay, device=device.device_id))
            try:
                await client.send_many([Outgoing(address, body, log.ACCOUNT_KEY_CONTENT_TYPE)])
            except (TetherlessError, TransportError, PrekeysUnavailableError) as exc:
                logger.info("account key %d not sent to %s through a session: %s", epoch, address, exc)

    def _release_held(self) -> None:
        """Queue the ``message-received`` record of every held message whose predecessors are all here.

        A message held longer than ``holdback_seconds`` is released with ``late``
        (a gap that never filled, e.g. a message its sender gave up on).
        """
        now = self.store.now_ms()
        for msg_key, sender_device, pair_seq, cursor, since in self.store.held():
            ready = pair_seq <= 0 or self.store.has_predecessors(sender_device, pair_seq)
            late = not ready and now - (since or now) >= self.holdback_seconds * 1000
            if not (ready or late):
                continue
            message = self.store.message(msg_key)
            assert message is not None
            plaintext = log.LogPlaintext(
                writer_device=self.keys.device_id,
                writer_seq=0,  # given when it is first sealed (append_pending)
                created_at_ms=now,
                body=log.MessageReceived(
                    message_uid=message.message_uid,
                    sender=message.sender,
                    sender_sign_key=b"",
                    recipient=self.keys.address,
                    pair_seq=message.pair_seq,
                    sent_at_ms=message.sent_at_ms,
                    relay_sent_at_ms=message.relay_sent_at_ms,
                    content_type=message.content_type,
                    body=message.body,
                    late=late,
                ),
            )
            self.store.release(msg_key, late=late)
            self.store.add_pending(msg_key, "event", encode_plaintext(plaintext), inbox_cursor=cursor)

    def _received(self, item: ReceivedMessage) -> HistoryMessage:
        pair_seq, content_type, body = 0, item.content_type, item.body
        if item.content_type == log.FRAME_CONTENT_TYPE:
            try:
                frame = log.unframe_message(item.body)
                pair_seq, content_type, body = frame.pair_seq, frame.content_type, frame.body
            except TetherlessError:
                pass
        return HistoryMessage(
            msg_key=log.message_record_id(self.keys.account_id, item.sender, item.message_id),
            message_uid=item.message_id,
            sender_device=Address.parse(item.sender).device,
            direction="received",
            pair_seq=pair_seq,
            sent_at_ms=item.sent_at_ms,
            relay_sent_at_ms=item.relay_sent_at_ms,
            log_position=None,
            via="inbox",
            late=False,
            sender=item.sender,
            recipients=[self.keys.address],
            content_type=content_type,
            body=body,
        )

    async def ack(self) -> None:
        point = self.store.ack_point()
        if point > self.store.cursor("inbox_acked"):
            assert self.client is not None
            await self._guard(self.client.ack(up_to=point))
            with self.store.transaction():
                self.store.set_cursor("inbox_acked", point)

    # -- outbox ---------------------------------------------------------------------------------------

    async def flush_outbox(self, only: int | None = None) -> bool:
        """Seal queued entries, post sealed ones (in outbox order, batched). True if anything moved.

        Sealing follows crypto.md §8.5: the recipients and sessions are resolved first (network), then
        one local transaction re-checks that the entry is still ``queued``, advances the ratchets (v2)
        or seals the boxes (v1), and stores the finished envelopes with ``state = sealed``; only then
        are they posted, and every retry posts those identical bytes.

        One entry never stops another (account-log.md §10 "Outbox entry states"): each failure is
        classified by :func:`protocol.client.outbox.classify`. A permanent one fails that entry only; a
        transient one (its destination relay unreachable, no prekeys, the recipient's inbox full) makes
        that entry — and, in this run, the other entries to the same destination — wait with a backoff
        (``next_attempt_at_ms``; a new engine, e.g. the next ``tetherless sync``, and ``only`` try it once
        at once); only a failure of the home relay (:class:`RetryError`) or this device's revocation
        (:class:`RevokedError`) leaves this method. Cancellation: the local transactions are atomic and
        every step is redone from the stored state.
        """
        changed = False
        now = self.store.now_ms()
        due = [e for e in self.store.outbox(("queued", "sealed")) if self._due(e, only, now)]
        if due and not self._limits_noted:
            assert self.client is not None
            known = await self._guard(self.client.well_known())
            outbox.remember_max_envelope_bytes(self.store, known.limits.max_envelope_bytes)
            self._limits_noted = True
        queued = [e for e in due if e.state == "queued"]
        for start in range(0, len(queued), _POST_BATCH):
            chunk = queued[start : start + _POST_BATCH]
            prepared = [(entry, await self._prepare(entry)) for entry in chunk]
            with self.store.transaction():
                for entry, outcome in prepared:
                    current = self.store.outbox_entry(entry.local_id)
                    if current is None or current.state != "queued":
                        continue  # another process sealed (or cancelled) it first: its outcome wins
                    if isinstance(outcome, outbox.Transient):
                        self._wait(current, outcome)
                    elif isinstance(outcome, outbox.Permanent):
                        self._fail(current, outcome)
                        changed = True
                    else:
                        # ``current``, not ``entry``: a failure just before may have given its pair_seq back.
                        self.store.put_envelopes(current.local_id, self._seal(current, outcome))
                        self.store.reschedule(current.local_id, "sealed")
                        changed = True
        now = self.store.now_ms()
        sealed = [e for e in self.store.outbox(("sealed",)) if self._due(e, only, now)]
        for start in range(0, len(sealed), _POST_BATCH):
            chunk = sealed[start : start + _POST_BATCH]
            batch: list[tuple[int, int, OutboundEnvelope]] = []
            for entry in chunk:
                for n, recipient, key, ciphertext, accepted, _ in self.store.envelopes(entry.local_id):
                    if accepted is None:
                        envelope = OutboundEnvelope(recipient=recipient, idempotency_key=key, ciphertext=ciphertext)
                        batch.append((entry.local_id, n, envelope))
            refused: set[int] = set()
            for i in range(0, len(batch), _POST_BATCH):
                await self._post(batch[i : i + _POST_BATCH], refused)
            with self.store.transaction():
                for entry in chunk:
                    self._posted(entry.local_id)
            changed = True
        return changed

    def _due(self, entry: OutboxEntry, only: int | None, now_ms: int) -> bool:
        """Whether to work on ``entry`` now: ``only`` names it, or it did not wait in this run, or its wait is over."""
        if only is not None:
            return entry.local_id == only
        return entry.local_id not in self._waited or entry.next_attempt_at_ms <= now_ms

    async def _prepare(self, entry: OutboxEntry) -> _Recipients | outbox.Transient | outbox.Permanent:
        """Who gets an entry and how (network only, nothing sealed yet), or why it waits or fails for good.

        v2 (sessions, crypto.md §9) when this device has sessions and the recipient's account has a
        format-2 list: sessions are started from claimed prekey bundles where missing (through this
        relay, also for remote addresses). Otherwise v1 sealed boxes to the devices' box keys. When the
        recipient's relay cannot be reached, the targets of the last successful preparation are used if
        every session exists already (account-log.md §10: the home relay queues remote envelopes itself).
        Raises :class:`RetryError` / :class:`RevokedError` only (the home relay, this device).
        """
        refused = outbox.special_use_relay(entry.recipient)
        if refused is not None:
            return refused
        try:
            address = Address.parse(entry.recipient)
        except TetherlessError as exc:
            return outbox.Permanent(exc.code.value, _describe(exc))
        blocked = self._unreachable.get(address.relay)
        if blocked is not None and blocked[1] > self.store.now_ms():
            return await self._cached_recipients(entry) or blocked[0]
        try:
            recipients = await self._resolve(entry, address)
        except Exception as exc:  # classified; a failure of the home relay or of this device is re-raised
            verdict = outbox.classify(exc, address.relay)
            if isinstance(verdict, outbox.Home):
                await self._guard(_raise(exc))
                raise
            if isinstance(verdict, outbox.Transient) and verdict.destination:
                delay = outbox.retry_delay_seconds(entry.attempts, self.rng, verdict.retry_after_seconds)
                self._unreachable[address.relay] = (verdict, self.store.now_ms() + int(delay * 1000))
                return await self._cached_recipients(entry) or verdict
            return verdict
        outbox.remember_targets(self.store, entry.recipient, outbox.CachedTargets(v2=recipients.v2, v1=recipients.v1))
        return recipients

    async def _resolve(self, entry: OutboxEntry, address: Address) -> _Recipients:
        """The verified recipient devices of ``entry`` and, for v2, their sessions. Raises what the SDK raises."""
        client = self.client
        assert client is not None
        if client.sessions is not None:
            head, entries = await client._verified_head(address.account, address.relay)
            if head.format >= device_list.FORMAT_2:
                targets = [
                    (str(Address(account=address.account, relay=address.relay, device=e.device_id)), e)
                    for e in entries
                    if e.device_id == address.device or (not address.device and e.device_id != self.keys.device_id)
                ]
                if address.device and not targets:
                    raise TetherlessError(
                        ErrorCode.UNKNOWN_RECIPIENT, "the device is not in its account's current device list"
                    )
                if not targets:
                    raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "that account has no other device to send to")
                await client._ensure_sessions(targets)
                version, _ = await self.device_list()
                return _Recipients(v2=[a for a, _ in targets], sender_list_version=version)
        devices = await client._recipient_devices(entry.recipient)
        if not devices:
            raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "that account has no other device to send to")
        return _Recipients(v1=devices)

    async def _cached_recipients(self, entry: OutboxEntry) -> _Recipients | None:
        """The last verified targets of ``entry``'s recipient, if they can be used without its relay (v2: every
        session exists), else None."""
        cached = outbox.cached_targets(self.store, entry.recipient)
        client = self.client
        if cached is None or client is None:
            return None
        if cached.v2 is not None:
            sessions = client.sessions
            if sessions is None or not cached.v2 or not all(sessions.has_session(a) for a in cached.v2):
                return None
            version, _ = await self.device_list()
            return _Recipients(v2=list(cached.v2), sender_list_version=version)
        return _Recipients(v1=list(cached.v1)) if cached.v1 else None

    def _wait(self, entry: OutboxEntry, verdict: outbox.Transient) -> None:
        """A transient failure: ``entry`` waits (``retrying``) with a backoff; the others go on."""
        self._waited.add(entry.local_id)
        delay = outbox.retry_delay_seconds(entry.attempts, self.rng, verdict.retry_after_seconds)
        self.store.note_attempt(
            entry.local_id,
            verdict.reason,
            self.store.now_ms() + int(delay * 1000),
            reason_code=verdict.code,
            destination=verdict.destination,
        )

    def _fail(self, entry: OutboxEntry, verdict: outbox.Permanent) -> None:
        """A permanent failure of ``entry`` only. Before anything was sealed, its ``pair_seq`` is given back."""
        with self.store.transaction():
            if not self.store.envelopes(entry.local_id):
                self.store.give_back_pair_seq(entry)
            self.store.set_outbox_state(entry.local_id, "failed", error=verdict.reason, reason_code=verdict.code)

    def _seal(self, entry: OutboxEntry, recipients: _Recipients) -> list[tuple[str, bytes, bytes]]:
        """The envelopes of one entry (one per recipient device). Called inside the outbox transaction:
        a v2 seal stores the advanced session state in that same transaction (crypto.md §8.5)."""
        assert self.client is not None
        framed = log.frame_message(entry.pair_seq, entry.content_type, entry.body)
        if recipients.v2 is not None:
            sessions = self.client.sessions
            assert sessions is not None
            return [
                (
                    address,
                    log.envelope_key(entry.message_uid, address),
                    sessions.seal(
                        address,
                        sender_list_version=recipients.sender_list_version,
                        sent_at_ms=entry.sent_at_ms,
                        message_id=entry.message_uid,
                        content_type=log.FRAME_CONTENT_TYPE,
                        body=framed,
                    ),
                )
                for address in recipients.v2
            ]
        cipher = self.client._cipher
        assert cipher is not None
        return [
            (
                address,
                log.envelope_key(entry.message_uid, address),
                cipher.seal(
                    recipient=address,
                    recipient_box_key=box_key,
                    sent_at_ms=entry.sent_at_ms,
                    message_id=entry.message_uid,
                    content_type=log.FRAME_CONTENT_TYPE,
                    body=framed,
                    entropy=self.random_bytes(cipher.entropy_bytes),
                ),
            )
            for address, box_key in recipients.v1 or []
        ]

    async def _post(self, batch: list[tuple[int, int, OutboundEnvelope]], refused: set[int]) -> None:
        """``POST /v1/messages`` with the stored bytes and keys; the receipts in one transaction.

        The relay takes or refuses a batch as a whole (protocol.md §5), so a batch refused for an entry's
        reason is split in halves until the refused envelope is alone: every other envelope is committed.
        A refused envelope fails its entry (added to ``refused``: its other envelopes are not posted), or
        makes it wait (``inbox_full``); a device removed from an account address since sealing loses only
        its own envelope. Raises :class:`RetryError` / :class:`RevokedError` for the home relay and this device.
        """
        batch = [b for b in batch if b[0] not in refused]
        if not batch:
            return
        assert self.client is not None
        try:
            response: SendResponse = await self.client._call(
                "POST", "/v1/messages", SendRequest(envelopes=[b[2] for b in batch]), SendResponse
            )
        except Exception as exc:  # classified; a failure of the home relay or of this device is re-raised
            verdict = outbox.classify(exc, "")
            if isinstance(verdict, outbox.Home):
                await self._guard(_raise(exc))
                raise
            if len(batch) > 1:
                half = len(batch) // 2
                await self._post(batch[:half], refused)
                await self._post(batch[half:], refused)
                return
            self._refused(batch[0], verdict, refused)
            return
        if len(response.accepted) != len(batch):
            raise RetryError(f"the relay answered {len(response.accepted)} receipts for {len(batch)} envelopes")
        with self.store.transaction():
            for (local_id, n, _), accepted in zip(batch, response.accepted, strict=True):
                self.store.set_receipt(local_id, n, accepted.id, accepted.sent_at_ms)

    def _refused(
        self, item: tuple[int, int, OutboundEnvelope], verdict: outbox.Transient | outbox.Permanent, refused: set[int]
    ) -> None:
        local_id, n, _ = item
        with self.store.transaction():
            entry = self.store.outbox_entry(local_id)
            if entry is None or entry.state != "sealed":
                return  # cancelled meanwhile
            if isinstance(verdict, outbox.Transient):
                self._wait(entry, verdict)
                refused.add(local_id)
                return
            removed = verdict.code in (ErrorCode.UNKNOWN_RECIPIENT.value, ErrorCode.RECIPIENT_REVOKED.value)
            to_account = "." not in entry.recipient.split("@", 1)[0]
            if removed and to_account and len(self.store.envelopes(local_id)) > 1:
                self.store.drop_envelope(local_id, n)  # that device left the account; the others still get it
                return
            self._fail(entry, verdict)
            refused.add(local_id)

    def _posted(self, local_id: int) -> None:
        """Step 4 of §10: the ``message-sent`` record and the local message, with ``state = posted``."""
        entry = self.store.outbox_entry(local_id)
        if entry is None or entry.state != "sealed":
            return
        envelopes = self.store.envelopes(local_id)
        if any(e[4] is None for e in envelopes):
            return
        relay_ms = max((e[5] or 0) for e in envelopes)
        record_id = log.message_record_id(self.keys.account_id, self.keys.address, entry.message_uid)
        recipients = [e[1] for e in envelopes]
        plaintext = log.LogPlaintext(
            writer_device=self.keys.device_id,
            writer_seq=0,
            created_at_ms=self.store.now_ms(),
            body=log.MessageSent(
                message_uid=entry.message_uid,
                sender=self.keys.address,
                recipients=recipients,
                pair_seq=entry.pair_seq,
                sent_at_ms=entry.sent_at_ms,
                content_type=entry.content_type,
                body=entry.body,
                envelope_ids=[e[4] for e in envelopes if e[4] is not None],
                relay_sent_at_ms=relay_ms,
            ),
        )
        with self.store.transaction():
            self.store.upsert_message(
                msg_key=record_id,
                message_uid=entry.message_uid,
                sender_device=self.keys.device_id,
                direction="sent",
                pair_seq=entry.pair_seq,
                sent_at_ms=entry.sent_at_ms,
                relay_sent_at_ms=relay_ms,
                via="local",
                sender=self.keys.address,
                recipients=recipients,
                content_type=entry.content_type,
                body=entry.body,
            )
            self.store.set_writer(record_id, self.keys.device_id)
            self.store.add_pending(record_id, "event", encode_plaintext(plaintext), outbox_local_id=local_id)
            self.store.set_outbox_state(local_id, "posted")

    # -- appending ------------------------------------------------------------------------------------

    def _seal_event(
        self, key: bytes, record_id: bytes, epoch: int, plaintext: log.LogPlaintext, *, signed: bool
    ) -> bytes:
        """An ``event`` record: signed by this device under a v2 epoch (§4.6), the legacy layout under a v1 one."""
        nonce = self.random_bytes(log.NONCE_BYTES)
        if signed:
            return log.seal_signed_record(
                key,
                plaintext,
                self.keys.signing_key,
                account_id=self.keys.account_id,
                record_id=record_id,
                epoch=epoch,
                nonce=nonce,
            )
        return log.seal_record(
            key, plaintext, account_id=self.keys.account_id, record_id=record_id, epoch=epoch, nonce=nonce
        )

    async def append_pending(self) -> bool:
        """Append ``log_pending`` in order, batched, under the newest epoch. True if anything was appended."""
        epoch = self.store.newest_epoch()
        key = self.store.epoch_key(epoch) if epoch else None
        if key is None or not self.store.pending(1):
            return False
        # Never append under an epoch a removed device holds, or one due for rotation (§5.4 "clients enforce"),
        # whatever the relay would accept: ensure_epoch ran just before and could not rotate it.
        _, devices = await self.device_list()
        reason = self.rotation_reason(epoch, devices)
        if reason is not None and self._rekey_needed:
            return True  # ensure_epoch lost a race (409): read the winner's key record first, then decide again
        if reason is not None:
            raise LogRekeyError(f"{reason}, and its rotation was not accepted yet; nothing is appended")
        info = self.store.epoch_info(epoch)
        signed = info is not None and info.record_format >= 2
        changed = False
        while True:
            pending = self.store.pending(_APPEND_BATCH)
            if not pending:
                return changed
            with self.store.transaction():  # the counter is durable before any record carrying it leaves
                plaintexts = [self._numbered(p.record_id, decode_plaintext(p.plaintext)) for p in pending]
            records = [
                LogRecordIn(record_id=p.record_id, kind="event", epoch=epoch, ciphertext=self._seal_event(
                    key, p.record_id, epoch, plaintext, signed=signed
                ))
                for p, plaintext in zip(pending, plaintexts, strict=True)
            ]  # fmt: skip
            try:
                response: AppendResponse = await self._call(
                    "POST", "/v1/log", AppendRequest(records=records), AppendResponse
                )
            except RemoteError as exc:
                if exc.code in (ErrorCode.LOG_EPOCH_STALE, ErrorCode.LOG_REKEY_REQUIRED):
                    # Read the log (new key records) or rotate, then try again; never spin on it.
                    self._rekey_needed = True
                    self._stale_appends += 1
                    if self._stale_appends > 3:
                        self._stale_appends = 0
                        raise RetryError(exc.code.value) from exc
                    return True
                raise
            self._stale_appends = 0
            with self.store.transaction():
                for result in response.results:
                    self._mark_logged(result.record_id, result.position)
                    self._assigned_seqs.pop(result.record_id, None)
            changed = True

    def _numbered(self, record_id: bytes, plaintext: log.LogPlaintext) -> log.LogPlaintext:
        """``plaintext`` with this device's next ``writer_seq``, given when the record is first sealed rather than
        queued, and the same on every retry in this process: a record dropped because another device logged the
        same message first never burns a number, so readers see no gap for it (account-log.md §4.6). A pending
        record queued by an older client keeps the number it has."""
        if plaintext.writer_seq:
            return plaintext
        seq = self._assigned_seqs.get(record_id)
        if seq is None:
            seq = self._assigned_seqs[record_id] = self.store.next_counter("writer_seq")
        return msgspec.structs.replace(plaintext, writer_seq=seq)


class AccountKeyMessage(msgspec.Struct, frozen=True):
    """The body of a ``tetherless/account-key`` session message (crypto.md §12): ``K[epoch]`` and the
    device-list version its key record names."""

    epoch: int
    key: bytes
    list_version: int


@dataclass(frozen=True)
class _Recipients:
    """How to seal one outbox entry: v1 ``(device address, box key)`` pairs, or v2 device addresses."""

    v1: list[tuple[str, bytes]] | None = None
    v2: list[str] | None = None
    sender_list_version: int = 0


class RecoveryBackupNote(msgspec.Struct, frozen=True):
    """The recovery backup key this device backs epochs up to, and the newest epoch a backup to it covers."""

    x25519_public: bytes
    kem_public: bytes
    backed_up_epoch: int = 0

    @property
    def key_hash(self) -> bytes:
        return recovery.backup_key_hash(hybrid.HybridRecipient(self.x25519_public, self.kem_public))


def _backup_note(store: ClientStore) -> RecoveryBackupNote | None:
    return store.db.get_struct(RECOVERY_BACKUP_TABLE, "current", RecoveryBackupNote)


def remember_recovery_backup_key(
    store: ClientStore, recipient: hybrid.HybridRecipient, *, backed_up_epoch: int = 0
) -> None:
    """Remember the public recovery backup key (account-log.md §5.7): ``device init`` does it for the key it made,
    the engine for every verified backup to the key the current list commits to. Public keys only; the hash is
    checked against the list before each use. Keeps the higher ``backed_up_epoch`` for the same key. Idempotent."""
    note = RecoveryBackupNote(recipient.x25519_public, recipient.kem_public, backed_up_epoch)
    old = _backup_note(store)
    if old is not None and old.key_hash == note.key_hash:
        note = msgspec.structs.replace(note, backed_up_epoch=max(old.backed_up_epoch, backed_up_epoch))
    store.db.put_struct(RECOVERY_BACKUP_TABLE, "current", note)


async def _raise(exc: BaseException) -> None:
    raise exc


def format_status(status: Status) -> str:
    stamp = time.strftime("%H:%M:%S")
    line = (
        f"{stamp} {status.state}  log={status.log_cursor}/{status.log_head}  inbox={status.inbox}  "
        f"outbox={status.outbox}  pending={status.pending}"
    )
    if status.state == "backoff":
        line += f"  attempt={status.attempt} delay={status.delay_s}s ({status.reason})"
    return line


def status_json(status: Status) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "at_ms": int(time.time() * 1000),
        "state": status.state,
        "log": status.log_cursor,
        "head": status.log_head,
        "inbox": status.inbox,
        "outbox": status.outbox,
        "pending": status.pending,
    }
    if status.state == "backoff":
        doc.update(attempt=status.attempt, delay_s=status.delay_s, reason=status.reason)
    return doc


__all__ = [
    "TRANSITIONS",
    "AccountKeyMessage",
    "RetryError",
    "RevokedError",
    "Status",
    "SyncEngine",
    "SyncOutcome",
    "backoff_delay",
    "format_status",
    "status_json",
]
