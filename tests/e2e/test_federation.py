"""Federation end to end: real relay processes on loopback deliver to each other (docs/federation.md).

- three relays (own ports, data dirs and names, a static resolver via --peer)
  whose users exchange messages through the SDK, sender verification included;
- multi-device fan-out to a remote account;
- SIGKILL of the receiving and of the sending relay while others keep
  sending; a receiving peer that answers 5xx, hangs, or processes and then
  drops the answer: every acknowledged envelope arrives exactly once;
- unsigned, wrongly signed, stale, replayed, wrong-destination, tampered and
  oversized federation requests are refused with their codes and leave no
  trace in the receiver's store.
"""

from __future__ import annotations

import base64
import http.client
import os
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nacl.public
import nacl.signing
import pytest
import trio

from protocol import codec, device_list, federation
from protocol.client.keystore import DeviceKeys
from protocol.client.sdk import ReceivedMessage, RelayClient
from protocol.ids import Address, account_id_for, device_id_for
from protocol.messages import DeliverRequest, DeliverResponse, FederatedEnvelope, InboxPage, SignedDeviceList
from tests.e2e.http11 import Http11, Peer, login, register
from tests.relay_process import RelayProcess

FAST = {
    "TETHERLESS_FEDERATION_POLL_SECONDS": "0.3",
    "TETHERLESS_FEDERATION_RETRY_MIN_SECONDS": "0.1",
    "TETHERLESS_FEDERATION_RETRY_MAX_SECONDS": "0.8",
    # Long enough that a loaded host's slow delivery is not cut off (it would come back "duplicate"); the test
    # with a hanging peer sets its own.
    "TETHERLESS_FEDERATION_TIMEOUT_SECONDS": "10",
    "TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Mesh:
    relays: dict[str, RelayProcess]

    def __getitem__(self, name: str) -> RelayProcess:
        return self.relays[name]


@contextmanager
def mesh(
    tmp_path: Path, names: list[str], *, urls: dict[str, str] | None = None, env: dict[str, str] | None = None
) -> Iterator[Mesh]:
    """Relays named ``names`` that know each other (``urls`` overrides where one is reached).

    Every relay must name the others' ports when it starts, so the ports are chosen first and bound a moment
    later; another process may take one in between. A start that fails then is tried again on fresh ports (in
    fresh data directories), up to three times."""
    for attempt in range(3):
        ports = {name: free_port() for name in names}
        addresses = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()} | (urls or {})
        relays = {}
        for name in names:
            peers = [f"--peer={other}={addresses[other]}" for other in names if other != name]
            relays[name] = RelayProcess(
                tmp_path / f"{name}-{attempt}" if attempt else tmp_path / name,
                port=ports[name],
                extra_args=["--name", name, *peers],
                env={**FAST, **(env or {})},
            )
        try:
            for relay in relays.values():
                relay.start()
        except RuntimeError:
            logs = [r.log_path.read_text(errors="replace") for r in relays.values() if r.log_path.exists()]
            busy = any("already in use" in text for text in logs)
            for relay in relays.values():
                relay.stop()
            if busy and attempt < 2:
                continue
            raise
        try:
            yield Mesh(relays)
        finally:
            for relay in relays.values():
                relay.stop()
        return


async def wait_for_messages(client: RelayClient, count: int, timeout: float = 20.0) -> list[ReceivedMessage]:
    got: list[ReceivedMessage] = []
    after = 0
    with trio.fail_after(timeout):
        while len(got) < count:
            batch = await client.fetch(after)
            for item in batch.items:
                assert isinstance(item, ReceivedMessage), item
                got.append(item)
            after = batch.next_cursor
            if len(got) < count:
                await trio.sleep(0.1)
    return got


def keys(client: RelayClient) -> DeviceKeys:
    assert client.keys is not None
    return client.keys


