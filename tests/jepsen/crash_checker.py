"""A Jepsen-style crash checker: concurrent numbered sends while the relay is SIGKILLed and restarted.

    python -m tests.jepsen.crash_checker --cycles 100
    python -m tests.jepsen.crash_checker --database postgresql://USER:PASSWORD@HOST/DB --cycles 100

Several client threads send uniquely numbered envelopes (one per request,
its number as both idempotency key and ciphertext) to a few recipients over
HTTP/1.1. Meanwhile the relay is killed with SIGKILL at random moments and
restarted; after every kill ``PRAGMA integrity_check`` runs on a copy of the
SQLite database (with its WAL). A send that fails on the wire is *not*
retried: its outcome is unknown, as in Jepsen. At the end every inbox is
drained and each number is classified, Jepsen queue-checker style:

- ok: acknowledged (201) and delivered once;
- lost: acknowledged, never delivered;
- unexpected: delivered, never sent;
- duplicated: delivered more than once;
- recovered: not acknowledged (in flight at a kill) yet delivered;
- unknown: not acknowledged, not delivered (allowed).

Exits non-zero when lost, unexpected or duplicated is non-zero, or an
integrity check failed.

PostgreSQL mode (``--database``, a server URL whose role may create
databases): a fresh database is created on that server for the run, and two
replicas serve from it with one name and one relay key. Clients spread their
sends over both; one replica is SIGKILLed and restarted every cycle while the
other keeps serving (a kill is what a node failure or an OOM kill does to a
pod). PostgreSQL's own crash safety is not what is tested (its server is not
killed), so there is no integrity check; the queue check is the same.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg

from protocol import codec
from protocol.messages import InboxPage
from tests.e2e.http11 import Http11, Peer, login, register
from tests.relay.store.postgres_db import drop_database
from tests.relay_process import RelayProcess

DB_FILE = "relay.sqlite3"
NO_RATE_LIMITS = {
    "TETHERLESS_RATE_IP_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_ENVELOPES_PER_SECOND": "0",
    "TETHERLESS_RATE_ACCOUNT_ENVELOPES_PER_SECOND": "0",
    "TETHERLESS_LOG_LEVEL": "warning",
}


@dataclass
class History:
    acknowledged: set[bytes] = field(default_factory=set)
    attempted: set[bytes] = field(default_factory=set)  # sent at least once, outcome unknown unless acknowledged
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Report:
    cycles: int
    sent: int
    ok: int
    lost: list[str]
    unexpected: list[str]
    duplicated: list[str]
    recovered: int
    unknown: int
    integrity_failures: list[str]
    client_errors: list[str]
    mode: str = "sqlite"
    seconds: float = 0.0

    @property
    def valid(self) -> bool:
        return not (self.lost or self.unexpected or self.duplicated or self.integrity_failures or self.client_errors)

    def render(self) -> str:
        summary = {
            "valid": self.valid,
            "mode": self.mode,
            "cycles": self.cycles,
            "seconds": round(self.seconds, 1),
            "sent": self.sent,
            "ok": self.ok,
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "duplicated": len(self.duplicated),
            "recovered": self.recovered,
            "unknown": self.unknown,
            "integrity_failures": len(self.integrity_failures),
            "client_errors": len(self.client_errors),
        }
        examples = {
            name: values[:5]
            for name, values in [
                ("lost", self.lost),
                ("unexpected", self.unexpected),
                ("duplicated", self.duplicated),
                ("integrity_failures", self.integrity_failures),
                ("client_errors", self.client_errors),
            ]
            if values
        }
        return json.dumps({**summary, **({"examples": examples} if examples else {})}, indent=2)


def integrity_check(data_dir: Path) -> str:
    """``PRAGMA integrity_check`` on a copy of the database and its WAL (the relay is down); "ok" when sound."""
    with tempfile.TemporaryDirectory() as scratch:
        for suffix in ("", "-wal"):
            source = data_dir / (DB_FILE + suffix)
            if source.exists():
                shutil.copyfile(source, Path(scratch) / (DB_FILE + suffix))
        copy = Path(scratch) / DB_FILE
        if not copy.exists():
            return "ok"  # killed before the database was created
        conn = sqlite3.connect(copy)
        try:
            return "; ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))
        finally:
            conn.close()


def _client(
    number: int, https: list[Http11], sender: Peer, recipients: list[Peer], history: History, stop: threading.Event
) -> None:
    sequence = 0
    while not stop.is_set():
        sequence += 1
        http = https[(sequence + number) % len(https)]  # replicas in turn (PostgreSQL mode)
        value = b"c%02d-%08d" % (number, sequence)
        recipient = recipients[sequence % len(recipients)]
        body = {"envelopes": [{"recipient": recipient.address, "idempotency_key": value, "ciphertext": value}]}
        with history.lock:
            history.attempted.add(value)
        try:
            answer = http.msgpack("POST", "/v1/messages", body, sender.token)
        except (OSError, HTTPException):
            time.sleep(0.02)  # the relay is down; this value's outcome stays unknown
            continue
        if answer.status == 201:
            with history.lock:
                history.acknowledged.add(value)
        elif answer.status != 503:  # 503: starting up or draining, outcome unknown
            with history.lock:
                history.errors.append(f"{value.decode()}: {answer.status} {answer.body[:200]!r}")
            return


def _drain(http: Http11, recipient: Peer) -> list[bytes]:
    received: list[bytes] = []
    after = 0
    while True:
        answer = http.get(f"/v1/inbox?after={after}&limit=1000", recipient.token, codec.MSGPACK)
        assert answer.status == 200, answer.body[:300]
        page = codec.decode(answer.body, InboxPage)
        received += [envelope.ciphertext for envelope in page.envelopes]
        after = page.next_cursor
        if not page.more:
            return received


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A new database on ``server_url``'s server for one run (URL), dropped afterwards."""
    name = f"tl_jepsen_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path="/" + name))
    finally:
        drop_database(server_url, name)


