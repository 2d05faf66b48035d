"""A message to a mistyped relay fails for good at once; a relay whose DNS fails for now is only waited for
(issue 14 point 3; docs/protocol.md ``unknown_relay``, docs/account-log.md §10 "Outbox entry states").

A real relay process whose resolver says "no such name" (``EAI_NONAME``) for ``no-such-relay.example`` and
"try again" (``EAI_AGAIN``) for ``dns-down.example`` (``tests/support/dns_stub``: only the C library's answer
is stubbed, so the relay's own handling runs as it does in production, on any machine's DNS), the real
``tetherless`` CLI in subprocesses, and raw HTTP for the wire answers and the relay's metrics.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.http11 import Http11
from tests.e2e.test_equal_devices import account_of, cli, init_device, ok
from tests.e2e.test_federation import FAST
from tests.e2e.test_federation_ssrf import user
from tests.e2e.test_outbox_jam import refused, rows, texts
from tests.relay_process import RelayProcess
from tests.support import dns_stub

MISSING = "no-such-relay.example"
FLAKY = "dns-down.example"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    stubbed = dns_stub.env({MISSING: "EAI_NONAME", FLAKY: "EAI_AGAIN"})
    process = RelayProcess(tmp_path / "relay-data", env=FAST | stubbed)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def counted(relay: RelayProcess, kind: str, outcome: str) -> float:
    sample = f'relay_federation_requests_total{{direction="out",kind="{kind}",outcome="{outcome}",peer="other"}}'
    lines = Http11(relay.url).get("/metrics").body.decode().splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(sample)), 0.0)


def test_a_mistyped_relay_fails_its_entry_for_good_and_jams_nothing(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    init_device(relay, alice_home)
    bob = init_device(relay, bob_home)
    ok(cli(alice_home, "send", bob, "--text", "before"))

    mistyped = account_of(bob).split("@")[0] + "@" + MISSING
    line = refused(cli(alice_home, "send", mistyped, "--text", "lost"))  # at the first attempt, one line
    assert line.startswith("tetherless: error: unknown_relay: ")
    assert MISSING in line
    unlucky = account_of(bob).split("@")[0] + "@" + FLAKY
    waiting = ok(cli(alice_home, "send", unlucky, "--text", "waits for DNS"))
    assert waiting.startswith("queued (peer_unavailable")
    ok(cli(alice_home, "send", bob, "--text", "after"))

    assert cli(alice_home, "sync").returncode == 0  # neither entry changes sync's exit status
    failed, retrying = rows(alice_home)
    assert (failed["recipient"], failed["state"], failed["reason_code"]) == (mistyped, "failed", "unknown_relay")
    assert MISSING in failed["reason"]
    assert (retrying["recipient"], retrying["state"]) == (unlucky, "retrying")
    assert (retrying["reason_code"], retrying["destination"]) == ("peer_unavailable", FLAKY)
    table = ok(cli(alice_home, "outbox")).splitlines()
    assert "failed" in table[1]
    assert "unknown_relay" in table[1]
    assert texts(bob_home) == ["before", "after"]

    # retry: tried again by the next sync, and fails again, alone; cancel removes both entries.
    ok(cli(alice_home, "outbox", "retry", str(failed["local_id"])))
    assert cli(alice_home, "sync").returncode == 0
    assert [r["state"] for r in rows(alice_home)] == ["failed", "retrying"]
    for entry in (failed, retrying):
        ok(cli(alice_home, "outbox", "cancel", str(entry["local_id"])))
    assert rows(alice_home) == []
    ok(cli(alice_home, "send", bob, "--text", "still flowing"))
    assert texts(bob_home) == ["still flowing"]


def test_the_relay_answers_unknown_relay_as_a_problem_and_counts_it(relay: RelayProcess) -> None:
    http = Http11(relay.url)
    alice, bob = user(http, "alice"), user(http, "bob")

    answer = http.get(f"/v1/relays/{MISSING}/accounts/{bob.parsed.account}/devices", alice.token)
    assert (answer.status, answer.code) == (404, "unknown_relay")
    assert answer.json()["type"] == "https://tetherless.dev/problems/unknown_relay"
    assert MISSING in answer.json()["detail"]
    answer = http.get(f"/v1/relays/{FLAKY}/accounts/{bob.parsed.account}/devices", alice.token)
    assert (answer.status, answer.code) == (502, "peer_unavailable")
    assert counted(relay, "device_list", "unresolved") == 1
    assert counted(relay, "device_list", "unreachable") == 1


def delivered_outcome(relay: RelayProcess, outcome: str) -> float:
    sample = f'relay_federation_envelopes_total{{direction="out",outcome="{outcome}",peer="other"}}'
    lines = Http11(relay.url).get("/metrics").body.decode().splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(sample)), 0.0)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30  # bounds a hang only: the worker polls every 0.3 s (FAST)
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_envelopes_queued_for_a_name_that_stopped_resolving_fail_with_the_reason(relay: RelayProcess) -> None:
    """The home relay's federation outbox (envelopes sealed from cached targets, or sent by another client):
    a name that does not exist fails its rows at the first attempt, with the reason in ``admin federation``,
    and they are not tried again; a name whose lookup fails for now keeps being retried meanwhile.
    ``admin federation retry`` makes the failed rows queued again (the name may exist by then)."""
    http = Http11(relay.url)
    alice, bob = user(http, "alice"), user(http, "bob")

    def post(relay_name: str) -> None:
        envelope = {
            "recipient": f"{bob.device_id}.{bob.parsed.account}@{relay_name}",
            "idempotency_key": os.urandom(8),
            "ciphertext": b"x",
        }
        answer = http.msgpack("POST", "/v1/messages", {"envelopes": [envelope]}, alice.token)
        assert answer.status == 201, answer.body

    def admin_line(peer: str) -> list[str]:
        admin = ok(cli(relay.data_dir.parent / "no-home", "admin", "federation", "--data", str(relay.data_dir)))
        (line,) = [line for line in admin.splitlines() if line.startswith(peer)]
        return line.split(maxsplit=5)

    post(MISSING)
    wait_for(lambda: delivered_outcome(relay, "failed") == 1, "the row to fail")
    assert counted(relay, "deliver", "unresolved") == 1
    # The worker counts the failure before it writes the row as failed: wait for the row, not the counter.
    wait_for(lambda: admin_line(MISSING)[1:3] == ["0", "1"], "the row to be failed in the outbox")
    assert f"unknown_relay: {MISSING} does not resolve" in admin_line(MISSING)[-1]

    # the worker goes on (a name that fails for now is retried, again and again) and never tries MISSING again
    post(FLAKY)
    wait_for(lambda: counted(relay, "deliver", "unreachable") >= 3, "the worker to retry the flaky name")
    assert counted(relay, "deliver", "unresolved") == 1
    assert admin_line(FLAKY)[1:3] == ["1", "0"]  # still queued, not failed

    ok(cli(relay.data_dir.parent / "no-home", "admin", "federation", "retry", MISSING, "--data", str(relay.data_dir)))
    wait_for(lambda: counted(relay, "deliver", "unresolved") == 2, "the retried row to be tried again")
    wait_for(lambda: delivered_outcome(relay, "failed") == 2, "the retried row to fail again")
    wait_for(lambda: admin_line(MISSING)[1:3] == ["0", "1"], "the retried row to be failed again")
