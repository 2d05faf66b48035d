"""The account log (schema: migrations/0006_account_log.sql; decisions in ``log_rules``; docs/account-log.md).

Serialisation of appends per account (docs/decisions/0005-account-log.md, D1):
SQLite has one writer thread; PostgreSQL locks the account's ``log_heads``
row (``SELECT … FOR UPDATE``, :attr:`Engine.lock_rows`), so appenders to one
account commit in position order and a reader never sees position p+1 before p.
Reads run in one snapshot (the backend's read transaction).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from protocol.errors import ErrorCode, TetherlessError

from ..base import (
    LogAppendOutcome,
    LogPageRecord,
    LogRetentionRecord,
    LogSnapshotInfo,
    LogSweepReport,
    NewLogRecord,
    StoredLogRecord,
)
from ..engine import LOG_CHANNEL, Engine, clamp
from ..log_rules import (
    ABANDONED_PARTS_MS,
    KEY,
    KIND_CODES,
    KIND_NAMES,
    MANIFEST,
    PART,
    SUPERSEDED_GRACE_MS,
    LogState,
    fit_count,
    plan_append,
)

_HEADER = "position, record_id, kind, epoch, committed_at_ms, size"
_EXTRA = "snapshot_id, covers, parts, device_list_version"


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _state(conn: Any, e: Engine, account_id: str, *, lock: bool) -> LogState:
    row = conn.execute(
        e.q(
            "SELECT head, horizon, bytes, epoch, epoch_device_list_version, rekey_after_version, snapshot_position"
            " FROM log_heads WHERE account_id = ?" + (e.lock_rows if lock else "")
        ),
        (account_id,),
    ).fetchone()
    if row is None:
        return LogState()
    covers = -1
    if row[6] is not None:
        found = conn.execute(
            e.q("SELECT covers FROM log_records WHERE account_id = ? AND position = ?"), (account_id, row[6])
        ).fetchone()
        covers = found[0] if found else -1
    head, horizon, used, epoch, list_version, rekey_after, snapshot_position = row
    return LogState(head, horizon, used, epoch, list_version, rekey_after, snapshot_position, covers)


def _ensure_head(conn: Any, e: Engine, account_id: str) -> None:
    conn.execute(e.q("INSERT INTO log_heads (account_id) VALUES (?) ON CONFLICT DO NOTHING"), (account_id,))


def append(
    conn: Any,
    e: Engine,
    account_id: str,
    records: Sequence[NewLogRecord],
    expected_head: int | None,
    now_ms: int,
    max_bytes: int,
) -> LogAppendOutcome:
    """Append under the account's serialisation; see ``Store.append_log``."""
    _ensure_head(conn, e, account_id)
    state = _state(conn, e, account_id, lock=True)
    existing: dict[bytes, int] = {}
    ids = [record.record_id for record in records]
    rows = e.fetch_in(
        conn,
        "SELECT record_id, position FROM log_records WHERE account_id = ? AND {one_of}",
        (account_id,),
        "record_id",
        ids,
        "bytea",
    )
    existing.update((bytes(rid), pos) for rid, pos in rows)

    def stored_parts(snapshot_id: bytes) -> int:
        row = conn.execute(
            e.q("SELECT count(*) FROM log_records WHERE account_id = ? AND snapshot_id = ? AND kind = ? AND size > 0"),
            (account_id, snapshot_id, PART),
        ).fetchone()
        return int(row[0])

    plan = plan_append(state, records, existing, expected_head, max_bytes, stored_parts)
    if not plan.rows:
        return plan.outcome
    conn.cursor().executemany(
        e.q(
            "INSERT INTO log_records (account_id, position, record_id, kind, epoch, committed_at_ms,"
            " snapshot_id, covers, parts, device_list_version, size, ciphertext)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ),
        [
            (
                account_id,
                position,
                r.record_id,
                KIND_CODES[r.kind],
                r.epoch,
                now_ms,
                r.snapshot_id,
                r.covers,
                r.parts,
                r.device_list_version,
                len(r.ciphertext),
                r.ciphertext,
            )
            for position, r in plan.rows
        ],
    )
    after = plan.state
    conn.execute(
        e.q(
            "UPDATE log_heads SET head = ?, bytes = ?, epoch = ?, epoch_device_list_version = ?,"
            " snapshot_position = ? WHERE account_id = ?"
        ),
        (after.head, after.bytes, after.epoch, after.epoch_device_list_version, after.snapshot_position, account_id),
    )
    e.notify(conn, LOG_CHANNEL, [account_id])
    return plan.outcome


def _record(row: Sequence[Any]) -> StoredLogRecord:
    return StoredLogRecord(
        position=row[0],
        record_id=bytes(row[1]),
        kind=KIND_NAMES[row[2]],
        epoch=row[3],
        committed_at_ms=row[4],
        size=row[5],
        snapshot_id=_bytes(row[6]),
        covers=row[7],
        parts=row[8],
        device_list_version=row[9],
        ciphertext=bytes(row[10]),
    )


def _snapshot(conn: Any, e: Engine, account_id: str, position: int | None) -> LogSnapshotInfo | None:
    if position is None:
        return None
    row = conn.execute(
        e.q(
            "SELECT snapshot_id, position, covers, parts, epoch, committed_at_ms FROM log_records"
            " WHERE account_id = ? AND position = ?"
        ),
        (account_id, position),
    ).fetchone()
    if row is None:
        return None
    return LogSnapshotInfo(bytes(row[0]), row[1], row[2], row[3], row[4], row[5])


def _page(
    conn: Any, e: Engine, account_id: str, where: str, params: Sequence[Any], limit: int, max_bytes: int, stub: bool
) -> list[StoredLogRecord]:
    """Records matching ``where`` (position order), at most ``limit`` and ``max_bytes`` (at least one).

    Sizes are read first from the small header columns, so a page never loads
    ciphertext it will not return.
    """
    if limit <= 0:
        return []
    returned = f"CASE WHEN kind = {PART} THEN 0 ELSE size END" if stub else "size"
    sizes = conn.execute(
        e.q(f"SELECT position, {returned} FROM log_records WHERE {where} ORDER BY position LIMIT ?"),
        (*params, limit),
    ).fetchall()
    if not sizes:
        return []
    last = sizes[fit_count(max_bytes, sizes) - 1][0]
    body = "CASE WHEN kind = ? THEN ? ELSE ciphertext END" if stub else "ciphertext"
    body_params: tuple[Any, ...] = (PART, b"") if stub else ()
    rows = conn.execute(
        e.q(f"SELECT {_HEADER}, {_EXTRA}, {body} FROM log_records WHERE {where} AND position <= ? ORDER BY position"),
        (*body_params, *params, last),
    ).fetchall()
    return [_record(row) for row in rows]


def read(
    conn: Any, e: Engine, account_id: str, after: int, limit: int, max_bytes: int, full_parts: bool
) -> LogPageRecord:
    """A page and the header, in one read transaction (the caller's)."""
    state = _state(conn, e, account_id, lock=False)
    records = _page(
        conn,
        e,
        account_id,
        "account_id = ? AND position > ?",
        (account_id, clamp(after)),
        limit,
        max_bytes,
        not full_parts,
    )
    return LogPageRecord(records, state.head, state.horizon, _snapshot(conn, e, account_id, state.snapshot_position))


def snapshot(conn: Any, e: Engine, account_id: str) -> LogSnapshotInfo | None:
    return _snapshot(conn, e, account_id, _state(conn, e, account_id, lock=False).snapshot_position)


def snapshot_parts(
    conn: Any, e: Engine, account_id: str, snapshot_id: bytes, after: int, limit: int, max_bytes: int
) -> LogPageRecord:
    """The newest snapshot's parts after ``after``; ``no_snapshot`` when ``snapshot_id`` is not the newest."""
    state = _state(conn, e, account_id, lock=False)
    info = _snapshot(conn, e, account_id, state.snapshot_position)
    if info is None or info.snapshot_id != snapshot_id:
        raise TetherlessError(ErrorCode.NO_SNAPSHOT, "no such snapshot, or it is not the newest complete one")
    where = f"account_id = ? AND snapshot_id = ? AND kind = {PART} AND position > ?"
    records = _page(conn, e, account_id, where, (account_id, snapshot_id, clamp(after)), limit, max_bytes, False)
    return LogPageRecord(records, state.head, state.horizon, info)


def _retention(conn: Any, e: Engine, account_id: str) -> LogRetentionRecord:
    row = conn.execute(
        e.q("SELECT retention_days, horizon, retention_updated_at_ms FROM log_heads WHERE account_id = ?"),
        (account_id,),
    ).fetchone()
    return LogRetentionRecord(*row) if row else LogRetentionRecord(None, 0, 0)


def get_retention(conn: Any, e: Engine, account_id: str) -> LogRetentionRecord:
    return _retention(conn, e, account_id)


def set_retention(conn: Any, e: Engine, account_id: str, days: int | None, now_ms: int) -> LogRetentionRecord:
    _ensure_head(conn, e, account_id)
    conn.execute(
        e.q("UPDATE log_heads SET retention_days = ?, retention_updated_at_ms = ? WHERE account_id = ?"),
        (days, now_ms, account_id),
    )
    return _retention(conn, e, account_id)


def note_revocation(conn: Any, e: Engine, account_id: str, device_list_version: int) -> None:
    """Raise the account's ``rekey_after_version`` (never lowers it); for the device-list transaction."""
    _ensure_head(conn, e, account_id)
    conn.execute(
        e.q("UPDATE log_heads SET rekey_after_version = ? WHERE account_id = ? AND rekey_after_version < ?"),
        (device_list_version, account_id, device_list_version),
    )


def sweep_accounts(conn: Any, e: Engine) -> list[str]:
    """Accounts a sweep may have work for: retention in days, or snapshot records still holding bytes."""
    rows = conn.execute(
        "SELECT account_id FROM log_heads h WHERE retention_days IS NOT NULL OR EXISTS ("
        " SELECT 1 FROM log_records r WHERE r.account_id = h.account_id AND r.snapshot_id IS NOT NULL"
        f" AND r.size > 0 AND r.kind IN ({PART}, {MANIFEST}) AND r.position <> COALESCE(h.snapshot_position, 0)"
        ") ORDER BY account_id"
    ).fetchall()
    return [row[0] for row in rows]


def sweep_account(conn: Any, e: Engine, account_id: str, now_ms: int, batch: int) -> LogSweepReport:
    """One retention step for one account, under its serialisation (see ``Store.sweep_log``)."""
    row = conn.execute(
        e.q("SELECT retention_days, horizon, snapshot_position FROM log_heads WHERE account_id = ?" + e.lock_rows),
        (account_id,),
    ).fetchone()
    if row is None:
        return LogSweepReport()
    days, horizon, snapshot_position = row
    newest = _snapshot(conn, e, account_id, snapshot_position)
    keep_id = newest.snapshot_id if newest is not None else None
    deleted, emptied, more, freed = 0, 0, False, 0
    if days is not None:
        cutoff = now_ms - days * 86_400_000
        due = conn.execute(
            e.q(
                "SELECT position, kind, snapshot_id, size FROM log_records"
                " WHERE account_id = ? AND position > ? AND committed_at_ms < ? ORDER BY position LIMIT ?"
            ),
            (account_id, horizon, cutoff, batch),
        ).fetchall()
        doomed = [
            (pos, size)
            for pos, kind, sid, size in due
            if kind != KEY and not (kind in (PART, MANIFEST) and keep_id is not None and _bytes(sid) == keep_id)
        ]
        _delete(conn, e, account_id, [pos for pos, _ in doomed])
        deleted = len(doomed)
        freed += sum(size for _, size in doomed)
        if due:
            horizon = max(horizon, due[-1][0])
        more = len(due) == batch
    # Derived data: snapshots superseded > 7 days ago, parts never completed within 24 hours.
    complete = {
        bytes(sid)
        for (sid,) in conn.execute(
            e.q("SELECT snapshot_id FROM log_records WHERE account_id = ? AND kind = ?"), (account_id, MANIFEST)
        ).fetchall()
    }
    candidates = conn.execute(
        e.q(
            "SELECT position, snapshot_id, size, committed_at_ms FROM log_records WHERE account_id = ?"
            " AND snapshot_id IS NOT NULL AND size > 0 AND kind IN (?, ?) ORDER BY position"
        ),
        (account_id, PART, MANIFEST),
    ).fetchall()
    superseded_ok = newest is not None and newest.committed_at_ms < now_ms - SUPERSEDED_GRACE_MS
    empty: list[tuple[int, int]] = []
    for pos, sid, size, at_ms in candidates:
        sid = bytes(sid)
        if sid == keep_id:
            continue
        if (sid in complete and superseded_ok) or (sid not in complete and at_ms < now_ms - ABANDONED_PARTS_MS):
            empty.append((pos, size))
            if len(empty) == batch:
                more = True
                break
    e.execute_in(
        conn,
        "UPDATE log_records SET ciphertext = ?, size = 0 WHERE account_id = ? AND {one_of}",
        (b"", account_id),
        "position",
        [pos for pos, _ in empty],
        "bigint",
    )
    emptied = len(empty)
    freed += sum(size for _, size in empty)
    conn.execute(
        e.q("UPDATE log_heads SET horizon = ?, bytes = bytes - ? WHERE account_id = ?"), (horizon, freed, account_id)
    )
    return LogSweepReport(deleted, emptied, more)


def _delete(conn: Any, e: Engine, account_id: str, positions: Iterable[int]) -> None:
    e.execute_in(
        conn,
        "DELETE FROM log_records WHERE account_id = ? AND {one_of}",
        (account_id,),
        "position",
        list(positions),
        "bigint",
    )