PROGRESS_PER_CYCLE = 5  # acknowledgements awaited before every other kill: 20 cycles give the test's 50
PROGRESS_WAIT_SECONDS = 30.0  # bounds the wait; a relay that serves nothing then fails the test's count instead


def _await_progress(history: History, count: int, timeout: float) -> None:
    """Until ``count`` more sends were acknowledged than now, or ``timeout`` passed."""
    with history.lock:
        target = len(history.acknowledged) + count
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with history.lock:
            if len(history.acknowledged) >= target:
                return
        time.sleep(0.01)


def run(
    cycles: int,
    *,
    clients: int = 4,
    recipients: int = 2,
    seed: int | None = None,
    workdir: Path,
    database: str | None = None,
) -> Report:
    """Run the checker (SQLite, or two replicas on PostgreSQL when ``database`` is a server URL)."""
    if database is None:
        return _run(cycles, clients, recipients, seed, workdir, None)
    with scratch_database(database) as url:
        return _run(cycles, clients, recipients, seed, workdir, url)


def _run(cycles: int, clients: int, recipients: int, seed: int | None, workdir: Path, url: str | None) -> Report:
    started = time.monotonic()
    rng = random.Random(seed)
    shared = ["--database", url, "--name", "jepsen.test"] if url else []
    relay = RelayProcess(workdir / "data", env=NO_RATE_LIMITS, extra_args=shared)
    relay.start()
    replicas = [relay]
    if url:  # a second replica with the same relay key keeps serving while the first is killed
        (workdir / "survivor").mkdir(mode=0o700)
        shutil.copy2(relay.data_dir / "relay.key", workdir / "survivor" / "relay.key")
        replicas.append(RelayProcess(workdir / "survivor", env=NO_RATE_LIMITS, extra_args=shared))
        replicas[1].start()
    https = [Http11(replica.url) for replica in replicas]
    http = https[-1]  # set-up and the final drain go through the replica that is never killed
    senders = [register(http, f"sender{i}") for i in range(clients)]
    inboxes = [register(http, f"recipient{i}") for i in range(recipients)]
    for peer in senders + inboxes:
        login(http, peer)
    history = History()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_client, args=(i, https, sender, inboxes, history, stop), daemon=True)
        for i, sender in enumerate(senders)
    ]
    for thread in threads:
        thread.start()
    integrity_failures: list[str] = []
    try:
        for cycle in range(cycles):
            if cycle % 2 == 0:
                # Every other kill waits for the clients to get through first (a loaded host may restart slowly,
                # and a run where nothing was acknowledged proves nothing); the others stay blind, so some still
                # land during start-up and recovery.
                _await_progress(history, PROGRESS_PER_CYCLE, PROGRESS_WAIT_SECONDS)
                time.sleep(rng.uniform(0.0, 0.35))
            else:
                time.sleep(rng.uniform(0.05, 0.4))
            relay.kill()
            result = "ok" if url else integrity_check(relay.data_dir)
            if result != "ok":
                integrity_failures.append(f"cycle {cycle}: {result}")
            relay.start()  # same port: the clients' URL stays valid
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    delivered: Counter[bytes] = Counter()
    for inbox in inboxes:
        delivered.update(_drain(http, inbox))
    for replica in replicas:
        assert replica.stop() == 0, replica.logs()[-3000:]
    final = "ok" if url else integrity_check(relay.data_dir)
    if final != "ok":
        integrity_failures.append(f"after clean stop: {final}")

    acknowledged, attempted = history.acknowledged, history.attempted
    return Report(
        cycles=cycles,
        sent=len(attempted),
        ok=sum(1 for value in acknowledged if delivered[value] == 1),
        lost=sorted(value.decode() for value in acknowledged if value not in delivered),
        unexpected=sorted(value.decode() for value in delivered if value not in attempted),
        duplicated=sorted(value.decode() for value, count in delivered.items() if count > 1),
        recovered=sum(1 for value in delivered if value in attempted and value not in acknowledged),
        unknown=sum(1 for value in attempted - acknowledged if value not in delivered),
        integrity_failures=integrity_failures,
        client_errors=history.errors,
        mode="postgresql (2 replicas, one killed per cycle)" if url else "sqlite",
        seconds=time.monotonic() - started,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cycles", type=int, default=100, help="kill/restart cycles (default 100)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent sending clients (default 4)")
    parser.add_argument("--recipients", type=int, default=2, help="inboxes sent to (default 2)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill timing")
    parser.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help="PostgreSQL server (postgresql://…, a role that may create databases): two replicas on a scratch database",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tetherless-jepsen-") as workdir:
        report = run(
            args.cycles,
            clients=args.clients,
            recipients=args.recipients,
            seed=args.seed,
            workdir=Path(workdir),
            database=args.database,
        )
    print(report.render())
    return 0 if report.valid else 1


if __name__ == "__main__":
    sys.exit(main())