async def test_three_relays_exchange_messages(tmp_path: Path) -> None:
    names = ["a.test", "b.test", "c.test"]
    with mesh(tmp_path, names) as m:
        async with (
            RelayClient.connect(m["a.test"].url) as ann,
            RelayClient.connect(m["b.test"].url) as ben,
            RelayClient.connect(m["c.test"].url) as cat,
        ):
            users = {"a.test": ann, "b.test": ben, "c.test": cat}
            for name, client in users.items():
                await client.register(name.split(".")[0])
                assert Address.parse(keys(client).address).relay == name
            for name, sender in users.items():
                for other, recipient in users.items():
                    if other != name:
                        # device address one way, account address the other: both route by the relay part
                        await sender.send(keys(recipient).address, f"{name} to {other} (device)")
                        account = str(Address.parse(keys(recipient).address).account) + "@" + other
                        await sender.send(account, f"{name} to {other} (account)")
            for name, client in users.items():
                got = await wait_for_messages(client, 4)
                texts = sorted(message.text or "" for message in got)
                senders = {message.sender for message in got}
                others = [o for o in names if o != name]
                assert texts == sorted(f"{o} to {name} ({kind})" for o in others for kind in ("account", "device"))
                assert senders == {keys(users[o]).address for o in others}  # verified via the remote device lists
                await client.ack(up_to=max(message.cursor for message in got))
            # The recipient can read a message before the sender's relay has settled its outbox row: wait for it.
            metrics = ""
            with trio.fail_after(20):
                while 'relay_federation_outbox_depth{peer="b.test"} 0.0' not in metrics:
                    await trio.sleep(0.1)
                    metrics = Http11(m["a.test"].url).get("/metrics").body.decode()
            assert 'relay_federation_envelopes_total{direction="out",outcome="stored",peer="b.test"}' in metrics
            discovery = Http11(m["a.test"].url).get("/.well-known/tetherless").json()
            assert discovery["federation_endpoint"] == "/federation/v1"
            assert discovery["relay_keys"][0]["key_id"] == federation.relay_key_id(
                base64.b64decode(discovery["relay_key"])
            )


def enroll_second_device(db: Path, first: DeviceKeys, *, now_ms: int) -> DeviceKeys:
    """Version 2 of ``first``'s device list, adding a new device, signed by ``first`` — written straight into
    the relay's database (the relay has no enrolment endpoint yet; the chain is what clients verify)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        (blob,) = conn.execute(
            "SELECT signed FROM device_lists WHERE account_id = ? AND version = 1", (first.account_id,)
        ).fetchone()
        genesis = codec.decode(blob, SignedDeviceList)
        signing_key = nacl.signing.SigningKey.generate()
        box = nacl.public.PrivateKey.generate()
        entry = device_list.device_entry(
            bytes(signing_key.verify_key), bytes(box.public_key), name="second", added_at_ms=now_ms
        )
        v2 = device_list.DeviceList(
            account_id=first.account_id,
            version=2,
            prev_hash=device_list.list_hash(genesis.device_list),
            created_at_ms=now_ms,
            devices=[*genesis.device_list.devices, entry],
        )
        signature = device_list.signing.sign(first.signing_key, device_list.list_layout(v2))
        signed = SignedDeviceList(
            device_list=v2,
            signatures=[device_list.DeviceListSignature(device_id=first.device_id, signature=signature)],
        )
        with conn:
            conn.execute(
                "INSERT INTO device_lists (account_id, version, signed, stored_at_ms) VALUES (?, 2, ?, ?)",
                (first.account_id, codec.encode(signed), now_ms),
            )
            conn.execute("UPDATE accounts SET list_version = 2 WHERE account_id = ?", (first.account_id,))
            conn.execute(
                "INSERT INTO devices (device_id, account_id, sign_key, box_key, created_at_ms) VALUES (?, ?, ?, ?, ?)",
                (entry.device_id, first.account_id, entry.sign_key, entry.box_key, now_ms),
            )
    finally:
        conn.close()
    assert entry.device_id == device_id_for(bytes(signing_key.verify_key))
    assert first.account_id != account_id_for(bytes(signing_key.verify_key))
    relay = Address.parse(first.address).relay
    return DeviceKeys(
        signing_seed=bytes(signing_key),
        box_private_key=bytes(box),
        relay_url=first.relay_url,
        account_id=first.account_id,
        device_id=entry.device_id,
        address=str(Address(account=first.account_id, relay=relay, device=entry.device_id)),
        device_name="second",
        ca_file=None,
    )


async def test_the_outbox_depth_gauge_drops_after_delivery_not_at_the_next_poll(tmp_path: Path) -> None:
    """The delivery worker refreshes ``relay_federation_outbox_depth`` when a pass delivered something; with a poll
    interval far beyond the test's wait, only that refresh can bring the gauge back to 0."""
    slow_poll = {"TETHERLESS_FEDERATION_POLL_SECONDS": "600"}
    with mesh(tmp_path, ["a.test", "b.test"], env=slow_poll) as m:
        async with RelayClient.connect(m["a.test"].url) as ann, RelayClient.connect(m["b.test"].url) as ben:
            await ann.register("ann")
            await ben.register("ben")
            await ann.send(keys(ben).address, "counted out and back")
            (message,) = await wait_for_messages(ben, 1)
            assert message.text == "counted out and back"
            gauge = 'relay_federation_outbox_depth{peer="b.test"} 0.0'
            metrics = ""
            with trio.fail_after(20):
                while gauge not in metrics:
                    await trio.sleep(0.1)
                    metrics = Http11(m["a.test"].url).get("/metrics").body.decode()
            assert 'relay_federation_envelopes_total{direction="out",outcome="stored",peer="b.test"} 1.0' in metrics


