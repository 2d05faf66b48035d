"""The outbox without processes (protocol/client/outbox.py, the engine's outbox steps; docs/account-log.md §10
"Outbox entry states"): the classification table, each entry's state, batches where one envelope is refused, an
unreachable destination, the size rule, ``retry`` and ``cancel``.

The relay is a fake that behaves like the real one where it matters here: ``POST /v1/messages`` takes or refuses
a batch as a whole (protocol.md §5), and device lists of another relay come through the home relay, which
answers ``peer_unavailable`` when that relay cannot be reached. The same cases over real relays and the real CLI
are in tests/e2e/test_outbox_jam.py.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nacl.public
import nacl.signing
import pytest
import trio

from protocol import log
from protocol.client import outbox
from protocol.client.chains import DeviceListRejectedError
from protocol.client.http import TransportError
from protocol.client.keystore import DeviceKeys
from protocol.client.localdb import LocalDB
from protocol.client.outbox import Home, OutboxState, Permanent, Transient
from protocol.client.sdk import TEXT_CONTENT_TYPE, Recipients, RelayClient, SealedEnvelope
from protocol.client.sessions import PrekeysUnavailableError
from protocol.client.store import ClientStore
from protocol.client.sync import RetryError, SyncEngine
from protocol.errors import STATUS, ErrorCode, RemoteError, TetherlessError, UnknownRemoteError
from protocol.ids import Address, account_id_for, device_id_for
from protocol.messages import Accepted, OutboundEnvelope, SendResponse
from tests.protocol.client.test_sessions import Clock, _entry, _keys, _pair

HOME = "a.test"
PEER = "b.test"


def _device(name: str, relay: str) -> tuple[str, str, bytes]:
    """(device address, account address, box key) of a made-up device."""
    signing = nacl.signing.SigningKey(hashlib.sha256(b"sign " + name.encode()).digest())
    sign_key = bytes(signing.verify_key)
    device, account = device_id_for(sign_key), account_id_for(sign_key)
    box = bytes(nacl.public.PrivateKey(hashlib.sha256(b"box " + name.encode()).digest()).public_key)
    return f"{device}.{account}@{relay}", f"{account}@{relay}", box


def _remote(code: ErrorCode, detail: str = "") -> RemoteError:
    return RemoteError(code, detail, http_status=STATUS[code])


class FakeRelay:
    """The home relay as the engine's outbox steps use it (v1 sealed boxes: no sessions)."""

    def __init__(self, keys: DeviceKeys) -> None:
        self.sessions = None
        self.cipher = RelayClient.make_cipher(keys)
        self.random_bytes = os.urandom
        self.api = self  # the typed request layer: send_envelopes
        self.accounts: dict[str, list[tuple[str, bytes]]] = {}  # account address → (device address, box key)
        self.unreachable: set[str] = set()  # relays whose device lists cannot be fetched
        self.refuse: dict[str, ErrorCode] = {}  # device address → what POST /v1/messages answers for it
        self.down = False  # the home relay itself
        self.list_requests: list[str] = []
        self.posts: list[list[str]] = []
        self.stored: list[str] = []
        self.max_envelope_bytes = 256 * 1024
        self.receipts_short = False

    def add(self, *devices: tuple[str, str, bytes]) -> None:
        for address, account, box in devices:
            self.accounts.setdefault(account, []).append((address, box))

    async def well_known(self) -> Any:
        if self.down:
            raise TransportError("connection refused")
        return SimpleNamespace(limits=SimpleNamespace(max_envelope_bytes=self.max_envelope_bytes))

    async def recipient_devices(self, text: str) -> list[tuple[str, bytes]]:
        if self.down:
            raise TransportError("connection refused")
        address = Address.parse(text)
        self.list_requests.append(address.relay)
        if address.relay in self.unreachable:
            raise _remote(ErrorCode.PEER_UNAVAILABLE, f"{address.relay} cannot be reached")
        devices = self.accounts.get(f"{address.account}@{address.relay}")
        if devices is None:
            raise _remote(ErrorCode.UNKNOWN_ACCOUNT, f"no such account on {address.relay}")
        if not address.device:
            return devices
        chosen = [d for d in devices if d[0] == text]
        if not chosen:
            raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "the device is not in its account's current device list")
        return chosen

    async def resolve_recipients(self, text: str, *, fan_out: bool = True) -> Recipients:
        assert not fan_out  # the engine logs what it sends; its own devices read it there
        return Recipients(v1=await self.recipient_devices(text))

    def seal_envelopes(self, recipients: Recipients, **fields: Any) -> list[SealedEnvelope]:
        return RelayClient.seal_envelopes(self, recipients, **fields)  # type: ignore[arg-type]  # the SDK's own seal

    async def send_envelopes(self, envelopes: list[OutboundEnvelope]) -> SendResponse:
        if self.down:
            raise TransportError("connection reset")
        recipients = [e.recipient for e in envelopes]
        self.posts.append(recipients)
        for recipient in recipients:  # all or nothing, like the relay
            if recipient in self.refuse:
                raise _remote(self.refuse[recipient], "envelopes[0]: refused")
        self.stored += recipients
        accepted = [Accepted(id=os.urandom(16), sent_at_ms=1_700_000_000_000) for _ in recipients]
        return SendResponse(accepted=accepted[:-1] if self.receipts_short else accepted)


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.keys = _keys("alice")
        self.store = ClientStore(LocalDB.open(tmp_path / "home", os.urandom(32)), wall_clock=self.clock)
        self.relay = FakeRelay(self.keys)

    def engine(self) -> SyncEngine:
        engine = SyncEngine(self.keys, self.store, rng=random.Random(7), wall_clock=self.clock)
        engine.client = self.relay  # type: ignore[assignment]
        return engine

    def send(self, recipient: str, text: str = "hi") -> int:
        return outbox.enqueue(self.store, recipient, TEXT_CONTENT_TYPE, text.encode()).local_id

    def state(self, local_id: int) -> outbox.OutboxView:
        (found,) = [v for v in outbox.outbox_view(self.store) if v.local_id == local_id]
        return found


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


