"""The snapshot part's own state (protocol/client/engine/snapshots.py), formerly module-level weak dictionaries
keyed by the engine: what it checks once per connection, per part, with no process."""

from __future__ import annotations

from pathlib import Path

import trio

from protocol.client.engine.log import LOG_PAGE, LogReader
from protocol.client.engine.snapshots import Snapshots, gaps, loaded_snapshots
from protocol.messages import DeviceEntry, LogPage, SnapshotRef
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


def test_past_cursor_0_the_shape_comes_with_the_first_page_kept_for_the_reader(tmp_path: Path) -> None:
    """No ``limit=0`` probe once this device has read the log: the page after the cursor carries the same head,
    horizon and snapshot, and the reader uses it once, unless the check moved the cursor to a snapshot."""
    parts = Parts(tmp_path)
    with parts.store.transaction():
        parts.store.set_cursor("log", 5)
    snapshots = _snapshots(parts)
    page = LogPage(records=[], next_after=5, head=5, horizon=0, more=False)
    parts.relay.log_pages.append(page)
    assert not trio.run(snapshots.before_read)
    assert parts.relay.calls == [("log_page", (5, LOG_PAGE))]
    assert snapshots.unread_page() == (5, page)
    assert snapshots.unread_page() is None  # used once
    assert not trio.run(snapshots.before_read)  # the same connection: nothing asked, nothing kept
    assert snapshots.unread_page() is None
    assert len(parts.relay.calls) == 1

    far_behind = SnapshotRef(
        snapshot_id=b"s" * 16, position=40, covers=39, parts=1, epoch=1, committed_at_ms=1_700_000_000_000
    )
    parts.relay.log_pages.append(LogPage(records=[], next_after=5, head=40, horizon=9, more=False, snapshot=far_behind))
    parts.relay.reconnect()
    assert trio.run(snapshots.before_read)  # below the horizon: the snapshot is chosen and the cursor moves to it
    assert parts.store.cursor("log") == 39
    assert snapshots.unread_page() is None  # a page after 5 says nothing about what follows 39


def test_at_cursor_0_only_the_shape_of_an_empty_log_is_kept_for_the_reader(tmp_path: Path) -> None:
    """At cursor 0 the check asks for the shape alone (``limit=0``): for an empty log that is the whole first page
    too; for any other it says nothing of the records, and the reader asks for them."""
    parts = Parts(tmp_path)
    snapshots = _snapshots(parts)
    assert not trio.run(snapshots.before_read)
    empty = LogPage(records=[], next_after=0, head=0, horizon=0, more=False)
    assert snapshots.unread_page() == (0, empty)

    async def head_3(after: int, limit: int) -> LogPage:
        parts.relay.calls.append(("log_page", (after, limit)))
        return LogPage(records=[], next_after=after, head=3, horizon=0, more=True)

    parts.relay.log_page = head_3  # type: ignore[method-assign]
    parts.relay.reconnect()
    assert not trio.run(snapshots.before_read)
    assert _shape_checks(parts) == 2
    assert snapshots.unread_page() is None


def test_the_reader_uses_a_kept_page_only_where_the_cursor_still_is(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    reader = LogReader(parts.ctx, parts.lists, parts.epochs, parts.holdback)

    async def no_list() -> tuple[int, list[DeviceEntry]]:
        return 1, []

    parts.lists.current = no_list  # type: ignore[method-assign]  # nothing to judge: the pages hold no records
    stale = LogPage(records=[], next_after=3, head=3, horizon=0, more=False)
    trio.run(reader.read, (3, stale))  # fetched after 3, but the cursor is at 0: asked again
    assert parts.relay.calls == [("log_page", (0, LOG_PAGE))]
    trio.run(reader.read, (0, LogPage(records=[], next_after=0, head=0, horizon=0, more=False)))
    assert len(parts.relay.calls) == 1  # at the cursor: used, not asked again


def test_the_tables_come_with_the_store(tmp_path: Path) -> None:
    """``state.db`` migration 4 creates them: reading before any sync finds them, empty."""
    parts = Parts(tmp_path)
    assert gaps(parts.store) == []
    assert loaded_snapshots(parts.store) == []
    names = {r[0] for r in parts.store.db.execute("SELECT name FROM sqlite_master WHERE name LIKE 'log_snapshot_%'")}
    assert names == {"log_snapshot_writes", "log_snapshot_loads", "log_snapshot_keys"}