async def test_send_to_a_remote_account_reaches_every_device(tmp_path: Path) -> None:
    with mesh(tmp_path, ["a.test", "b.test"]) as m:
        async with RelayClient.connect(m["a.test"].url) as ann, RelayClient.connect(m["b.test"].url) as ben:
            await ann.register("ann")
            await ben.register("ben-phone", list_format=1)  # enroll_second_device writes a format-1 version
            laptop_keys = enroll_second_device(
                m["b.test"].data_dir / "relay.sqlite3", keys(ben), now_ms=int(time.time() * 1000)
            )
            async with RelayClient.connect(m["b.test"].url, keys=laptop_keys) as laptop:
                account = f"{keys(ben).account_id}@b.test"
                sent = await ann.send(account, "to all of ben's devices")
                assert sorted(s.recipient for s in sent) == sorted([keys(ben).address, laptop_keys.address])
                for device in (ben, laptop):
                    (message,) = await wait_for_messages(device, 1)
                    assert (message.text, message.sender) == ("to all of ben's devices", keys(ann).address)
                # and back: the laptop (enrolled by the phone, not a genesis device) is a verified sender
                await laptop.send(keys(ann).address, "from the laptop")
                (reply,) = await wait_for_messages(ann, 1)
                assert (reply.text, reply.sender) == ("from the laptop", laptop_keys.address)


# -- durability: crashes, 5xx, hangs ------------------------------------------------------------------