# -- the classification table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.ENVELOPE_TOO_LARGE,
        ErrorCode.UNKNOWN_RECIPIENT,
        ErrorCode.RECIPIENT_REVOKED,
        ErrorCode.UNKNOWN_ACCOUNT,
        ErrorCode.REMOTE_RECIPIENT,
        ErrorCode.PEER_FORBIDDEN,
        ErrorCode.PEER_ADDRESS_REFUSED,
        ErrorCode.IDEMPOTENCY_CONFLICT,
        ErrorCode.INVALID_FIELD,
        ErrorCode.FORBIDDEN,  # any other 4xx
    ],
)
def test_refusals_of_the_recipient_are_permanent(code: ErrorCode) -> None:
    verdict = outbox.classify(_remote(code, "why"), PEER)
    assert verdict == Permanent(code.value, f"{code.value}: why")


def test_an_unreachable_peer_is_transient_and_names_it() -> None:
    verdict = outbox.classify(_remote(ErrorCode.PEER_UNAVAILABLE, "b.test cannot be reached"), PEER)
    assert verdict == Transient("peer_unavailable", "peer_unavailable: b.test cannot be reached", PEER)
    full = outbox.classify(_remote(ErrorCode.INBOX_FULL), PEER)
    assert isinstance(full, Transient)
    assert full.destination == ""  # reachable, just full
    waiting = outbox.classify(PrekeysUnavailableError(["x@b.test"]), PEER)
    assert isinstance(waiting, Transient)
    assert waiting.reason.startswith("waiting for prekeys")


@pytest.mark.parametrize(
    "exc",
    [
        TransportError("connection refused"),
        _remote(ErrorCode.UNAVAILABLE),
        _remote(ErrorCode.RATE_LIMITED),
        _remote(ErrorCode.INTERNAL),
        _remote(ErrorCode.DEVICE_REVOKED),
        _remote(ErrorCode.INVALID_TOKEN),
        UnknownRemoteError(502, b"<html>"),
        UnknownRemoteError(429, b""),
        RetryError("home relay"),
        AssertionError("a bug is nobody's entry's fault"),
    ],
)
def test_failures_of_the_home_relay_are_not_the_entrys(exc: BaseException) -> None:
    assert outbox.classify(exc, PEER) == Home()


