"""A device enrolled after 10,000 messages, with every other device offline, gets the whole history from the relay.

docs/account-log.md §14.1. The 10,000 messages are made the fastest honest
way: each sender's outbox is filled in one local transaction and its real
engine (in this process) seals, posts and logs them in batches; the
recipients' engines receive and log them. The new device then bootstraps
through the real CLI (``tetherless sync``) while no other device runs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import trio

from tests.e2e.offline_client import (
    NO_RATE_LIMITS,
    cli,
    enqueue_many,
    history,
    init_device,
    link_device,
    load,
    run_engine,
)
from tests.relay_process import RelayProcess

PER_SENDER = 5000


def _account(address: str) -> str:
    return address.split(".", 1)[1]


def _settled(homes: list[Path], total: int) -> bool:
    for home in homes:
        ks, _, store = load(home)
        done = store.message_count() == total and not store.outbox() and store.pending_count() == 0
        store.db.close()
        ks.close()
        if not done:
            return False
    return True


@pytest.mark.slow
def test_new_device_rebuilds_ten_thousand_messages_from_the_relay_alone(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay-data", env=NO_RATE_LIMITS)
    relay.start()
    try:
        a1_home, a2_home, a3_home, b1_home = (tmp_path / n for n in ("a1", "a2", "a3", "b1"))
        a1 = init_device(relay.url, a1_home, "a1")
        b1 = init_device(relay.url, b1_home, "b1")
        trio.run(link_device, relay.url, a1_home, a2_home, "a2")
        sent_by_b = [f"b1 to a #{i} ✓" for i in range(PER_SENDER)]
        sent_by_a = [f"a1 to b #{i}" for i in range(PER_SENDER)]
        enqueue_many(b1_home, _account(a1), sent_by_b)  # to A's account: A1 and A2 get envelopes
        enqueue_many(a1_home, _account(b1), sent_by_a)

        async def exchange() -> None:
            for _ in range(6):
                async with trio.open_nursery() as nursery:
                    for home in (a1_home, a2_home, b1_home):
                        nursery.start_soon(run_engine, home)
                if _settled([a1_home, b1_home], 2 * PER_SENDER):
                    return
            raise AssertionError("the senders' and recipients' engines never settled")

        trio.run(exchange)

        # A1 enrols A3 (link code) and, on its next sync, appends A3's grant to the log. Then everyone stops.
        a3 = trio.run(link_device, relay.url, a1_home, a3_home, "a3")
        assert trio.run(run_engine, a1_home) == 0

        synced = cli(a3_home, "sync", "--json", timeout=300)  # A3 alone: only the relay has the history
        assert synced.returncode == 0, synced.stderr
        got = history(a3_home)
        assert len(got) == 2 * PER_SENDER
        assert len({m["message_id"] for m in got}) == 2 * PER_SENDER
        reference = history(a1_home)
        assert [(m["message_id"], m["position"]) for m in got] == [(m["message_id"], m["position"]) for m in reference]
        positions = [m["position"] for m in got]
        assert positions == sorted(positions)
        by_sender: dict[str, list[dict[str, object]]] = defaultdict(list)
        for m in got:
            by_sender[str(m["sender"])].append(m)
        assert set(by_sender) == {a1, b1}
        for sender, texts in ((a1, sent_by_a), (b1, sent_by_b)):
            assert [m["pair_seq"] for m in by_sender[sender]] == list(range(1, PER_SENDER + 1))
            assert [m["text"] for m in by_sender[sender]] == texts
        assert {m["direction"] for m in by_sender[a1]} == {"sent"}
        assert {m["direction"] for m in by_sender[b1]} == {"received"}
        assert not any(m["late"] for m in got)
        assert a3.endswith(_account(a1))
    finally:
        relay.stop()
