"""Federation cannot be aimed at internal addresses (issue 13 point 4; docs/federation.md §1.1).

A plain TCP listener on a loopback port records every connection it gets.
A real relay in the default ``open`` federation mode is then asked, in
every way an outsider or a local client can, to talk to that port: by
unsigned and badly signed federation requests naming it (as an IP literal,
and as ``localhost``, a name that resolves to it), by a client's remote
device-list lookup, by a send to an address on it, by a prekey claim for a
device on it. Each is refused with its code, and the listener never sees a
connection.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nacl.signing
import pytest

from protocol import codec, federation
from tests.e2e.http11 import Http11, Peer, login, register
from tests.e2e.test_federation import FAST
from tests.relay_process import RelayProcess

OWN = "b.test"


class Listener:
    """Accepts (and closes) connections on 127.0.0.1, counting them, until closed."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@contextmanager
def listener() -> Iterator[Listener]:
    probe = Listener()
    try:
        yield probe
    finally:
        probe.close()


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    process = RelayProcess(tmp_path / "b", extra_args=["--name", OWN], env=FAST)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def signed(relay: RelayProcess, origin: str, body: bytes, path: str = "/federation/v1/deliver") -> dict[str, str]:
    """A well-formed signature by a key nobody publishes (a forger's)."""
    headers = federation.sign_request(
        nacl.signing.SigningKey.generate(),
        method="POST",
        authority=f"127.0.0.1:{relay.port}",
        path=path,
        body=body,
        origin=origin,
        destination=OWN,
        created=int(time.time()),
        nonce=base64.urlsafe_b64encode(os.urandom(18)).decode(),
    )
    return dict(headers) | {"content-type": codec.MSGPACK, "accept": codec.MSGPACK}


def user(http: Http11, name: str) -> Peer:
    peer = register(http, name)
    login(http, peer)
    return peer


def test_the_control_connection_is_seen() -> None:
    """The listener does record connections (so the zero counts below mean something)."""
    with listener() as probe:
        socket.create_connection(("127.0.0.1", probe.port)).close()
        deadline = time.monotonic() + 10
        while probe.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert probe.connections == 1


def test_federation_requests_naming_a_loopback_port_connect_nowhere(relay: RelayProcess) -> None:
    http = Http11(relay.url)
    body = codec.encode({"envelopes": []})
    with listener() as probe:
        for origin in (f"127.0.0.1:{probe.port}", f"localhost:{probe.port}", f"[::1]:{probe.port}"):
            unsigned = {"content-type": codec.MSGPACK, "tetherless-origin": origin}
            answer = http.request("POST", "/federation/v1/deliver", body, unsigned)
            assert (answer.status, answer.code) == (401, "signature_missing")
            answer = http.request("POST", "/federation/v1/deliver", body, signed(relay, origin, body))
            assert (answer.status, answer.code) == (403, "peer_address_refused"), origin
            claim = codec.encode({"claimer_account": "a" * 32, "devices": []})
            answer = http.request(
                "POST",
                "/federation/v1/prekeys/claim",
                claim,
                signed(relay, origin, claim, "/federation/v1/prekeys/claim"),
            )
            assert (answer.status, answer.code) == (403, "peer_address_refused"), origin
        assert probe.connections == 0


def test_client_requests_naming_a_loopback_port_connect_nowhere(relay: RelayProcess) -> None:
    http = Http11(relay.url)
    alice, bob = user(http, "alice"), user(http, "bob")
    with listener() as probe:
        names = (f"127.0.0.1:{probe.port}", f"localhost:{probe.port}", f"127.1:{probe.port}")
        for name in names:
            answer = http.get(f"/v1/relays/{name}/accounts/{bob.parsed.account}/devices", alice.token)
            assert (answer.status, answer.code) == (403, "peer_address_refused"), name
        # a send to an IP literal is refused when it is submitted (no DNS needed to judge it)
        for name in (f"127.0.0.1:{probe.port}", f"127.1:{probe.port}"):
            envelope = {"recipient": f"{bob.device_id}.{bob.parsed.account}@{name}", "idempotency_key": os.urandom(8)}
            answer = http.msgpack("POST", "/v1/messages", {"envelopes": [envelope | {"ciphertext": b"x"}]}, alice.token)
            assert (answer.status, answer.code) == (403, "peer_address_refused"), name
        # prekey claims for devices there: answered as missing, nothing fetched
        remote = [f"{bob.device_id}.{bob.parsed.account}@{name}" for name in names]
        answer = http.msgpack("POST", "/v1/prekeys/claim", {"devices": remote}, alice.token)
        assert answer.status == 200, answer.body
        assert sorted(codec.decode(answer.body, dict)["missing"]) == sorted(remote)
        assert probe.connections == 0


def test_queued_envelopes_for_a_name_resolving_to_loopback_are_never_delivered_there(relay: RelayProcess) -> None:
    """A DNS name is judged when the delivery worker resolves it (its answer may change): every attempt is
    refused before connecting, and the envelope stays queued until its TTL."""
    http = Http11(relay.url)
    alice, bob = user(http, "alice"), user(http, "bob")
    with listener() as probe:
        recipient = f"{bob.device_id}.{bob.parsed.account}@localhost:{probe.port}"
        envelope = {"recipient": recipient, "idempotency_key": os.urandom(8), "ciphertext": b"x"}
        answer = http.msgpack("POST", "/v1/messages", {"envelopes": [envelope]}, alice.token)
        assert answer.status == 201, answer.body
        refused = 'relay_federation_requests_total{direction="out",kind="deliver",outcome="refused",peer="other"}'
        deadline = time.monotonic() + 30  # several worker passes (FAST: poll 0.3 s, retry up to 0.8 s)
        attempts = 0.0
        while attempts < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            lines = Http11(relay.url).get("/metrics").body.decode().splitlines()
            attempts = next((float(line.split()[-1]) for line in lines if line.startswith(refused)), 0.0)
        assert attempts >= 3, "the worker did not try the refused peer"
        assert probe.connections == 0