def test_a_device_list_that_does_not_verify_fails_the_entry() -> None:
    rejected = DeviceListRejectedError("x@b.test", TetherlessError(ErrorCode.BAD_SIGNATURE, "swapped key"))
    assert outbox.classify(rejected, PEER) == Permanent("bad_signature", f"bad_signature: {rejected.detail}")
    assert outbox.classify(UnknownRemoteError(418, b""), PEER) == Permanent("rejected", "the relay answered HTTP 418")


def test_special_use_relay_names_never_resolve() -> None:
    verdict = outbox.special_use_relay(_device("x", "nonexistent.invalid")[1])
    assert isinstance(verdict, Permanent)
    assert verdict.code == "peer_address_refused"
    assert "nonexistent.invalid" in verdict.reason
    assert outbox.special_use_relay("x@relay.example.org:8443") is None


# -- the engine: one entry never jams the others --------------------------------------------------------------


async def test_a_refused_envelope_in_a_batch_fails_only_its_entry(env: Env) -> None:
    good1, _, _ = dev1 = _device("bob1", HOME)
    revoked, _, _ = dev2 = _device("bob2", HOME)
    carol1 = _device("carol1", HOME)
    carol2 = _device("carol2", HOME)
    assert carol1[1] != carol2[1]
    carol_account = carol1[1]
    carol2_same = (carol2[0].split(".", 1)[0] + "." + carol_account, carol_account, carol2[2])
    env.relay.add(dev1, dev2, carol1, carol2_same)
    env.relay.refuse[revoked] = ErrorCode.RECIPIENT_REVOKED
    env.relay.refuse[carol2_same[0]] = ErrorCode.RECIPIENT_REVOKED
    first = env.send(good1, "one")
    bad = env.send(revoked, "two")
    to_account = env.send(carol_account, "three")
    last = env.send(good1, "four")

    assert await env.engine().flush_outbox()

    assert env.state(bad).state is OutboxState.FAILED
    assert env.state(bad).reason_code == "recipient_revoked"
    for local_id in (first, to_account, last):
        assert env.state(local_id).state is OutboxState.DELIVERED
    # Everything but the refused envelopes was committed once; carol's removed device lost only its copy.
    assert sorted(env.relay.stored) == sorted([good1, carol1[0], good1])
    assert [e[1] for e in env.store.envelopes(to_account)] == [carol1[0]]


async def test_an_unreachable_peer_delays_only_the_entries_addressed_there(env: Env) -> None:
    bob = _device("bob", HOME)
    dave, dave_account, _ = peer = _device("dave", PEER)
    env.relay.add(bob, peer)
    env.relay.unreachable.add(PEER)
    to_dave = [env.send(dave), env.send(dave_account)]
    to_bob = env.send(bob[0])
    engine = env.engine()

    await engine.flush_outbox()

    assert env.state(to_bob).state is OutboxState.DELIVERED
    for local_id in to_dave:
        view = env.state(local_id)
        assert view.state is OutboxState.RETRYING
        assert (view.destination, view.reason_code) == (PEER, "peer_unavailable")
        assert view.next_attempt_at_ms > env.store.now_ms()
    assert env.relay.list_requests.count(PEER) == 1  # the second entry to b.test did not ask again
    # Still waiting: nothing is tried before the next attempt.
    assert not await engine.flush_outbox()
    assert env.relay.list_requests.count(PEER) == 1
    # b.test is back and the wait is over: delivered.
    env.relay.unreachable.clear()
    env.clock.now += outbox.MAX_RETRY_SECONDS + 1
    await engine.flush_outbox()
    assert all(env.state(i).state is OutboxState.DELIVERED for i in to_dave)


async def test_a_peer_that_is_down_does_not_matter_once_its_devices_are_known(env: Env) -> None:
    dave = _device("dave", PEER)
    env.relay.add(dave)
    first = env.send(dave[0])
    await env.engine().flush_outbox()
    assert env.state(first).state is OutboxState.DELIVERED
    env.relay.unreachable.add(PEER)
    second = env.send(dave[0])
    await env.engine().flush_outbox()  # a new process: nothing in memory
    assert env.state(second).state is OutboxState.DELIVERED  # handed to the home relay's federation outbox
    assert env.relay.stored == [dave[0], dave[0]]


