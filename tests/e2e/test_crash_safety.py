"""kill -9 at random moments while batches are being sent: every envelope answered 2xx arrives exactly once."""

from __future__ import annotations

import functools
import http.client
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

from protocol import codec
from protocol.messages import InboxPage, SendResponse
from tests.e2e.http11 import Http11, login, register
from tests.e2e.offline_client import wait_until
from tests.relay_process import RelayProcess

KILLS = 20
BATCH = 10


def test_acknowledged_envelopes_survive_sigkill(tmp_path: Path) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    # Load, not abuse: the sender retries as fast as it can across restarts.
    relay = RelayProcess(tmp_path / "data", env={"TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0"})
    relay.start()
    client = Http11(relay.url)
    alice, bob = register(client, "alice"), register(client, "bob")
    login(client, alice)
    login(client, bob)

    acknowledged: list[bytes] = []  # ciphertexts whose batch was answered 201
    stop = threading.Event()
    errors: list[str] = []

    def sender() -> None:
        batch_no = 0
        while not stop.is_set():
            batch = [
                {
                    "recipient": bob.address,
                    "idempotency_key": b"b%07dn%02d" % (batch_no, j),
                    "ciphertext": b"ct-%07d-%02d" % (batch_no, j),
                }
                for j in range(BATCH)
            ]
            while True:  # retry the same batch (same keys) until the relay answers
                try:
                    answer = client.msgpack("POST", "/v1/messages", {"envelopes": batch}, alice.token)
                except (OSError, http.client.HTTPException):
                    time.sleep(0.02)
                    if stop.is_set():
                        return
                    continue
                if answer.status == 201:
                    result = codec.decode(answer.body, SendResponse)
                    assert len(result.accepted) == BATCH
                    acknowledged.extend(e["ciphertext"] for e in batch)  # type: ignore[misc]
                    break
                if answer.status == 503:  # starting up
                    time.sleep(0.02)
                    continue
                errors.append(f"unexpected {answer.status}: {answer.body[:200]!r}")
                return
            batch_no += 1

    def acknowledged_more_than(count: int) -> bool:
        return len(acknowledged) > count or bool(errors)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        for kill in range(KILLS):
            # Each kill comes after a batch was acknowledged since the last start (so the run proves something
            # however slow the host), at a random moment of the batches that follow.
            wait_until(
                functools.partial(acknowledged_more_than, len(acknowledged)),
                60,
                f"an acknowledged batch before kill {kill + 1} (the sender barely gets through)",
            )
            time.sleep(rng.uniform(0.0, 0.35))
            relay.kill()
            relay.start()
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors

    received: list[bytes] = []
    after = 0
    while True:
        answer = client.get(f"/v1/inbox?after={after}", bob.token, codec.MSGPACK)
        assert answer.status == 200
        page = codec.decode(answer.body, InboxPage)
        received += [env.ciphertext for env in page.envelopes]
        after = page.next_cursor
        if not page.more:
            break
    counts = Counter(received)
    duplicates = {ct: n for ct, n in counts.items() if n > 1}
    assert not duplicates, f"delivered more than once: {list(duplicates)[:5]}"
    missing = [ct for ct in acknowledged if ct not in counts]
    assert not missing, f"{len(missing)} acknowledged envelopes lost, e.g. {missing[:3]}"
    # Acknowledge everything: the inbox is then empty.
    assert client.msgpack("POST", "/v1/inbox/ack", {"up_to": after}, bob.token).status == 200
    page = codec.decode(client.get("/v1/inbox", bob.token, codec.MSGPACK).body, InboxPage)
    assert page.envelopes == []
    assert relay.stop() == 0
