"""A new device gets the whole history from the relay alone, also when its approver is gone for good right after
approving (issue 12 point 1; account-log.md §5.5; crypto.md §12), and a device enrolled by the recovery key alone
after every other device is gone reads it from the recovery backup (account-log.md §5.7). Real relay processes
and the real CLI."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from protocol import handshake, log, recovery
from tests.e2e.offline_client import (
    NO_RATE_LIMITS,
    cli,
    enqueue_many,
    history,
    init_device,
    load,
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
    """Device A of an account that received ``count`` messages from another account's device; A's recovery key
    is in ``tmp_path / "recovery-key"``."""
    a, bob = tmp_path / "a", tmp_path / "bob"
    made = cli(
        a, "device", "init", "--relay", relay.url, "--name", "a", "--recovery-key-file", str(_key_file(tmp_path))
    )
    assert made.returncode == 0, made.stderr
    a_address = made.stdout.strip()
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
    decoded = [log.decode_any_key_record(row[0]) for row in rows if log.decode_recovery_backup(row[0]) is None]
    return [r for r in decoded if isinstance(r, log.KeyEpochRecordV2)]


# -- a device enrolled by the recovery key alone (account-log.md §5.7) -----------------------------------------


def _key_file(tmp_path: Path, name: str = "recovery-key") -> Path:
    return tmp_path / name


def _recovery_keys(key_file: Path, account: str) -> recovery.RecoveryKeys:
    text = key_file.read_text(encoding="utf-8").strip()
    return recovery.recovery_keys(recovery.parse_recovery_secret(text), account)


def _link_by_recovery_key(
    relay: RelayProcess, home: Path, account: str, key_file: Path, *revoke: str
) -> subprocess.CompletedProcess[str]:
    args = ["device", "link", "--relay", relay.url, "--account", f"{account}@{relay.name}", "--recovery-key"]
    args += ["--recovery-key-file", str(key_file)]
    for device in revoke:
        args += ["--revoke", device]
    return cli(home, *args)


def _device_id(home: Path) -> str:
    return cli(home, "whoami").stdout.strip().split(".", 1)[0]


def _backups(relay: RelayProcess, account: str) -> list[tuple[int, log.RecoveryBackupRecord]]:
    """(position, record) of every recovery backup record the relay stores for ``account``."""
    conn = sqlite3.connect(relay.data_dir / "relay.sqlite3", timeout=30, isolation_level=None)
    try:
        rows = conn.execute(
            "SELECT position, ciphertext FROM log_records WHERE account_id = ? AND kind = 3 ORDER BY position",
            (account,),
        ).fetchall()
    finally:
        conn.close()
    return [(row[0], backup) for row in rows if (backup := log.decode_recovery_backup(row[1])) is not None]


def test_recovery_key_alone_reads_the_whole_history_after_every_device_is_gone(tmp_path: Path) -> None:
    relay = _relay(tmp_path)
    try:
        a, expected = _account_with_history(relay, tmp_path)
        account, a_id = _account_of(a), _device_id(a)
        b = tmp_path / "b"
        assert _approve_and_join(relay, a, b).returncode == 0
        shutil.rmtree(a)  # A is gone for good
        assert cli(b, "sync").returncode == 0
        b_id = _device_id(b)
        shutil.rmtree(b)  # and so is B: only the printed recovery key is left
        c = tmp_path / "c"
        joined = _link_by_recovery_key(relay, c, account, _key_file(tmp_path))
        assert joined.returncode == 0, joined.stderr
        assert "recovered the account keys of 1 epoch(s) from the recovery backup" in joined.stderr
        assert "warning" not in joined.stderr
        synced = cli(c, "sync")
        assert synced.returncode == 0, synced.stderr
        assert "warning" not in synced.stderr
        assert _shown(history(c)) == expected  # all 200, same ids, senders and bodies, in order
        # C revokes the lost devices and rotates; without the secret now, it backs the new epoch up to the
        # recovery key named by the newest verified backup record in the log.
        for lost in (a_id, b_id):
            assert cli(c, "device", "revoke", lost, "--yes").returncode == 0
        synced = cli(c, "sync")
        assert synced.returncode == 0, synced.stderr
        assert "warning" not in synced.stderr
        backups = [b.backup for _, b in _backups(relay, account)]
        assert [(b.epoch, [c.epoch for c in b.commitments]) for b in backups] == [(1, [1]), (2, [1, 2])]
        keys = _recovery_keys(_key_file(tmp_path), account)
        assert log.open_recovery_backup(_backups(relay, account)[-1][1], keys).keys() == {1, 2}
    finally:
        relay.stop()


def test_a_replaced_recovery_key_backs_up_to_the_new_key_only(tmp_path: Path) -> None:
    relay = _relay(tmp_path)
    try:
        a, expected = _account_with_history(relay, tmp_path, count=5)
        account = _account_of(a)
        new_file = _key_file(tmp_path, "new-recovery-key")
        replaced = cli(a, "device", "recovery-key", "--recovery-key-file", str(new_file))
        assert replaced.returncode == 0, replaced.stderr
        assert "recovery backup: the account keys up to epoch 1 are backed up" in replaced.stderr
        listed = json.loads(cli(a, "device", "list", "--json").stdout)
        assert listed["recovery_backup"] is True
        shutil.rmtree(a)
        old_keys = _recovery_keys(_key_file(tmp_path), account)
        new_keys = _recovery_keys(new_file, account)
        backups = _backups(relay, account)
        assert len(backups) == 2  # one at init (old key), one at the replacement (new key)
        assert log.open_recovery_backup(backups[0][1], old_keys) == {
            1: log.open_recovery_backup(backups[1][1], new_keys)[1]
        }
        for _, later in backups[1:]:  # the old key opens nothing written after its replacement
            with pytest.raises(log.InvalidRecordError):
                log.open_recovery_backup(later, old_keys)
        stale = _link_by_recovery_key(relay, tmp_path / "stale", account, _key_file(tmp_path))
        assert stale.returncode == 1
        assert "not the account's current recovery key" in stale.stderr
        c = tmp_path / "c"
        joined = _link_by_recovery_key(relay, c, account, new_file)
        assert joined.returncode == 0, joined.stderr
        assert "recovered the account keys of 1 epoch(s)" in joined.stderr
        assert _shown(history(c)) == expected
    finally:
        relay.stop()


def test_relay_dropping_the_backup_makes_the_recovered_device_say_it_has_no_key(tmp_path: Path) -> None:
    relay = _relay(tmp_path)
    try:
        a, _ = _account_with_history(relay, tmp_path, count=5)
        account = _account_of(a)
        shutil.rmtree(a)
        conn = sqlite3.connect(relay.data_dir / "relay.sqlite3", timeout=30, isolation_level=None)
        try:
            for position, _ in _backups(relay, account):
                conn.execute("DELETE FROM log_records WHERE account_id = ? AND position = ?", (account, position))
        finally:
            conn.close()
        assert _backups(relay, account) == []
        c = tmp_path / "c"
        joined = _link_by_recovery_key(relay, c, account, _key_file(tmp_path))
        assert joined.returncode == 0, joined.stderr  # joined: the device exists, without the history's keys
        assert "tetherless: warning: no key for epoch 1" in joined.stderr
        assert "tetherless: warning: no recovery backup opened" in joined.stderr
        assert "Traceback" not in joined.stderr
        synced = cli(c, "sync")
        assert synced.returncode == 0, synced.stderr
        assert "tetherless: warning: no key for epoch 1" in synced.stderr
        assert history(c) == []
    finally:
        relay.stop()


def test_backup_forged_with_a_revoked_devices_keys_after_its_removal_is_refused(tmp_path: Path) -> None:
    """A malicious relay keeps revoked device A's keys (or A colludes): after B revoked A and rotated, it appends
    backups signed by A — one for the new epoch naming the old list version, one under the old epoch. The
    recovered device refuses both, says so, and still reads the history from B's genuine backup."""
    relay = _relay(tmp_path)
    try:
        a, expected = _account_with_history(relay, tmp_path, count=5)
        account, a_id = _account_of(a), _device_id(a)
        _, a_keys, a_store = load(a)
        k1 = a_store.epoch_key(1)
        a_store.db.close()
        assert k1 is not None
        b = tmp_path / "b"
        assert _approve_and_join(relay, a, b).returncode == 0
        assert cli(b, "sync").returncode == 0  # B reads A's records while A is still listed
        old_version = json.loads(cli(b, "device", "list", "--json").stdout)["version"]
        assert cli(b, "device", "revoke", a_id, "--yes").returncode == 0
        assert cli(b, "sync").returncode == 0  # B rotates to epoch 2 and backs it up
        shutil.rmtree(a)
        recipient = recovery.backup_recipient(_recovery_keys(_key_file(tmp_path), account))
        forged = []
        for epoch, keys in ((2, {1: k1, 2: bytes(32)}), (1, {1: k1})):
            kem_ct, kem_ss = handshake.encapsulate(recipient.kem_public)
            forged.append(
                (
                    epoch,
                    log.make_recovery_backup(
                        a_keys.signing_key,
                        account_id=account,
                        writer_device=a_id,
                        epoch=epoch,
                        keys=keys,
                        device_list_version=old_version,
                        recipient=recipient,
                        created_at_ms=1,
                        ephemeral_private_key=bytes([5]) * 32,
                        kem_ciphertext=kem_ct,
                        kem_shared_secret=kem_ss,
                    ),
                )
            )
        conn = sqlite3.connect(relay.data_dir / "relay.sqlite3", timeout=30, isolation_level=None)
        try:  # appended behind the relay's own rules, as a malicious relay would
            conn.execute("BEGIN IMMEDIATE")
            (head,) = conn.execute("SELECT head FROM log_heads WHERE account_id = ?", (account,)).fetchone()
            for n, (epoch, ciphertext) in enumerate(forged, start=1):
                conn.execute(
                    "INSERT INTO log_records (account_id, position, record_id, kind, epoch, committed_at_ms, "
                    "device_list_version, size, ciphertext) VALUES (?, ?, ?, 3, ?, 1, ?, ?, ?)",
                    (account, head + n, bytes([n]) * 16, epoch, old_version, len(ciphertext), ciphertext),
                )
            conn.execute("UPDATE log_heads SET head = ? WHERE account_id = ?", (head + len(forged), account))
            conn.execute("COMMIT")
        finally:
            conn.close()
        c = tmp_path / "c"
        joined = _link_by_recovery_key(relay, c, account, _key_file(tmp_path))
        assert joined.returncode == 0, joined.stderr
        assert (
            f"refused log record at position {head + 1} (epoch 2): bad_signature: recovery backup writer is not "
            "a device of the list"
            in joined.stderr
            or f"refused log record at position {head + 1} (epoch 2): bad_signature: recovery backup names an "
            "older device list than its epoch"
            in joined.stderr
        ), joined.stderr
        assert f"refused log record at position {head + 2} (epoch 1): log_epoch_stale" in joined.stderr
        assert "recovered the account keys of 2 epoch(s)" in joined.stderr
        assert _shown(history(c)) == expected
    finally:
        relay.stop()
