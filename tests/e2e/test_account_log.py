"""The account log on real relay processes (docs/account-log.md §3): concurrent appends followed by a live
stream, every kind of bad input with its exact code and an unchanged log, and durability across SIGKILL."""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocol import codec
from protocol.messages import AppendResponse, LogPage, LogRetention, SnapshotRef
from tests.e2e.http11 import Answer, Http11, Peer, login, register
from tests.e2e.test_device_lists import Account, Device, add, remove
from tests.relay.store.postgres_db import fresh_database
from tests.relay_process import RelayProcess

NO_RATE_LIMITS = {
    "TETHERLESS_RATE_IP_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0",
}


def rec(
    record_id: bytes, kind: str = "event", epoch: int = 1, ciphertext: bytes = b"sealed", **extra: Any
) -> dict[str, Any]:
    return {"record_id": record_id, "kind": kind, "epoch": epoch, "ciphertext": ciphertext, **extra}


def append(client: Http11, dev: Peer, records: list[dict[str, Any]], expected_head: int | None = None) -> Answer:
    body: dict[str, Any] = {"records": records}
    if expected_head is not None:
        body["expected_head"] = expected_head
    return client.msgpack("POST", "/v1/log", body, dev.token)


def genesis_key(client: Http11, dev: Peer, list_version: int = 1) -> None:
    """Epoch 1 of the account key: the key record the genesis device writes first (§5.4)."""
    answer = append(client, dev, [rec(os.urandom(16), "key", 1, b"grants", device_list_version=list_version)], 0)
    assert answer.status == 201, answer.body


def read_all(client: Http11, dev: Peer, parts: str = "full") -> LogPage:
    """Every record of the log (paged), with the last page's header."""
    after, records = 0, []
    while True:
        answer = client.get(f"/v1/log?after={after}&parts={parts}", dev.token, accept=codec.MSGPACK)
        assert answer.status == 200, answer.body
        page = codec.decode(answer.body, LogPage)
        records += page.records
        after = page.next_after
        if not page.more:
            return LogPage(
                records=records, next_after=after, head=page.head, horizon=page.horizon, more=False,
                snapshot=page.snapshot,
            )  # fmt: skip