class Sender:
    """Posts batches of opaque envelopes to its own relay, retrying each batch with the same keys until 201."""

    def __init__(self, relay: RelayProcess, peer: Peer, recipients: list[str], tag: str) -> None:
        self.http = Http11(relay.url)
        self.peer = peer
        self.recipients = recipients
        self.tag = tag
        self.acknowledged: list[bytes] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        batch_no = 0
        while not self.stop.is_set():
            batch = [
                {
                    "recipient": recipient,
                    "idempotency_key": f"{self.tag}-{batch_no}-{j}".encode().ljust(8, b"."),
                    "ciphertext": f"{self.tag}-{batch_no}-{j}".encode(),
                }
                for j, recipient in enumerate(self.recipients)
            ]
            while True:
                try:
                    answer = self.http.msgpack("POST", "/v1/messages", {"envelopes": batch}, self.peer.token)
                except (OSError, http.client.HTTPException):
                    if self.stop.wait(0.05):
                        return
                    continue
                if answer.status == 201:
                    self.acknowledged += [e["ciphertext"] for e in batch]  # type: ignore[misc]
                    break
                if answer.status == 503:
                    time.sleep(0.05)
                    continue
                self.errors.append(f"{answer.status}: {answer.body[:200]!r}")
                return
            batch_no += 1
            time.sleep(0.01)

    def __enter__(self) -> Sender:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def drain_inbox(relay: RelayProcess, peer: Peer, expected: set[bytes], timeout: float = 30.0) -> Counter[bytes]:
    """Read (without acknowledging) until every expected ciphertext is there or the time is up."""
    http = Http11(relay.url)
    deadline = time.monotonic() + timeout
    while True:
        received: Counter[bytes] = Counter()
        after = 0
        while True:
            answer = http.get(f"/v1/inbox?after={after}", peer.token, codec.MSGPACK)
            assert answer.status == 200, answer.body
            page = codec.decode(answer.body, InboxPage)
            received.update(env.ciphertext for env in page.envelopes)
            after = page.next_cursor
            if not page.more:
                break
        if expected <= set(received) or time.monotonic() > deadline:
            return received
        time.sleep(0.2)


def check_exactly_once(received: Counter[bytes], acknowledged: list[bytes]) -> None:
    duplicates = {ct: n for ct, n in received.items() if n > 1}
    assert not duplicates, f"delivered more than once: {list(duplicates)[:5]}"
    missing = [ct for ct in acknowledged if ct not in received]
    assert not missing, f"{len(missing)} acknowledged envelopes lost, e.g. {missing[:3]}"
    assert len(set(acknowledged)) == len(acknowledged)


@pytest.mark.slow
def test_sigkill_of_receiving_and_sending_relays_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    with mesh(tmp_path, ["a.test", "b.test", "c.test"]) as m:
        a, b, c = m["a.test"], m["b.test"], m["c.test"]
        ann, ben, bea, cid = (
            register(Http11(a.url), "ann"),
            register(Http11(b.url), "ben"),
            register(Http11(b.url), "bea"),
            register(Http11(c.url), "cid"),
        )
        for relay, peer in ((a, ann), (b, ben), (b, bea), (c, cid)):
            login(Http11(relay.url), peer)
        targets = [ben.address, bea.address]
        with Sender(a, ann, targets, "ann") as from_a, Sender(c, cid, targets, "cid") as from_c:
            time.sleep(0.5)
            b.kill()  # the receiving relay dies; a and c keep accepting sends for it
            time.sleep(1.5)
            a.kill()  # a sending relay dies with a full outbox
            a.start()
            time.sleep(1.0)
            b.start()
            time.sleep(1.0)
            b.kill()  # and once more, mid-delivery
            b.start()
            time.sleep(1.0)
        for sender in (from_a, from_c):
            assert not sender.errors, sender.errors
            assert len(sender.acknowledged) >= 40, "the sender barely got through; the test proves little"
        acknowledged = from_a.acknowledged + from_c.acknowledged
        for peer in (ben, bea):
            mine = {ct for i, ct in enumerate(acknowledged) if i % 2 == targets.index(peer.address)}
            check_exactly_once(drain_inbox(b, peer, mine), sorted(mine))


