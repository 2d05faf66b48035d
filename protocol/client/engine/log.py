"""The account log on this device (docs/account-log.md §4.6, §10 "Read", "Append"): :class:`LogReader` pages the
log from the cursor and applies what it trusts; :class:`LogAppender` appends ``log_pending`` under the newest
epoch."""

from __future__ import annotations

from typing import Any, Final

import msgspec

from ... import log
from ...errors import ErrorCode, RemoteError, TetherlessError
from ...ids import Address
from ...messages import AppendRequest, LogPage, LogRecord, LogRecordIn
from ..localdb import StateRolledBackError
from ..store import EpochInfo, HistoryMessage, decode_plaintext, encode_plaintext
from .base import Context, LogRekeyError, OnMessage, Part, RetryError, guarded
from .epochs import CLOSED, HIGH_WATER, Epochs, LogView
from .lists import DeviceLists
from .pending import HoldBack, mark_logged

LOG_PAGE: Final = 500
_APPEND_BATCH: Final = 200


class LogReader(Part):
    """Pages the account log from the ``log`` cursor and applies it: key records first (through
    :class:`~protocol.client.engine.epochs.Epochs`), then records in position order, each page in one local
    transaction with the cursor. A record whose epoch key this device does not hold yet stops the cursor.

    Owns what its last pass found: :attr:`head` (the relay's, for the status line), :attr:`blocked_on_key`,
    :attr:`blocked_on_rotation` (a removed writer's record waits for the rotation, §4.6 "wait"),
    :attr:`read_upto` (the last position paged, held records included) and the removed writers' highest
    ``writer_seq`` read while waiting (the rotation's close-out marks, §5.1 v3)."""

    def __init__(
        self,
        ctx: Context,
        lists: DeviceLists,
        epochs: Epochs,
        holdback: HoldBack,
        *,
        on_message: OnMessage | None = None,
    ) -> None:
        super().__init__(ctx)
        self._lists = lists
        self._epochs = epochs
        self._holdback = holdback
        self._on_message = on_message
        self.head = 0
        self.blocked_on_key = False
        self.blocked_on_rotation = False
        self.read_upto = 0
        self._held_marks: dict[str, int] = {}

    def view(self) -> LogView:
        """What this pass found, for the epoch decisions (:meth:`Epochs.ensure_epoch`)."""
        return LogView(blocked_on_key=self.blocked_on_key, read_upto=self.read_upto, held_marks=dict(self._held_marks))

    def note_head(self, head: int) -> None:
        """A head seen elsewhere (the log stream): the status line shows the highest."""
        self.head = max(self.head, head)

    async def read(self, first: tuple[int, LogPage] | None = None) -> bool:
        """Page the log from the cursor to the head and apply it. True if the cursor moved.

        ``first``: ``(after, page)``, a page already fetched after ``after`` on this pass (the snapshot part's check
        of the log's shape), used instead of asking again when the cursor is still at ``after``.

        Raises ``RetryError`` / ``RevokedError``, ``StateRolledBackError`` (this device's own later records are in
        the log: the home was restored, crypto.md §13.2) and ``TamperedRowError``. Idempotent; cancellation keeps
        the pages committed before it."""
        store = self._store
        await self._lists.current()  # the verified list judges writers (§4.6)
        self.blocked_on_rotation = False
        self._held_marks = {}
        start = store.cursor("log")
        buffered: list[LogRecord] = []
        after = start
        fetched = first[1] if first is not None and first[0] == start else None
        while True:
            page = fetched if fetched is not None else await guarded(self._relay.log_page(after, LOG_PAGE))
            fetched = None
            self.head = page.head
            if not self._positions_dense(after, page):
                break  # the rest up to the head is gone: never page forever on a relay that dropped it
            if page.records:
                await self._epochs.apply_keys([r for r in page.records if r.kind == "key"])
                buffered += page.records
                buffered = self.apply_records(buffered)
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
            self._report.warn("log_key_missing", line)
        self.read_upto = max(after, store.cursor("log"))
        return store.cursor("log") != start

    async def page_from(self, after: int, upto: int | None = None) -> list[LogRecord]:
        """Every record after ``after`` (up to ``upto``), parts stubbed; applies nothing. Raises like :meth:`read`."""
        records: list[LogRecord] = []
        while upto is None or after < upto:
            page = await guarded(self._relay.log_page(after, LOG_PAGE))
            self.head = page.head
            records += [r for r in page.records if upto is None or r.position <= upto]
            after = max(after, page.next_after)
            if not page.more or not page.records:
                break
        return records

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
        self._report.warn(
            "log_records_missing",
            f"log_records_missing: log positions {first}-{last} are missing below the relay's head: "
            "the relay deleted or withholds them",
        )

    def apply_records(self, records: list[LogRecord]) -> list[LogRecord]:
        """Apply records in order, in one transaction (:meth:`ClientStore.page`) with the cursor moved past the
        last one applied; return the ones waiting (for an epoch key, or for the rotation after a removed writer's
        last records, see :meth:`_open_event`). Every record is checked on its own; what is batched is the
        bookkeeping: epoch keys opened once per page, per-epoch record counts and the cursor written once.
        An exception (a tampered row, a rolled-back home) or a cancellation leaves the store and the cursor as
        before the page."""
        store = self._store
        new_messages: list[HistoryMessage] = []
        infos = {i.epoch: i for i in store.epoch_infos()}
        keys: dict[int, bytes | None] = {}  # no key is written while a page applies (apply_keys ran before)
        counted: dict[int, int] = {}
        waiting: list[LogRecord] = []
        applied: int | None = None
        with store.page():
            for index, record in enumerate(records):
                if record.kind in ("event", "state"):
                    if record.epoch not in keys:
                        keys[record.epoch] = store.epoch_key(record.epoch)
                    key = keys[record.epoch]
                    if key is None:
                        waiting = records[index:]  # the cursor stays before this record
                        break
                    try:
                        opened = self._open_event(record, key, infos)
                    except TetherlessError as exc:
                        self._report.refuse(record, exc)
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
                store.advance_counter(f"epoch_records:{epoch}", count)
            if applied is not None:
                store.set_cursor("log", applied)
            self._holdback.release()
        for message in new_messages:
            if self._on_message is not None and message.direction == "received":
                self._on_message(message, None, None)
        return waiting

    def _note_held_ahead(self, records: list[LogRecord], infos: dict[int, EpochInfo]) -> None:
        """Raise the close-out marks of removed writers to their highest record in ``records`` (the rest of the
        page after the first one waiting for the rotation): the rotation this device is about to write must close
        each removed writer after *all* of its records that precede the rotation in the log, not after the first
        one read, or its later pre-removal records would be refused as written after it. Reads only; a record
        that does not open is left to be refused when it is applied. A removed writer's records beyond this page
        are not seen (the rotation then closes it earlier, and those records are refused: account-log.md §18)."""
        current = self._lists.cached_devices()
        if current is None:
            return
        present = {d.device_id for d in current}
        for record in records:
            info = infos.get(record.epoch)
            key = self._store.epoch_key(record.epoch) if record.kind in ("event", "state") else None
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
            account_id=self._keys.account_id,
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
        store = self._store
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
                account_id=self._keys.account_id,
                record_id=record.record_id,
                epoch=record.epoch,
                kind=record.kind,
            )
            return plaintext, None
        plaintext = self._open_signed(record, key, info)
        if plaintext.writer_device == self._keys.device_id and plaintext.writer_seq > store.counter("writer_seq"):
            raise StateRolledBackError(
                f"the account log holds record #{plaintext.writer_seq} written by this device, which remembers "
                f"writing only {store.counter('writer_seq')}: this home was restored from an older copy, and "
                "sending on its sessions would reuse ratchet keys. " + StateRolledBackError.RECOVERY
            )
        writer, seq = plaintext.writer_device, plaintext.writer_seq
        closed = store.counter(CLOSED + writer)  # the close-out mark + 1 (§5.1 v3); 0: not closed
        if closed and seq > closed - 1:
            raise TetherlessError(
                ErrorCode.LOG_EPOCH_STALE,
                f"record #{seq} of {writer}, whose removal closed it at #{closed - 1}: written after the rotation",
            )
        current = self._lists.cached_devices()
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
        store = self._store
        high = store.counter(HIGH_WATER + writer)
        if seq <= high:
            if store.message(record.record_id) is not None:
                return
            raise TetherlessError(
                ErrorCode.LOG_EPOCH_STALE,
                f"record #{seq} of {writer} after its #{high}: the relay reordered or replayed its records",
            )
        if high and seq > high + 1 and writer != self._keys.device_id:
            self._report.warn(
                "log_writer_gap",
                f"log_writer_gap: records #{high + 1}-#{seq - 1} of device {writer} are missing before log "
                f"position {record.position}: the relay may withhold them",
            )
        store.advance_counter(HIGH_WATER + writer, seq - high)

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
        if self._store.upsert_message(**fields):
            self._store.set_writer(record.record_id, writer)
            new.append(HistoryMessage(**fields, writer=writer, authenticated=writer is not None))
        if self._store.is_pending(record.record_id):
            # Another device logged it first (or our own append whose answer we lost): done here.
            mark_logged(self._store, record.record_id, record.position)


