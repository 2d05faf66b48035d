"""Differential test: the Python SDK (this process) and the TypeScript client (one Node process) on one real relay.

Issue 16 item 6: "a differential test exchanges messages, device-list updates and log records between the
Python SDK and the browser in both directions". The browser's code is web/src/client and web/src/protocol;
here it runs under Node (web/test/interop/peer.ts, :class:`tests.web.support.NodePeer`), the same modules the
app bundles, so what is compared is the protocol code, not the DOM. Each side accepts exactly what the other
produced, and where a format is deterministic both produce the same bytes:

- messages (hybrid sessions, sealed sender v2, padding): several each way, delivered out of order (the
  TypeScript side posts its newest message first; a reordering relay hands the Node client its inbox
  backwards), across ratchet steps and crossing in flight; both sides agree on every message id, text,
  ``pair_seq`` and time;
- device lists: versions the Python SDK made (genesis, an approval, a revocation) verified by TypeScript
  from the genesis, versions TypeScript made (a genesis, an approval, a new device's self-signed version
  in a Python account) verified by Python; every version re-encodes to the same bytes and list hash in both;
- the account log: ``message-sent`` / ``message-received`` records the TypeScript client wrote are read and
  applied by the Python SDK's log reader (the sync engine), and the Python-written ones replayed by
  TypeScript's (logsync.ts); every record opens to the same plaintext in both, which re-encodes to the same
  bytes, under the record id both derive;
- refusals: a record, a device-list chain and a log record on the relay changed by one byte are refused by
  both implementations with the same error code.

One relay and one Node process for the module. Fails (not skips) without node under ``CI=true``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from protocol import codec, device_list, log
from protocol.client import devices
from protocol.client.home import make_engine
from protocol.client.sdk import RelayClient
from protocol.client.store import HistoryMessage
from protocol.client.sync import SyncOutcome
from protocol.errors import TetherlessError
from protocol.messages import DeviceListChain, SignedDeviceList
from tests.e2e.offline_client import NO_RATE_LIMITS, enqueue_many, init_device, keystore, link_device, load
from tests.relay_process import RelayProcess
from tests.web.support import NodePeer

KIND = {1: "event", 2: "state", 3: "key"}


@dataclass(frozen=True)
class Pair:
    """The module's relay, its Node peer and a directory for the Python devices' homes."""

    relay: RelayProcess
    node: NodePeer
    homes: Path

    def ts(self, device: str, cmd: str, **args: Any) -> dict[str, Any]:
        """Command ``cmd`` for the TypeScript device named ``device``; fails the test on an error answer."""
        return self.node.must(cmd=cmd, device=device, **args)

    def python_device(self, name: str) -> tuple[Path, str]:
        """A new Python device (``tetherless device init``: a format-3 account); its home and address."""
        home = self.homes / name
        return home, init_device(self.relay.url, home, name)

    def with_client(self, home: Path | None, work: Callable[[RelayClient], Any]) -> Any:
        """``await work(client)`` on an SDK client of the device at ``home`` (None: no device yet), in this process."""

        async def run() -> Any:
            ks = keystore(home) if home is not None else None
            try:
                keys = ks.load() if ks is not None else None
                async with RelayClient.connect(self.relay.url, keys=keys) as client:
                    return await work(client)
            finally:
                if ks is not None:
                    ks.close()

        return trio.run(run)


@pytest.fixture(scope="module")
def pair(node_peer_script: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("differential")
    relay = RelayProcess(root / "relay", env=NO_RATE_LIMITS)
    node = NodePeer(node_peer_script, root / "node-peer.log")
    with pytest.MonkeyPatch.context() as env:
        # The in-process sync engines (make_engine) retry quickly, as tests/e2e/offline_client.py's CLI runs do.
        env.setenv("TETHERLESS_SYNC_MAX_BACKOFF", "1.0")
        env.setenv("TETHERLESS_SYNC_POLL_SECONDS", "0.5")
        relay.start()
        try:
            yield Pair(relay, node, root)
        finally:
            node.close()
            assert relay.stop() == 0, relay.logs()[-2000:]
            assert "Traceback" not in relay.logs()


# -- the Python side ------------------------------------------------------------------------------------------


def python_sync(home: Path) -> list[dict[str, str]]:
    """One sync of the device at ``home`` in this process (outbox, inbox, account log) until quiescent; the
    warnings its log reader gave (``{"warning": code, "detail": line}``, as ``sync --json`` prints them)."""

    async def run() -> list[dict[str, str]]:
        ks, keys, store = load(home)
        try:
            engine = make_engine(keys, store)
            assert await engine.run(follow=False, timeout=60) is SyncOutcome.DONE
            return list(engine.warnings)
        finally:
            store.db.close()
            ks.close()

    return trio.run(run)


def python_history(home: Path) -> list[HistoryMessage]:
    _, _, store = load(home)
    try:
        return store.history()
    finally:
        store.db.close()


def python_epoch_key(home: Path, epoch: int) -> bytes:
    _, _, store = load(home)
    try:
        key = store.epoch_key(epoch)
    finally:
        store.db.close()
    assert key is not None, f"no key of epoch {epoch}"
    return key


def relay_db(relay: RelayProcess) -> sqlite3.Connection:
    return sqlite3.connect(relay.data_dir / "relay.sqlite3", timeout=30, isolation_level=None)


def stored_versions(relay: RelayProcess, account_id: str) -> list[bytes]:
    """The account's device-list versions as the relay stores them (the bytes each maker posted), oldest first."""
    with closing(relay_db(relay)) as db:
        rows = db.execute(
            "SELECT signed FROM device_lists WHERE account_id = ? ORDER BY version", (account_id,)
        ).fetchall()
    return [bytes(row[0]) for row in rows]