class LogStreamReader(threading.Thread):
    """Follows ``GET /v1/log/stream`` (JSON Lines) from a position, collecting records and heartbeats."""

    def __init__(self, url: str, token: str, after: int = 0) -> None:
        super().__init__(daemon=True)
        self.host, port = url.rsplit("/", 1)[1].split(":")
        self.port = int(port)
        self.token = token
        self.after = after
        self.records: list[dict[str, Any]] = []
        self.heartbeats: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self._conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        conn = self._conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(
                "GET",
                f"/v1/log/stream?after={self.after}",
                headers={"accept": codec.JSON_LINES, "authorization": f"Bearer {self.token}"},
            )
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            self.connected.set()
            while True:
                line = resp.readline()
                if not line:
                    return
                item = json.loads(line)
                with self.changed:
                    (self.records if item["type"] == "record" else self.heartbeats).append(item)
                    self.changed.notify_all()
        except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: closed under a read
            self.error = exc
        finally:
            conn.close()
            with self.changed:
                self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` records arrived (the timeout only guards against a hang)."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.records) >= count or not self.is_alive(), timeout)
        assert len(self.records) >= count, (len(self.records), count, self.error)

    def close(self) -> None:
        conn = self._conn
        if conn is not None and conn.sock is not None:
            conn.sock.shutdown(socket.SHUT_RDWR)
        self.join(timeout=10)


@pytest.fixture(params=["sqlite", "postgres"])
def relays(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[RelayProcess]]:
    """SQLite: one relay. PostgreSQL: two replicas of one relay on a fresh database, so appends made through
    one wake streams on the other (NOTIFY tetherless_log). Heartbeats are too slow to hide a lost wake-up."""
    env = {"TETHERLESS_STREAM_HEARTBEAT_SECONDS": "30", **NO_RATE_LIMITS}
    processes: list[RelayProcess] = []
    if request.param == "sqlite":
        process = RelayProcess(tmp_path / "data", env=env)
        process.start()
        try:
            yield [process]
        finally:
            assert process.stop() == 0
        return
    with fresh_database("tl_e2e") as url:
        try:
            for i in range(2):
                data = tmp_path / f"replica{i}"
                if processes:
                    data.mkdir(mode=0o700)
                    shutil.copy2(processes[0].data_dir / "relay.key", data / "relay.key")
                process = RelayProcess(data, extra_args=["--database", url, "--name", "log.test"], env=env)
                process.start()
                processes.append(process)
            yield processes
        finally:
            for process in processes:
                process.stop()


def test_concurrent_appends_over_http_with_a_live_stream(relays: list[RelayProcess]) -> None:
    """Acceptance: several devices of one account append at once while a stream follows; no record is lost,
    duplicated, or skipped by a cursor, positions are dense, and a resumed stream continues after its position."""
    first = Http11(relays[0].url)
    account = Account(first, relays[0].name)
    devices = [account.first]
    writers_n, appends = 6, 15
    for _ in range(writers_n - 1):
        new = Device()
        account.accept(add(account, new, account.first))
        devices.append(new)
    tokens = [device.peer(account.id, relays[0].name) for device in devices]
    for i, peer in enumerate(tokens):
        login(Http11(relays[i % len(relays)].url), peer)
    alice = tokens[0]
    genesis_key(first, alice, list_version=account.head.version)
    reader = LogStreamReader(relays[0].url, alice.token)
    reader.start()
    assert reader.connected.wait(30)
    accepted: list[list[tuple[bytes, int]]] = [[] for _ in range(writers_n)]
    failures: list[str] = []

    def writer(index: int) -> None:
        client = Http11(relays[(index + 1) % len(relays)].url)  # PostgreSQL: the other replica than the reader
        rng = random.Random(index)
        for _ in range(appends):
            batch = [rec(os.urandom(16), ciphertext=os.urandom(rng.randint(1, 300))) for _ in range(rng.randint(1, 3))]
            answer = append(client, tokens[index], batch)
            if answer.status != 201:
                failures.append(f"{answer.status} {answer.body[:200]!r}")
                return
            result = codec.decode(answer.body, AppendResponse)
            positions = [r.position for r in result.results]
            if positions != list(range(positions[0], positions[0] + len(batch))):
                failures.append(f"batch not at consecutive positions: {positions}")
            accepted[index] += [(r["record_id"], p) for r, p in zip(batch, positions, strict=True)]

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    total = 1 + sum(len(a) for a in accepted)
    reader.wait_for(total)
    reader.close()
    streamed = [(item["position"], base64.b64decode(item["record_id"])) for item in reader.records]
    assert [p for p, _ in streamed] == list(range(1, total + 1))  # in order, each once, none skipped
    log = read_all(Http11(relays[-1].url), alice)
    assert [(r.position, r.record_id) for r in log.records] == streamed
    assert log.head == total
    by_id = {record_id: position for position, record_id in streamed}
    for written in accepted:
        for record_id, position in written:
            assert by_id[record_id] == position  # every 201 is in the log, where the relay said
    # Resuming from any position continues exactly after it.
    resumed = LogStreamReader(relays[-1].url, alice.token, after=total - 3)
    resumed.start()
    resumed.wait_for(3)
    resumed.close()
    assert [item["position"] for item in resumed.records] == [total - 2, total - 1, total]


def test_heartbeats_carry_the_head_and_parts_are_stubbed(tmp_path: Path) -> None:
    process = RelayProcess(tmp_path / "data", env={"TETHERLESS_STREAM_HEARTBEAT_SECONDS": "0.2"})
    process.start()
    try:
        client = Http11(process.url)
        alice = register(client, "alice")
        login(client, alice)
        genesis_key(client, alice)
        snap = os.urandom(16)
        parts = [rec(os.urandom(16), "snapshot_part", ciphertext=b"P" * 500, snapshot_id=snap) for _ in range(2)]
        manifest = rec(os.urandom(16), "snapshot", ciphertext=b"M", snapshot_id=snap, covers=1, parts=2)
        assert append(client, alice, [*parts, manifest]).status == 201
        reader = LogStreamReader(process.url, alice.token)
        reader.start()
        reader.wait_for(4)
        with reader.changed:
            assert reader.changed.wait_for(lambda: len(reader.heartbeats) >= 1, 30)
        reader.close()
        assert reader.heartbeats[0]["head"] == 4
        assert [(base64.b64decode(r["ciphertext"]), r["size"]) for r in reader.records[1:3]] == [(b"", 500)] * 2
        ref = codec.decode(client.get("/v1/log/snapshot", alice.token, accept=codec.MSGPACK).body, SnapshotRef)
        assert (ref.snapshot_id, ref.position, ref.covers, ref.parts) == (snap, 4, 1, 2)
        answer = client.get(f"/v1/log/snapshot/{snap.hex()}", alice.token, accept=codec.MSGPACK)
        page = codec.decode(answer.body, LogPage)
        assert [(r.position, r.ciphertext) for r in page.records] == [(2, b"P" * 500), (3, b"P" * 500)]
        stubbed = codec.decode(client.get("/v1/log?parts=stub", alice.token, accept=codec.MSGPACK).body, LogPage)
        assert [r.ciphertext for r in stubbed.records[1:3]] == [b"", b""]
        header = codec.decode(client.get("/v1/log?limit=0", alice.token, accept=codec.MSGPACK).body, LogPage)
        assert (header.records, header.head, header.snapshot) == ([], 4, ref)
        # Retention round trip.
        answer = client.msgpack("PUT", "/v1/log/retention", {"mode": "days", "days": 30}, alice.token)
        assert answer.status == 200, answer.body
        got = codec.decode(client.get("/v1/log/retention", alice.token, accept=codec.MSGPACK).body, LogRetention)
        assert (got.mode, got.days, got.horizon) == ("days", 30, 0)
    finally:
        assert process.stop() == 0


def test_appends_answered_201_survive_sigkill(tmp_path: Path) -> None:
    process = RelayProcess(tmp_path / "data", env=NO_RATE_LIMITS)
    process.start()
    try:
        client = Http11(process.url)
        alice = register(client, "alice")
        login(client, alice)
        genesis_key(client, alice)
        acknowledged: list[bytes] = []
        for i in range(20):
            batch = [rec(os.urandom(16), ciphertext=b"%d" % i) for _ in range(5)]
            assert append(client, alice, batch).status == 201
            acknowledged += [r["record_id"] for r in batch]
        process.kill()
        process.start()
        log = read_all(Http11(process.url), alice)
        assert [r.record_id for r in log.records[1:]] == acknowledged
        assert [r.position for r in log.records] == list(range(1, 102))
        after = append(Http11(process.url), alice, [rec(acknowledged[0]), rec(os.urandom(16))])
        result = codec.decode(after.body, AppendResponse)
        assert [(r.position, r.duplicate) for r in result.results] == [(2, True), (102, False)]
    finally:
        process.stop()


# -- bad input: exact codes, and the log is unchanged ----------------------------------------------

LIMITS = {
    "TETHERLESS_MAX_BODY_BYTES": "65536",
    "TETHERLESS_MAX_ENVELOPE_BYTES": "65536",
    "TETHERLESS_MAX_LOG_RECORD_BYTES": "1000",
    "TETHERLESS_MAX_LOG_BATCH_RECORDS": "4",
    "TETHERLESS_MAX_PAGE_LOG_RECORDS": "50",
    "TETHERLESS_MAX_LOG_BYTES": "3000",
    "TETHERLESS_MAX_RETENTION_DAYS": "365",
    **NO_RATE_LIMITS,
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Http11]:
    process = RelayProcess(tmp_path_factory.mktemp("log-bad-input") / "data", env=LIMITS)
    process.start()
    try:
        yield Http11(process.url)
    finally:
        assert process.stop() == 0


@pytest.fixture(scope="module")
def carol(limited: Http11) -> Peer:
    dev = register(limited, "carol")
    login(limited, dev)
    genesis_key(limited, dev)
    assert append(limited, dev, [rec(b"R" * 16)]).status == 201
    return dev


def unchanged(client: Http11, dev: Peer, answer: Answer, status: int, code: str) -> dict[str, Any]:
    """``answer`` is the problem (status, code) and the log still holds exactly the two setup records."""
    assert (answer.status, answer.code) == (status, code), answer.body
    log = read_all(client, dev)
    assert [r.position for r in log.records] == [1, 2]
    assert log.head == 2
    assert log.records[1].record_id == b"R" * 16
    return answer.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (codec.MSGPACK, b"\xc1"),
        (codec.MSGPACK, b"\x81\xa7records"),
        (codec.JSON, b'{"records": [}'),
    ],
)
def test_malformed_body(limited: Http11, carol: Peer, content_type: str, body: bytes) -> None:
    headers = {"content-type": content_type, "authorization": f"Bearer {carol.token}"}
    unchanged(limited, carol, limited.request("POST", "/v1/log", body, headers), 400, "malformed_body")


@pytest.mark.parametrize(
    "records",
    [
        [rec(b"short")],  # record id not 16 bytes
        [rec(os.urandom(16), kind="message")],  # unknown kind
        [rec(os.urandom(16), epoch=0)],
        [rec(os.urandom(16), ciphertext=b"")],
        [rec(os.urandom(16), snapshot_id=b"S" * 16)],  # header field of another kind
        [rec(os.urandom(16), "snapshot_part")],  # part without snapshot_id
        [rec(b"D" * 16), rec(b"D" * 16)],  # duplicate ids in one batch
        [],
    ],
)
def test_invalid_records(limited: Http11, carol: Peer, records: list[dict[str, Any]]) -> None:
    unchanged(limited, carol, append(limited, carol, records), 422, "invalid_field")


def test_key_record_needs_expected_head(limited: Http11, carol: Peer) -> None:
    answer = append(limited, carol, [rec(os.urandom(16), "key", 2, device_list_version=1)])
    unchanged(limited, carol, answer, 422, "invalid_field")


def test_record_and_batch_too_large(limited: Http11, carol: Peer) -> None:
    answer = append(limited, carol, [rec(os.urandom(16)), rec(os.urandom(16), ciphertext=b"x" * 1001)])
    unchanged(limited, carol, answer, 413, "record_too_large")
    answer = append(limited, carol, [rec(os.urandom(16)) for _ in range(5)])
    unchanged(limited, carol, answer, 413, "batch_too_large")
    answer = append(limited, carol, [rec(os.urandom(16), ciphertext=b"x" * 70_000)])
    unchanged(limited, carol, answer, 413, "body_too_large")


def test_stale_expected_head_answers_the_head(limited: Http11, carol: Peer) -> None:
    problem = unchanged(limited, carol, append(limited, carol, [rec(os.urandom(16))], 1), 409, "log_conflict")
    assert problem["head"] == 2


def test_stale_epoch_answers_the_epoch(limited: Http11, carol: Peer) -> None:
    problem = unchanged(limited, carol, append(limited, carol, [rec(os.urandom(16), epoch=2)]), 409, "log_epoch_stale")
    assert problem["epoch"] == 1
    answer = append(limited, carol, [rec(os.urandom(16), "key", 3, device_list_version=1)], 2)
    assert unchanged(limited, carol, answer, 409, "log_epoch_stale")["epoch"] == 1


def test_incomplete_snapshot(limited: Http11, carol: Peer) -> None:
    snap = os.urandom(16)
    batch = [
        rec(os.urandom(16), "snapshot_part", snapshot_id=snap),
        rec(os.urandom(16), "snapshot", snapshot_id=snap, covers=1, parts=2),
    ]
    unchanged(limited, carol, append(limited, carol, batch), 422, "snapshot_incomplete")
    answer = limited.get("/v1/log/snapshot", carol.token)
    unchanged(limited, carol, answer, 404, "no_snapshot")
    answer = limited.get(f"/v1/log/snapshot/{snap.hex()}", carol.token)
    unchanged(limited, carol, answer, 404, "no_snapshot")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/log?after=-1",
        "/v1/log?after=x",
        "/v1/log?limit=51",
        "/v1/log?parts=some",
        "/v1/log/stream?after=1.5",
        "/v1/log/snapshot/" + "ab" * 16 + "?limit=99",
    ],
)
def test_bad_queries(limited: Http11, carol: Peer, path: str) -> None:
    unchanged(limited, carol, limited.get(path, carol.token), 400, "invalid_query")


def test_no_token(limited: Http11, carol: Peer) -> None:
    for method, path in (("GET", "/v1/log"), ("GET", "/v1/log/stream"), ("GET", "/v1/log/retention")):
        answer = limited.request(method, path, None, {"accept": codec.JSON})
        unchanged(limited, carol, answer, 401, "missing_token")
    answer = limited.request("POST", "/v1/log", codec.encode({"records": [rec(os.urandom(16))]}),
                             {"content-type": codec.MSGPACK})  # fmt: skip
    unchanged(limited, carol, answer, 401, "missing_token")
    bad = {"authorization": "Bearer tl_nonsense", "accept": codec.JSON}
    unchanged(limited, carol, limited.request("GET", "/v1/log", None, bad), 401, "invalid_token")


@pytest.mark.parametrize(
    "body",
    [{"mode": "days"}, {"mode": "days", "days": 366}, {"mode": "days", "days": 0}, {"mode": "forever", "days": 5},
     {"mode": "weeks", "days": 5}],
)  # fmt: skip
def test_bad_retention(limited: Http11, carol: Peer, body: dict[str, Any]) -> None:
    unchanged(limited, carol, limited.msgpack("PUT", "/v1/log/retention", body, carol.token), 422, "invalid_field")
    got = codec.decode(limited.get("/v1/log/retention", carol.token, accept=codec.MSGPACK).body, LogRetention)
    assert (got.mode, got.days) == ("forever", None)


def test_quota(limited: Http11) -> None:
    dave = register(limited, "dave")
    login(limited, dave)
    genesis_key(limited, dave)  # 6 bytes
    for _ in range(2):
        assert append(limited, dave, [rec(os.urandom(16), ciphertext=b"q" * 997)]).status == 201
    before = read_all(limited, dave)
    over = [rec(os.urandom(16), ciphertext=b"q" * 600), rec(os.urandom(16), ciphertext=b"q" * 401)]
    answer = append(limited, dave, over)  # 6 + 1994 + 1001 > 3000
    assert (answer.status, answer.code) == (507, "log_quota")
    assert read_all(limited, dave) == before
    assert append(limited, dave, [rec(os.urandom(16), ciphertext=b"q" * 1000)]).status == 201  # exactly 3000


def test_accounts_have_separate_logs(limited: Http11, carol: Peer) -> None:
    erin = register(limited, "erin")
    login(limited, erin)
    assert read_all(limited, erin).records == []
    genesis_key(limited, erin)
    assert append(limited, erin, [rec(b"R" * 16)]).status == 201  # the same id as carol's record: not a duplicate
    log = read_all(limited, erin)
    assert [r.position for r in log.records] == [1, 2]
    theirs = read_all(limited, carol)
    assert [r.position for r in theirs.records] == [1, 2]
    assert theirs.head == 2


def test_revocation_closes_the_log_and_requires_a_new_epoch(tmp_path: Path) -> None:
    """L8 and §5.4: a revoked device loses the log (401 device_revoked, its open stream ends), and nothing more
    is written under the old key until a key record for a new epoch names the revoking list version."""
    process = RelayProcess(tmp_path / "data", env={"TETHERLESS_STREAM_HEARTBEAT_SECONDS": "0.2", **NO_RATE_LIMITS})
    process.start()
    try:
        http = Http11(process.url)
        account = Account(http, process.name)
        lost = Device()
        account.accept(add(account, lost, account.first))
        keeper, thief = account.first.peer(account.id, process.name), lost.peer(account.id, process.name)
        login(http, keeper)
        login(http, thief)
        genesis_key(http, keeper, list_version=2)
        assert append(http, thief, [rec(os.urandom(16))]).status == 201  # a current device may append
        stream = LogStreamReader(process.url, thief.token)
        stream.start()
        stream.wait_for(2)
        revoking = account.accept(remove(account, lost, account.first)).version
        stream.join(timeout=30)
        assert not stream.is_alive()  # the open stream ended
        assert [item["position"] for item in stream.records] == [1, 2]
        for answer in (
            http.get("/v1/log", thief.token),
            http.get("/v1/log/stream", thief.token),
            append(http, thief, [rec(os.urandom(16))]),
        ):
            assert (answer.status, answer.code) == (401, "device_revoked")
        assert read_all(http, keeper).head == 2
        # Only a key record for epoch 2 naming the revoking version (or later) goes in now.
        answer = append(http, keeper, [rec(os.urandom(16))])
        assert (answer.status, answer.code) == (409, "log_rekey_required")
        answer = append(http, keeper, [rec(os.urandom(16), "key", 2, device_list_version=revoking - 1)], 2)
        assert (answer.status, answer.code) == (409, "log_rekey_required")
        answer = append(http, keeper, [rec(os.urandom(16), "key", 1, device_list_version=revoking)], 2)
        assert (answer.status, answer.code) == (409, "log_rekey_required")  # grant-only is not enough
        assert read_all(http, keeper).head == 2
        answer = append(http, keeper, [rec(os.urandom(16), "key", 2, device_list_version=revoking)], 2)
        assert answer.status == 201, answer.body
        assert append(http, keeper, [rec(os.urandom(16), epoch=2)]).status == 201
        answer = append(http, keeper, [rec(os.urandom(16), epoch=1)])
        assert (answer.status, answer.code, answer.json()["epoch"]) == (409, "log_epoch_stale", 2)
        assert read_all(http, keeper).head == 4
    finally:
        assert process.stop() == 0
