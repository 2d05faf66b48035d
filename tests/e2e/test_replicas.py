"""Three relay processes (one relay, several replicas) on one PostgreSQL database."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol import codec
from protocol.messages import InboxPage, SendResponse
from tests.e2e.http11 import Http11, Peer, login, register
from tests.relay.store.postgres_db import fresh_database
from tests.relay_process import RelayProcess

RELAY_NAME = "replicas.test"
NO_RATE_LIMITS = {
    "TETHERLESS_RATE_IP_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_ENVELOPES_PER_SECOND": "0",
    "TETHERLESS_RATE_ACCOUNT_ENVELOPES_PER_SECOND": "0",
}


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[RelayProcess]]:
    """Three replicas sharing a fresh database and one relay key; heartbeats too slow to hide missing wake-ups."""
    with fresh_database("tl_e2e") as url:
        env = {"TETHERLESS_STREAM_HEARTBEAT_SECONDS": "30", **NO_RATE_LIMITS}
        processes = []
        try:
            for i in range(3):
                data = tmp_path / f"replica{i}"
                if processes:  # every replica signs as the same relay
                    data.mkdir(mode=0o700)
                    shutil.copy2(processes[0].data_dir / "relay.key", data / "relay.key")
                process = RelayProcess(data, extra_args=["--database", url, "--name", RELAY_NAME], env=env)
                process.start()
                processes.append(process)
            yield processes
        finally:
            for process in processes:
                process.stop()


class StreamReader(threading.Thread):
    """Follows a device's inbox stream (JSON Lines), reconnecting to the next replica from its cursor."""

    def __init__(self, urls: list[str], token: str) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.token = token
        self.cursor = 0
        self.received: list[tuple[bytes, float]] = []
        self.connected = threading.Event()
        self.reconnects = 0
        self.stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        turn = 0
        while not self.stop.is_set():
            host, port = self.urls[turn % len(self.urls)].rsplit("/", 1)[1].split(":")
            turn += 1
            conn = self._conn = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                conn.request(
                    "GET",
                    f"/v1/inbox/stream?after={self.cursor}",
                    headers={"accept": codec.JSON_LINES, "authorization": f"Bearer {self.token}"},
                )
                resp = conn.getresponse()
                if resp.status != 200:
                    resp.read()
                else:
                    self.connected.set()
                    self._follow(resp)
            except (OSError, http.client.HTTPException, ValueError):
                pass
            finally:
                conn.close()
            if not self.stop.is_set():
                self.reconnects += 1
                time.sleep(0.1)

    def _follow(self, resp: http.client.HTTPResponse) -> None:
        while not self.stop.is_set():
            line = resp.readline()
            if not line:
                return
            item = json.loads(line)
            if "ciphertext" in item:
                self.received.append((base64.b64decode(item["ciphertext"]), time.time()))
            self.cursor = item["cursor"]

    def close(self) -> None:
        self.stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader; it closes the connection itself
        self.join(timeout=10)


def send(client: Http11, sender: Peer, recipient: Peer, ciphertexts: list[bytes], key: bytes) -> int:
    batch = [
        {"recipient": recipient.address, "idempotency_key": key + b"%03d" % i, "ciphertext": ct}
        for i, ct in enumerate(ciphertexts)
    ]
    answer = client.msgpack("POST", "/v1/messages", {"envelopes": batch}, sender.token)
    if answer.status == 201:
        assert len(codec.decode(answer.body, SendResponse).accepted) == len(batch)
    return answer.status


def test_devices_on_different_replicas_exchange_messages_live(replicas: list[RelayProcess]) -> None:
    one, three = Http11(replicas[0].url), Http11(replicas[2].url)
    alice, bob = register(one, "alice"), register(three, "bob")
    assert alice.address.endswith("@" + RELAY_NAME)
    login(one, alice)
    login(three, bob)  # a session made on replica 3 is valid everywhere
    reader = StreamReader([replicas[1].url], bob.token)  # bob streams from replica 2
    reader.start()
    try:
        assert reader.connected.wait(10)
        time.sleep(0.3)
        for i, client in enumerate([one, three, one]):  # sent through replicas 1 and 3
            sent_at = time.time()
            assert send(client, alice, bob, [b"live-%d" % i], b"live%04d" % i) == 201
            deadline = time.monotonic() + 3
            while len(reader.received) <= i:
                assert time.monotonic() < deadline, "not delivered across replicas within 3 s (heartbeat is 30 s)"
                time.sleep(0.01)
            assert reader.received[i][0] == b"live-%d" % i
            assert reader.received[i][1] - sent_at < 3
    finally:
        reader.close()
    assert reader.reconnects == 0


def test_sigkill_one_replica_under_load_loses_and_duplicates_nothing(replicas: list[RelayProcess]) -> None:
    clients = [Http11(r.url) for r in replicas]
    alice, bob = register(clients[0], "alice"), register(clients[0], "bob")
    login(clients[0], alice)
    login(clients[0], bob)
    # Bob streams from the replica that will be killed, then fails over to the others.
    reader = StreamReader([replicas[1].url, replicas[2].url, replicas[0].url], bob.token)
    reader.start()
    assert reader.connected.wait(10)

    acknowledged: list[bytes] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def sender(worker: int) -> None:
        batch_no, turn = 0, worker
        while not stop.is_set():
            cts = [b"w%d-b%05d-%02d" % (worker, batch_no, j) for j in range(5)]
            while True:  # same keys on every retry, to whichever replica answers
                client = clients[turn % 3]
                try:
                    status = send(client, alice, bob, cts, b"w%db%05d" % (worker, batch_no))
                except (OSError, http.client.HTTPException):
                    turn += 1
                    time.sleep(0.02)
                    continue
                if status == 201:
                    with lock:
                        acknowledged.extend(cts)
                    break
                if status == 503:
                    turn += 1
                    continue
                errors.append(f"unexpected status {status}")
                return
            batch_no += 1
            turn += 1

    threads = [threading.Thread(target=sender, args=(w,), daemon=True) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        replicas[1].kill()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors, errors
    assert len(acknowledged) > 50, "the senders barely got through; the test proves little"
    deadline = time.monotonic() + 10
    while len(reader.received) < len(acknowledged) and time.monotonic() < deadline:
        time.sleep(0.05)
    reader.close()
    assert reader.reconnects >= 1, "the stream never failed over"

    streamed = Counter(ct for ct, _ in reader.received)
    assert not [ct for ct, n in streamed.items() if n > 1], "the stream delivered an envelope twice"
    missing = [ct for ct in acknowledged if ct not in streamed]
    assert not missing, f"{len(missing)} acknowledged envelopes not streamed, e.g. {missing[:3]}"
    # Paging through a surviving replica agrees: every acknowledged envelope stored exactly once.
    stored: list[bytes] = []
    after = 0
    while True:
        page = codec.decode(clients[2].get(f"/v1/inbox?after={after}", bob.token, codec.MSGPACK).body, InboxPage)
        stored += [env.ciphertext for env in page.envelopes]
        after = page.next_cursor
        if not page.more:
            break
    counts = Counter(stored)
    assert not [ct for ct, n in counts.items() if n > 1]
    assert set(acknowledged) <= set(counts)
