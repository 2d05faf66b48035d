"""A new device gets the whole history from the relay alone, also when its approver is gone for good right after
approving (issue 12 point 1; account-log.md §5.5; crypto.md §12). Real relay processes and the real CLI."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import trio

from protocol import log
from tests.e2e.offline_client import (
    NO_RATE_LIMITS,
    cli,
    enqueue_many,
    history,
    init_device,
    run_engine,
)
from tests.e2e.test_equal_devices import start_link
from tests.relay_process import RelayProcess

MESSAGES = 200


def _approve_and_join(
    relay: RelayProcess, approver: Path, new_home: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``device link`` on the new device, ``device approve CODE --yes`` on the approver; both must succeed."""
    proc, code = start_link(relay, new_home)
    try:
        approved = cli(approver, "device", "approve", code, "--yes", "--timeout", "60", env=env)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out, err)
    return approved


def _shown(entries: list[dict[str, Any]]) -> list[tuple[str, str, int, str]]:
    return [(m["message_id"], m["sender"], m["pair_seq"], m["text"]) for m in entries]


def _account_of(home: Path) -> str:
    return str(json.loads(cli(home, "device", "list", "--json").stdout)["account"]).split("@", 1)[0]


def _account_with_history(
    relay: RelayProcess, tmp_path: Path, count: int = MESSAGES
) -> tuple[Path, list[tuple[str, str, int, str]]]:
    """Device A of an account that received ``count`` messages from another account's device."""
    a, bob = tmp_path / "a", tmp_path / "bob"
    a_address = init_device(relay.url, a, "a")
    init_device(relay.url, bob, "bob")
    texts = [f"message {n:03d}" for n in range(count)]
    enqueue_many(bob, a_address.split(".", 1)[1], texts)
    for _ in range(6):  # sessions first need the other side's prekeys: a few rounds until everything arrived
        assert trio.run(run_engine, bob) == 0
        assert trio.run(run_engine, a) == 0
        shown = _shown(history(a))
        if len(shown) == count:
            break
    assert [text for *_, text in shown] == texts
    return a, shown


def _relay(tmp_path: Path) -> RelayProcess:
    relay = RelayProcess(tmp_path / "relay-data", env=NO_RATE_LIMITS)
    relay.start()
    return relay


def test_approved_device_reads_the_whole_history_after_its_approver_is_gone(tmp_path: Path) -> None:
    relay = _relay(tmp_path)
    try:
        a, expected = _account_with_history(relay, tmp_path)
        b = tmp_path / "b"
        approved = _approve_and_join(relay, a, b)
        assert approved.returncode == 0, approved.stderr
        assert "granted the account's history to" in approved.stdout
        shutil.rmtree(a)  # A is gone for good: it never runs again
        synced = cli(b, "sync")
        assert synced.returncode == 0, synced.stderr
        assert "no key for epoch" not in synced.stderr
        assert _shown(history(b)) == expected  # all 200, same ids, senders and bodies, in order
    finally:
        relay.stop()


def test_relay_dropping_the_grant_makes_the_new_device_say_it_has_no_key(tmp_path: Path) -> None:
    relay = _relay(tmp_path)
    try:
        a, _ = _account_with_history(relay, tmp_path)
        b = tmp_path / "b"
        assert _approve_and_join(relay, a, b).returncode == 0
        shutil.rmtree(a)
        account = _account_of(b)
        conn = sqlite3.connect(relay.data_dir / "relay.sqlite3", timeout=30, isolation_level=None)
        try:  # the relay drops the grant-only record written at approval time (the log's newest record)
            conn.execute("BEGIN IMMEDIATE")
            dropped = conn.execute(
                "DELETE FROM log_records WHERE account_id = ? AND kind = 3 AND position = "
                "(SELECT head FROM log_heads WHERE account_id = ?) RETURNING epoch, ciphertext",
                (account, account),
            ).fetchall()
            conn.execute("UPDATE log_heads SET head = head - 1 WHERE account_id = ?", (account,))
            conn.execute("COMMIT")
        finally:
            conn.close()
        assert len(dropped) == 1
        record = log.decode_any_key_record(dropped[0][1])
        assert isinstance(record, log.KeyEpochRecordV2)
        assert not record.body.rotation  # the approver's all-epochs grant, not a rotation
        synced = cli(b, "sync")
        assert synced.returncode == 0, synced.stderr
        assert f"tetherless: warning: no key for epoch {dropped[0][0]}" in synced.stderr
        assert history(b) == []
    finally:
        relay.stop()


def test_a_rotation_due_when_the_device_joins_carries_the_older_epochs(tmp_path: Path) -> None:
    """The approver's sync must rotate first (here: the schedule, one record per epoch); the rotation record
    then carries epoch 1's key to the new device too, or it would read only the epochs after its join."""
    relay = _relay(tmp_path)
    try:
        a, expected = _account_with_history(relay, tmp_path, count=5)
        b = tmp_path / "b"
        approved = _approve_and_join(relay, a, b, env={"TETHERLESS_LOG_ROTATE_RECORDS": "1"})
        assert approved.returncode == 0, approved.stderr
        shutil.rmtree(a)
        assert cli(b, "sync").returncode == 0
        records = [r for r in _key_records(relay, _account_of(b)) if r.body.rotation]
        assert [r.body.epoch for r in records] == [1, 2]  # the approver rotated when B joined
        assert [c.epoch for c in records[-1].body.commitments] == [1, 2]  # and handed epoch 1 on
        assert _shown(history(b)) == expected
    finally:
        relay.stop()


def _key_records(relay: RelayProcess, account: str) -> list[log.KeyEpochRecordV2]:
    conn = sqlite3.connect(relay.data_dir / "relay.sqlite3", timeout=30, isolation_level=None)
    try:
        rows = conn.execute(
            "SELECT ciphertext FROM log_records WHERE account_id = ? AND kind = 3 ORDER BY position", (account,)
        ).fetchall()
    finally:
        conn.close()
    decoded = [log.decode_any_key_record(row[0]) for row in rows]
    return [r for r in decoded if isinstance(r, log.KeyEpochRecordV2)]
