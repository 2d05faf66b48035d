"""The account log's remaining integrity gaps, each as an attack by the relay (account-log.md §4.6, §5.1 v3,
§18.1; docs/security.md "Account log: the relay as the adversary").

Real relay processes and the real CLI; the relay is the attacker and edits its own SQLite database (with the
revoked device's keys where it needs a signature). Every attack ends in the documented warning or refusal and
in a ``history --json`` without anything the relay forged, moved or claimed.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import msgspec
import pytest
import trio

from protocol import log
from protocol.client.sdk import RelayClient
from protocol.client.sessions import MemoryStore
from protocol.device_list import FORMAT_2
from tests.e2e import test_log_malicious_relay as malicious
from tests.e2e.offline_client import cli, history, keystore, link_device, load, run_engine
from tests.e2e.test_log_malicious_relay import KIND, Account, _db, _forged_event, _revoke

account = malicious.account  # the fixture: A1, A2 (linked) and Bob; "m1" logged by A1 under epoch 1


def _texts(home: Path) -> list[str]:
    return [m["text"] for m in history(home)]


def _send(home: Path, to: str, *texts: str) -> None:
    for text in texts:
        assert cli(home, "send", to, "--text", text).returncode == 0
    assert cli(home, "sync").returncode == 0


def _events(conn: sqlite3.Connection, account: str) -> list[tuple[int, bytes]]:
    return conn.execute(
        "SELECT position, record_id FROM log_records WHERE account_id = ? AND kind = ? ORDER BY position",
        (account, KIND["event"]),
    ).fetchall()


def _shift(conn: sqlite3.Connection, account: str, at: int, by: int) -> None:
    """Move every record at or after position ``at`` by ``by`` (through negatives: positions stay unique)."""
    conn.execute(
        "UPDATE log_records SET position = -(position + ?) WHERE account_id = ? AND position >= ?", (by, account, at)
    )
    conn.execute("UPDATE log_records SET position = -position WHERE account_id = ? AND position < 0", (account,))
    conn.execute("UPDATE log_heads SET head = head + ? WHERE account_id = ?", (by, account))


# -- 1. a revoked device and the relay insert records before the rotation (§5.1 v3) -------------------------


def test_record_inserted_before_the_rotation_is_refused_by_the_close_out_mark(account: Account, tmp_path: Path) -> None:
    """A3 has not read past the rotation that removed A2; the relay places a record A2 signed under epoch 1
    (whose key it holds) *before* that rotation. The rotation's close-out mark for A2 refuses it."""
    _send(account.a2, account.bob, "by a2")  # a genuine record of A2 before its removal: its mark is above 0
    a3 = tmp_path / "a3"
    trio.run(link_device, account.relay.url, account.a1, a3, "a3")
    assert trio.run(run_engine, account.a1) == 0
    assert trio.run(run_engine, a3) == 0
    assert _texts(a3) == ["m1", "by a2"]
    _, _, a2_store = load(account.a2)
    a2_last = a2_store.counter("writer_seq")
    a2_store.db.close()
    assert a2_last >= 1

    _revoke(account)
    _send(account.a1, account.bob, "after")  # A1 rotates to epoch 2, closing A2 at its last record
    conn = _db(account.relay)
    try:
        rows = conn.execute(
            "SELECT position, ciphertext FROM log_records WHERE account_id = ? AND kind = ? AND epoch = 2 "
            "ORDER BY position",
            (account.account, KIND["key"]),
        ).fetchall()
    finally:
        conn.close()
    # The first key record of epoch 2 is its rotation (a recovery backup record, also of kind key, may follow).
    rotation, ciphertext = rows[0]
    record = log.decode_any_key_record(ciphertext)
    assert isinstance(record, log.KeyEpochRecordV2)
    assert record.v == 3
    assert [(m.device_id, m.last_seq) for m in record.closed] == [(account.a2_id, a2_last)]

    record_id, forged = _forged_event(account, 1, "forged before the rotation")  # A2's writer_seq 99
    conn = _db(account.relay)
    try:
        conn.execute("BEGIN IMMEDIATE")
        _shift(conn, account.account, rotation, 1)
        conn.execute(
            "INSERT INTO log_records (account_id, position, record_id, kind, epoch, committed_at_ms, "
            "device_list_version, size, ciphertext) VALUES (?, ?, ?, ?, 1, 1, NULL, ?, ?)",
            (account.account, rotation, record_id, KIND["event"], len(forged), forged),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    result = cli(a3, "sync")
    assert result.returncode == 0, result.stderr
    assert f"refused log record at position {rotation} (epoch 1): log_epoch_stale" in result.stderr
    assert f"whose removal closed it at #{a2_last}" in result.stderr
    assert _texts(a3) == _texts(account.a1) == ["m1", "by a2", "after"]


def test_the_rotation_closes_a_removed_writer_after_all_its_records_read_so_far(account: Account) -> None:
    """A1 revokes A2 before reading A2's last three records: they wait for A1's rotation, which must close A2
    after the last of them (not the first), so all three are applied and none is refused as stale."""
    assert trio.run(run_engine, account.a1) == 0
    _send(account.a2, account.bob, "w1", "w2", "w3")  # A1 has not read these
    _, _, a2_store = load(account.a2)
    a2_last = a2_store.counter("writer_seq")
    a2_store.db.close()
    _revoke(account)
    result = cli(account.a1, "sync")
    assert result.returncode == 0, result.stderr
    assert "log_epoch_stale" not in result.stderr
    assert _texts(account.a1)[-3:] == ["w1", "w2", "w3"]
    conn = _db(account.relay)
    try:
        rows = conn.execute(
            "SELECT ciphertext FROM log_records WHERE account_id = ? AND kind = ? AND epoch = 2 ORDER BY position",
            (account.account, KIND["key"]),
        ).fetchall()
    finally:
        conn.close()
    rotation = log.decode_any_key_record(rows[0][0])
    assert isinstance(rotation, log.KeyEpochRecordV2)
    assert [(m.device_id, m.last_seq) for m in rotation.closed] == [(account.a2_id, a2_last)]


# -- 2. per-writer order: a hidden record is flagged, a reordered one refused (§4.6) ------------------------


def test_a_record_the_relay_hides_is_flagged_as_a_writer_gap(account: Account) -> None:
    """The relay removes A2's middle record and renumbers the rest: no position is missing, A2's order shows it."""
    _send(account.a2, account.bob, "g1", "g2", "g3")
    conn = _db(account.relay)
    try:
        _, (hidden, hidden_id), _ = _events(conn, account.account)[-3:]
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM log_records WHERE account_id = ? AND record_id = ?", (account.account, hidden_id))
        _shift(conn, account.account, hidden + 1, -1)
        conn.execute("COMMIT")
    finally:
        conn.close()
    result = cli(account.a1, "sync", "--json")
    assert result.returncode == 0, result.stderr
    assert f"log_writer_gap: records #2-#2 of device {account.a2_id} are missing before log position {hidden}" in (
        result.stderr
    )
    assert {"log_writer_gap"} <= {json.loads(line).get("warning") for line in result.stdout.splitlines()}
    assert "log_records_missing" not in result.stderr
    assert _texts(account.a1) == ["m1", "g1", "g3"]  # what the relay showed, and the warning says what it hid


def test_records_of_one_writer_reordered_by_the_relay_are_refused(account: Account) -> None:
    _send(account.a2, account.bob, "r1", "r2")
    conn = _db(account.relay)
    try:
        (first, _), (second, _) = _events(conn, account.account)[-2:]
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE log_records SET position = -1 WHERE account_id = ? AND position = ?", (account.account, first)
        )
        conn.execute(
            "UPDATE log_records SET position = ? WHERE account_id = ? AND position = ?",
            (first, account.account, second),
        )
        conn.execute(
            "UPDATE log_records SET position = ? WHERE account_id = ? AND position = -1", (second, account.account)
        )
        conn.execute("COMMIT")
    finally:
        conn.close()
    result = cli(account.a1, "sync")
    assert result.returncode == 0, result.stderr
    assert f"refused log record at position {second} (epoch 1): log_epoch_stale: record #1 of {account.a2_id}" in (
        result.stderr
    )
    assert _texts(account.a1) == ["m1", "r2"]


