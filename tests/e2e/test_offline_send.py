"""Sending with the relay down succeeds locally, and the ``sync --follow`` engine delivers it when the relay returns."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.e2e.offline_client import Follower, cli, history, init_device, load, wait_until
from tests.relay_process import RelayProcess


def test_send_while_the_relay_is_down_is_delivered_without_user_action(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay-data")
    relay.start()
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    follower = Follower(alice_home, tmp_path, "alice-follow")
    try:
        init_device(relay.url, alice_home, "alice")
        bob = init_device(relay.url, bob_home, "bob")
        online = cli(alice_home, "send", bob, "--text", "before the outage")
        assert online.returncode == 0, online.stderr
        assert re.fullmatch(r"[a-z2-7]{26}\n", online.stdout)  # sent at once: the message id (docs/cli.md)

        follower.start()
        _, _, store = load(alice_home)
        wait_until(lambda: not store.outbox(), 60, "the first message to be logged")
        relay.kill()  # a crash, not a drain

        texts = [f"offline {i}" for i in range(5)]
        for i, text in enumerate(texts):
            queued = cli(alice_home, "send", bob, "--text", text)
            assert queued.returncode == 0, queued.stderr
            assert re.fullmatch(rf"queued \(offline; local id {i + 2}, message id [a-z2-7]{{26}}\)\n", queued.stdout)
        waiting = cli(alice_home, "outbox", "--json")
        assert waiting.returncode == 0, waiting.stderr
        rows = [json.loads(line) for line in waiting.stdout.splitlines()]
        assert [r["state"] for r in rows] == ["queued"] * 5
        assert all(r["recipient"] == bob for r in rows)

        relay.start()  # same port and data directory; nobody touches alice's client
        wait_until(lambda: not store.outbox(), 60, "alice's engine to deliver and log the queued messages")
        assert follower.running
        assert follower.stop() == 0

        synced = cli(bob_home, "sync", "--json")
        assert synced.returncode == 0, synced.stderr
        received = [json.loads(line)["text"] for line in synced.stdout.splitlines()]
        assert received == ["before the outage", *texts]  # each once, in send order

        # Both accounts' logs hold the messages: history is complete on both sides, once each, in order.
        assert [m["text"] for m in history(alice_home)] == ["before the outage", *texts]
        bob_history = history(bob_home)
        assert [m["text"] for m in bob_history] == ["before the outage", *texts]
        assert [m["pair_seq"] for m in bob_history] == [1, 2, 3, 4, 5, 6]
        assert all(m["position"] is not None for m in bob_history)
        assert cli(alice_home, "outbox").stdout == ""
        assert "backoff" in follower.err.read_text()  # it really was offline and retried
    finally:
        follower.stop(hard=True)
        relay.stop()


def test_sync_gives_up_with_exit_3_when_the_relay_stays_down(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay-data")
    relay.start()
    home = tmp_path / "alice"
    init_device(relay.url, home, "alice")
    relay.stop()
    result = cli(home, "sync", "--timeout", "2")
    assert result.returncode == 3
    assert result.stderr.startswith("tetherless: error: cannot reach the relay")