async def test_permanent_failures_before_sealing(env: Env) -> None:
    bob = _device("bob", HOME)
    env.relay.add(bob)
    nowhere = env.send(_device("x", "nonexistent.invalid")[1])
    unknown = env.send(_device("ghost", HOME)[1])
    ok = env.send(bob[0])
    await env.engine().flush_outbox()
    assert env.state(nowhere).state is OutboxState.FAILED
    assert env.state(nowhere).reason_code == "peer_address_refused"
    assert "nonexistent.invalid" not in env.relay.list_requests  # refused without a request
    assert (env.state(unknown).state, env.state(unknown).reason_code) == (OutboxState.FAILED, "unknown_account")
    assert env.state(ok).state is OutboxState.DELIVERED


async def test_an_account_with_no_other_device_fails_the_entry_before_sealing(env: Env) -> None:
    """The SDK's step 1 may answer "nobody" (an account whose only device is this one): the engine fails the
    entry itself rather than store an entry with no envelope as sealed."""
    lonely = _device("lonely", HOME)
    env.relay.accounts[lonely[1]] = []
    local_id = env.send(lonely[1])
    await env.engine().flush_outbox()
    view = env.state(local_id)
    assert (view.state, view.reason_code) == (OutboxState.FAILED, "unknown_recipient")
    assert env.relay.posts == []


async def test_the_home_relay_down_is_the_engines_failure_not_the_entries(env: Env) -> None:
    bob = _device("bob", HOME)
    env.relay.add(bob)
    local_id = env.send(bob[0])
    env.relay.down = True
    with pytest.raises(RetryError):
        await env.engine().flush_outbox()
    assert env.state(local_id).state is OutboxState.QUEUED
    assert env.state(local_id).reason == ""


async def test_a_full_inbox_makes_the_entry_wait_and_a_short_answer_is_retried(env: Env) -> None:
    bob, carol = _device("bob", HOME), _device("carol", HOME)
    env.relay.add(bob, carol)
    env.relay.refuse[bob[0]] = ErrorCode.INBOX_FULL
    full, other = env.send(bob[0]), env.send(carol[0])
    await env.engine().flush_outbox()
    assert env.state(full).state is OutboxState.RETRYING
    assert env.state(full).stored_state == "sealed"  # the same bytes go again later
    assert env.state(other).state is OutboxState.DELIVERED
    env.relay.receipts_short = True  # a relay answering fewer receipts than envelopes is not believed
    another = env.send(carol[0])
    with pytest.raises(RetryError):
        await env.engine().flush_outbox(only=another)
    assert env.state(another).state is OutboxState.SENDING


# -- retry, cancel, pair_seq ------------------------------------------------------------------------------------


async def test_retry_and_cancel(env: Env) -> None:
    bob = _device("bob", HOME)
    env.relay.add(bob)
    env.relay.refuse[bob[0]] = ErrorCode.IDEMPOTENCY_CONFLICT
    local_id = env.send(bob[0])
    await env.engine().flush_outbox()
    assert env.state(local_id).state is OutboxState.FAILED
    assert outbox.retry(env.store, local_id).state is OutboxState.SENDING  # sealed once: the same bytes again
    del env.relay.refuse[bob[0]]
    await env.engine().flush_outbox()
    assert env.state(local_id).state is OutboxState.DELIVERED
    with pytest.raises(outbox.OutboxCancelError):
        outbox.cancel(env.store, local_id)
    queued = env.send(bob[0])
    assert outbox.cancel(env.store, queued).local_id == queued
    assert env.store.outbox_entry(queued) is None
    with pytest.raises(outbox.UnknownOutboxEntryError):
        outbox.cancel(env.store, queued)
    with pytest.raises(outbox.UnknownOutboxEntryError):
        outbox.retry(env.store, 999)


