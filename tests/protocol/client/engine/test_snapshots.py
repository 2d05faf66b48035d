"""The snapshot part's own state (protocol/client/engine/snapshots.py), formerly module-level weak dictionaries
keyed by the engine: what it checks once per connection, per part, with no process."""

from __future__ import annotations

from pathlib import Path

import trio

from protocol.client.engine.log import LogReader
from protocol.client.engine.snapshots import Snapshots, ensure_tables, gaps, loaded_snapshots
from protocol.messages import LogPage
from tests.support.engine_parts import Parts


def _snapshots(parts: Parts) -> Snapshots:
    reader = LogReader(parts.ctx, parts.lists, parts.epochs, parts.holdback)
    return Snapshots(parts.ctx, parts.lists, parts.epochs, reader, parts.holdback)


def _shape_checks(parts: Parts) -> int:
    return sum(1 for name, args in parts.relay.calls if name == "log_page" and args == (0, 0))


def test_the_log_shape_is_checked_once_per_connection_and_per_part(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    snapshots = _snapshots(parts)
    assert not trio.run(snapshots.before_read)
    assert not trio.run(snapshots.before_read)
    assert _shape_checks(parts) == 1  # the same connection: not asked again
    parts.relay.reconnect()
    trio.run(snapshots.before_read)
    assert _shape_checks(parts) == 2
    other = _snapshots(parts)  # another engine on the same home keeps its own state
    trio.run(other.before_read)
    assert _shape_checks(parts) == 3


def test_a_retention_gap_below_the_horizon_is_noted_once(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    snapshots = _snapshots(parts)

    async def horizon_7(after: int, limit: int) -> LogPage:
        parts.relay.calls.append(("log_page", (after, limit)))
        return LogPage(records=[], next_after=after, head=9, horizon=7, more=False)

    parts.relay.log_page = horizon_7  # type: ignore[method-assign]
    assert trio.run(snapshots.before_read)  # history changed: a gap (0, 7] is recorded (§6.3)
    assert [(g.after, g.upto, g.positions) for g in gaps(parts.store)] == [(0, 7, 7)]
    assert not snapshots.waiting_for_key()
    assert loaded_snapshots(parts.store) == []


def test_the_tables_are_created_on_first_use_only(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    assert gaps(parts.store) == []  # creates them
    ensure_tables(parts.store)  # idempotent: a read of the schema, nothing written
    names = {r[0] for r in parts.store.db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'log_snapshot_%'")}
    assert names == {"log_snapshot_writes", "log_snapshot_loads", "log_snapshot_keys"}
