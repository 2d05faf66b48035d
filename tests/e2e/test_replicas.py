"""Relay processes (one relay, several replicas) on one PostgreSQL database.

- devices on different replicas exchange messages live; SIGKILL of one
  replica under load loses and duplicates nothing;
- one identity: a replica started with another ``--name``, another relay key,
  a retired key or no name refuses to start (exit 2, one line); a rotation
  mounted with the rotation file is accepted;
- one sender per peer: two replicas drain one federation outbox, every row
  reaches the peer once, and the lease passes on after SIGKILL of its holder.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from protocol import codec
from protocol.messages import InboxPage, SendResponse
from relay.relay_keys import rotate
from tests.e2e.http11 import Http11, Peer, login, register
from tests.e2e.offline_client import wait_until
from tests.e2e.test_federation import free_port
from tests.relay.store.postgres_db import fresh_database
from tests.relay_process import RelayProcess, replica_processes

RELAY_NAME = "replicas.test"
LIVE_WITHIN_SECONDS = 15.0  # half the streams' heartbeat (30 s, set below)
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
        with replica_processes(tmp_path, url, 3, name=RELAY_NAME, env=env) as processes:
            yield processes


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
            # Half the heartbeat: a wake-up from another replica that went missing shows as a 30 s wait, while a
            # loaded host's slow delivery does not fail the test.
            deadline = time.monotonic() + LIVE_WITHIN_SECONDS
            while len(reader.received) <= i:
                assert time.monotonic() < deadline, "not delivered across replicas within 15 s (heartbeat is 30 s)"
                time.sleep(0.01)
            assert reader.received[i][0] == b"live-%d" % i
            assert reader.received[i][1] - sent_at < LIVE_WITHIN_SECONDS
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

    def acknowledged_at_least(count: int) -> bool:
        return len(acknowledged) >= count or bool(errors)

    # The kill lands while batches are in flight, after the senders got going and before they go on through
    # the others (counted, not timed: a loaded host sends fewer batches per second).
    try:
        wait_until(functools.partial(acknowledged_at_least, 50), 60, "the senders to get through before the kill")
        replicas[1].kill()
        wait_until(
            functools.partial(acknowledged_at_least, len(acknowledged) + 50), 60, "the senders to go on after the kill"
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not errors, errors
    deadline = time.monotonic() + 60  # bounds a hang only: the stream carries each one as it is stored
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


# -- one identity for all replicas ------------------------------------------------------------


def serve_refused(data: Path, *args: str) -> tuple[int, str]:
    """Start ``tetherless serve`` expecting a refusal: (exit code, stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "serve", "--data", str(data), "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TETHERLESS_LOG_LEVEL": "warning"},
    )
    return done.returncode, done.stderr


def refusal_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("tetherless: error:")]
    return line


def test_a_replica_with_another_name_or_key_refuses_to_start(replicas: list[RelayProcess], tmp_path: Path) -> None:
    url = next(arg for arg in replicas[0].extra_args if arg.startswith("postgresql://"))
    same_key = tmp_path / "same-key"
    same_key.mkdir(mode=0o700)
    shutil.copy2(replicas[0].data_dir / "relay.key", same_key / "relay.key")

    code, stderr = serve_refused(same_key, "--database", url, "--name", "other.test")
    assert code == 2, stderr
    assert refusal_line(stderr).endswith(f"this database belongs to relay {RELAY_NAME}; started as other.test")

    code, stderr = serve_refused(same_key, "--database", url)  # no --name: the listen address is no relay name
    assert code != 0
    assert "name: required with a PostgreSQL database" in refusal_line(stderr)

    other_key = tmp_path / "other-key"  # its own relay.key is created: not the Secret the others mount
    code, stderr = serve_refused(other_key, "--database", url, "--name", RELAY_NAME)
    assert code == 2, stderr
    line = refusal_line(stderr)
    assert "is not the one recorded for this database" in line
    assert "mount the same Secret" in line
    assert replicas[0].proc is not None
    assert replicas[0].proc.poll() is None
    assert Http11(replicas[0].url).get("/readyz").status == 200


def test_a_rotation_is_accepted_once_and_the_retired_key_then_refused(
    replicas: list[RelayProcess], tmp_path: Path
) -> None:
    url = next(arg for arg in replicas[0].extra_args if arg.startswith("postgresql://"))
    old_secret, new_secret = tmp_path / "old-secret", tmp_path / "new-secret"
    for directory in (old_secret, new_secret):
        directory.mkdir(mode=0o700)
        shutil.copy2(replicas[0].data_dir / "relay.key", directory / "relay.key")
    retired, new = rotate(new_secret, overlap_ms=86_400_000, now_ms=int(time.time() * 1000))

    rotated = RelayProcess(new_secret, extra_args=["--database", url, "--name", RELAY_NAME])
    rotated.start()  # the rotation file retires the recorded key: accepted and recorded
    try:
        assert f"relay key rotated: {retired.key_id} retired, {new.key_id} current" in rotated.logs()
    finally:
        rotated.stop()
    code, stderr = serve_refused(old_secret, "--database", url, "--name", RELAY_NAME)
    assert code == 2, stderr
    assert f"relay key {retired.key_id} was retired for this database" in refusal_line(stderr)
    with psycopg.connect(url) as conn:
        keys: dict[str, str] = dict(conn.execute("SELECT key_id, status FROM relay_key_ids").fetchall())
    assert keys == {retired.key_id: "retired", new.key_id: "current"}


# -- one sender per federation peer -------------------------------------------------------------