def test_cancel_gives_the_pair_seq_back_unless_a_later_one_is_sealed(env: Env) -> None:
    bob = _device("bob", HOME)
    ids = [env.send(bob[1], str(i)) for i in range(3)]
    assert [env.store.outbox_entry(i).pair_seq for i in ids] == [1, 2, 3]  # type: ignore[union-attr]
    outbox.cancel(env.store, ids[0])
    assert [env.store.outbox_entry(i).pair_seq for i in ids[1:]] == [1, 2]  # type: ignore[union-attr]
    env.send(bob[0], "next")
    assert env.store.outbox()[-1].pair_seq == 3
    # Once a later entry is sealed its number is fixed: a cancel leaves the gap.
    with env.store.transaction():
        env.store.put_envelopes(ids[2], [(bob[0], b"k" * 16, b"c")])
        env.store.set_outbox_state(ids[2], "sealed")
    outbox.cancel(env.store, ids[1])
    assert env.store.outbox_entry(ids[2]).pair_seq == 2  # type: ignore[union-attr]


# -- sizes ------------------------------------------------------------------------------------------------------


def test_size_limit_is_checked_before_queueing(env: Env) -> None:
    limit = outbox.max_body_bytes(outbox.DEFAULT_MAX_ENVELOPE_BYTES)
    assert limit == 192 * 1024 - 1 - outbox.INNER_OVERHEAD_BYTES
    with pytest.raises(outbox.MessageTooLargeError, match=f"at most {limit} bytes") as raised:
        outbox.enqueue(env.store, _device("bob", HOME)[0], TEXT_CONTENT_TYPE, b"x" * (limit + 1))
    assert raised.value.code is ErrorCode.ENVELOPE_TOO_LARGE
    with pytest.raises(outbox.EmptyMessageError):
        outbox.enqueue(env.store, _device("bob", HOME)[0], TEXT_CONTENT_TYPE, b"")
    assert env.store.outbox() == []  # nothing was queued
    outbox.remember_max_envelope_bytes(env.store, 64 * 1024)
    assert outbox.known_max_envelope_bytes(env.store) == 64 * 1024
    with pytest.raises(outbox.MessageTooLargeError):
        outbox.enqueue(env.store, _device("bob", HOME)[0], TEXT_CONTENT_TYPE, b"x" * (32 * 1024))


@pytest.mark.parametrize("max_envelope_bytes", [256 * 1024, 64 * 1024, 1024 * 1024])
def test_the_largest_allowed_body_fits_a_first_session_message(max_envelope_bytes: int) -> None:
    """The overhead bound holds for the biggest header there is: a session's first (handshake) message,
    with the frame the engine adds, to a long address."""
    limit = outbox.max_body_bytes(max_envelope_bytes)
    alice, bob, relay = _pair(Clock())
    alice.establish(relay.claim(), _entry(bob.keys))
    framed = log.frame_message(2**63 - 1, log.FRAME_CONTENT_TYPE + "x" * 100, b"x" * limit)
    sealed = alice.seal(
        bob.keys.address,
        sender_list_version=2**40,
        sent_at_ms=2**50,
        message_id=os.urandom(16),
        content_type=log.FRAME_CONTENT_TYPE,
        body=framed,
    )
    assert len(sealed) <= max_envelope_bytes
    v1 = RelayClient.make_cipher(alice.keys).seal(
        recipient=bob.keys.address,
        recipient_box_key=_entry(bob.keys).box_key,
        sent_at_ms=2**50,
        message_id=os.urandom(16),
        content_type=log.FRAME_CONTENT_TYPE,
        body=framed,
        entropy=os.urandom(32),
    )
    assert len(v1) <= max_envelope_bytes


async def test_the_sdk_refuses_an_oversized_body_before_any_request() -> None:
    """``RelayClient.send`` checks the same limit; the address points nowhere, so a request would fail otherwise."""
    keys = _keys("alice")
    limit = outbox.max_body_bytes(outbox.DEFAULT_MAX_ENVELOPE_BYTES)
    async with trio.open_nursery() as nursery:
        client = RelayClient(nursery, "http://127.0.0.1:9", keys=keys, max_attempts=1)
        with pytest.raises(outbox.MessageTooLargeError, match=f"at most {limit} bytes"):
            await client.send(_device("bob", HOME)[0], b"x" * (limit + 1))
        await client.aclose()