class FakePeer:
    """A stand-in for relay b between a and b: answers 503, hangs, or forwards to b and drops b's answer.

    ``mode`` can change while it runs: "503", "hang", "drop" (forward, then close without answering),
    "forward" (a faithful proxy).
    """

    def __init__(self, port: int, upstream_port: int) -> None:
        self.mode = "503"
        self.upstream_port = upstream_port
        self.requests: Counter[str] = Counter()
        self.listener = socket.create_server(("127.0.0.1", port))
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while True:
                    raw = b""
                    while b"\r\n\r\n" not in raw:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        raw += chunk
                    head, _, body = raw.partition(b"\r\n\r\n")
                    lines = head.decode("latin-1").split("\r\n")
                    method, path, _ = lines[0].split(" ", 2)
                    headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
                    length = int(next(v for k, v in headers if k.lower() == "content-length"))
                    while len(body) < length:
                        body += conn.recv(65536)
                    mode = self.mode
                    self.requests[mode] += 1
                    if mode == "503":
                        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
                        continue
                    if mode == "hang":
                        self.closed.wait(30)
                        return
                    upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=10)
                    upstream.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                    for key, value in headers:
                        upstream.putheader(key, value)
                    upstream.endheaders(body)
                    answer = upstream.getresponse()
                    data = answer.read()
                    upstream.close()
                    if mode == "drop":
                        return  # b stored the batch; a never hears about it
                    kept = [(k, v) for k, v in answer.getheaders() if k.lower() not in ("content-length", "connection")]
                    out = f"HTTP/1.1 {answer.status} {answer.reason}\r\n".encode()
                    out += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in kept)
                    out += f"content-length: {len(data)}\r\n\r\n".encode() + data
                    conn.sendall(out)
            except (OSError, StopIteration, ValueError):
                return


@pytest.mark.slow
def test_peer_answering_5xx_hanging_or_dropping_answers_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    proxy_port = free_port()
    hang_briefly = {"TETHERLESS_FEDERATION_TIMEOUT_SECONDS": "2"}  # every mode below lasts 2.5 s
    with mesh(tmp_path, ["a.test", "b.test"], urls={"b.test": f"http://127.0.0.1:{proxy_port}"}, env=hang_briefly) as m:
        a, b = m["a.test"], m["b.test"]
        fake = FakePeer(proxy_port, b.port)
        try:
            ann, ben = register(Http11(a.url), "ann"), register(Http11(b.url), "ben")
            login(Http11(a.url), ann)
            login(Http11(b.url), ben)
            with Sender(a, ann, [ben.address], "ann") as sender:
                for mode in ("503", "hang", "drop", "forward"):
                    fake.mode = mode
                    time.sleep(2.5)
            assert not sender.errors, sender.errors
            assert len(sender.acknowledged) >= 40
            assert min(fake.requests[mode] for mode in ("503", "hang", "drop", "forward")) >= 1, fake.requests
            check_exactly_once(drain_inbox(b, ben, set(sender.acknowledged)), sender.acknowledged)
            states = Http11(a.url).get("/metrics").body.decode()
            assert (
                'relay_federation_requests_total{direction="out",kind="deliver",outcome="503",peer="b.test"}' in states
            )
        finally:
            fake.close()


# -- refusals leave no trace ----------------------------------------------------------------------------


def store_counts(relay: RelayProcess) -> tuple[int, int, int]:
    conn = sqlite3.connect(f"file:{relay.data_dir / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        return tuple(  # type: ignore[return-value]
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("envelopes", "federation_received", "federation_nonces")
        )
    finally:
        conn.close()


