"""The account log: append, page, stream, snapshots, retention (docs/account-log.md).

Rules decided here (the store enforces the rest atomically, see
``Store.append_log``):

- the log is always the log of the caller's account (no account in the path);
- only a current device of the account may use it (``device_revoked``, also
  checked by open streams on every heartbeat);
- limits: records per batch (``batch_too_large``), bytes per record
  (``record_too_large``), bytes per account (``log_quota``, in the store);
- request shape: record ids unique within a batch, header fields only where
  the kind has them, ``key`` records only with ``expected_head``
  (``invalid_field``);
- 201 only after a durable commit; the relay never sees plaintext.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import (
    AppendRequest,
    AppendResponse,
    AppendResult,
    LogHeartbeat,
    LogPage,
    LogRecord,
    LogRecordIn,
    LogRetention,
    SnapshotRef,
)
from relay import metrics
from relay.store import Store
from relay.store.base import LogPageRecord, LogRetentionRecord, LogSnapshotInfo, NewLogRecord, StoredLogRecord

from .auth import Principal
from .context import ServiceContext
from .inbox import InboxNotifier

log = logging.getLogger("relay.services.log")

SWEEP_BATCH = 1000


class LogNotifier(InboxNotifier):
    """Wakes log streams when their account's log grows: keyed by account id, same contract as
    :class:`InboxNotifier` (version counters, so no wake-up is lost between a read and the wait)."""


@dataclass(frozen=True, slots=True)
class LogChunk:
    """What a log stream yields: records to send, or a heartbeat when idle."""

    records: list[LogRecord]
    heartbeat: LogHeartbeat | None = None


def _to_wire(record: StoredLogRecord) -> LogRecord:
    return LogRecord(
        position=record.position,
        record_id=record.record_id,
        kind=record.kind,  # type: ignore[arg-type]  # one of LOG_KINDS, checked on the way in
        epoch=record.epoch,
        committed_at_ms=record.committed_at_ms,
        ciphertext=record.ciphertext,
        size=record.size,
        snapshot_id=record.snapshot_id,
        covers=record.covers,
        parts=record.parts,
        device_list_version=record.device_list_version,
    )


def _snapshot_ref(info: LogSnapshotInfo | None) -> SnapshotRef | None:
    if info is None:
        return None
    return SnapshotRef(
        snapshot_id=info.snapshot_id,
        position=info.position,
        covers=info.covers,
        parts=info.parts,
        epoch=info.epoch,
        committed_at_ms=info.committed_at_ms,
    )


def _page(page: LogPageRecord, after: int) -> LogPage:
    records = [_to_wire(r) for r in page.records]
    next_after = records[-1].position if records else after
    return LogPage(
        records=records,
        next_after=next_after,
        head=page.head,
        horizon=page.horizon,
        more=next_after < page.head,
        snapshot=_snapshot_ref(page.snapshot),
    )


def _check_shape(index: int, record: LogRecordIn) -> None:
    """Header fields only where the kind has them (they are bound into the record's AEAD, §4.2)."""
    where = f"records[{index}]"
    snapshot_kind = record.kind in ("snapshot_part", "snapshot")
    if snapshot_kind != (record.snapshot_id is not None):
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"{where}: snapshot_id goes with snapshot kinds only")
    manifest = record.kind == "snapshot"
    if manifest != (record.covers is not None) or manifest != (record.parts is not None):
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"{where}: covers and parts go with snapshot manifests only")
    if (record.kind == "key") != (record.device_list_version is not None):
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"{where}: device_list_version goes with key records only")


