"""Snapshots and retention on the client (docs/account-log.md §6, §3.3, §13).

**Writing** (:meth:`Snapshots.write`, ``tetherless log snapshot``): the local
history up to the log cursor (``covers`` = the cursor) is serialised as a
:class:`~protocol.log.SnapshotState`, cut into ``snapshot_part`` records
(at most :data:`~protocol.log.SNAPSHOT_PART_BYTES` of plaintext each, sealed
under the newest epoch key like every other record), appended in batches, then
the ``snapshot`` manifest (SHA-256 of every part; signed under a v2 epoch) is appended. The snapshot id
and every record id are derived from ``(account, writer device, covers)``,
and the plan (``covers``, the retention floor) is stored in
``log_snapshot_writes`` before the first part goes out, so a retry after a
crash resumes the same snapshot with the same ids and bytes of plaintext: the
relay answers ``duplicate`` for what it has (L3) and exactly one complete
snapshot results. The manifest goes without ``expected_head`` (§4.5: ``covers``
makes it self-describing; §3.2's "manifests send expected_head" is not followed,
it would only make a busy account's snapshot retry forever).

**Reading** (:meth:`Snapshots.before_read` / :meth:`Snapshots.waiting_for_key`, run by
the coordinator around :meth:`LogReader.read`): once per connection the engine reads the
log's ``head``, ``horizon`` and newest snapshot: a device at cursor 0 asks for them alone
(``GET /v1/log?limit=0``, no records), any other takes them from its first page of records
after the cursor; the reader then uses that page (or the empty log's shape) instead of asking again. A device
whose cursor is below the snapshot's ``covers`` and that is new (cursor 0), below the horizon, or more than
:data:`SNAPSHOT_THRESHOLD` records behind, records the snapshot as a pending
load and moves its cursor to ``covers`` in one transaction. It then pages the
records after ``covers`` once (parts stubbed), opens the parts
(``GET /v1/log/snapshot/{id}``) with the epoch key it holds or the one its own
grant after ``covers`` gives (signature, list and commitment checked), applies
the copies of the ``key`` records ``<= covers`` that the snapshot carries and
then those after ``covers`` through the engine's own key checks (which accept
a grant-only record only after the record that created its epoch), and loads
the history in one transaction only if the key those checks accepted is the
one that opened the parts. Parts are checked (indexes, ``total``, ``covers``,
all inside the AEAD); under a v2 epoch the manifest (paged with the records
after ``covers``) must be signed by a writer of the epoch still in the list
and name exactly the parts' hashes, else the snapshot is refused and the log
read instead (§6.1 "Signed snapshots"). When no grant after
``covers`` helps (it predates the snapshot), the key records up to ``covers``
are scanned from the log instead (slow path). So a new device fetches the
parts plus the records after ``covers``. Positions ``(cursor, horizon]`` that
no snapshot covers are recorded as a retention gap (``history_gaps``) and
shown by ``tetherless history``.

The writer copies the ``key`` records up to ``covers`` into the snapshot
(:meth:`Snapshots.collect_key_records`, incremental: ``log_snapshot_keys`` and the
``snapshot_keys`` cursor; a device that loaded a snapshot keeps its copies).
The tables are created by ``state.db`` migration 4 (:data:`~protocol.client.store.SNAPSHOT_TABLES`).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from ... import log
from ...errors import ErrorCode, RemoteError, TetherlessError
from ...ids import Address
from ...messages import AppendRequest, AppendResponse, DeviceEntry, LogPage, LogRecord, LogRecordIn, LogRetention
from ..store import ClientStore, HistoryMessage
from .base import Context, OnMessage, Part, guarded
from .epochs import Epochs
from .lists import DeviceLists
from .log import LOG_PAGE, LogReader
from .pending import HoldBack, mark_logged

#: §6.3: a device more than this many records behind a snapshot loads it rather than replaying.
SNAPSHOT_THRESHOLD: Final = 20_000
_APPEND_BYTES: Final = 6 * 1024 * 1024  # ciphertext per append request (max_body_bytes is 8 MiB)
_APPEND_RECORDS: Final = 200
_DAY_MS: Final = 86_400_000
_KEYS_CURSOR: Final = "snapshot_keys"  # log_cursors: key records up to here are copied in log_snapshot_keys
# log_counters, per snapshot id (hex): refused once (never chosen again), and the cursor before its load + 1
# (where the reader goes back to when it refuses it).
_REFUSED: Final = "snapshot_refused:"
_FROM: Final = "snapshot_from:"


class SnapshotError(Exception):
    """A snapshot cannot be written now (nothing to snapshot, no account key yet)."""


class SnapshotPlan(msgspec.Struct, frozen=True):
    """A snapshot being written: stored before the first part is appended, deleted after the manifest."""

    snapshot_id: bytes
    covers: int
    since_ms: int
    created_at_ms: int


class SnapshotWritten(msgspec.Struct, frozen=True):
    snapshot_id: bytes
    covers: int
    parts: int
    messages: int
    position: int  # of the manifest
    duplicate: bool  # the manifest was already stored (an earlier attempt completed)


class PendingLoad(msgspec.Struct, frozen=True):
    snapshot_id: bytes
    position: int
    covers: int
    parts: int
    epoch: int


class Gap(msgspec.Struct, frozen=True):
    """Log positions ``(after, upto]`` deleted by retention that no snapshot covers. ``positions`` is an upper
    bound of the records lost: key records and the newest snapshot's own parts in that range survive."""

    after: int
    upto: int

    @property
    def positions(self) -> int:
        return self.upto - self.after