FAST_FEDERATION = {
    "TETHERLESS_FEDERATION_POLL_SECONDS": "0.1",
    "TETHERLESS_FEDERATION_RETRY_MIN_SECONDS": "0.1",
    "TETHERLESS_FEDERATION_RETRY_MAX_SECONDS": "0.5",
    # A delivery cut off by the timeout after b stored it is sent again (b answers "duplicate", which this test
    # counts as a row sent twice): well above a loaded host's slowest batch of five. The lease must outlive it
    # (config), and the kill below waits it out.
    "TETHERLESS_FEDERATION_TIMEOUT_SECONDS": "5",
    "TETHERLESS_FEDERATION_LEASE_SECONDS": "8",
    "TETHERLESS_FEDERATION_BATCH_ENVELOPES": "5",  # many small batches: many chances to send a row twice
    **NO_RATE_LIMITS,
}
_COUNTER = re.compile(
    r'^relay_federation_envelopes_total\{direction="(in|out)",outcome="(\w+)",peer="([^"]+)"\} (\S+)$'
)


def envelope_counts(relay: RelayProcess) -> Counter[tuple[str, str]]:
    """(direction, outcome) → envelopes, from the relay's /metrics."""
    counts: Counter[tuple[str, str]] = Counter()
    for line in Http11(relay.url).get("/metrics").body.decode().splitlines():
        match = _COUNTER.match(line)
        if match:
            counts[match[1], match[2]] += int(float(match[4]))
    return counts


def wait_for_inbox(relay: RelayProcess, peer: Peer, count: int, timeout: float = 60.0) -> list[bytes]:
    received: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        received, after = [], 0
        while True:
            page = codec.decode(
                Http11(relay.url).get(f"/v1/inbox?after={after}", peer.token, codec.MSGPACK).body, InboxPage
            )
            received += [env.ciphertext for env in page.envelopes]
            after = page.next_cursor
            if not page.more:
                break
        if len(received) >= count or time.monotonic() > deadline:
            return received
        time.sleep(0.1)


def lease_holder(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT holder FROM federation_leases WHERE peer = 'b.test'").fetchone()
    assert row is not None, "nobody holds b.test's lease"
    return str(row[0])


def test_each_outbox_row_is_sent_by_one_replica_and_the_lease_passes_on_after_sigkill(tmp_path: Path) -> None:
    # b names a.test by the first replica's address before that one listens: the one port chosen ahead (any
    # other is the kernel's pick at bind time, so no other process can take it in between).
    a_ports = [free_port(), 0]
    b_args = ["--name", "b.test", f"--peer=a.test=http://127.0.0.1:{a_ports[0]}"]
    b = RelayProcess(tmp_path / "b", extra_args=b_args, env=FAST_FEDERATION)
    with fresh_database("tl_e2e") as url:
        a: list[RelayProcess] = []
        try:
            b.start()
            for i, port in enumerate(a_ports):
                data = tmp_path / f"a{i}"
                if a:
                    data.mkdir(mode=0o700)
                    shutil.copy2(a[0].data_dir / "relay.key", data / "relay.key")
                replica = RelayProcess(
                    data,
                    port=port,
                    extra_args=["--database", url, "--name", "a.test", f"--peer=b.test={b.url}"],
                    env=FAST_FEDERATION,
                )
                replica.start()
                a.append(replica)
            alice, bob = register(Http11(a[0].url), "alice"), register(Http11(b.url), "bob")
            login(Http11(a[0].url), alice)
            login(Http11(b.url), bob)

            def sender(replica: RelayProcess, tag: bytes) -> None:  # both replicas commit outbox rows at once
                client = Http11(replica.url)
                for n in range(40):
                    cts = [b"%s-%03d-%d" % (tag, n, j) for j in range(3)]
                    assert send(client, alice, bob, cts, b"%s%03d" % (tag, n)) == 201

            threads = [threading.Thread(target=sender, args=(r, b"r%d" % i)) for i, r in enumerate(a)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            first = wait_for_inbox(b, bob, 240)
            assert sorted(first) == sorted(
                b"r%d-%03d-%d" % (i, n, j) for i in range(2) for n in range(40) for j in range(3)
            )
            # The receiver stores a batch before it answers, and the sender counts the batch only once it has read
            # that answer: wait for the senders' counters to take in the last batches before comparing them.
            sent: list[Counter[tuple[str, str]]] = []

            def counted_all() -> bool:
                sent[:] = [envelope_counts(replica) for replica in a]
                return sum(c["out", "stored"] + c["out", "duplicate"] for c in sent) >= 240

            wait_until(counted_all, 30, "the senders to count every delivered envelope")
            assert sum(c["out", "stored"] for c in sent) == 240, sent
            assert sum(c["out", "duplicate"] for c in sent) == 0, f"a row was sent twice: {sent}"
            assert envelope_counts(b)["in", "duplicate"] == 0

            # Kill the replica that holds b.test's lease (a lease unexpired, held by a dead process).
            holder = lease_holder(url)
            (victim,) = [r for r in a if f"lease holder {holder}" in r.logs()]
            survivor = a[1 - a.index(victim)]
            victim.kill()
            client = Http11(survivor.url)
            assert send(client, alice, bob, [b"after-kill-%d" % j for j in range(3)], b"after-kill") == 201
            after = wait_for_inbox(b, bob, 243)
            assert sorted(after[240:]) == [b"after-kill-%d" % j for j in range(3)], "the lease never passed on"
            assert envelope_counts(b)["in", "duplicate"] == 0
            assert f"lease holder {lease_holder(url)}" in survivor.logs()
        finally:
            for replica in a:
                replica.stop()
            b.stop()
