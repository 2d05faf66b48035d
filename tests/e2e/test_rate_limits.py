"""Abuse limits on a real relay: 429 rate_limited with Retry-After, counted per scope."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.http11 import Http11, login, register
from tests.relay_process import RelayProcess

# Bursts spent within the test, refilled one token per 100 s: the refusals below hold however slowly a loaded
# host runs the test (at 0.1/s, ten seconds between the first request and a refusal let it through).
TIGHT = {
    "TETHERLESS_RATE_IP_PER_SECOND": "0.01",
    "TETHERLESS_RATE_IP_BURST": "8",
    "TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0.01",
    "TETHERLESS_RATE_DEVICE_REQUESTS_BURST": "5",
    "TETHERLESS_MAX_BATCH_ENVELOPES": "10",
    "TETHERLESS_RATE_DEVICE_ENVELOPES_PER_SECOND": "0.01",
    "TETHERLESS_RATE_DEVICE_ENVELOPES_BURST": "12",
}


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    process = RelayProcess(tmp_path / "data", env=TIGHT)
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0


def metric(http: Http11, scope: str) -> float:
    for line in http.get("/metrics", accept="*/*").body.decode().splitlines():
        if line.startswith(f'relay_rate_limited_total{{scope="{scope}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_limits_per_ip_device_and_envelopes(relay: RelayProcess) -> None:
    http = Http11(relay.url)
    alice = register(http, "alice")  # 1 unauthenticated request
    bob = register(http, "bob")  # 2
    login(http, alice)  # 4
    login(http, bob)  # 6
    for _ in range(2):  # 8: the burst is spent
        assert http.msgpack("POST", "/v1/auth/challenge", {"device_id": alice.device_id}).status == 200
    answer = http.msgpack("POST", "/v1/auth/challenge", {"device_id": alice.device_id})
    assert (answer.status, answer.code) == (429, "rate_limited")
    assert int(answer.headers["retry-after"]) >= 1
    assert answer.json()["retry_after_seconds"] == int(answer.headers["retry-after"])
    assert metric(http, "ip") == 1

    # Envelopes: 10 + 2 fit in the burst of 12; the next batch is refused whole.
    def batch(n: int) -> dict[str, object]:
        return {
            "envelopes": [
                {"recipient": bob.address, "idempotency_key": os.urandom(16), "ciphertext": b"x"} for _ in range(n)
            ]
        }

    assert http.msgpack("POST", "/v1/messages", batch(10), alice.token).status == 201
    assert http.msgpack("POST", "/v1/messages", batch(2), alice.token).status == 201
    answer = http.msgpack("POST", "/v1/messages", batch(1), alice.token)
    assert (answer.status, answer.code) == (429, "rate_limited")
    assert metric(http, "device_envelopes") == 1

    # Requests per device: alice's three sends spent 3 of her burst of 5; two more pass, then 429.
    assert http.get("/v1/inbox", alice.token).status == 200
    assert http.get("/v1/inbox", alice.token).status == 200
    answer = http.get("/v1/inbox", alice.token)
    assert (answer.status, answer.code) == (429, "rate_limited")
    assert metric(http, "device") == 1
    # Another device is not affected.
    assert http.get("/v1/inbox", bob.token).status == 200