class LogAppender(Part):
    """Appends ``log_pending`` in ``seq`` order, in batches, encrypted under the newest epoch key; on 201 one
    transaction drops them, sets the messages' positions and marks the outbox rows ``logged``.

    Owns the count of refusals in a row (it never spins on them). The ``writer_seq`` given to a pending record is
    written into its ``log_pending`` row with the counter, so every retry, in this process or after a restart,
    seals the same number."""

    def __init__(self, ctx: Context, lists: DeviceLists, epochs: Epochs) -> None:
        super().__init__(ctx)
        self._lists = lists
        self._epochs = epochs
        self._stale_appends = 0

    def has_work(self) -> bool:
        """Whether records wait to be appended (local only)."""
        return bool(self._store.pending_count())

    def _seal_event(
        self, key: bytes, record_id: bytes, epoch: int, plaintext: log.LogPlaintext, *, signed: bool
    ) -> bytes:
        """An ``event`` record: signed by this device under a v2 epoch (§4.6), the legacy layout under a v1 one."""
        nonce = self._random_bytes(log.NONCE_BYTES)
        account_id = self._keys.account_id
        if signed:
            return log.seal_signed_record(
                key,
                plaintext,
                self._keys.signing_key,
                account_id=account_id,
                record_id=record_id,
                epoch=epoch,
                nonce=nonce,
            )
        return log.seal_record(key, plaintext, account_id=account_id, record_id=record_id, epoch=epoch, nonce=nonce)

    async def append(self) -> bool:
        """Append ``log_pending`` in order, batched, under the newest epoch. True if anything was appended (or the
        log must be read again first).

        Never appends under an epoch a removed device holds or one due for rotation (§5.4 "clients enforce"):
        raises :class:`~protocol.client.engine.base.LogRekeyError` then, and ``RetryError`` after 3 refusals in a
        row, ``RevokedError``. Idempotent per record id (a retry after a lost answer is a ``duplicate``);
        cancellation leaves the records pending, with their ``writer_seq`` durable."""
        store = self._store
        epoch = store.newest_epoch()
        key = store.epoch_key(epoch) if epoch else None
        if key is None or not store.pending(1):
            return False
        # Never append under an epoch a removed device holds, or one due for rotation (§5.4 "clients enforce"),
        # whatever the relay would accept: ensure_epoch ran just before and could not rotate it.
        _, devices = await self._lists.current()
        reason = self._epochs.rotation_reason(epoch, devices)
        if reason is not None and self._epochs.rekey_needed:
            return True  # ensure_epoch lost a race (409): read the winner's key record first, then decide again
        if reason is not None:
            raise LogRekeyError(f"{reason}, and its rotation was not accepted yet; nothing is appended")
        info = store.epoch_info(epoch)
        signed = info is not None and info.record_format >= 2
        changed = False
        while True:
            pending = store.pending(_APPEND_BATCH)
            if not pending:
                return changed
            with store.transaction():  # the counter is durable before any record carrying it leaves
                plaintexts = [self._numbered(p.record_id, decode_plaintext(p.plaintext)) for p in pending]
            records = [
                LogRecordIn(record_id=p.record_id, kind="event", epoch=epoch, ciphertext=self._seal_event(
                    key, p.record_id, epoch, plaintext, signed=signed
                ))
                for p, plaintext in zip(pending, plaintexts, strict=True)
            ]  # fmt: skip
            try:
                response = await guarded(self._relay.log_append(AppendRequest(records=records)))
            except RemoteError as exc:
                if exc.code in (ErrorCode.LOG_EPOCH_STALE, ErrorCode.LOG_REKEY_REQUIRED):
                    # Read the log (new key records) or rotate, then try again; never spin on it.
                    self._epochs.rekey_needed = True
                    self._stale_appends += 1
                    if self._stale_appends > 3:
                        self._stale_appends = 0
                        raise RetryError(exc.code.value) from exc
                    return True
                raise
            self._stale_appends = 0
            with store.transaction():
                for result in response.results:
                    mark_logged(store, result.record_id, result.position)
            changed = True

    def _numbered(self, record_id: bytes, plaintext: log.LogPlaintext) -> log.LogPlaintext:
        """``plaintext`` with this device's next ``writer_seq``, given when the record is first sealed rather than
        queued: a record dropped because another device logged the same message first never burns a number, so
        readers see no gap for it (account-log.md §4.6). The number is stored in the pending row in the caller's
        transaction, with the counter: a retry after a lost answer or a crash (the relay may or may not hold the
        record) seals the same number, never a second one that would leave a false ``log_writer_gap``."""
        if plaintext.writer_seq:
            return plaintext
        numbered = msgspec.structs.replace(plaintext, writer_seq=self._store.next_counter("writer_seq"))
        self._store.renumber_pending(record_id, encode_plaintext(numbered))
        return numbered


__all__ = ["LOG_PAGE", "LogAppender", "LogReader"]
