"""The account log's append rules, shared by both backends (docs/account-log.md §3.2, §5.4).

The backends read the account's ``log_heads`` row and the batch's existing
record ids under their serialisation (SQLite: the writer thread; PostgreSQL:
the row lock), call :func:`plan_append`, and write what it returns. Keeping
the decisions here means SQLite and PostgreSQL cannot disagree on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from protocol.errors import ErrorCode, TetherlessError

from .base import LOG_KINDS, LogAppended, LogAppendOutcome, NewLogRecord

KIND_CODES: dict[str, int] = {kind: code for code, kind in enumerate(LOG_KINDS, start=1)}
KIND_NAMES: dict[int, str] = {code: kind for kind, code in KIND_CODES.items()}
KEY = KIND_CODES["key"]
PART = KIND_CODES["snapshot_part"]
MANIFEST = KIND_CODES["snapshot"]

# Retention's garbage collection of derived data (§6.2).
SUPERSEDED_GRACE_MS = 7 * 86_400_000  # parts and manifests of a superseded snapshot
ABANDONED_PARTS_MS = 86_400_000  # parts that no manifest completed


@dataclass(frozen=True, slots=True)
class LogState:
    """One account's ``log_heads`` row (all zero/None for an account that never appended)."""

    head: int = 0
    horizon: int = 0
    bytes: int = 0
    epoch: int = 0
    epoch_device_list_version: int = 0
    rekey_after_version: int = 0
    snapshot_position: int | None = None
    snapshot_covers: int = -1  # covers of the snapshot at snapshot_position (-1: none)


@dataclass(frozen=True, slots=True)
class AppendPlan:
    """What to write: ``rows`` as (position, record), the state after the append, and the answer."""

    rows: list[tuple[int, NewLogRecord]]
    state: LogState
    outcome: LogAppendOutcome

    @property
    def added_bytes(self) -> int:
        return sum(len(record.ciphertext) for _, record in self.rows)


def plan_append(
    state: LogState,
    records: Sequence[NewLogRecord],
    existing: Mapping[bytes, int],
    expected_head: int | None,
    max_bytes: int,
    stored_parts: Callable[[bytes], int],
) -> AppendPlan:
    """Decide an append. ``existing`` maps the batch's already-stored ids to their positions;
    ``stored_parts(snapshot_id)`` counts stored ``snapshot_part`` records of a snapshot.

    Raises (and then nothing may be written) ``invalid_field``, ``log_conflict``,
    ``log_epoch_stale``, ``log_rekey_required``, ``log_quota`` or ``snapshot_incomplete``.
    """
    ids = [record.record_id for record in records]
    if len(set(ids)) != len(ids):
        raise TetherlessError(ErrorCode.INVALID_FIELD, "a record_id is repeated in the batch")
    if all(record_id in existing for record_id in ids):
        results = [LogAppended(record_id, existing[record_id], True) for record_id in ids]
        return AppendPlan([], state, LogAppendOutcome(state.head, results))
    if expected_head is not None and expected_head != state.head:
        raise TetherlessError(
            ErrorCode.LOG_CONFLICT, f"expected head {expected_head}, the head is {state.head}", head=state.head
        )
    epoch, list_version = state.epoch, state.epoch_device_list_version
    new = [(index, record) for index, record in enumerate(records) if record.record_id not in existing]
    for index, record in new:
        if record.kind == "key":
            if record.epoch == epoch + 1:
                if (record.device_list_version or 0) < state.rekey_after_version:
                    raise TetherlessError(
                        ErrorCode.LOG_REKEY_REQUIRED,
                        f"records[{index}]: a new epoch must name device list version"
                        f" {state.rekey_after_version} or later",
                    )
                epoch, list_version = record.epoch, record.device_list_version or 0
                continue
            if record.epoch != epoch:
                raise TetherlessError(
                    ErrorCode.LOG_EPOCH_STALE,
                    f"records[{index}]: a key record must name epoch {epoch} or {epoch + 1}",
                    epoch=epoch,
                )
        elif record.epoch != epoch:
            raise TetherlessError(
                ErrorCode.LOG_EPOCH_STALE, f"records[{index}]: the current epoch is {epoch}", epoch=epoch
            )
        if list_version < state.rekey_after_version:
            raise TetherlessError(
                ErrorCode.LOG_REKEY_REQUIRED,
                f"records[{index}]: a device was revoked; only a key record for a new epoch is accepted",
            )
    added = sum(len(record.ciphertext) for _, record in new)
    if max_bytes and state.bytes + added > max_bytes:
        raise TetherlessError(ErrorCode.LOG_QUOTA, f"the account's log would exceed {max_bytes} bytes")
    rows: list[tuple[int, NewLogRecord]] = []
    positions = dict(existing)
    batch_parts: dict[bytes, int] = {}
    snapshot_position, snapshot_covers = state.snapshot_position, state.snapshot_covers
    head = state.head
    for index, record in new:
        head += 1
        if record.kind == "snapshot_part" and record.snapshot_id is not None:
            batch_parts[record.snapshot_id] = batch_parts.get(record.snapshot_id, 0) + 1
        elif record.kind == "snapshot" and record.snapshot_id is not None:
            covers = record.covers or 0
            if covers > head - 1:
                raise TetherlessError(ErrorCode.INVALID_FIELD, f"records[{index}]: covers is above the head")
            have = stored_parts(record.snapshot_id) + batch_parts.get(record.snapshot_id, 0)
            if have != record.parts:
                raise TetherlessError(
                    ErrorCode.SNAPSHOT_INCOMPLETE,
                    f"records[{index}]: {have} of {record.parts} parts of this snapshot are stored",
                )
            if covers >= snapshot_covers:
                snapshot_position, snapshot_covers = head, covers
        positions[record.record_id] = head
        rows.append((head, record))
    results = [LogAppended(record_id, positions[record_id], record_id in existing) for record_id in ids]
    after = replace(
        state,
        head=head,
        bytes=state.bytes + added,
        epoch=epoch,
        epoch_device_list_version=list_version,
        snapshot_position=snapshot_position,
        snapshot_covers=snapshot_covers,
    )
    return AppendPlan(rows, after, LogAppendOutcome(head, results))


def fit_count(limit_bytes: int, sizes: Sequence[tuple[int, int]]) -> int:
    """How many of ``sizes`` ((position, returned bytes), in order) fit in ``limit_bytes`` (at least one)."""
    total = 0
    for count, (_, size) in enumerate(sizes):
        total += size
        if count and total > limit_bytes:
            return count
    return len(sizes)
