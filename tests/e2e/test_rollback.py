"""Local state resists rollback (issue 12 point 4; docs/crypto.md §13.2), end to end.

Real relay process, the real ``tetherless`` CLI. Alice's home is copied aside, she exchanges messages with
Bob, and the old copy is put back — ``state.db`` alone (evidence: the generation in her keystore) or the
whole home (evidence: her own later records in the account log). Every time the CLI refuses with one line
that explains and names the recovery, posts nothing (so no ratchet key is used twice), and after
``sync --recover-rollback`` she talks on fresh sessions.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from protocol import session as sealed_v2
from tests.e2e.test_cli_sessions import inner_kind, relay_envelopes
from tests.e2e.test_equal_devices import cli, init_device, ok
from tests.relay_process import RelayProcess

DB_FILES = ("state.db", "state.db-wal", "state.db-shm")


def texts(home: Path) -> list[str]:
    out = ok(cli(home, "sync", "--json"))
    return [json.loads(line)["text"] for line in out.splitlines() if line.strip()]


def copy_db(home: Path, to: Path) -> None:
    to.mkdir(mode=0o700)
    for name in DB_FILES:
        if (home / name).exists():
            shutil.copy2(home / name, to / name)


def restore_db(saved: Path, home: Path) -> None:
    for name in DB_FILES:
        (home / name).unlink(missing_ok=True)
        if (saved / name).exists():
            shutil.copy2(saved / name, home / name)


def restore_home(saved: Path, home: Path) -> None:
    shutil.rmtree(home)
    shutil.copytree(saved, home)


def refused(home: Path, *args: str) -> str:
    result = cli(home, *args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert "--recover-rollback" in result.stderr
    return result.stderr


def alice_sent_bob_one(relay: RelayProcess, tmp_path: Path) -> tuple[Path, Path, str]:
    """Alice and Bob, one message from Alice read by Bob, and Alice synced: ``(alice_home, bob_home, bob)``."""
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    init_device(relay, alice_home)
    bob = init_device(relay, bob_home)
    ok(cli(alice_home, "send", bob, "--text", "one"))
    assert texts(bob_home) == ["one"]
    ok(cli(alice_home, "sync"))
    return alice_home, bob_home, bob


def test_state_db_put_back_is_refused_and_nothing_is_sent(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice, bob = init_device(relay, alice_home), init_device(relay, bob_home)
    ok(cli(alice_home, "send", bob, "--text", "one"))
    assert texts(bob_home) == ["one"]
    copy_db(alice_home, tmp_path / "saved")

    ok(cli(alice_home, "send", bob, "--text", "two"))
    assert texts(bob_home) == ["two"]
    ok(cli(bob_home, "send", alice, "--text", "back"))
    assert texts(alice_home) == ["back"]
    restore_db(tmp_path / "saved", alice_home)

    posted = len(relay_envelopes(relay))
    error = refused(alice_home, "send", bob, "--text", "would reuse the key of 'two'")
    assert "state.db is older than this device's keystore says" in error
    assert "sync" in refused(alice_home, "sync")
    assert len(relay_envelopes(relay)) == posted  # nothing left the device: no ratchet key used twice

    ok(cli(alice_home, "sync", "--recover-rollback"))
    ok(cli(alice_home, "send", bob, "--text", "three"))
    newest = relay_envelopes(relay)[-1][1]
    assert inner_kind(bob_home, newest) == sealed_v2.KIND_PREKEY  # a fresh session, not the restored chain
    assert texts(bob_home) == ["three"]
    ok(cli(bob_home, "send", alice, "--text", "still there"))
    assert texts(alice_home) == ["still there"]


def test_whole_home_put_back_is_refused_from_the_account_log(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home, bob = alice_sent_bob_one(relay, tmp_path)
    shutil.copytree(alice_home, tmp_path / "saved")  # a backup, or a VM snapshot: keystore and state together

    ok(cli(alice_home, "send", bob, "--text", "two"))
    ok(cli(alice_home, "sync"))  # "two" is in the account log, signed by Alice's device
    assert texts(bob_home) == ["two"]
    restore_home(tmp_path / "saved", alice_home)

    posted = len(relay_envelopes(relay))
    error = refused(alice_home, "send", bob, "--text", "would reuse the key of 'two'")
    assert "restored from an older copy" in error
    refused(alice_home, "sync")
    assert len(relay_envelopes(relay)) == posted

    # The refused message stays queued (nothing is lost) and leaves only after the recovery, on a new session.
    ok(cli(alice_home, "sync", "--recover-rollback"))
    assert inner_kind(bob_home, relay_envelopes(relay)[-1][1]) == sealed_v2.KIND_PREKEY
    history = [json.loads(line)["text"] for line in ok(cli(alice_home, "history", "--json")).splitlines()]
    assert history == ["one", "two", "would reuse the key of 'two'"]  # "two" came back from the account log
    ok(cli(alice_home, "send", bob, "--text", "three"))
    assert texts(bob_home) == ["would reuse the key of 'two'", "three"]


# -- deleted rows (crypto.md §13.3): a deleted check is tampering, never a check turned off --------------------


def delete_one_row(home: Path, table: str) -> None:
    """What someone with write access to the file (and no data key) can do: delete one row."""
    conn = sqlite3.connect(home / "state.db")
    try:
        with conn:
            assert conn.execute(f"DELETE FROM {table} WHERE rowid = (SELECT min(rowid) FROM {table})").rowcount == 1
    finally:
        conn.close()


def tampered(home: Path, *args: str) -> str:
    error = refused(home, *args)
    assert "local state tampered: " in error, error
    return error


def test_a_deleted_device_list_mark_is_refused_not_trusted_on_first_use(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home, bob = alice_sent_bob_one(relay, tmp_path)
    # Peers appear in Alice's state.db only as keyed hashes (account-log.md §8): not Bob's account, not his device.
    on_disk = b"".join((alice_home / name).read_bytes() for name in DB_FILES if (alice_home / name).exists())
    bob_device, bob_account = bob.split("@", 1)[0].split(".", 1)
    assert bob_account.encode() not in on_disk
    assert bob_device.encode() not in on_disk
    delete_one_row(alice_home, "device_marks")

    posted = len(relay_envelopes(relay))
    assert "device_marks" in tampered(alice_home, "send", bob, "--text", "two")
    tampered(alice_home, "sync")
    assert len(relay_envelopes(relay)) == posted  # no device list was trusted afresh, nothing was sent

    ok(cli(alice_home, "sync", "--recover-rollback"))  # the user accepts the state as it is
    ok(cli(alice_home, "send", bob, "--text", "three"))
    assert texts(bob_home) == ["two", "three"]  # the refused message stayed queued


def test_a_deleted_replay_cache_row_is_refused_at_the_next_session_start(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home, carol_home = tmp_path / "alice", tmp_path / "bob", tmp_path / "carol"
    init_device(relay, alice_home)
    bob = init_device(relay, bob_home)
    init_device(relay, carol_home)
    ok(cli(alice_home, "send", bob, "--text", "from alice"))
    assert texts(bob_home) == ["from alice"]  # a session start: its transcript is in Bob's replay cache
    delete_one_row(bob_home, "session_transcript")

    ok(cli(carol_home, "send", bob, "--text", "from carol"))
    assert "session_transcript" in tampered(bob_home, "sync")
    ok(cli(bob_home, "sync", "--recover-rollback"))
    assert "from carol" in texts(bob_home) + [
        json.loads(line)["text"] for line in ok(cli(bob_home, "history", "--json")).splitlines()
    ]