@dataclass(frozen=True)
class StoredRecord:
    position: int
    record_id: bytes
    kind: str
    epoch: int
    ciphertext: bytes


def stored_records(relay: RelayProcess, account_id: str) -> list[StoredRecord]:
    with closing(relay_db(relay)) as db:
        rows = db.execute(
            "SELECT position, record_id, kind, epoch, ciphertext FROM log_records WHERE account_id = ? "
            "ORDER BY position",
            (account_id,),
        ).fetchall()
    return [StoredRecord(p, bytes(r), KIND[k], e, bytes(c)) for p, r, k, e, c in rows]


def plain(value: Any) -> Any:
    """A msgspec value as peer.ts shows its own: every field (defaults too), the union tag, bytes as hex."""
    if isinstance(value, msgspec.Struct):
        config = value.__struct_config__
        shown = {name: plain(getattr(value, name)) for name in value.__struct_fields__}
        if config.tag is not None:
            shown[str(config.tag_field)] = config.tag
        return shown
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def account_id_of(address: str) -> str:
    return address.split("@", 1)[0].split(".")[-1]


def device_id_of(address: str) -> str:
    return address.split(".", 1)[0]


# -- (a) messages ---------------------------------------------------------------------------------------------


def test_messages_both_ways_out_of_order_and_across_ratchet_steps(pair: Pair) -> None:
    p_home, p_address = pair.python_device("p")
    t = pair.ts("t", "create", relay=pair.relay.url)
    t_address = t["address"]

    # TypeScript starts the session (a prekey message); Python answers on it (its ratchet step).
    first = pair.ts("t", "send", to=p_address, text="t1: hello from TypeScript")
    assert python_sync(p_home) == []
    enqueue_many(p_home, t_address, ["p1: hello from Python"])
    python_sync(p_home)
    got = pair.ts("t", "receive")
    assert got["refused"] == []
    assert [(m["sender"], m["text"], m["pair_seq"]) for m in got["messages"]] == [
        (p_address, "p1: hello from Python", 1)
    ]

    # TypeScript's next chain (its ratchet step), posted newest first: Python opens t4 before t2 and t3.
    sealed = [pair.ts("t", "seal", to=p_address, text=f"t{n}: sealed in order") for n in (2, 3, 4)]
    assert [s["pair_seq"] for s in sealed] == [2, 3, 4]
    assert pair.ts("t", "post_reversed")["posted"] == 3
    flushed = pair.ts("t", "flush")["sent"]
    assert [s["duplicate"] for s in flushed] == [True, True, True]  # the same idempotency keys: no second copy
    python_sync(p_home)

    # Python's next chain; the relay hands the Node client its page backwards: p4, p3, p2.
    enqueue_many(p_home, t_address, [f"p{n}: queued in order" for n in (2, 3, 4)])
    python_sync(p_home)
    got = pair.ts("t", "receive", reverse=True)
    assert got["refused"] == []
    assert [(m["text"], m["pair_seq"]) for m in got["messages"]] == [
        ("p4: queued in order", 4),
        ("p3: queued in order", 3),
        ("p2: queued in order", 2),
    ]

    # Crossing in flight: each sends before it has read the other's message, then once more each.
    enqueue_many(p_home, t_address, ["p5: crossing"])
    python_sync(p_home)
    pair.ts("t", "send", to=p_address, text="t5: crossing")
    python_sync(p_home)
    enqueue_many(p_home, t_address, ["p6: after the crossing"])
    python_sync(p_home)
    pair.ts("t", "send", to=p_address, text="t6: after the crossing")
    python_sync(p_home)
    got = pair.ts("t", "receive")
    assert [m["text"] for m in got["messages"]] == ["p5: crossing", "p6: after the crossing"]

    # Both sides hold the same twelve messages: ids, texts and send times (pair_seq: checked above and below).
    history = python_history(p_home)
    python_side = {(m.direction, m.message_uid.hex(), m.text, m.sent_at_ms) for m in history}
    ts_side = {
        ("received" if m["direction"] == "out" else "sent", m["message_id"], m["text"], m["sent_at_ms"])
        for m in pair.ts("t", "messages")["messages"]
    }
    assert python_side == ts_side
    assert len(python_side) == 12
    assert first["message_id"] in {i for _, i, _, _ in python_side}
    pair_seqs = {m.text: (m.direction, m.pair_seq) for m in history}
    assert [pair_seqs[f"t{n}: sealed in order"] for n in (2, 3, 4)] == [("received", n) for n in (2, 3, 4)]
    received_by_python = [m for m in history if m.direction == "received"]
    assert {m.sender for m in received_by_python} == {t_address}
    assert all(m.authenticated for m in history)