class LogService:
    def __init__(self, store: Store, ctx: ServiceContext, notifier: LogNotifier) -> None:
        self._store = store
        self._ctx = ctx
        self._notifier = notifier

    @property
    def notifier(self) -> LogNotifier:
        """This process's wake-up hub: the composition root also feeds it commits made by other replicas."""
        return self._notifier

    async def check_device(self, principal: Principal) -> None:
        """Raises ``device_revoked`` unless the caller's device is a current device of its account."""
        device = await self._store.get_device(principal.device_id)
        if device is None or device.revoked_at_ms is not None or device.account_id != principal.account_id:
            raise TetherlessError(ErrorCode.DEVICE_REVOKED, "this device is no longer in its account's device list")

    async def append(self, principal: Principal, request: AppendRequest) -> AppendResponse:
        """Append a batch to the caller's account log; durable before it returns.

        Raises ``device_revoked``, ``batch_too_large``, ``record_too_large``,
        ``invalid_field``, ``log_conflict`` (with ``head``), ``log_epoch_stale``
        (with ``epoch``), ``log_rekey_required``, ``log_quota``,
        ``snapshot_incomplete``; then nothing is stored. Idempotent per record id.
        On cancellation the batch may or may not be committed: retry it.
        """
        limits = self._ctx.limits
        if len(request.records) > limits.max_log_batch_records:
            raise TetherlessError(
                ErrorCode.BATCH_TOO_LARGE, f"at most {limits.max_log_batch_records} records per request"
            )
        seen: set[bytes] = set()
        for index, record in enumerate(request.records):
            if len(record.ciphertext) > limits.max_log_record_bytes:
                raise TetherlessError(
                    ErrorCode.RECORD_TOO_LARGE,
                    f"records[{index}]: ciphertext above {limits.max_log_record_bytes} bytes",
                )
            if record.record_id in seen:
                raise TetherlessError(ErrorCode.INVALID_FIELD, f"records[{index}]: record_id repeated in batch")
            seen.add(record.record_id)
            _check_shape(index, record)
            if record.kind == "key" and request.expected_head is None:
                raise TetherlessError(ErrorCode.INVALID_FIELD, f"records[{index}]: a key record needs expected_head")
        await self.check_device(principal)
        records = [
            NewLogRecord(
                record_id=r.record_id,
                kind=r.kind,
                epoch=r.epoch,
                ciphertext=r.ciphertext,
                snapshot_id=r.snapshot_id,
                covers=r.covers,
                parts=r.parts,
                device_list_version=r.device_list_version,
            )
            for r in request.records
        ]
        try:
            outcome = await self._store.append_log(
                principal.account_id, records, request.expected_head, self._ctx.clock_ms(), limits.max_log_bytes
            )
        except TetherlessError as exc:
            outcome_label = "conflict" if exc.code == ErrorCode.LOG_CONFLICT else "rejected"
            metrics.log_appends_total.labels(outcome_label).inc()
            raise
        fresh = [r for r, result in zip(records, outcome.results, strict=True) if not result.duplicate]
        if fresh:
            self._notifier.notify(principal.account_id)
            metrics.log_appends_total.labels("stored").inc()
        else:
            metrics.log_appends_total.labels("duplicate").inc()
        metrics.log_records_appended_total.inc(len(fresh))
        for new in fresh:
            metrics.log_record_bytes.observe(len(new.ciphertext))
        return AppendResponse(
            head=outcome.head,
            results=[
                AppendResult(record_id=r.record_id, position=r.position, duplicate=r.duplicate) for r in outcome.results
            ],
        )

    def _limit(self, limit: int | None) -> int:
        max_page = self._ctx.limits.max_page_log_records
        if limit is None:
            return max_page
        if limit > max_page:
            raise TetherlessError(ErrorCode.INVALID_QUERY, f"limit must be between 0 and {max_page}")
        return limit

    async def page(self, principal: Principal, after: int, limit: int | None, full_parts: bool) -> LogPage:
        """Records after position ``after`` (``limit=0``: only head, horizon and snapshot).

        Raises ``invalid_query`` for a bad limit, ``device_revoked``.
        """
        limit = self._limit(limit)
        await self.check_device(principal)
        page = await self._store.read_log(
            principal.account_id, after, limit, self._ctx.limits.max_log_page_bytes, full_parts
        )
        metrics.log_records_served_total.labels("page").inc(len(page.records))
        return _page(page, after)

    async def snapshot(self, principal: Principal) -> SnapshotRef:
        """The newest complete snapshot; raises ``no_snapshot``, ``device_revoked``."""
        await self.check_device(principal)
        ref = _snapshot_ref(await self._store.log_snapshot(principal.account_id))
        if ref is None:
            raise TetherlessError(ErrorCode.NO_SNAPSHOT, "the account's log has no complete snapshot")
        return ref

    async def snapshot_parts(self, principal: Principal, snapshot_id: bytes, after: int, limit: int | None) -> LogPage:
        """The newest snapshot's parts (full ciphertext) after ``after``.

        Raises ``no_snapshot`` (not the newest complete snapshot), ``invalid_query``, ``device_revoked``.
        """
        limit = self._limit(limit)
        await self.check_device(principal)
        page = await self._store.read_snapshot_parts(
            principal.account_id, snapshot_id, after, limit, self._ctx.limits.max_log_page_bytes
        )
        metrics.log_records_served_total.labels("snapshot").inc(len(page.records))
        return _page(page, after)

    async def stream(self, principal: Principal, after: int, heartbeat_seconds: float) -> AsyncIterator[LogChunk]:
        """Yield committed records after ``after`` in position order, forever (parts stubbed).

        Pages through the backlog first, then waits for wake-ups; after
        ``heartbeat_seconds`` without news it re-reads, checks that the device
        is still current (ending the stream with ``device_revoked`` if not)
        and yields a heartbeat with the head. Cancellation ends the stream.
        """
        account_id = principal.account_id
        cursor = after
        limits = self._ctx.limits
        metrics.log_streams_open.inc()
        try:
            while True:
                version = self._notifier.version(account_id)
                page = await self._store.read_log(
                    account_id, cursor, limits.max_page_log_records, limits.max_log_page_bytes, False
                )
                if page.records:
                    cursor = page.records[-1].position
                    metrics.log_records_served_total.labels("stream").inc(len(page.records))
                    yield LogChunk([_to_wire(r) for r in page.records])
                    continue
                woken = await self._notifier.wait(account_id, version, heartbeat_seconds)
                if not woken:
                    await self.check_device(principal)
                    yield LogChunk([], LogHeartbeat(head=page.head, at_ms=self._ctx.clock_ms()))
        finally:
            metrics.log_streams_open.dec()

    async def get_retention(self, principal: Principal) -> LogRetention:
        """The account's retention; raises ``device_revoked``."""
        await self.check_device(principal)
        return _retention(await self._store.get_log_retention(principal.account_id))

    async def set_retention(self, principal: Principal, request: LogRetention) -> LogRetention:
        """Set retention (``forever``, or ``days`` 1..``max_retention_days``); raises ``invalid_field``,
        ``device_revoked``. ``horizon`` and ``updated_at_ms`` in the request are ignored."""
        if request.mode == "forever":
            if request.days is not None:
                raise TetherlessError(ErrorCode.INVALID_FIELD, "days goes with mode days only")
            days = None
        else:
            if request.days is None:
                raise TetherlessError(ErrorCode.INVALID_FIELD, "mode days needs days")
            if request.days > self._ctx.limits.max_retention_days:
                raise TetherlessError(
                    ErrorCode.INVALID_FIELD, f"days must be at most {self._ctx.limits.max_retention_days}"
                )
            days = request.days
        await self.check_device(principal)
        stored = await self._store.set_log_retention(principal.account_id, days, self._ctx.clock_ms())
        log.info("log retention of an account set to %s", "forever" if days is None else f"{days} days")
        return _retention(stored)

    async def sweep(self) -> int:
        """Run retention until nothing more is due now; returns records deleted or emptied."""
        total = 0
        while True:
            report = await self._store.sweep_log(self._ctx.clock_ms(), SWEEP_BATCH)
            metrics.log_retention_deleted_total.inc(report.deleted + report.emptied)
            total += report.deleted + report.emptied
            if not report.more:
                return total
            await trio.lowlevel.checkpoint()

    async def run_retention(self, interval_seconds: float) -> None:
        """Sweep retention every interval (next to the inbox expiry loop). Runs forever."""
        while True:
            try:
                count = await self.sweep()
            except Exception:
                log.exception("log retention sweep failed; will retry")
            else:
                if count:
                    log.info("log retention deleted or emptied %d records", count)
            await trio.sleep(interval_seconds)


def _retention(stored: LogRetentionRecord) -> LogRetention:
    return LogRetention(
        mode="forever" if stored.days is None else "days",
        days=stored.days,
        horizon=stored.horizon,
        updated_at_ms=stored.updated_at_ms,
    )