def gaps(store: ClientStore) -> list[Gap]:
    """The retention gaps this device noted, in log order. Local only."""
    return [Gap(r[0], r[1]) for r in store.db.execute("SELECT after, upto FROM history_gaps ORDER BY after")]


def loaded_snapshots(store: ClientStore) -> list[tuple[bytes, int, int]]:
    """``(snapshot_id, covers, messages)`` of every snapshot this device bootstrapped from. Local only."""
    return [
        (r[0], r[1], r[2])
        for r in store.db.execute(
            "SELECT snapshot_id, covers, messages FROM log_snapshot_loads WHERE loaded_at_ms IS NOT NULL "
            "ORDER BY covers"
        )
    ]


def build_state(store: ClientStore, plan: SnapshotPlan) -> log.SnapshotState:
    """Every logged message at a position ``<= covers`` (and not older than the plan's retention floor), in
    log order, and the retention gaps below ``covers``. Deterministic: the same plan gives the same bytes."""
    messages = [
        log.SnapshotMessage(
            position=m.log_position,
            record_id=m.msg_key,
            message_uid=m.message_uid,
            sender=m.sender,
            direction="sent" if m.direction == "sent" else "received",
            recipients=m.recipients,
            pair_seq=m.pair_seq,
            sent_at_ms=m.sent_at_ms,
            relay_sent_at_ms=m.relay_sent_at_ms,
            content_type=m.content_type,
            body=m.body,
            late=m.late,
        )
        for m in store.history()
        if m.log_position is not None and m.log_position <= plan.covers and m.sent_at_ms >= plan.since_ms
    ]
    below = [log.SnapshotGap(after=g.after, upto=g.upto) for g in gaps(store) if g.upto <= plan.covers]
    return log.SnapshotState(
        covers=plan.covers, messages=messages, gaps=below, key_records=_key_records(store, plan.covers)
    )


def _note_gap(store: ClientStore, after: int, upto: int) -> None:
    if upto > after:
        store.db.execute(
            "INSERT OR IGNORE INTO history_gaps (after, upto, noted_at_ms) VALUES (?, ?, ?)",
            (after, upto, store.now_ms()),
        )


def _keep_key_records(store: ClientStore, records: list[log.SnapshotKeyRecord]) -> None:
    for r in records:
        store.db.execute(
            "INSERT OR IGNORE INTO log_snapshot_keys (position, record_id, epoch, device_list_version, "
            "committed_at_ms, ciphertext) VALUES (?, ?, ?, ?, ?, ?)",
            (r.position, r.record_id, r.epoch, r.device_list_version, r.committed_at_ms, r.ciphertext),
        )


def _key_records(store: ClientStore, upto: int) -> list[log.SnapshotKeyRecord]:
    return [
        log.SnapshotKeyRecord(
            position=r[0], record_id=r[1], epoch=r[2], device_list_version=r[3], committed_at_ms=r[4], ciphertext=r[5]
        )
        for r in store.db.execute(
            "SELECT position, record_id, epoch, device_list_version, committed_at_ms, ciphertext "
            "FROM log_snapshot_keys WHERE position <= ? ORDER BY position",
            (upto,),
        )
    ]