# -- 3. a record deleted under a kept head: no endless paging (§18.1) ---------------------------------------


def test_records_deleted_under_a_kept_head_end_in_a_warning_not_a_loop(account: Account) -> None:
    _send(account.a2, account.bob, "d1")
    conn = _db(account.relay)
    try:
        [(deleted, deleted_id)] = _events(conn, account.account)[-1:]
        conn.execute("DELETE FROM log_records WHERE account_id = ? AND record_id = ?", (account.account, deleted_id))
    finally:
        conn.close()
    # Before the fix the reader asked for the page after its cursor forever (the relay says "more" up to
    # its head); the subprocess timeout would end this test with TimeoutExpired.
    result = cli(account.a1, "sync", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    line = f"log_records_missing: log positions {deleted}-{deleted} are missing below the relay's head"
    assert line in result.stderr
    warnings = [json.loads(x) for x in result.stdout.splitlines() if '"warning"' in x]
    assert [w["warning"] for w in warnings] == ["log_records_missing"]
    assert _texts(account.a1) == ["m1"]
    # The log goes on: a later record is read, and the hole below it is reported again, once.
    _send(account.a2, account.bob, "d2")
    result = cli(account.a1, "sync", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(f"tetherless: warning: {line}") == 1
    assert _texts(account.a1) == ["m1", "d2"]


# -- 4. a v1 payload from a format-2+ sender: refused, visible, never blocking (§18.1) ----------------------


def test_a_v1_downgrade_is_a_visible_warning_and_blocks_nothing(account: Account) -> None:
    a1_address = keystore(account.a1).load().address

    async def downgrade() -> None:
        async with RelayClient.connect(account.relay.url) as mallory:
            await mallory.register("mallory", list_format=FORMAT_2)
            await mallory.send(a1_address, "downgraded")  # no sessions: a v1 sealed box
            await mallory.enable_sessions(MemoryStore())
            await mallory.send(a1_address, "over a session")

    trio.run(downgrade)
    assert cli(account.a2, "send", a1_address, "--text", "from a2").returncode == 0
    result = cli(account.a1, "sync", "--json")
    assert result.returncode == 0, result.stderr
    assert "tetherless: warning: refused message (envelope " in result.stderr
    assert "payload_downgrade: malformed_body: a version-1 payload from a format-" in result.stderr
    lines = [json.loads(x) for x in result.stdout.splitlines()]
    assert [w["warning"] for w in lines if "warning" in w] == ["payload_downgrade"]
    assert "over a session" in [m["text"] for m in lines if "text" in m]
    assert sorted(_texts(account.a1)) == ["from a2", "m1", "over a session"]  # "from a2" may come from the log
    again = cli(account.a1, "sync")  # acknowledged with the rest: reported once, never redelivered
    assert again.returncode == 0, again.stderr
    assert "payload_downgrade" not in again.stderr


# -- 5. snapshots are signed under v2 epochs (§6.1) -----------------------------------------------------------


@pytest.mark.parametrize("unsigned_manifest", [False, True], ids=["part-resealed", "unsigned-manifest"])
def test_a_snapshot_resealed_by_a_key_holder_is_refused_and_the_log_read_instead(
    account: Account, tmp_path: Path, unsigned_manifest: bool
) -> None:
    """A1 writes a snapshot (its manifest signed, §6.1); A2 holds the epoch key and, with the relay, reseals the
    part with a changed history (and, in the second case, replaces the manifest by an unsigned one naming the
    forged part, as a legacy epoch's would be). A new device refuses the snapshot and reads the log instead."""
    _send(account.a1, account.bob, "m2", "m3")
    written = cli(account.a1, "log", "snapshot", "--json")
    assert written.returncode == 0, written.stderr
    conn = _db(account.relay)
    try:
        position, manifest_id, snapshot, covers, epoch = conn.execute(
            "SELECT r.position, r.record_id, r.snapshot_id, r.covers, r.epoch FROM log_records r JOIN log_heads h "
            "ON h.account_id = r.account_id AND h.snapshot_position = r.position WHERE r.account_id = ?",
            (account.account,),
        ).fetchone()
        [(part_id, part_ct)] = conn.execute(
            "SELECT record_id, ciphertext FROM log_records WHERE account_id = ? AND kind = 4 AND snapshot_id = ?",
            (account.account, snapshot),
        ).fetchall()
    finally:
        conn.close()
    _, _, a2_store = load(account.a2)
    key = a2_store.epoch_key(epoch)
    a2_store.db.close()
    assert key is not None
    header = {"account_id": account.account, "snapshot": snapshot, "epoch": epoch}
    part = log.open_snapshot_part(key, part_ct, record_id=part_id, **header)
    real = log.join_snapshot([part], covers)
    forged_messages = [msgspec.structs.replace(m, body=b"forged history") for m in real.messages]
    [chunk] = log.split_snapshot(msgspec.structs.replace(real, messages=forged_messages))
    forged = log.seal_snapshot_part(
        key, msgspec.structs.replace(part, data=chunk), nonce=os.urandom(log.NONCE_BYTES), **header
    )
    replaced = [(part_id, forged)]
    if unsigned_manifest:
        manifest = log.SnapshotManifest(
            writer_device=account.a2_id, created_at_ms=1, covers=covers, part_hashes=[log.sha256(chunk)]
        )
        nonce = os.urandom(log.NONCE_BYTES)
        replaced.append((manifest_id, log.seal_snapshot_manifest(key, manifest, nonce=nonce, **header)))
    conn = _db(account.relay)
    try:
        for record_id, ciphertext in replaced:
            conn.execute(
                "UPDATE log_records SET ciphertext = ?, size = ? WHERE account_id = ? AND record_id = ?",
                (ciphertext, len(ciphertext), account.account, record_id),
            )
    finally:
        conn.close()

    a3 = tmp_path / "a3"
    trio.run(link_device, account.relay.url, account.a1, a3, "a3")
    assert trio.run(run_engine, account.a1) == 0
    result = cli(a3, "sync", "--json")
    assert result.returncode == 0, result.stderr
    why = (
        "snapshot manifest does not decrypt" if unsigned_manifest else "snapshot parts do not match its signed manifest"
    )
    assert (
        f"refused snapshot at position {position} (epoch {epoch}, covers {covers}): malformed_body: {why}; "
        "reading the log instead"
    ) in result.stderr
    assert "snapshot_refused" in [json.loads(x).get("warning") for x in result.stdout.splitlines()]
    assert _texts(a3) == _texts(account.a1) == ["m1", "m2", "m3"]
    again = cli(a3, "sync")  # never chosen again
    assert again.returncode == 0, again.stderr
    assert "refused snapshot" not in again.stderr


def test_a_snapshot_by_a_device_removed_since_is_not_loaded(account: Account, tmp_path: Path) -> None:
    """A2 wrote a genuine snapshot, then was revoked: its signature stays valid for epoch 1, so a snapshot it
    (with the relay) could still forge there is indistinguishable; a new device reads the log instead."""
    _send(account.a1, account.bob, "m2")
    assert trio.run(run_engine, account.a2) == 0
    written = cli(account.a2, "log", "snapshot", "--json")
    assert written.returncode == 0, written.stderr
    _revoke(account)
    _send(account.a1, account.bob, "after")
    a3 = tmp_path / "a3"
    trio.run(link_device, account.relay.url, account.a1, a3, "a3")
    assert trio.run(run_engine, account.a1) == 0
    result = cli(a3, "sync")
    assert result.returncode == 0, result.stderr
    assert "bad_signature: snapshot written by a device no longer in the list; reading the log instead" in (
        result.stderr
    )
    assert _texts(a3) == _texts(account.a1) == ["m1", "m2", "after"]
