"""Snapshots and retention on the client (docs/account-log.md §6, §3.3, §13): the public functions.

The work is done by the engine's snapshot part, :class:`protocol.client.engine.snapshots.Snapshots` (its module doc
says how snapshots are written and loaded); these functions keep the names the command line and the tests use and
take the engine whose part they call. Each raises what that method raises.
"""

from __future__ import annotations

from .. import log
from ..messages import LogRetention
from .engine.engine import SyncEngine
from .engine.snapshots import (
    SNAPSHOT_THRESHOLD,
    Gap,
    PendingLoad,
    SnapshotError,
    SnapshotPlan,
    SnapshotWritten,
    build_state,
    gaps,
    loaded_snapshots,
)


async def retention(engine: SyncEngine) -> LogRetention:
    """``GET /v1/log/retention`` (:meth:`Snapshots.retention`)."""
    return await engine.snapshots.retention()


async def set_retention(engine: SyncEngine, days: int | None) -> LogRetention:
    """``PUT /v1/log/retention``: ``None`` = forever, else days (:meth:`Snapshots.set_retention`)."""
    return await engine.snapshots.set_retention(days)


async def begin_snapshot(engine: SyncEngine) -> SnapshotPlan:
    """The snapshot to write (:meth:`Snapshots.begin`)."""
    return await engine.snapshots.begin()


async def collect_key_records(engine: SyncEngine, upto: int) -> None:
    """Copy the ``key`` records up to ``upto`` (:meth:`Snapshots.collect_key_records`)."""
    await engine.snapshots.collect_key_records(upto)


async def prepare_chunks(engine: SyncEngine, plan: SnapshotPlan, part_bytes: int) -> list[bytes]:
    """The plaintext chunks of a plan's parts (:meth:`Snapshots.prepare_chunks`)."""
    return await engine.snapshots.prepare_chunks(plan, part_bytes)


async def append_parts(engine: SyncEngine, plan: SnapshotPlan, chunks: list[bytes]) -> None:
    """Append the parts (:meth:`Snapshots.append_parts`)."""
    await engine.snapshots.append_parts(plan, chunks)


async def append_manifest(engine: SyncEngine, plan: SnapshotPlan, chunks: list[bytes]) -> tuple[int, bool]:
    """Append the manifest (:meth:`Snapshots.append_manifest`)."""
    return await engine.snapshots.append_manifest(plan, chunks)


async def write_snapshot(engine: SyncEngine, *, part_bytes: int = log.SNAPSHOT_PART_BYTES) -> SnapshotWritten:
    """Write (or finish writing) a snapshot at the log cursor (:meth:`Snapshots.write`)."""
    return await engine.snapshots.write(part_bytes=part_bytes)


__all__ = [
    "SNAPSHOT_THRESHOLD",
    "Gap",
    "PendingLoad",
    "SnapshotError",
    "SnapshotPlan",
    "SnapshotWritten",
    "append_manifest",
    "append_parts",
    "begin_snapshot",
    "build_state",
    "collect_key_records",
    "gaps",
    "loaded_snapshots",
    "prepare_chunks",
    "retention",
    "set_retention",
    "write_snapshot",
]