def _pending_load(store: ClientStore) -> PendingLoad | None:
    row = store.db.execute(
        "SELECT snapshot_id, position, covers, parts, epoch FROM log_snapshot_loads WHERE loaded_at_ms IS NULL "
        "ORDER BY covers DESC LIMIT 1"
    ).fetchone()
    return PendingLoad(row[0], row[1], row[2], row[3], row[4]) if row else None


def _as_log_record(copy: log.SnapshotKeyRecord) -> LogRecord:
    return LogRecord(
        position=copy.position,
        record_id=copy.record_id,
        kind="key",
        epoch=copy.epoch,
        committed_at_ms=copy.committed_at_ms,
        ciphertext=copy.ciphertext,
        size=len(copy.ciphertext),
        device_list_version=copy.device_list_version,
    )


class _Superseded:
    pass


_SUPERSEDED: Final = _Superseded()


class Snapshots(Part):
    """Writes snapshots of the local history and loads the newest one instead of replaying the log (§6.3).

    Owns what it does once per connection: the connection the log's shape (head, horizon, newest snapshot) was
    checked on, the snapshot whose key records were scanned from the log (slow path, once), and the last load
    attempted without its epoch key (once per connection and snapshot)."""

    def __init__(
        self,
        ctx: Context,
        lists: DeviceLists,
        epochs: Epochs,
        reader: LogReader,
        holdback: HoldBack,
        *,
        on_message: OnMessage | None = None,
    ) -> None:
        super().__init__(ctx)
        self._lists = lists
        self._epochs = epochs
        self._reader = reader
        self._holdback = holdback
        self._on_message = on_message
        self._checked_on: object | None = None
        self._scanned: bytes | None = None
        self._attempted: tuple[object | None, bytes] | None = None
        self._unread: tuple[int, LogPage] | None = None

    # -- retention ----------------------------------------------------------------------------------

    async def retention(self) -> LogRetention:
        """``GET /v1/log/retention``. Raises ``RetryError`` / ``RevokedError`` / ``RemoteError``; read-only."""
        return await guarded(self._relay.retention())

    async def set_retention(self, days: int | None) -> LogRetention:
        """``PUT /v1/log/retention``: ``None`` = forever, else days (1 … ``max_retention_days``). Idempotent; raises
        like :meth:`retention`."""
        body = LogRetention(mode="forever") if days is None else LogRetention(mode="days", days=days)
        return await guarded(self._relay.set_retention(body))

    # -- writing ------------------------------------------------------------------------------------

    def _current_key(self) -> tuple[int, bytes]:
        epoch = self._store.newest_epoch()
        key = self._store.epoch_key(epoch) if epoch else None
        if key is None:
            raise SnapshotError("this device holds no account key yet: run `tetherless sync` first")
        return epoch, key

    async def begin(self) -> SnapshotPlan:
        """The snapshot to write: the stored unfinished one (a retry after a crash), else a new one at the cursor.

        A new plan leaves out messages older than the retention period (§6.2). Raises :class:`SnapshotError`
        when the cursor is 0. Idempotent (the plan is stored before it is returned).
        """
        store = self._store
        row = store.db.execute(
            "SELECT snapshot_id, covers, since_ms, created_at_ms FROM log_snapshot_writes ORDER BY covers DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            return SnapshotPlan(row[0], row[1], row[2], row[3])
        covers = store.cursor("log")
        if covers == 0:
            raise SnapshotError("nothing to snapshot: this device has not read the account log yet")
        policy = await self.retention()
        now = store.now_ms()
        since_ms = now - policy.days * _DAY_MS if policy.mode == "days" and policy.days else 0
        plan = SnapshotPlan(log.snapshot_id(self._keys.account_id, self._keys.device_id, covers), covers, since_ms, now)
        with store.transaction():
            store.db.execute(
                "INSERT OR IGNORE INTO log_snapshot_writes (snapshot_id, covers, since_ms, created_at_ms) "
                "VALUES (?, ?, ?, ?)",
                (plan.snapshot_id, plan.covers, plan.since_ms, plan.created_at_ms),
            )
        return plan

    async def collect_key_records(self, upto: int) -> None:
        """Copy the ``key`` records up to ``upto`` into ``log_snapshot_keys`` (incremental: only what was not
        scanned before, and nothing below a snapshot this device loaded, whose copies it kept). Idempotent."""
        store = self._store
        after = store.cursor(_KEYS_CURSOR)
        while after < upto:
            page = await guarded(self._relay.log_page(after, LOG_PAGE))
            found = [
                log.SnapshotKeyRecord(
                    position=r.position,
                    record_id=r.record_id,
                    epoch=r.epoch,
                    device_list_version=r.device_list_version or 0,
                    committed_at_ms=r.committed_at_ms,
                    ciphertext=r.ciphertext,
                )
                for r in page.records
                if r.kind == "key" and r.position <= upto
            ]
            after = min(upto, page.next_after) if page.records else upto
            with store.transaction():
                _keep_key_records(store, found)
                store.set_cursor(_KEYS_CURSOR, after)
            if not page.more:
                break

    async def prepare_chunks(self, plan: SnapshotPlan, part_bytes: int) -> list[bytes]:
        """The plaintext chunks of a plan's parts (collects the key record copies first)."""
        await self.collect_key_records(plan.covers)
        return log.split_snapshot(build_state(self._store, plan), part_bytes)

    async def _append(self, records: list[LogRecordIn]) -> AppendResponse:
        return await guarded(self._relay.log_append(AppendRequest(records=records)))

    async def append_parts(self, plan: SnapshotPlan, chunks: list[bytes]) -> None:
        """Append the parts (unconditionally, in batches bounded by count and bytes); idempotent per part id."""
        epoch, key = self._current_key()
        batch: list[LogRecordIn] = []
        size = 0
        for index, chunk in enumerate(chunks):
            part = log.SnapshotPart(index=index, total=len(chunks), covers=plan.covers, data=chunk)
            ciphertext = log.seal_snapshot_part(
                key,
                part,
                account_id=self._keys.account_id,
                snapshot=plan.snapshot_id,
                epoch=epoch,
                nonce=self._random_bytes(log.NONCE_BYTES),
            )
            if batch and (len(batch) >= _APPEND_RECORDS or size + len(ciphertext) > _APPEND_BYTES):
                await self._append(batch)
                batch, size = [], 0
            batch.append(
                LogRecordIn(
                    record_id=log.snapshot_part_id(plan.snapshot_id, index),
                    kind="snapshot_part",
                    epoch=epoch,
                    ciphertext=ciphertext,
                    snapshot_id=plan.snapshot_id,
                )
            )
            size += len(ciphertext)
        if batch:
            await self._append(batch)

    async def append_manifest(self, plan: SnapshotPlan, chunks: list[bytes]) -> tuple[int, bool]:
        """Append the manifest (after every part); returns (its position, duplicate). ``snapshot_incomplete`` if a
        part is missing. Idempotent (a deterministic record id)."""
        epoch, key = self._current_key()
        manifest = log.SnapshotManifest(
            writer_device=self._keys.device_id,
            created_at_ms=plan.created_at_ms,
            covers=plan.covers,
            part_hashes=[log.sha256(chunk) for chunk in chunks],
        )
        info = self._store.epoch_info(epoch)
        signed = info is not None and info.record_format >= 2  # §6.1: signed like event records under v2 epochs
        ciphertext = log.seal_snapshot_manifest(
            key,
            manifest,
            account_id=self._keys.account_id,
            snapshot=plan.snapshot_id,
            epoch=epoch,
            nonce=self._random_bytes(log.NONCE_BYTES),
            signing_key=self._keys.signing_key if signed else None,
        )
        record = LogRecordIn(
            record_id=log.snapshot_manifest_id(plan.snapshot_id),
            kind="snapshot",
            epoch=epoch,
            ciphertext=ciphertext,
            snapshot_id=plan.snapshot_id,
            covers=plan.covers,
            parts=len(chunks),
        )
        response = await self._append([record])
        return response.results[0].position, response.results[0].duplicate

    async def write(self, *, part_bytes: int = log.SNAPSHOT_PART_BYTES) -> SnapshotWritten:
        """Write (or finish writing) a snapshot of the local history at the log cursor. The engine must be
        connected and should have drained first, so the cursor is at the head.

        Raises :class:`SnapshotError`, and ``RetryError`` / ``RevokedError`` / ``RemoteError``; the plan stays
        stored on failure, so calling again resumes the same snapshot (idempotent: the same ids and bytes).
        """
        plan = await self.begin()
        await self.collect_key_records(plan.covers)
        state = build_state(self._store, plan)
        chunks = log.split_snapshot(state, part_bytes)
        await self.append_parts(plan, chunks)
        position, duplicate = await self.append_manifest(plan, chunks)
        with self._store.transaction():
            self._store.db.execute("DELETE FROM log_snapshot_writes WHERE snapshot_id = ?", (plan.snapshot_id,))
        return SnapshotWritten(plan.snapshot_id, plan.covers, len(chunks), len(state.messages), position, duplicate)

    # -- reading (before the log reader pages) -------------------------------------------------------

    async def before_read(self) -> bool:
        """§6.3, before the reader pages from the cursor: start from the newest snapshot, or note a retention gap.
        True if the cursor moved or history changed. Raises like the log reader; each step commits on its own."""
        store = self._store
        moved = False
        self._unread = None
        connection = self._relay.connection
        if self._checked_on is not connection:
            cursor = store.cursor("log")
            # Every page carries the shape: a device at cursor 0 asks for the shape alone (it most likely loads a
            # snapshot and would throw records away), any other for its first page, kept for the reader. The shape
            # of an empty log is also its whole first page.
            page = await guarded(self._relay.log_page(cursor, LOG_PAGE if cursor else 0))
            self._checked_on = connection
            if cursor or (page.head == 0 and not page.more and not page.records):
                self._unread = (cursor, page)
            snapshot = page.snapshot
            if (
                snapshot is not None
                and snapshot.covers > cursor
                and not store.counter(_REFUSED + snapshot.snapshot_id.hex())
                and _pending_load(store) is None
                and (cursor == 0 or cursor < page.horizon or snapshot.covers - cursor > SNAPSHOT_THRESHOLD)
            ):
                with store.transaction():
                    store.db.execute(
                        "INSERT OR IGNORE INTO log_snapshot_loads (snapshot_id, position, covers, parts, epoch) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (snapshot.snapshot_id, snapshot.position, snapshot.covers, snapshot.parts, snapshot.epoch),
                    )
                    _note_gap(store, max(cursor, snapshot.covers), page.horizon)
                    if not store.counter(_FROM + snapshot.snapshot_id.hex()):
                        store.advance_counter(_FROM + snapshot.snapshot_id.hex(), cursor + 1)
                    store.set_cursor("log", snapshot.covers)
                moved = True
            elif cursor < page.horizon:
                with store.transaction():  # deleted by retention, and no snapshot covers them (§6.3)
                    _note_gap(store, cursor, page.horizon)
                moved = True
        pending = _pending_load(store)
        if pending is not None:
            self._unread = None  # the load pages and applies from the cursor itself
            # Without the epoch key, try once per connection (then the reader waits for a grant like any record).
            attempt = (connection, pending.snapshot_id)
            if store.epoch_key(pending.epoch) is not None or self._attempted != attempt:
                self._attempted = attempt
                moved |= await self._bootstrap(pending)
        return moved

    def unread_page(self) -> tuple[int, LogPage] | None:
        """``(after, page)``: the first page after the cursor that the last :meth:`before_read` fetched to check the
        log's shape and did not use, for :meth:`LogReader.read` (which ignores it once the cursor moved). Cleared
        by the call: a page is used once. Local only."""
        unread, self._unread = self._unread, None
        return unread

    def waiting_for_key(self) -> bool:
        """Whether a chosen snapshot still waits for its epoch key: the engine then counts as blocked on a key (so
        it waits for a grant rather than deciding about epochs on a partial view). Local only."""
        pending = _pending_load(self._store)
        return pending is not None and self._store.epoch_key(pending.epoch) is None

    async def _tentative_key(self, record: LogRecord) -> bytes | None:
        """This device's key from a grant record, checked (signature, list, commitment) but not yet applied."""
        try:
            key_record, _ = await self._epochs.verified_key_record(record)
            return self._epochs.granted_keys(key_record).get(record.epoch)
        except TetherlessError:
            return None

    async def _bootstrap(self, pending: PendingLoad) -> bool:
        """Load a pending snapshot: page the records after ``covers`` (once; the engine's reader then finds
        nothing new), open the parts with the epoch key (held, or this device's grant after ``covers``), apply the
        key records the snapshot carries (positions ``<= covers``) and those after it through the engine's own
        checks, and load the history only if the key the checks accepted is the one that opened the parts."""
        store, epochs = self._store, self._epochs
        records = await self._reader.page_from(store.cursor("log"))
        keys_after = [r for r in records if r.kind == "key"]
        tentative: dict[int, bytes] = {}
        for record in keys_after:
            if store.epoch_key(record.epoch) is None and record.epoch not in tentative:
                key = await self._tentative_key(record)
                if key is not None:
                    tentative[record.epoch] = key
        fetched = await self._fetch_state(pending, tentative)
        if fetched is _SUPERSEDED:
            return True
        if fetched is None and store.epoch_key(pending.epoch) is None and self._scanned != pending.snapshot_id:
            self._scanned = pending.snapshot_id
            # No usable grant after covers (e.g. it predates the snapshot): the key records up to covers, then retry.
            await epochs.apply_keys([r for r in await self._reader.page_from(0, pending.covers) if r.kind == "key"])
            await epochs.apply_keys(keys_after)
            fetched = await self._fetch_state(pending, {})
            if fetched is _SUPERSEDED:
                return True
        state, hashes = fetched if isinstance(fetched, tuple) else (None, [])
        if state is not None:
            await epochs.apply_keys([_as_log_record(k) for k in sorted(state.key_records, key=lambda k: k.position)])
        await epochs.apply_keys(keys_after)
        if state is not None and all(store.epoch_key(epoch) == key for epoch, key in tentative.items()):
            _, current = await self._lists.current()
            try:
                self._check_manifest(pending, records, hashes, current)
            except TetherlessError as exc:
                self._refuse_snapshot(pending, exc)
                return True
            self._load_state(pending, state)
        # What waits is found again by the reader, which pages from the cursor right after this.
        self._reader.apply_records(records)
        return True

    async def _fetch_state(
        self, pending: PendingLoad, tentative: dict[int, bytes]
    ) -> tuple[log.SnapshotState, list[bytes]] | _Superseded | None:
        """Fetch and open the parts: the state and the SHA-256 of every part's data in order (for the manifest);
        None when an epoch key is missing, ``_SUPERSEDED`` (and the load is reset) when the relay no longer serves
        this snapshot. Raises :class:`~protocol.log.InvalidRecordError`."""
        store = self._store
        if store.epoch_key(pending.epoch) is None and pending.epoch not in tentative:
            return None
        records: list[LogRecord] = []
        after = 0
        try:
            while True:
                page = await guarded(self._relay.snapshot_page(pending.snapshot_id, after, LOG_PAGE))
                records += page.records
                after = page.next_after
                if not page.more or not page.records:
                    break
        except RemoteError as exc:
            if exc.code is not ErrorCode.NO_SNAPSHOT:
                raise
            # Superseded since we chose it: start over from the newest snapshot (loading is idempotent).
            with store.transaction():
                store.db.execute("DELETE FROM log_snapshot_loads WHERE snapshot_id = ?", (pending.snapshot_id,))
                store.set_cursor("log", 0)
            self._checked_on = None
            return _SUPERSEDED
        parts: list[log.SnapshotPart] = []
        for record in records:
            key = store.epoch_key(record.epoch) or tentative.get(record.epoch)
            if key is None:
                return None
            parts.append(
                log.open_snapshot_part(
                    key,
                    record.ciphertext,
                    account_id=self._keys.account_id,
                    record_id=record.record_id,
                    snapshot=pending.snapshot_id,
                    epoch=record.epoch,
                )
            )
        if len(parts) != pending.parts:
            raise log.InvalidRecordError(ErrorCode.MALFORMED_BODY, "the relay served another number of parts")
        state = log.join_snapshot(parts, pending.covers)
        return state, [log.sha256(p.data) for p in sorted(parts, key=lambda p: p.index)]

    def _check_manifest(
        self, pending: PendingLoad, records: list[LogRecord], hashes: list[bytes], current: list[DeviceEntry]
    ) -> None:
        """Under a v2 epoch a snapshot is loaded only with its manifest signed by one of the epoch's writers that
        is still in the verified list (``current``), written before any later epoch began, and naming exactly the
        parts' data (account-log.md §6.1 "signed snapshots"). Snapshots of legacy epochs keep the unsigned layout.
        Raises :class:`~protocol.errors.TetherlessError` (``malformed_body``, ``bad_signature``,
        ``log_epoch_stale``)."""
        store = self._store
        info = store.epoch_info(pending.epoch)
        key = store.epoch_key(pending.epoch)
        if info is None or info.record_format < 2 or key is None:
            return
        if any(i.epoch > pending.epoch and i.position < pending.position for i in store.epoch_infos()):
            raise TetherlessError(ErrorCode.LOG_EPOCH_STALE, "snapshot written under an epoch after a later one began")
        manifest_record = next((r for r in records if r.position == pending.position and r.kind == "snapshot"), None)
        if manifest_record is None:
            raise log.InvalidRecordError(ErrorCode.MALFORMED_BODY, "the relay did not serve the snapshot's manifest")
        manifest = log.open_snapshot_manifest(
            key,
            manifest_record.ciphertext,
            account_id=self._keys.account_id,
            snapshot=pending.snapshot_id,
            epoch=pending.epoch,
            covers=pending.covers,
            parts=pending.parts,
            writers=info.writers,
        )
        if manifest.writer_device not in {d.device_id for d in current}:
            raise log.InvalidRecordError(ErrorCode.BAD_SIGNATURE, "snapshot written by a device no longer in the list")
        if manifest.part_hashes != hashes:
            raise log.InvalidRecordError(ErrorCode.MALFORMED_BODY, "snapshot parts do not match its signed manifest")

    def _refuse_snapshot(self, pending: PendingLoad, exc: TetherlessError) -> None:
        """Never load it, never choose it again, and read the log from where this device was instead: a snapshot
        is only a shortcut, the records it covers are still in the log (except those retention removed)."""
        store = self._store
        self._report.warn(
            "snapshot_refused",
            f"refused snapshot at position {pending.position} (epoch {pending.epoch}, covers {pending.covers}): "
            f"{exc.code.value}: {exc.detail}; reading the log instead",
        )
        with store.transaction():
            store.db.execute("DELETE FROM log_snapshot_loads WHERE snapshot_id = ?", (pending.snapshot_id,))
            store.advance_counter(_REFUSED + pending.snapshot_id.hex(), 1)
            store.set_cursor("log", max(0, store.counter(_FROM + pending.snapshot_id.hex()) - 1))

    def _load_state(self, pending: PendingLoad, state: log.SnapshotState) -> None:
        """The snapshot's history, gaps and key record copies, in one transaction with the load's completion."""
        store = self._store
        new: list[HistoryMessage] = []
        with store.transaction():
            for m in state.messages:
                fields: dict[str, Any] = {
                    "msg_key": m.record_id,
                    "message_uid": m.message_uid,
                    "sender_device": Address.parse(m.sender).device,
                    "direction": m.direction,
                    "pair_seq": m.pair_seq,
                    "sent_at_ms": m.sent_at_ms,
                    "relay_sent_at_ms": m.relay_sent_at_ms,
                    "via": "log",
                    "sender": m.sender,
                    "recipients": m.recipients,
                    "content_type": m.content_type,
                    "body": m.body,
                    "log_position": m.position,
                    "late": m.late,
                }
                if store.upsert_message(**fields):
                    new.append(HistoryMessage(**fields))
                if store.is_pending(m.record_id):
                    mark_logged(store, m.record_id, m.position)
            for gap in state.gaps:
                _note_gap(store, gap.after, gap.upto)
            _keep_key_records(store, state.key_records)
            if store.cursor(_KEYS_CURSOR) < state.covers:
                store.set_cursor(_KEYS_CURSOR, state.covers)
            store.db.execute(
                "UPDATE log_snapshot_loads SET loaded_at_ms = ?, messages = ? WHERE snapshot_id = ?",
                (store.now_ms(), len(state.messages), pending.snapshot_id),
            )
            self._holdback.release()
        for message in new:
            if self._on_message is not None and message.direction == "received":
                self._on_message(message, None, None)


__all__ = [
    "SNAPSHOT_THRESHOLD",
    "Gap",
    "PendingLoad",
    "SnapshotError",
    "SnapshotPlan",
    "SnapshotWritten",
    "Snapshots",
    "build_state",
    "gaps",
    "loaded_snapshots",
]
