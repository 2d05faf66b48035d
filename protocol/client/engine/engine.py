"""The sync engine's coordinator (docs/account-log.md §10-§11, docs/decisions/0011-sync-engine-parts.md).

One :class:`SyncEngine` per device and process. :meth:`SyncEngine.run` is the
supervisor: ``Connecting → CatchingUp → Live`` (with ``follow``) or
``Stopped`` once quiescent (without), and ``Backoff`` on any transport error,
5xx or 429, with "full jitter" ``uniform(0, min(max_backoff, 0.5 s · 2^attempt))``
(``Retry-After`` a floor; ``attempt`` resets after 30 s live). 403
``device_revoked`` ends in ``RevokedError`` (:attr:`SyncOutcome.REVOKED`). A TLS set-up error
(``TLSSetupError``: untrusted certificate, ``http://`` vs ``https://``) is not retried: waiting fixes nothing.

One *drain* step (``CatchingUp``; repeated until nothing changes), each by the part that owns it:

1. **log reader** (:mod:`.snapshots`, then :mod:`.log`): start from the newest snapshot when far behind, then
   page ``GET /v1/log`` from the ``log`` cursor; key records are applied first (epoch keys from grants), then
   records in position order, each page in one local transaction with the cursor (§10 "Read"). A record whose
   epoch key this device does not hold yet stops the cursor; the reader keeps paging for key records and
   resumes once the key arrives.
2. **epochs** (:mod:`.epochs`): no key record in the whole log → create epoch 1 (``expected_head`` = cursor);
   current devices without a grant → a grant-only record; a rotation when one is due; the recovery backup.
3. **inbox** (:mod:`.inbox`): page the inbox; each page in one transaction: upsert the messages, enqueue their
   ``message-received`` records in ``log_pending``, advance ``inbox_received``.
4. **outbox** (:mod:`.outbox`): ``queued → sealed`` (envelopes sealed once and stored), ``sealed → posted``
   (``POST /v1/messages`` with the stored idempotency keys and bytes; the ``message-sent`` record and the local
   message row in the same transaction as the receipts).
5. **log appender** (:mod:`.log`): ``log_pending`` in ``seq`` order, in batches, encrypted under the newest epoch
   key; on 201 one transaction drops them, sets the messages' positions and marks the outbox rows ``logged``.
6. **acker** (:mod:`.inbox`): ``POST /v1/inbox/ack up_to`` the highest cursor whose messages are all logged
   (custody rule D5), then ``inbox_acked``.

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
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import msgspec
import trio

from ... import codec, device_list, recovery
from ...errors import RemoteError, UnknownRemoteError
from ...messages import (
    AppendRequest,
    AppendResponse,
    DeviceEntry,
    LogHeartbeat,
    LogPage,
    LogRecord,
    LogRetention,
    OutboundEnvelope,
    SendResponse,
    WellKnown,
)
from ..http import TransportError
from ..keystore import DeviceKeys
from ..sdk import InboxBatch, Outgoing, Recipients, RelayClient, SealedEnvelope, Sent
from ..sessions import SessionManager
from ..store import ClientStore, HistoryMessage
from .base import Context, Report, RetryError, RevokedError, guarded, raise_guarded
from .epochs import DEFAULT_ROTATE_AFTER_RECORDS, DEFAULT_ROTATE_AFTER_SECONDS, Epochs
from .inbox import Inbox
from .lists import DeviceLists
from .log import LogAppender, LogReader
from .outbox import Outbox
from .pending import HoldBack
from .snapshots import Snapshots

T = TypeVar("T")

LIVE_RESET_SECONDS: Final = 30.0

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


def backoff_delay(attempt: int, rng: random.Random, max_backoff: float = 60.0, floor: float | None = None) -> float:
    """Full jitter: ``uniform(0, min(max_backoff, 0.5 · 2^attempt))``, at least ``floor``."""
    delay = rng.uniform(0, min(max_backoff, 0.5 * 2 ** min(attempt, 30)))
    return max(delay, floor or 0.0)


class Status(msgspec.Struct):
    state: str = "stopped"
    attempt: int = 0
    delay_s: float = 0.0
    reason: str = ""
    log_cursor: int = 0
    log_head: int = 0
    inbox: int = 0
    outbox: int = 0
    pending: int = 0
    extra: dict[str, Any] = msgspec.field(default_factory=dict)


class _Relay:
    """The parts' :class:`~protocol.client.engine.base.Relay` port over the engine's current client: the one place
    the engine's parts reach the SDK, through the client's typed, public methods (``client.api`` for the account-log
    routes, which are :func:`~protocol.client.engine.base.guarded` here; a test plays a lying relay by wrapping
    those ``client.api`` methods)."""

    def __init__(self, engine: SyncEngine) -> None:
        self._engine = engine

    def _client(self) -> RelayClient:
        client = self._engine.client
        assert client is not None, "the engine is not connected"
        return client

    @property
    def connection(self) -> object | None:
        return self._engine.client

    @property
    def sessions(self) -> SessionManager | None:
        client = self._engine.client
        return client.sessions if client is not None else None

    async def log_page(self, after: int, limit: int) -> LogPage:
        return await guarded(self._client().api.log_page(after=after, limit=limit))

    async def log_append(self, request: AppendRequest) -> AppendResponse:
        api = self._client().api
        return await guarded(api.log_append(request.records, expected_head=request.expected_head))

    async def snapshot_page(self, snapshot_id: bytes, after: int, limit: int) -> LogPage:
        return await guarded(self._client().api.snapshot_parts(snapshot_id, after=after, limit=limit))

    async def retention(self) -> LogRetention:
        return await guarded(self._client().api.log_retention())

    async def set_retention(self, policy: LogRetention) -> LogRetention:
        return await guarded(self._client().api.set_log_retention(policy))

    async def device_chain(self, account_id: str) -> device_list.VerifiedChain:
        return await self._client().device_chain(account_id)

    async def list_at(self, account_id: str, version: int) -> list[DeviceEntry] | None:
        return await self._client().list_at(account_id, version)

    async def recovery_backup_hash_at(self, account_id: str, version: int) -> bytes | None:
        return await self._client().recovery_backup_hash_at(account_id, version)

    async def inbox_page(self, after: int) -> InboxBatch:
        return await self._client().fetch(after=after)

    async def ack(self, up_to: int) -> Any:
        return await self._client().ack(up_to=up_to)

    async def well_known(self) -> WellKnown:
        return await self._client().well_known()

    async def resolve_recipients(self, recipient: str) -> Recipients:
        return await self._client().resolve_recipients(recipient, fan_out=False)

    def seal_envelopes(
        self,
        recipients: Recipients,
        *,
        message_id: Callable[[str], bytes],
        sent_at_ms: int,
        content_type: str,
        body: bytes,
    ) -> list[SealedEnvelope]:
        return self._client().seal_envelopes(
            recipients, message_id=message_id, sent_at_ms=sent_at_ms, content_type=content_type, body=body
        )

    async def send_envelopes(self, envelopes: list[OutboundEnvelope]) -> SendResponse:
        return await self._client().api.send_envelopes(envelopes)

    async def send_many(self, messages: Iterable[Outgoing]) -> list[Sent]:
        return await self._client().send_many(messages)


class SyncEngine:
    """See the module doc. ``on_message`` is called (after the commit) for each newly stored received message.

    The coordinator: it owns the state machine (:attr:`status`), the retries, the current connection
    (:attr:`client`, set by :meth:`run` / :meth:`connected`, or by a caller that connected itself) and the
    rollback check, and builds the parts, which own the rest (:attr:`lists`, :attr:`epochs`, :attr:`inbox`,
    :attr:`outbox`, :attr:`log`, :attr:`appender`, :attr:`snapshots`; :attr:`report` collects their warnings)."""

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
        self.on_status = on_status
        self.rng = rng or random.Random()
        self.max_backoff = max_backoff
        self.poll_seconds = poll_seconds
        self.request_timeout = request_timeout_seconds
        self.status = Status()
        self.client: RelayClient | None = None
        self.rollback_checked = False  # the log was read once before anything is sealed (crypto.md §13.2)
        self.random_bytes = random_bytes
        self.last_failure = ""  # the reason of the last retried failure (the CLI's error line on giving up)
        self._kick = trio.Event()
        self.report = Report()
        ctx = Context(keys, store, _Relay(self), self.report, random_bytes, wall_clock, self.rng)
        self.lists = DeviceLists(ctx)
        self.holdback = HoldBack(ctx, holdback_seconds)
        self.epochs = Epochs(
            ctx, self.lists, rotate_after_records=rotate_after_records, rotate_after_seconds=rotate_after_seconds
        )
        self.inbox = Inbox(ctx, self.epochs, self.holdback, on_message=on_message)
        self.outbox = Outbox(ctx, self.lists)
        self.log = LogReader(ctx, self.lists, self.epochs, self.holdback, on_message=on_message)
        self.appender = LogAppender(ctx, self.lists, self.epochs)
        self.snapshots = Snapshots(ctx, self.lists, self.epochs, self.log, self.holdback, on_message=on_message)

    # -- what the command line reads ---------------------------------------------------------------------

    @property
    def log_head(self) -> int:
        """The highest log head the relay reported in this run."""
        return self.log.head

    @property
    def rejected(self) -> int:
        """Records, envelopes and session messages refused in this run."""
        return self.report.rejected

    @property
    def refusals(self) -> list[str]:
        """One line per record refused (§4.6, §5.4) or epoch without a key (§5.5) in this run."""
        return self.report.refusals

    @property
    def warnings(self) -> list[dict[str, str]]:
        """The same, structured for ``sync --json``: ``{"warning": code, "detail": line}`` (account-log.md §18.1)."""
        return self.report.warnings

    @property
    def recovery(self) -> recovery.RecoveryKeys | None:
        """The keys derived from the recovery secret while a command that holds it runs (account-log.md §5.7)."""
        return self.epochs.recovery

    @recovery.setter
    def recovery(self, keys: recovery.RecoveryKeys | None) -> None:
        self.epochs.recovery = keys

    @property
    def recovered_epochs(self) -> set[int]:
        """Epochs whose keys came from a recovery backup in this run."""
        return self.epochs.recovered_epochs

    def backed_up_epoch(self, key_hash: bytes) -> int:
        """See :meth:`Epochs.backed_up_epoch`."""
        return self.epochs.backed_up_epoch(key_hash)

    def history_granted(self, device_id: str) -> bool:
        """See :meth:`Epochs.history_granted`."""
        return self.epochs.history_granted(device_id)

    # -- supervisor ----------------------------------------------------------------------------

    def _transition(self, event: str, **info: Any) -> None:
        state = TRANSITIONS.get((self.status.state, event))
        if state is None:
            raise AssertionError(f"no transition from {self.status.state} on {event}")
        self.status.state = state
        self.status.reason = str(info.get("reason", ""))
        self.status.delay_s = float(info.get("delay_s", 0.0))
        self._refresh_status()
        if self.on_status is not None:
            self.on_status(self.status)

    def _refresh_status(self) -> None:
        s = self.status
        s.log_cursor = self.store.cursor("log")
        s.log_head = max(self.log.head, s.log_cursor)
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
                        random_bytes=self.random_bytes,  # the outbox seals through the client
                    ) as client:
                        self.client = client
                        # The home's stored token when it is still good (``sync`` after ``send`` authenticates
                        # no more); the request layer re-authenticates once if the relay refuses it.
                        await guarded(client.api.token())
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
                self._refresh_status()
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
            random_bytes=self.random_bytes,
        ) as client:
            self.client = client
            try:
                await guarded(client.api.token())  # the stored token when still good, as in run()
                if drain:
                    await self.enable_sessions()
                    await self.drain()
                yield client
            finally:
                self.client = None

    # -- live ------------------------------------------------------------------------------------

    async def _live(self) -> None:
        failure: list[BaseException] = []
        async with trio.open_nursery() as nursery:

            async def worker(fn: Callable[[], Awaitable[None]]) -> None:
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
        return self.outbox.has_work() or self.appender.has_work() or self.inbox.has_unacked()

    async def _inbox_stream(self) -> None:
        assert self.client is not None
        async with self.client.stream(after=self.store.cursor("inbox_received"), idle_timeout_seconds=30) as inbox:
            while True:
                try:
                    item = await inbox.__anext__()
                except (RemoteError, UnknownRemoteError) as exc:
                    await raise_guarded(exc)
                    raise
                self.inbox.apply([item], item.cursor)
                self._kick.set()

    async def _log_stream(self) -> None:
        client = self.client
        assert client is not None
        try:
            async with client.api.log_stream(self.store.cursor("log"), chunk_timeout=90) as response:
                decoder = codec.StreamDecoder(LogRecord | LogHeartbeat, codec.MSGPACK)
                async for chunk in response:
                    for item in decoder.feed(chunk):
                        if isinstance(item, LogRecord):
                            self.log.note_head(item.position)
                            if item.position > self.store.cursor("log"):
                                self._kick.set()
                        elif item.head > self.store.cursor("log"):
                            self.log.note_head(item.head)
                            self._kick.set()
        except (RemoteError, UnknownRemoteError) as exc:
            await raise_guarded(exc)
            raise
        except TransportError as exc:
            if not exc.retryable:
                raise  # a TLS set-up error: waiting fixes nothing
            raise RetryError(f"log stream: {exc}") from exc
        raise RetryError("the relay ended the log stream")

    # -- one drain step --------------------------------------------------------------------------

    async def enable_sessions(self) -> None:
        """Format-2 accounts use v2 sessions (crypto.md §7-§9): state in this home's LocalDB, prekeys
        published or topped up now. Format-1 accounts keep v1 sealed boxes. Before anything is sealed, the log
        is read once (crypto.md §13.2). Raises ``RetryError`` / ``RevokedError`` / ``StateRolledBackError``;
        idempotent."""
        client = self.client
        assert client is not None
        if self.keys.list_format >= device_list.FORMAT_2 and client.sessions is None:
            await guarded(client.enable_sessions(self.store.db))
        if not self.rollback_checked:
            # Before any session seals: this device's own later records in the log are the evidence that
            # survives a restore of the whole home (crypto.md §13.2); read_log raises StateRolledBackError.
            await self.read_log()
            self.rollback_checked = True

    async def drain(self, *, inbox: bool = True) -> None:
        """Repeat read-log / epochs / inbox / outbox / append / ack until nothing changes. Raises ``RetryError`` /
        ``RevokedError`` and what the steps raise; each step commits on its own (safe to cancel and run again)."""
        client = self.client
        if client is not None and client.sessions is not None and client.sessions.prekeys_dirty:
            await guarded(client.maintain_prekeys())  # one-time prekeys were used (crypto.md §7.2)
        while True:
            changed = await self.read_log()
            changed |= await self.ensure_epoch()
            changed |= await self.ensure_recovery_backup()
            if inbox:
                changed |= await self.read_inbox()
            changed |= await self.flush_outbox()
            changed |= await self.append_pending()
            await self.ack()
            self._refresh_status()
            if not changed:
                return

    async def read_log(self) -> bool:
        """Page the log from the cursor to the head and apply it (from the newest snapshot when far behind, §6.3).
        True if the cursor moved or history changed. Raises like :meth:`LogReader.read`."""
        moved = await self.snapshots.before_read()
        moved |= await self.log.read(self.snapshots.unread_page())
        if self.snapshots.waiting_for_key():  # decide nothing about epochs on a partial view
            self.log.blocked_on_key = True
        return moved

    async def ensure_epoch(self) -> bool:
        """See :meth:`Epochs.ensure_epoch`, with what the last :meth:`read_log` found."""
        return await self.epochs.ensure_epoch(self.log.view())

    async def ensure_recovery_backup(self) -> bool:
        """See :meth:`Epochs.ensure_recovery_backup`, with what the last :meth:`read_log` found."""
        return await self.epochs.ensure_recovery_backup(self.log.view())

    async def read_inbox(self) -> bool:
        """See :meth:`Inbox.read`."""
        return await self.inbox.read()

    async def flush_outbox(self, only: int | None = None) -> bool:
        """See :meth:`Outbox.flush` (``only``: that entry alone, at once: ``tetherless send``)."""
        return await self.outbox.flush(only)

    async def append_pending(self) -> bool:
        """See :meth:`LogAppender.append` (also what ``tetherless send`` runs after posting)."""
        return await self.appender.append()

    async def ack(self) -> None:
        """See :meth:`Inbox.ack`."""
        await self.inbox.ack()


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
    "LIVE_RESET_SECONDS",
    "TRANSITIONS",
    "Status",
    "SyncEngine",
    "SyncOutcome",
    "backoff_delay",
    "format_status",
    "status_json",
]
