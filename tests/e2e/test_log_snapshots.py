"""Snapshots and retention on the client, against a real relay process (docs/account-log.md §6, §3.3, §13).

- a new device bootstraps from a snapshot, with every other device offline, to
  the same history as the writer, and the relay serves it only the parts and
  the records after ``covers`` (counted by the relay's own metrics);
- a snapshot write interrupted between its parts and its manifest is resumed
  by the next write, leaving exactly one complete snapshot;
- retention in days plus the sweep: a new device gets the newest snapshot and
  the later records, and its history marks the positions no snapshot covers.

A manifest whose parts are missing (422 ``snapshot_incomplete``, store
unchanged) is covered by ``tests/e2e/test_account_log.py::test_incomplete_snapshot``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from protocol.client import snapshots
from protocol.client.api import RelayApi
from protocol.client.engine.log import LOG_PAGE
from protocol.client.home import make_engine
from protocol.client.sdk import RelayClient
from protocol.client.sync import SyncEngine
from protocol.messages import LogRecord, SnapshotRef
from relay.store.sqlite import SQLiteStore
from tests.e2e.http11 import Http11
from tests.e2e.offline_client import (
    NO_RATE_LIMITS,
    cli,
    enqueue_many,
    history,
    init_device,
    link_device,
    load,
    run_engine,
)
from tests.relay_process import RelayProcess

T = TypeVar("T")
DAY_MS = 86_400_000
PART_BYTES = "4096"  # small parts, so a few hundred messages make several of them


def _account(address: str) -> str:
    return address.split(".", 1)[1]


def _served(relay: RelayProcess) -> dict[str, float]:
    """``relay_log_records_served_total`` by ``via`` (page, stream, snapshot), from the relay's /metrics."""
    text = Http11(relay.url).get("/metrics", accept="*/*").body.decode()
    found = re.findall(r'^relay_log_records_served_total\{via="(\w+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return {via: float(value) for via, value in found}


def _settled(homes: list[Path], total: int) -> bool:
    for home in homes:
        ks, _, store = load(home)
        done = store.message_count() == total and not store.outbox() and store.pending_count() == 0
        store.db.close()
        ks.close()
        if not done:
            return False
    return True


def _exchange(homes: list[Path], settled: list[Path], total: int) -> None:
    async def rounds() -> None:
        for _ in range(8):
            async with trio.open_nursery() as nursery:
                for home in homes:
                    nursery.start_soon(run_engine, home)
            if _settled(settled, total):
                return
        raise AssertionError("the engines never settled")

    trio.run(rounds)


def _with_engine(home: Path, fn: Callable[[SyncEngine], Awaitable[T]], *, drain: bool = True) -> T:
    """Run ``fn`` with a connected (and drained) in-process engine of the device at ``home``."""

    async def main() -> T:
        ks, keys, store = load(home)
        engine = make_engine(keys, store)
        try:
            async with RelayClient.connect(keys.relay_url, keys=keys, local_db=store.db) as client:
                engine.client = client
                await client.authenticate()
                if drain:
                    await engine.drain()
                return await fn(engine)
        finally:
            engine.client = None
            store.db.close()
            ks.close()

    return trio.run(main)


def _api(engine: SyncEngine) -> RelayApi:
    assert engine.client is not None, "inside engine.connected()"
    return engine.client.api


async def _all_records(engine: SyncEngine) -> list[LogRecord]:
    records: list[LogRecord] = []
    after = 0
    while True:
        page = await _api(engine).log_page(after=after, limit=500)
        records += page.records
        after = page.next_after
        if not page.more:
            return records


async def _newest_snapshot(engine: SyncEngine) -> SnapshotRef:
    return await _api(engine).log_snapshot()


def _texts(entries: list[dict[str, Any]]) -> list[str]:
    return [str(m["text"]) for m in entries if "gap" not in m]


@pytest.fixture
def relay(tmp_path: Path) -> Any:
    process = RelayProcess(tmp_path / "relay-data", env=NO_RATE_LIMITS)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_new_device_bootstraps_from_a_snapshot_and_fetches_only_what_follows(
    relay: RelayProcess, tmp_path: Path
) -> None:
    a1_home, a3_home, b1_home = (tmp_path / n for n in ("a1", "a3", "b1"))
    a1 = init_device(relay.url, a1_home, "a1")
    b1 = init_device(relay.url, b1_home, "b1")
    early_b = [f"b1 to a #{i}" for i in range(150)]
    early_a = [f"a1 to b #{i} ✓" for i in range(150)]
    enqueue_many(b1_home, _account(a1), early_b)
    enqueue_many(a1_home, _account(b1), early_a)
    _exchange([a1_home, b1_home], [a1_home, b1_home], 300)

    written = cli(a1_home, "log", "snapshot", "--json", "--part-bytes", PART_BYTES)
    assert written.returncode == 0, written.stderr
    snap = json.loads(written.stdout)
    assert snap["messages"] == 300
    assert snap["parts"] > 3
    assert not snap["duplicate"]
    text = cli(a1_home, "log", "snapshot", "--part-bytes", PART_BYTES)  # a second one, at the new cursor
    assert text.returncode == 0
    assert text.stdout.startswith("snapshot ")
    assert "300 messages" in text.stdout
    newest = json.loads(cli(a1_home, "log", "snapshot", "--json", "--part-bytes", PART_BYTES).stdout)
    covers, parts = newest["covers"], newest["parts"]
    assert covers > snap["covers"]

    late_b = [f"b1 later #{i}" for i in range(25)]
    late_a = [f"a1 later #{i}" for i in range(25)]
    enqueue_many(b1_home, _account(a1), late_b)
    enqueue_many(a1_home, _account(b1), late_a)
    _exchange([a1_home, b1_home], [a1_home, b1_home], 350)
    trio.run(link_device, relay.url, a1_home, a3_home, "a3")
    assert trio.run(run_engine, a1_home) == 0  # A1 appends A3's grant; then every other device stays offline

    head = _with_engine(a1_home, lambda e: _newest_head(e))
    before = _served(relay)
    synced = cli(a3_home, "sync", "--json", timeout=300)
    assert synced.returncode == 0, synced.stderr
    after = _served(relay)
    from_pages = after.get("page", 0) - before.get("page", 0)
    from_snapshot = after.get("snapshot", 0) - before.get("snapshot", 0)
    assert from_snapshot == parts  # every part once
    assert from_pages <= head - covers  # only the records after covers (A3's grant is among them)
    assert from_pages >= 50  # and really the later messages (a full replay would be about `head`)

    got = history(a3_home)
    reference = history(a1_home)
    assert len(got) == 350
    assert [(m["message_id"], m["position"]) for m in got] == [(m["message_id"], m["position"]) for m in reference]
    assert [m["text"] for m in got] == [m["text"] for m in reference]
    assert [m["text"] for m in got if m["sender"] == a1] == early_a + late_a
    assert [m["text"] for m in got if m["sender"] == b1] == early_b + late_b
    _, _, store = load(a3_home)
    loaded = snapshots.loaded_snapshots(store)
    store.db.close()
    assert [(c, n) for _, c, n in loaded] == [(covers, 300)]
    assert "removed by retention" not in cli(a3_home, "history").stdout


async def _newest_head(engine: SyncEngine) -> int:
    page = await _api(engine).log_page(after=0, limit=0)
    return page.head


def test_a_snapshot_write_interrupted_before_its_manifest_is_resumed_once(relay: RelayProcess, tmp_path: Path) -> None:
    a1_home, b1_home = tmp_path / "a1", tmp_path / "b1"
    a1 = init_device(relay.url, a1_home, "a1")
    b1 = init_device(relay.url, b1_home, "b1")
    enqueue_many(b1_home, _account(a1), [f"b #{i}" for i in range(40)])
    enqueue_many(a1_home, _account(b1), [f"a #{i}" for i in range(40)])
    _exchange([a1_home, b1_home], [a1_home, b1_home], 80)

    async def crash_after_parts(engine: SyncEngine) -> tuple[snapshots.SnapshotPlan, int]:
        plan = await snapshots.begin_snapshot(engine)
        chunks = await snapshots.prepare_chunks(engine, plan, int(PART_BYTES))
        await snapshots.append_parts(engine, plan, chunks)
        return plan, len(chunks)  # "crash": no manifest, the plan stays stored

    plan, parts = _with_engine(a1_home, crash_after_parts)
    assert parts > 1

    # Meanwhile the log grows and A1 reads on: the resumed write must still be the interrupted snapshot.
    enqueue_many(b1_home, _account(a1), [f"b more #{i}" for i in range(5)])
    _exchange([a1_home, b1_home], [a1_home, b1_home], 85)
    resumed = cli(a1_home, "log", "snapshot", "--json", "--part-bytes", PART_BYTES)
    assert resumed.returncode == 0, resumed.stderr
    done = json.loads(resumed.stdout)
    assert (bytes.fromhex(done["snapshot_id"]), done["covers"], done["parts"]) == (plan.snapshot_id, plan.covers, parts)
    assert done["messages"] == 80
    assert not done["duplicate"]

    async def check(engine: SyncEngine) -> None:
        # The lower-level steps once more with the same plan: everything is a duplicate.
        chunks = await snapshots.prepare_chunks(engine, plan, int(PART_BYTES))
        await snapshots.append_parts(engine, plan, chunks)
        assert await snapshots.append_manifest(engine, plan, chunks) == (done["position"], True)
        records = await _all_records(engine)
        manifests = [r for r in records if r.kind == "snapshot"]
        part_records = [r for r in records if r.kind == "snapshot_part"]
        assert [(m.snapshot_id, m.covers, m.parts) for m in manifests] == [(plan.snapshot_id, plan.covers, parts)]
        assert len(part_records) == parts
        assert {r.snapshot_id for r in part_records} == {plan.snapshot_id}
        assert all(r.size > 0 and r.ciphertext == b"" for r in part_records)  # stubbed in pages
        ref = await _newest_snapshot(engine)
        assert (ref.snapshot_id, ref.covers, ref.parts, ref.position) == (
            plan.snapshot_id,
            plan.covers,
            parts,
            done["position"],
        )

    _with_engine(a1_home, check)


def test_retention_keeps_the_newest_snapshot_and_history_marks_the_gap(relay: RelayProcess, tmp_path: Path) -> None:
    a1_home, a3_home, b1_home = (tmp_path / n for n in ("a1", "a3", "b1"))
    a1 = init_device(relay.url, a1_home, "a1")
    init_device(relay.url, b1_home, "b1")
    first = [f"first #{i}" for i in range(30)]
    enqueue_many(b1_home, _account(a1), first)
    _exchange([a1_home, b1_home], [a1_home], 30)
    written = cli(a1_home, "log", "snapshot", "--json", "--part-bytes", PART_BYTES)
    assert written.returncode == 0, written.stderr
    covers = json.loads(written.stdout)["covers"]
    second = [f"second #{i}" for i in range(20)]  # after the snapshot: nothing will cover these
    enqueue_many(b1_home, _account(a1), second)
    _exchange([a1_home, b1_home], [a1_home], 50)

    shown = cli(a1_home, "log", "retention")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("retention: forever")
    assert "horizon: log position 0" in shown.stdout
    for bad in ("0", "-3", "soon", "1.5"):
        refused = cli(a1_home, "log", "retention", bad)
        assert refused.returncode == 2
        assert "expected `forever` or a number of days" in refused.stderr
    assert json.loads(cli(a1_home, "log", "retention", "--json").stdout)["mode"] == "forever"  # unchanged
    set_days = cli(a1_home, "log", "retention", "1")
    assert set_days.returncode == 0, set_days.stderr
    assert set_days.stdout.startswith("retention set to 1 day (the relay deletes records committed more than 1 day ago")
    assert "except the newest snapshot" in set_days.stdout
    head_before = _with_engine(a1_home, _newest_head)

    # Two days later (the relay's retention unit is days): sweep the relay's store directly, relay stopped.
    relay.stop()

    async def sweep() -> None:
        store = await SQLiteStore.open(relay.data_dir)
        try:
            while (await store.sweep_log(int(time.time() * 1000) + 2 * DAY_MS, 1000)).more:
                pass
        finally:
            await store.close()

    trio.run(sweep)
    relay.start()
    policy = json.loads(cli(a1_home, "log", "retention", "--json").stdout)
    assert policy["mode"] == "days"
    assert policy["days"] == 1
    horizon = policy["horizon"]
    assert covers < horizon <= head_before

    third = [f"third #{i}" for i in range(10)]
    enqueue_many(b1_home, _account(a1), third)
    _exchange([a1_home, b1_home], [a1_home], 60)
    trio.run(link_device, relay.url, a1_home, a3_home, "a3")
    assert trio.run(run_engine, a1_home) == 0

    synced = cli(a3_home, "sync", timeout=120)
    assert synced.returncode == 0, synced.stderr
    got = history(a3_home)
    gap = [m for m in got if "gap" in m]
    assert gap == [{"gap": "retention", "after": covers, "upto": horizon, "positions": horizon - covers}]
    assert _texts(got) == first + third  # the snapshot, the gap, the later records
    assert got.index(gap[0]) == len(first)
    lines = cli(a3_home, "history").stdout.splitlines()
    assert lines[len(first)] == (
        f"---- up to {horizon - covers} older records removed by retention (log positions {covers + 1}-{horizon};"
        " no snapshot covers them) ----"
    )
    assert len(lines) == len(first) + 1 + len(third)
    assert _texts(history(a1_home)) == first + second + third  # A1 keeps what it had (local deletion: not yet)


def test_a_device_granted_before_the_snapshot_still_bootstraps_from_it(relay: RelayProcess, tmp_path: Path) -> None:
    """The slow path: A3's grant lies below ``covers``, so A3 reads the key records up to ``covers`` first."""
    a1_home, a3_home, b1_home = (tmp_path / n for n in ("a1", "a3", "b1"))
    a1 = init_device(relay.url, a1_home, "a1")
    init_device(relay.url, b1_home, "b1")
    trio.run(link_device, relay.url, a1_home, a3_home, "a3")  # enrolled now, but stays offline until the end
    texts = [f"before #{i}" for i in range(40)]
    enqueue_many(b1_home, _account(a1), texts)
    _exchange([a1_home, b1_home], [a1_home], 40)
    written = cli(a1_home, "log", "snapshot", "--json", "--part-bytes", PART_BYTES)
    assert written.returncode == 0, written.stderr
    covers = json.loads(written.stdout)["covers"]
    synced = cli(a3_home, "sync", timeout=120)  # A3 alone; A1 and B1 are offline
    assert synced.returncode == 0, synced.stderr
    _, _, store = load(a3_home)
    loaded = snapshots.loaded_snapshots(store)
    store.db.close()
    assert [(c, n) for _, c, n in loaded] == [(covers, 40)]
    assert [(m["message_id"], m["position"]) for m in history(a3_home)] == [
        (m["message_id"], m["position"]) for m in history(a1_home)
    ]


def test_a_sync_of_an_established_home_takes_the_log_shape_from_its_first_page(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """The snapshot check needs the log's head, horizon and newest snapshot once per connection; every page carries
    them, so a device past cursor 0 asks for its first page of records (used by the reader) and no ``limit=0``
    probe: one log request per ``sync`` of a home that is up to date, not two."""
    a1_home, b1_home = tmp_path / "a1", tmp_path / "b1"
    a1 = init_device(relay.url, a1_home, "a1")
    b1 = init_device(relay.url, b1_home, "b1")
    enqueue_many(a1_home, _account(b1), ["one", "two"])
    _exchange([a1_home, b1_home], [a1_home, b1_home], 2)
    assert a1

    async def count(engine: SyncEngine) -> tuple[int, list[tuple[int, int | None]], int]:
        api = _api(engine)
        honest = api.log_page
        asked: list[tuple[int, int | None]] = []

        async def log_page(after: int = 0, limit: int | None = None) -> Any:
            asked.append((after, limit))
            return await honest(after=after, limit=limit)

        api.log_page = log_page  # type: ignore[method-assign]
        before = api.requests_sent
        await engine.drain()
        return engine.store.cursor("log"), asked, api.requests_sent - before

    for home in (a1_home, b1_home):
        cursor, asked, requests = _with_engine(home, count, drain=False)
        assert cursor > 0
        assert asked == [(cursor, LOG_PAGE)], asked
        assert requests == 3  # the whole pass; 4 with the probe (measured with it put back)
    # `send` reads the log once before it seals (crypto.md §13.2): one GET /v1/log, counted by the relay.
    before = _log_reads(relay)
    sent = cli(a1_home, "send", b1, "--text", "three")
    assert sent.returncode == 0, sent.stderr
    assert _log_reads(relay) - before == 1


def _log_reads(relay: RelayProcess) -> float:
    """``GET /v1/log`` requests the relay answered, from its ``relay_http_requests_total``."""
    text = Http11(relay.url).get("/metrics", accept="*/*").body.decode()
    found = re.findall(r"^relay_http_requests_total\{([^}]*)\} ([0-9.e+]+)$", text, re.MULTILINE)
    return sum(float(value) for labels, value in found if 'route="/v1/log"' in labels and 'method="GET"' in labels)