def test_bad_federation_requests_are_refused_and_leave_no_trace(tmp_path: Path) -> None:
    with mesh(tmp_path, ["a.test", "b.test"], env={"TETHERLESS_FEDERATION_MAX_BODY_BYTES": "65536"}) as m:
        a, b = m["a.test"], m["b.test"]
        ben = register(Http11(b.url), "ben")
        a_key = nacl.signing.SigningKey((a.data_dir / "relay.key").read_bytes())
        http = Http11(b.url)
        authority = f"127.0.0.1:{b.port}"

        def deliver_body(ciphertext: bytes = b"x") -> bytes:
            envelope = FederatedEnvelope(
                id=os.urandom(16),
                recipient=ben.address,
                sent_at_ms=int(time.time() * 1000),
                expires_at_ms=int(time.time() * 1000) + 60_000,
                ciphertext=ciphertext,
            )
            return codec.encode(DeliverRequest(envelopes=[envelope]))

        def signed(
            body: bytes,
            *,
            key: nacl.signing.SigningKey = a_key,
            created: int | None = None,
            destination: str = "b.test",
            origin: str = "a.test",
        ) -> dict[str, str]:
            headers = federation.sign_request(
                key,
                method="POST",
                authority=authority,
                path="/federation/v1/deliver",
                body=body,
                origin=origin,
                destination=destination,
                created=int(time.time()) if created is None else created,
                nonce=base64.urlsafe_b64encode(os.urandom(18)).decode(),
            )
            return dict(headers) | {"content-type": codec.MSGPACK, "accept": codec.MSGPACK}

        def post(body: bytes, headers: dict[str, str]) -> str:
            answer = http.request("POST", "/federation/v1/deliver", body, headers)
            assert answer.status >= 400, answer.body
            return f"{answer.status} {answer.code}"

        before = store_counts(b)
        body = deliver_body()
        good = signed(body)
        forged = dict(good)
        forged["signature"] = "tl=:" + base64.b64encode(bytes(64)).decode() + ":"
        tampered_body = deliver_body(b"other")
        assert post(body, {"content-type": codec.MSGPACK}) == "401 signature_missing"
        assert post(body, forged) == "401 bad_signature"
        assert post(body, signed(body, key=nacl.signing.SigningKey.generate())) == "401 unknown_relay_key"
        assert post(body, signed(body, created=int(time.time()) - 3600)) == "401 signature_expired"
        assert post(body, signed(body, destination="c.test")) == "421 wrong_destination"
        assert post(tampered_body, good) == "400 digest_mismatch"
        big = deliver_body(b"x" * 70_000)
        assert post(big, signed(big)) == "413 body_too_large"
        assert post(body, signed(body, origin="b.test")) == "403 peer_forbidden"
        assert store_counts(b) == before, "a refused request left a trace"

        answer = http.request("POST", "/federation/v1/deliver", body, good)
        assert answer.status == 200, answer.body
        assert [r.outcome for r in codec.decode(answer.body, DeliverResponse).results] == ["stored"]
        after_one = store_counts(b)
        assert after_one == (before[0] + 1, before[1] + 1, before[2] + 1)
        assert post(body, good) == "401 signature_replayed"
        again = http.request("POST", "/federation/v1/deliver", body, signed(body))  # a retry, freshly signed
        assert [r.outcome for r in codec.decode(again.body, DeliverResponse).results] == ["duplicate"]
        assert store_counts(b)[:2] == after_one[:2]


def test_policy_off_and_deny_list(tmp_path: Path) -> None:
    for args, relay_name, expected in (
        (["--federation", "off"], "elsewhere.example", "422 remote_recipient"),
        (["--peer", "evil.example=http://127.0.0.1:9"], "evil.example", "403 peer_forbidden"),
    ):
        relay = RelayProcess(
            tmp_path / args[0].strip("-"),
            extra_args=args,
            env={**FAST, "TETHERLESS_FEDERATION_DENY": "evil.example"},
        )
        relay.start()
        try:
            http = Http11(relay.url)
            alice, bob = register(http, "alice"), register(http, "bob")
            login(http, alice)
            body = {
                "envelopes": [
                    {
                        "recipient": f"{bob.device_id}.{bob.parsed.account}@{relay_name}",
                        "idempotency_key": b"k" * 8,
                        "ciphertext": b"x",
                    }
                ]
            }
            answer = http.msgpack("POST", "/v1/messages", body, alice.token)
            assert f"{answer.status} {answer.code}" == expected
            devices = http.get(f"/v1/relays/{relay_name}/accounts/{bob.parsed.account}/devices", alice.token)
            assert f"{devices.status} {devices.code}" == expected
            local = http.get(f"/v1/relays/{relay.name}/accounts/{bob.parsed.account}/devices", alice.token)
            assert local.status == 200
        finally:
            relay.stop()