# -- (b) device lists -----------------------------------------------------------------------------------------


def assert_same_chain(pair: Pair, viewer: str, account_id: str) -> dict[str, Any]:
    """TypeScript device ``viewer`` verifies ``account_id``'s chain from the genesis; Python verifies the same
    stored bytes. Both re-encode every version to the bytes the relay stores and derive the same list hashes."""
    stored = stored_versions(pair.relay, account_id)
    decoded = [codec.decode(raw, SignedDeviceList) for raw in stored]
    chain = DeviceListChain(account_id=account_id, versions=decoded)
    verified = device_list.verify_chain(chain, account_id)
    ts = pair.ts(viewer, "chain", account=account_id)
    assert ts["version"] == verified.head.version == len(stored)
    assert [d["device_id"] for d in ts["devices"]] == [d.device_id for d in verified.devices]
    assert ts["mark"] == [verified.mark[0], verified.mark[1].hex()]
    assert [v["list_hash"] for v in ts["versions"]] == [device_list.list_hash(v.device_list).hex() for v in decoded]
    assert (
        [v["encoded"] for v in ts["versions"]] == [codec.encode(v).hex() for v in decoded] == [s.hex() for s in stored]
    )
    return ts


def test_device_lists_made_by_either_implementation_verify_in_the_other(pair: Pair) -> None:
    pair.ts("viewer", "create", relay=pair.relay.url)

    # Python-made: a genesis, the approval of a second Python device, its revocation.
    q1_home, q1_address = pair.python_device("q1")
    q = account_id_of(q1_address)
    q2_address = trio.run(link_device, pair.relay.url, q1_home, pair.homes / "q2", "q2")
    assert assert_same_chain(pair, "viewer", q)["version"] == 2
    pair.with_client(q1_home, lambda client: devices.revoke_device(client, device_id_of(q2_address)))
    ts = assert_same_chain(pair, "viewer", q)
    assert ts["version"] == 3
    assert [d["device_id"] for d in ts["devices"]] == [device_id_of(q1_address)]

    # TypeScript-made: a genesis, and the approval of a Python device, which checks the proposal against the
    # chain from the TypeScript genesis, signs and posts it.
    u = pair.ts("u", "create", relay=pair.relay.url)
    u2_home = pair.homes / "u2"

    async def join_approved_by_typescript(client: RelayClient) -> str:
        pending = await devices.start_link(client)
        approved = await trio.to_thread.run_sync(lambda: pair.ts("u", "approve", code=pending.code))
        assert approved["fingerprint"] == pending.fingerprint  # both screens show the same fingerprint
        assert approved["device_id"] == pending.device_id
        ks = keystore(u2_home)
        try:
            keys = await devices.finish_link(client, pending, keystore=ks, name="u2", poll_seconds=0.2)
        finally:
            ks.close()
        return keys.address

    u2_address = pair.with_client(None, join_approved_by_typescript)
    assert account_id_of(u2_address) == u["account_id"]
    seen_by_u2 = pair.with_client(u2_home, lambda client: client.device_chain(u["account_id"]))
    assert {d.device_id for d in seen_by_u2.devices} == {u["device_id"], device_id_of(u2_address)}
    assert assert_same_chain(pair, "viewer", u["account_id"])["version"] == 2

    # TypeScript joins the Python account: the Python SDK approves, the TypeScript device signs the version
    # and posts it; Python verifies that version too.
    started = pair.ts("q3", "link_start", relay=pair.relay.url)
    pair.with_client(q1_home, lambda client: devices.approve_link(client, started["code"]))
    q3 = pair.ts("q3", "link_finish")
    assert q3["account_id"] == q
    seen_by_q1 = pair.with_client(q1_home, lambda client: client.device_chain(q))
    assert {d.device_id for d in seen_by_q1.devices} == {device_id_of(q1_address), started["device_id"]}
    assert assert_same_chain(pair, "viewer", q)["version"] == 4


