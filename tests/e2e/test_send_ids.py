"""Every ``send`` outcome line names the message id (docs/cli.md "Message ids"; issue 14 point 4).

Off a terminal ``send`` prints the id alone once delivered, ``queued (…; local id N, message id ID)`` while the
message waits, and ``tetherless: error: REASON (local id N, message id ID)`` when it failed for good. The id
printed while it waits is the one ``history --json`` and the recipient's ``sync --json`` show once it is
delivered. A real relay process (its resolver stubbed for one mistyped name) and the real CLI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_equal_devices import account_of, cli, init_device, ok
from tests.e2e.test_outbox_jam import refused
from tests.relay_process import RelayProcess
from tests.support import dns_stub

MISSING = "no-such-relay.example"
ID = "[a-z2-7]{26}"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    process = RelayProcess(tmp_path / "relay-data", env=dns_stub.env({MISSING: "EAI_NONAME"}))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_every_send_outcome_names_the_message_id(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    init_device(relay, alice_home)
    bob = init_device(relay, bob_home)
    delivered = ok(cli(alice_home, "send", bob, "--text", "first"))  # a session now exists
    assert re.fullmatch(f"{ID}\n", delivered)

    relay.stop()
    queued = ok(cli(alice_home, "send", bob, "--text", "while the relay is down"))
    match = re.fullmatch(rf"queued \(offline; local id (\d+), message id ({ID})\)\n", queued)
    assert match, queued
    local_id, waiting_id = match.groups()
    waiting = [json.loads(line) for line in ok(cli(alice_home, "outbox", "--json")).splitlines()]
    assert [e["state"] for e in waiting if e["local_id"] == int(local_id)] == ["queued"]

    relay.start()
    assert cli(alice_home, "sync").returncode == 0
    sent = [json.loads(line) for line in ok(cli(alice_home, "history", "--json")).splitlines()]
    assert [m["message_id"] for m in sent if m["text"] == "while the relay is down"] == [waiting_id]
    received = [json.loads(line) for line in ok(cli(bob_home, "sync", "--json")).splitlines() if '"text"' in line]
    assert {m["text"]: m["message_id"] for m in received}["while the relay is down"] == waiting_id
    assert {m["text"]: m["message_id"] for m in received}["first"] == delivered.strip()

    # failed for good at the first attempt: the one stderr line names both ids, and the entry stays
    mistyped = account_of(bob).split("@")[0] + "@" + MISSING
    line = refused(cli(alice_home, "send", mistyped, "--text", "lost"))
    match = re.fullmatch(rf"tetherless: error: unknown_relay: .*{MISSING}.* \(local id (\d+), message id {ID}\)", line)
    assert match, line
    entries = [json.loads(x) for x in ok(cli(alice_home, "outbox", "--json")).splitlines()]
    assert [e["state"] for e in entries if e["local_id"] == int(match.group(1))] == ["failed"]
