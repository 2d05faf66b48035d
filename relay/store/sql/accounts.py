"""Accounts and their devices (schema: migrations/0001_initial.sql)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from protocol.errors import ErrorCode, TetherlessError

from ..base import DeviceRecord
from ..engine import Engine


def create_account(
    conn: Any, e: Engine, *, account_id: str, device: DeviceRecord, signed_device_list: bytes, now_ms: int
) -> None:
    """See ``Store.create_account``; the primary keys decide "exists", also between concurrent replicas."""
    exists = TetherlessError(ErrorCode.ACCOUNT_EXISTS, "an account with this genesis key exists")
    created = conn.execute(
        e.q("INSERT INTO accounts (account_id, created_at_ms, list_version) VALUES (?, ?, 1) ON CONFLICT DO NOTHING"),
        (account_id, now_ms),
    ).rowcount
    if not created:
        raise exists
    conn.execute(
        e.q("INSERT INTO device_lists (account_id, version, signed, stored_at_ms) VALUES (?, 1, ?, ?)"),
        (account_id, signed_device_list, now_ms),
    )
    added = conn.execute(
        e.q(
            "INSERT INTO devices (device_no, device_id, account_id, sign_key, box_key, created_at_ms)"
            f" VALUES ({e.next_device_no}, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
        ),
        (device.device_id, account_id, device.sign_key, device.box_key, now_ms),
    ).rowcount
    if not added:
        raise exists  # the caller's transaction rolls the account back


def get_device(conn: Any, e: Engine, *, device_id: str) -> DeviceRecord | None:
    if not e.storable(device_id):
        return None
    row = conn.execute(
        e.q(
            "SELECT device_id, account_id, sign_key, box_key, created_at_ms, revoked_at_ms"
            " FROM devices WHERE device_id = ?"
        ),
        (device_id,),
    ).fetchone()
    return DeviceRecord(row[0], row[1], bytes(row[2]), bytes(row[3]), row[4], row[5]) if row else None


def get_device_lists(conn: Any, e: Engine, *, account_id: str) -> list[bytes] | None:
    if not e.storable(account_id):
        return None
    rows = conn.execute(
        e.q("SELECT signed FROM device_lists WHERE account_id = ? ORDER BY version"), (account_id,)
    ).fetchall()
    return [bytes(row[0]) for row in rows] or None


def lock_devices(conn: Any, e: Engine, device_ids: Iterable[str], columns: str) -> dict[str, Any]:
    """device id -> its row's ``columns``, for the known ones among ``device_ids``.

    Where the engine locks rows, the rows stay locked until commit, taken in
    device id order so that transactions locking several never deadlock.
    """
    rows = e.fetch_in(
        conn,
        f"SELECT device_id, {columns} FROM devices WHERE {{one_of}} ORDER BY device_id{e.lock_rows}",
        (),
        "device_id",
        sorted(set(device_ids)),
        "text",
    )
    return {row[0]: row[1:] for row in rows}