def test_a_device_list_chain_changed_by_one_byte_is_refused_alike(pair: Pair) -> None:
    """Single-byte changes all over a stored version: both refuse each with the same code. The only changes both
    accept rename a map key into one neither knows (``name`` of the unnamed genesis entry: an unknown field is
    ignored, as msgspec does), so the version decodes to the very same value; both then re-encode it alike."""
    _, address = pair.python_device("chain-owner")
    account = account_id_of(address)
    pair.ts("chain-viewer", "create", relay=pair.relay.url)
    [genesis] = stored_versions(pair.relay, account)
    honest = codec.decode(genesis, SignedDeviceList)
    # A chain of one version: the map {"account_id": …, "versions": [genesis]}, spliced (0x91: an array of one).
    prefix = codec.encode(DeviceListChain(account_id=account, versions=[]))[:-1]
    codes: dict[str, int] = {}
    step = max(1, len(genesis) // 97)  # about a hundred positions over the whole encoding, header to signature
    for at in range(0, len(genesis), step):
        changed = bytearray(genesis)
        changed[at] ^= 0x01
        chain_bytes = prefix + b"\x91" + bytes(changed)
        try:
            chain = codec.decode(chain_bytes, DeviceListChain)
            device_list.verify_chain(chain, account)
            python_code = "accepted"
            assert chain.versions == [honest], at
        except TetherlessError as exc:
            python_code = exc.code.value
        answer = pair.node.ask(cmd="verify_chain", account=account, chain=chain_bytes.hex())
        ts_code = "accepted" if answer["ok"] else answer["code"]
        assert ts_code == python_code, (at, answer, python_code)
        if answer["ok"]:
            assert [v["encoded"] for v in answer["versions"]] == [genesis.hex()]
        codes[python_code] = codes.get(python_code, 0) + 1
    assert codes.get("bad_signature", 0) > len(codes), codes  # most bytes are signed ones
    assert codes.get("accepted", 0) <= 4, codes


# -- (c) the account log --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedAccount:
    """Python device r1 and TypeScript device "rl" in one account with an epoch; TypeScript device "v" elsewhere."""

    r1_home: Path
    r1_address: str
    rl_address: str
    v_address: str
    account_id: str


@pytest.fixture(scope="module")
def logged(pair: Pair) -> LoggedAccount:
    r1_home, r1_address = pair.python_device("r1")
    python_sync(r1_home)  # creates epoch 1 of the account key
    started = pair.ts("rl", "link_start", relay=pair.relay.url)
    pair.with_client(r1_home, lambda client: devices.approve_link(client, started["code"]))
    rl = pair.ts("rl", "link_finish")
    python_sync(r1_home)  # grants the new device the account's history (its epoch keys)
    synced = pair.ts("rl", "log_sync")
    assert synced["warnings"] == []
    assert synced["waiting"] is False
    v = pair.ts("v", "create", relay=pair.relay.url)
    return LoggedAccount(r1_home, r1_address, rl["address"], v["address"], account_id_of(r1_address))


def writers(pair: Pair, home: Path, account_id: str) -> dict[str, bytes]:
    verified = pair.with_client(home, lambda client: client.device_chain(account_id))
    return {d.device_id: d.sign_key for d in verified.devices}


def open_both(pair: Pair, key: bytes, record: StoredRecord, account_id: str, allowed: dict[str, bytes]) -> Any:
    """``record`` opened by the Python code and the TypeScript code: (Python's plaintext or error code, the
    peer's answer)."""
    try:
        python: Any = log.open_signed_record(
            key,
            record.ciphertext,
            writers=allowed,
            account_id=account_id,
            record_id=record.record_id,
            epoch=record.epoch,
            kind=record.kind,
        )
    except log.InvalidRecordError as exc:
        python = exc.code.value
    answer = pair.node.ask(
        cmd="open_record",
        key=key.hex(),
        ciphertext=record.ciphertext.hex(),
        writers={device: sign_key.hex() for device, sign_key in allowed.items()},
        account_id=account_id,
        record_id=record.record_id.hex(),
        epoch=record.epoch,
        kind=record.kind,
    )
    return python, answer


def test_log_records_written_by_either_implementation_are_applied_by_the_other(
    pair: Pair, logged: LoggedAccount
) -> None:
    r1_home, rl_address, v_address = logged.r1_home, logged.rl_address, logged.v_address

    # TypeScript writes: a message it received (v → rl) and one it sent (rl → v), each to that device only.
    pair.ts("v", "send", to=rl_address, text="to the TypeScript device")
    received = pair.ts("rl", "receive")["messages"]
    assert [m["text"] for m in received] == ["to the TypeScript device"]
    sent = pair.ts("rl", "send", to=v_address, text="from the TypeScript device")
    assert pair.ts("rl", "log_sync")["appended"] == 2

    # Python writes: a message it sent (r1 → v) and one it received (v → r1).
    enqueue_many(r1_home, v_address, ["from the Python device"])
    pair.ts("v", "send", to=logged.r1_address, text="to the Python device")
    assert python_sync(r1_home) == []  # and reads TypeScript's two records: no warning

    # The Python SDK applied TypeScript's records: the same message, fields and writer.
    by_text = {m.text: m for m in python_history(r1_home)}
    rl_device = device_id_of(rl_address)
    got = by_text["to the TypeScript device"]
    assert (got.direction, got.via, got.writer, got.authenticated) == ("received", "log", rl_device, True)
    assert (got.message_uid.hex(), got.sender, got.pair_seq) == (received[0]["message_id"], v_address, 1)
    assert (got.sent_at_ms, got.relay_sent_at_ms) == (received[0]["sent_at_ms"], received[0]["relay_sent_at_ms"])
    got = by_text["from the TypeScript device"]
    assert (got.direction, got.via, got.writer, got.authenticated) == ("sent", "log", rl_device, True)
    assert (got.message_uid.hex(), got.sender, got.recipients, got.pair_seq) == (
        sent["message_id"],
        rl_address,
        [v_address],
        1,
    )

    # TypeScript replays Python's records: the same messages, in its conversation.
    replayed = pair.ts("rl", "log_sync")
    assert replayed["warnings"] == []
    shown = {m["text"]: m for m in replayed["added"]}
    assert set(shown) == {"from the Python device", "to the Python device"}
    for text in shown:
        assert shown[text]["message_id"] == by_text[text].message_uid.hex()
        assert shown[text]["sent_at_ms"] == by_text[text].sent_at_ms
    assert (shown["from the Python device"]["direction"], shown["to the Python device"]["direction"]) == ("out", "in")

    # Byte level: every message record opens to the same plaintext in both, re-encodes to the same bytes, and
    # sits under the record id both derive from (account, sender device address, message uid).
    allowed = writers(pair, r1_home, logged.account_id)
    records = [r for r in stored_records(pair.relay, logged.account_id) if r.kind == "event"]
    written_by = set()
    for record in records:
        key = python_epoch_key(r1_home, record.epoch)
        python, answer = open_both(pair, key, record, logged.account_id, allowed)
        assert isinstance(python, log.LogPlaintext), python
        assert answer["ok"], answer
        assert answer["plaintext"] == plain(python)
        assert answer["encoded"] == codec.encode(python).hex()
        body = python.body
        assert isinstance(body, log.MessageSent | log.MessageReceived)
        assert record.record_id == log.message_record_id(logged.account_id, body.sender, body.message_uid)
        written_by.add((python.writer_device, type(body).__name__))
    assert written_by == {
        (rl_device, "MessageReceived"),
        (rl_device, "MessageSent"),
        (device_id_of(logged.r1_address), "MessageSent"),
        (device_id_of(logged.r1_address), "MessageReceived"),
    }


def test_a_log_record_changed_by_one_byte_is_refused_alike(pair: Pair, logged: LoggedAccount) -> None:
    """The relay changes records: both log readers refuse the same records with the same codes; both open
    functions give one code per changed byte; the next honest record is applied by both."""
    r1_home = logged.r1_home
    allowed = writers(pair, r1_home, logged.account_id)
    python_sync(r1_home)
    pair.ts("rl", "log_sync")

    # One record of each writer, every byte position of a few: nonce, ciphertext body, tag.
    pair.ts("rl", "send", to=logged.v_address, text="TypeScript's record, to be changed")
    pair.ts("rl", "log_sync")
    enqueue_many(r1_home, logged.v_address, ["Python's record, to be changed"])
    python_sync(r1_home)
    records = [r for r in stored_records(pair.relay, logged.account_id) if r.kind == "event"][-2:]
    key = python_epoch_key(r1_home, records[0].epoch)
    for record in records:
        honest, _ = open_both(pair, key, record, logged.account_id, allowed)
        assert isinstance(honest, log.LogPlaintext)
        size = len(record.ciphertext)
        for at in (0, 12, log.NONCE_BYTES, size // 2, size - log.TAG_BYTES - 1, size - 1):
            changed = bytearray(record.ciphertext)
            changed[at] ^= 0x01
            python, answer = open_both(
                pair,
                key,
                StoredRecord(record.position, record.record_id, record.kind, record.epoch, bytes(changed)),
                logged.account_id,
                allowed,
            )
            assert not answer["ok"]
            assert (answer["code"], python) == ("malformed_body", "malformed_body"), (at, answer)
        # Another record id (the AD), and a writer the epoch does not name: refused alike too.
        other_id = StoredRecord(record.position, os.urandom(16), record.kind, record.epoch, record.ciphertext)
        python, answer = open_both(pair, key, other_id, logged.account_id, allowed)
        assert (answer["code"], python) == ("malformed_body", "malformed_body")
        python, answer = open_both(pair, key, record, logged.account_id, {})
        assert (answer["code"], python) == ("bad_signature", "bad_signature")

    # Through the readers: TypeScript appends a record, the relay changes one byte of it before either reads it.
    pair.ts("rl", "send", to=logged.v_address, text="changed on the relay")
    pair.ts("rl", "log_sync")
    [tampered] = [r for r in stored_records(pair.relay, logged.account_id) if r.kind == "event"][-1:]
    changed = bytearray(tampered.ciphertext)
    changed[len(changed) // 2] ^= 0x01
    with closing(relay_db(pair.relay)) as db:
        db.execute(
            "UPDATE log_records SET ciphertext = ? WHERE account_id = ? AND position = ?",
            (bytes(changed), logged.account_id, tampered.position),
        )
    pair.ts("rl", "send", to=logged.v_address, text="honest after the changed one")
    python_warnings = python_sync(r1_home)
    ts_sync = pair.ts("rl", "log_sync")
    assert [w["warning"] for w in python_warnings] == [w["code"] for w in ts_sync["warnings"]] == ["malformed_body"]
    texts = {m.text for m in python_history(r1_home)}
    assert "changed on the relay" not in texts
    pair.ts("rl", "log_sync")
    python_sync(r1_home)
    assert "honest after the changed one" in {m.text for m in python_history(r1_home)}
