"""Guarantees that the performance work on the SQLite store must keep (docs/performance.md, "Changes").

- batched inserts (two ``executemany`` per request): cursors follow the order
  of the request across many recipients; a key repeated inside one request is
  a duplicate of its first use (or a conflict), and a failing request stores
  nothing;
- the longer WAL between checkpoints (``wal_autocheckpoint``): an
  acknowledged batch is durable and readable after a reopen, before any
  checkpoint ran.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from protocol.errors import ErrorCode, TetherlessError
from relay.store.base import DeviceRecord, NewEnvelope
from relay.store.sqlite import DB_FILE, SQLiteStore

FOREVER = 2**62


def _device(n: int) -> DeviceRecord:
    return DeviceRecord(
        device_id=f"dev{n:029d}", account_id=f"acc{n:029d}", sign_key=b"s" * 32, box_key=b"b" * 32, created_at_ms=1
    )


def _envelope(dev: DeviceRecord, key: bytes, body: bytes = b"ct") -> NewEnvelope:
    return NewEnvelope(
        recipient_device=dev.device_id,
        recipient_account=dev.account_id,
        idempotency_key=key,
        digest=(key + body).ljust(16, b"\0")[:16],
        envelope_id=os.urandom(16),
        expires_at_ms=FOREVER,
        ciphertext=body,
    )


async def _store_with_devices(path: Path, count: int) -> tuple[SQLiteStore, list[DeviceRecord]]:
    store = await SQLiteStore.open(path)
    devices = [_device(n) for n in range(count)]
    for dev in devices:
        await store.create_account(dev.account_id, dev, b"list", 1)
    return store, devices


async def test_cursors_follow_request_order_across_recipients(tmp_path: Path) -> None:
    store, devices = await _store_with_devices(tmp_path, 7)
    try:
        batch = [_envelope(devices[(i * 3) % 7], b"k%03d" % i, b"body%03d" % i) for i in range(100)]
        stored = await store.store_envelopes("sender", batch, 10, 1000, FOREVER)
        cursor_of: dict[bytes, int] = {}
        for dev in devices:
            for record in await store.read_inbox(dev.device_id, 0, 1000, 0):
                cursor_of[record.envelope_id] = record.cursor
        cursors = [cursor_of[s.envelope_id] for s in stored]
        assert cursors == sorted(cursors)
        assert len(set(cursors)) == 100
    finally:
        await store.close()


async def test_key_repeated_within_one_request_is_a_duplicate_or_a_conflict(tmp_path: Path) -> None:
    store, (a, b) = await _store_with_devices(tmp_path, 2)
    try:
        first, again = await store.store_envelopes(
            "sender", [_envelope(a, b"same"), _envelope(a, b"same")], 10, 1000, FOREVER
        )
        assert not first.duplicate
        assert again.duplicate
        assert again.envelope_id == first.envelope_id
        assert len(await store.read_inbox(a.device_id, 0, 10, 0)) == 1
        with pytest.raises(TetherlessError) as info:
            await store.store_envelopes(
                "sender",
                [_envelope(b, b"fresh"), _envelope(b, b"twice", b"x"), _envelope(b, b"twice", b"y")],
                11,
                1000,
                FOREVER,
            )
        assert info.value.code is ErrorCode.IDEMPOTENCY_CONFLICT
        assert await store.read_inbox(b.device_id, 0, 10, 0) == []  # nothing of the failed request
    finally:
        await store.close()


async def test_acknowledged_batch_survives_reopen_before_any_checkpoint(tmp_path: Path) -> None:
    store, (a,) = await _store_with_devices(tmp_path, 1)
    stored = await store.store_envelopes("sender", [_envelope(a, b"k%d" % i) for i in range(50)], 10, 1000, FOREVER)
    wal = tmp_path / (DB_FILE + "-wal")
    assert wal.exists()
    assert wal.stat().st_size > 0  # the rows are in the WAL, not yet checkpointed
    # Copy the files as a crash would leave them (the store is still open: no closing checkpoint).
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):
        (crashed / (DB_FILE + suffix)).write_bytes((tmp_path / (DB_FILE + suffix)).read_bytes())
    await store.close()
    conn = sqlite3.connect(crashed / DB_FILE)
    ids = [row[0] for row in conn.execute("SELECT envelope_id FROM envelopes ORDER BY seq")]
    conn.close()
    assert ids == [s.envelope_id for s in stored]
