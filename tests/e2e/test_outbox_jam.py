"""Never jammed by one message (issue 14 point 3; docs/account-log.md §10 "Outbox entry states"), end to end.

Real relay processes on loopback, the real ``tetherless`` CLI in subprocesses. In every case the other
traffic still flows, ``sync`` exits 0, ``outbox`` shows each entry's state with its reason, and ``outbox
cancel`` removes the entry: an oversized text (refused before queueing), an empty one, a relay name that never
resolves, a recipient device revoked after the message was queued, and a peer relay that is stopped (with
and without a session to its account).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from protocol.client import outbox
from tests.e2e.test_equal_devices import account_of, cli, init_device, link_device, ok
from tests.e2e.test_federation import mesh
from tests.relay_process import RelayProcess


def rows(home: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ok(cli(home, "outbox", "--json")).splitlines()]


def texts(home: Path) -> list[str]:
    out = ok(cli(home, "sync", "--json"))
    return [json.loads(line)["text"] for line in out.splitlines() if line.strip() and '"text"' in line]


def refused(result: Any) -> str:
    """A command that failed with one line on stderr and no traceback; returns that line."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return str(lines[0])


def test_oversized_empty_and_unresolvable_never_jam_the_outbox(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    init_device(relay, alice_home)
    bob = init_device(relay, bob_home)
    ok(cli(alice_home, "send", bob, "--text", "before"))

    limit = outbox.max_body_bytes(outbox.DEFAULT_MAX_ENVELOPE_BYTES)
    line = refused(cli(alice_home, "send", bob, stdin="x" * 300_000))  # one argument holds at most 128 KiB
    assert "envelope_too_large" in line
    assert f"at most {limit} bytes" in line  # the limit, before anything is queued
    assert "empty" in refused(cli(alice_home, "send", bob, "--text", ""))
    assert [r["state"] for r in rows(alice_home)] == ["delivered"]  # "before" (logged at the next sync), only

    nowhere = account_of(bob).split("@")[0] + "@nonexistent.invalid"
    line = refused(cli(alice_home, "send", nowhere, "--text", "lost"))
    assert "peer_address_refused" in line
    assert "nonexistent.invalid" in line
    ok(cli(alice_home, "send", bob, "--text", "after"))

    assert cli(alice_home, "sync").returncode == 0  # a failed entry never changes sync's exit status
    (failed,) = rows(alice_home)
    assert (failed["recipient"], failed["state"], failed["reason_code"]) == (nowhere, "failed", "peer_address_refused")
    table = ok(cli(alice_home, "outbox")).splitlines()
    assert table[0].split() == ["ID", "TO", "STATE", "REASON", "/", "NEXT", "ATTEMPT", "CREATED", "(UTC)"]
    assert "failed" in table[1]
    assert "peer_address_refused" in table[1]
    assert texts(bob_home) == ["before", "after"]

    # retry: tried again by the next sync, and fails again with the same reason, alone.
    ok(cli(alice_home, "outbox", "retry", str(failed["local_id"])))
    assert rows(alice_home)[0]["state"] == "queued"
    assert cli(alice_home, "sync").returncode == 0
    assert rows(alice_home)[0]["state"] == "failed"
    ok(cli(alice_home, "outbox", "cancel", str(failed["local_id"])))
    assert rows(alice_home) == []
    assert "no outbox entry" in refused(cli(alice_home, "outbox", "cancel", str(failed["local_id"])))
    assert "no outbox entry" in refused(cli(alice_home, "outbox", "retry", "999"))


def test_a_recipient_revoked_after_queueing_fails_only_that_entry(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob1_home, bob2_home = tmp_path / "alice", tmp_path / "bob1", tmp_path / "bob2"
    init_device(relay, alice_home)
    bob1 = init_device(relay, bob1_home)
    bob2 = link_device(relay, bob2_home, bob1_home)
    ok(cli(alice_home, "send", bob2, "--text", "hello bob2"))  # alice knows bob2 and has a session with it

    relay.stop()
    queued = ok(cli(alice_home, "send", bob2, "--text", "to the device that goes away"))
    assert queued.startswith("queued (offline; local id ")
    doomed = int(queued.removeprefix("queued (offline; local id ").split(",", 1)[0])
    assert ok(cli(alice_home, "send", bob1, "--text", "to the device that stays")).startswith("queued (offline")
    relay.start()
    ok(cli(bob1_home, "device", "revoke", bob2, "--yes"))

    assert cli(alice_home, "sync").returncode == 0
    (entry,) = rows(alice_home)
    assert (entry["local_id"], entry["state"], entry["reason_code"]) == (doomed, "failed", "unknown_recipient")
    assert "device list" in entry["reason"]
    assert texts(bob1_home) == ["to the device that stays"]
    ok(cli(alice_home, "outbox", "cancel", str(doomed)))
    assert rows(alice_home) == []
    ok(cli(alice_home, "send", bob1, "--text", "still flowing"))
    assert texts(bob1_home) == ["still flowing"]


def test_a_stopped_peer_relay_delays_only_the_entries_addressed_there(tmp_path: Path) -> None:
    with mesh(tmp_path, ["a.test", "b.test"]) as relays:
        a, b = relays["a.test"], relays["b.test"]
        alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
        dave_home, erin_home = tmp_path / "dave", tmp_path / "erin"
        init_device(a, alice_home)
        bob = init_device(a, bob_home)
        dave = init_device(b, dave_home)
        erin = init_device(b, erin_home)
        assert dave.endswith("@b.test")
        ok(cli(alice_home, "send", dave, "--text", "while b is up"))  # a session and dave's device list

        b.stop()
        # dave: the session and the device list are known, so the home relay takes it into its federation outbox.
        handed_over = ok(cli(alice_home, "send", dave, "--text", "while b is down")).split()
        assert len(handed_over) == 1  # sent: the message id, not "queued (…)"
        assert not handed_over[0].startswith("queued")
        # erin: first contact needs her device list and prekeys from b.test: the entry waits, naming b.test.
        waiting = ok(cli(alice_home, "send", erin, "--text", "first contact"))
        assert waiting.startswith("queued (peer_unavailable")
        assert "b.test" in waiting
        ok(cli(alice_home, "send", bob, "--text", "local traffic flows"))

        assert cli(alice_home, "sync").returncode == 0
        (entry,) = rows(alice_home)
        assert (entry["recipient"], entry["state"]) == (erin, "retrying")
        assert (entry["destination"], entry["reason_code"]) == ("b.test", "peer_unavailable")
        assert entry["next_attempt"] is not None
        assert "b.test" in ok(cli(alice_home, "outbox")).splitlines()[1]
        assert texts(bob_home) == ["local traffic flows"]

        b.start()
        assert cli(alice_home, "sync").returncode == 0
        assert rows(alice_home) == []  # delivered and logged
        assert trio.run(_eventually, dave_home, ["while b is up", "while b is down"])
        assert trio.run(_eventually, erin_home, ["first contact"])


async def _eventually(home: Path, expected: list[str]) -> bool:
    """The relays deliver between each other on their own schedule: sync until ``expected`` arrived."""
    got: list[str] = []
    with trio.fail_after(60):
        while got != expected:
            got += await trio.to_thread.run_sync(texts, home)
            assert got == expected[: len(got)], got
            if got != expected:
                await trio.sleep(0.3)
    return True
