"""Equal devices on a real relay: device-list versions, policies, WebAuthn, revocation (docs/crypto.md §3-§6).

Raw HTTP/1.1 (tests/e2e/http11.py) against a real ``tetherless serve``
process; lists are built with the pure builders of protocol.device_list and
WebAuthn bytes come from the software authenticator. Every refused version
is checked for its exact code *and* for an unchanged chain.
"""

from __future__ import annotations

import base64
import contextlib
import http.client as httplib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nacl.public
import nacl.signing
import psycopg
import pytest

from protocol import codec, federation
from protocol.device_list import (
    approve,
    device_entry,
    genesis_v2,
    list_hash,
    next_version,
    signed_list,
    verify_chain,
)
from protocol.ids import account_id_for
from protocol.messages import (
    AccountCreated,
    Challenge,
    DeliverRequest,
    DeliverResponse,
    DeviceEntry,
    DeviceList,
    DeviceListAccepted,
    DeviceListChain,
    FederatedEnvelope,
    Policy,
    SignedDeviceList,
    WebAuthnAssertion,
    WebAuthnCredential,
    WebAuthnRegistration,
    WebAuthnRegistrationOptions,
)
from tests.e2e.http11 import Answer, Http11, Peer, login
from tests.e2e.test_federation import mesh
from tests.relay.store.postgres_db import fresh_database
from tests.relay_process import RelayProcess
from tests.support.soft_authenticator import SoftAuthenticator


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Device:
    signing_key: nacl.signing.SigningKey = field(default_factory=nacl.signing.SigningKey.generate)
    box_key: nacl.public.PrivateKey = field(default_factory=nacl.public.PrivateKey.generate)

    def entry(self) -> DeviceEntry:
        return device_entry(bytes(self.signing_key.verify_key), bytes(self.box_key.public_key), added_at_ms=now_ms())

    @property
    def device_id(self) -> str:
        return self.entry().device_id

    def peer(self, account_id: str, relay: str) -> Peer:
        created = AccountCreated(
            account_id=account_id, device_id=self.device_id, address=f"{self.device_id}.{account_id}@{relay}"
        )
        return Peer(self.signing_key, self.box_key, created)


class Account:
    """An account on the relay, its current head, and helpers to post versions."""

    def __init__(self, http: Http11, relay_name: str, *, policy: Policy | None = None) -> None:
        self.http = http
        self.relay = relay_name
        self.first = Device()
        signed = genesis_v2(
            self.first.signing_key, bytes(self.first.box_key.public_key), now_ms=now_ms(), policy=policy
        )
        answer = http.msgpack("POST", "/v1/accounts", {"signed": signed})
        assert answer.status == 201, answer.body
        self.id = account_id_for(bytes(self.first.signing_key.verify_key))
        self.head: DeviceList = signed.device_list

    @property
    def path(self) -> str:
        return f"/v1/accounts/{self.id}/devices"

    def post(self, signed: SignedDeviceList | dict[str, object]) -> Answer:
        body = {"signed": signed}
        return self.http.msgpack("POST", self.path, body)  # not idempotent: a retry after success is a conflict

    def chain_bytes(self) -> bytes:
        answer = self.http.get(self.path, accept=codec.MSGPACK)
        assert answer.status == 200, answer.body
        return answer.body

    def accept(self, signed: SignedDeviceList) -> DeviceListAccepted:
        answer = self.post(signed)
        assert answer.status == 201, answer.body
        accepted = codec.decode(answer.body, DeviceListAccepted)
        assert (accepted.account_id, accepted.version) == (self.id, signed.device_list.version)
        assert accepted.list_hash == list_hash(signed.device_list)
        self.head = signed.device_list
        return accepted

    def refuse(self, signed: SignedDeviceList | dict[str, object], status: int, code: str) -> None:
        """The version is refused with exactly ``status``/``code`` and the chain served is unchanged."""
        before = self.chain_bytes()
        answer = self.post(signed)
        assert (answer.status, answer.code) == (status, code), answer.body
        assert self.chain_bytes() == before

    def verify(self) -> DeviceListChain:
        chain = codec.decode(self.chain_bytes(), DeviceListChain)
        verified = verify_chain(chain, self.id)
        assert verified.head == self.head
        return chain


def add(account: Account, new: Device, *approvers: Device, **changes: object) -> SignedDeviceList:
    """The next version adding ``new`` (self-signed), approved by ``approvers``."""
    dl = next_version(account.head, add_devices=[new.entry()], now_ms=now_ms(), **changes)  # type: ignore[arg-type]
    return signed_list(dl, [approve(dl, d.signing_key) for d in (*approvers, new)])


def remove(account: Account, gone: Device, *approvers: Device) -> SignedDeviceList:
    dl = next_version(account.head, remove_device_ids=[gone.device_id], now_ms=now_ms())
    return signed_list(dl, [approve(dl, d.signing_key) for d in approvers])


@pytest.fixture
def http(relay: RelayProcess) -> Http11:
    return Http11(relay.url)


# -- adding devices and policies ------------------------------------------------------------


def test_a_device_adds_another_and_the_new_one_can_log_in(relay: RelayProcess, http: Http11) -> None:
    account = Account(http, relay.name)
    laptop = Device()
    before = account.chain_bytes()
    account.accept(add(account, laptop, account.first))
    assert account.chain_bytes() != before
    chain = account.verify()
    assert [v.device_list.version for v in chain.versions] == [1, 2]
    assert login(http, laptop.peer(account.id, relay.name)).startswith("tls1_")


def test_k_of_n_needs_k_approvals(relay: RelayProcess, http: Http11) -> None:
    account = Account(http, relay.name)
    phone, tablet = Device(), Device()
    # version 2 adds the phone and raises the threshold to 2 (approved under version 1's threshold 1)
    account.accept(add(account, phone, account.first, policy=Policy(threshold=2)))
    one = add(account, tablet, account.first)
    account.refuse(one, 403, "policy_not_met")
    account.accept(add(account, tablet, account.first, phone))
    account.verify()
    metrics = http.get("/metrics").body.decode()
    assert 'relay_device_list_versions_total{outcome="accepted"} 2.0' in metrics
    assert 'relay_device_list_versions_total{outcome="policy_not_met"} 1.0' in metrics


def test_require_webauthn_with_a_registered_key(relay: RelayProcess, http: Http11) -> None:
    account = Account(http, relay.name)
    peer = account.first.peer(account.id, relay.name)
    login(http, peer)
    key = register_key(http, peer)
    credential = key.credential_from_relay
    # version 2 adds the key (with its proof of possession) and requires it from now on
    dl = next_version(account.head, add_credentials=[credential], policy=Policy(require_webauthn=True), now_ms=now_ms())
    account.accept(signed_list(dl, [approve(dl, account.first.signing_key)], webauthn_assertions=[key.assert_on(dl)]))
    # a device alone no longer suffices
    laptop = Device()
    account.refuse(add(account, laptop, account.first), 403, "policy_not_met")
    dl = next_version(account.head, add_devices=[laptop.entry()], now_ms=now_ms())
    account.accept(
        signed_list(dl, [approve(dl, laptop.signing_key)], webauthn_assertions=[key.assert_on(dl)])  # key alone
    )
    account.verify()


# -- WebAuthn --------------------------------------------------------------------------------


@dataclass
class Key:
    authenticator: SoftAuthenticator
    credential_from_relay: WebAuthnCredential

    def assert_on(self, dl: DeviceList, **options: object) -> WebAuthnAssertion:
        return self.authenticator.get_assertion(list_hash(dl), **options)  # type: ignore[arg-type]


def begin(http: Http11, peer: Peer) -> WebAuthnRegistrationOptions:
    answer = http.request(
        "POST",
        "/v1/webauthn/register/begin",
        None,
        {"authorization": f"Bearer {peer.token}", "accept": codec.MSGPACK},
    )
    assert answer.status == 200, answer.body
    return codec.decode(answer.body, WebAuthnRegistrationOptions)


def complete(http: Http11, peer: Peer, registration: WebAuthnRegistration) -> Answer:
    return http.msgpack("POST", "/v1/webauthn/register/complete", registration, token=peer.token)


def register_key(http: Http11, peer: Peer) -> Key:
    options = begin(http, peer)
    assert options.rp_id == "127.0.0.1"  # the relay name's host, without the port
    authenticator = SoftAuthenticator(rp_id=options.rp_id)
    answer = complete(http, peer, authenticator.make_credential(options.challenge))
    assert answer.status == 200, answer.body
    credential = codec.decode(answer.body, WebAuthnCredential)
    assert credential.public_key == authenticator.public_key()
    return Key(authenticator, credential)


def test_registration_challenges_are_single_use_and_bound(relay: RelayProcess, http: Http11) -> None:
    account = Account(http, relay.name)
    peer = account.first.peer(account.id, relay.name)
    login(http, peer)
    other = Account(http, relay.name)
    stranger = other.first.peer(other.id, relay.name)
    login(http, stranger)
    options = begin(http, peer)
    authenticator = SoftAuthenticator(rp_id=options.rp_id)
    registration = authenticator.make_credential(options.challenge)
    answer = complete(http, stranger, registration)  # another account's device
    assert (answer.status, answer.code) == (401, "challenge_unknown")
    answer = complete(http, peer, registration)  # the stranger's attempt did not burn it
    assert answer.status == 200, answer.body
    answer = complete(http, peer, registration)
    assert (answer.status, answer.code) == (401, "challenge_used")
    # a response for another origin or a garbage attestation is webauthn_invalid (and burns the challenge)
    options = begin(http, peer)
    answer = complete(http, peer, authenticator.make_credential(options.challenge, origin="https://evil.example"))
    assert (answer.status, answer.code) == (401, "webauthn_invalid")
    options = begin(http, peer)
    garbage = msgspec.structs.replace(
        authenticator.make_credential(options.challenge), attestation_object=b"\xa1garbage"
    )
    assert complete(http, peer, garbage).code == "webauthn_invalid"
    bad_json = WebAuthnRegistration(credential_id=b"x", client_data_json=b"{", attestation_object=b"")
    assert complete(http, peer, bad_json).code == "webauthn_invalid"
    answer = http.request("POST", "/v1/webauthn/register/begin", None, {"accept": codec.JSON})
    assert (answer.status, answer.code) == (401, "missing_token")


def test_webauthn_refusals(relay: RelayProcess, http: Http11) -> None:
    account = Account(http, relay.name)
    peer = account.first.peer(account.id, relay.name)
    login(http, peer)
    key = register_key(http, peer)

    # an unregistered credential cannot be added, even with a valid assertion
    loose = SoftAuthenticator(rp_id="127.0.0.1")
    dl = next_version(account.head, add_credentials=[loose.credential(now_ms())], now_ms=now_ms())
    account.refuse(
        signed_list(
            dl, [approve(dl, account.first.signing_key)], webauthn_assertions=[loose.get_assertion(list_hash(dl))]
        ),
        401,
        "webauthn_invalid",
    )
    # a registered one is added with a proof of possession whose counter is above the registration's
    dl = next_version(account.head, add_credentials=[key.credential_from_relay], now_ms=now_ms())
    stale = key.assert_on(dl, counter=0)  # the registration's counter was 0: 0 after 0 is accepted...
    key.authenticator.counter = 5
    account.accept(signed_list(dl, [approve(dl, account.first.signing_key)], webauthn_assertions=[stale]))

    # ...but once a counter was seen, it must go up
    laptop = Device()
    dl = next_version(account.head, add_devices=[laptop.entry()], now_ms=now_ms())
    first = key.assert_on(dl)  # counter 6
    account.accept(signed_list(dl, [approve(dl, laptop.signing_key)], webauthn_assertions=[first]))

    tablet = Device()
    dl = next_version(account.head, add_devices=[tablet.entry()], now_ms=now_ms())
    self_signed = [approve(dl, tablet.signing_key)]
    replayed = key.assert_on(dl, counter=6)  # the same counter again: a replay or a clone
    account.refuse(signed_list(dl, self_signed, webauthn_assertions=[replayed]), 401, "webauthn_replayed")
    regressed = key.assert_on(dl, counter=2)
    account.refuse(signed_list(dl, self_signed, webauthn_assertions=[regressed]), 401, "webauthn_replayed")
    wrong_origin = key.assert_on(dl, origin="https://evil.example")
    account.refuse(signed_list(dl, self_signed, webauthn_assertions=[wrong_origin]), 401, "webauthn_invalid")
    other_list = key.assert_on(account.head)  # an assertion over another version
    account.refuse(signed_list(dl, self_signed, webauthn_assertions=[other_list]), 401, "webauthn_invalid")
    # the refused assertions moved no counter: 7 is still accepted
    account.accept(signed_list(dl, self_signed, webauthn_assertions=[key.assert_on(dl, counter=7)]))
    account.verify()


# -- revocation ------------------------------------------------------------------------------------


class Stream:
    """An open inbox stream (JSON Lines over HTTP/1.1), read line by line."""

    def __init__(self, client: Http11, token: str) -> None:
        self.conn = httplib.HTTPConnection(client.host, client.port, timeout=30)
        self.conn.request(
            "GET", "/v1/inbox/stream?after=0", headers={"authorization": f"Bearer {token}", "accept": codec.JSON}
        )
        self.response = self.conn.getresponse()
        assert self.response.status == 200

    def next(self) -> dict[str, object] | None:
        line = self.response.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def opened() -> Iterator[list[Stream]]:
    streams: list[Stream] = []
    yield streams
    for stream in streams:
        stream.close()


def send(http: Http11, sender: Peer, to: str) -> Answer:
    body = {"envelopes": [{"recipient": to, "idempotency_key": os.urandom(16), "ciphertext": b"sealed"}]}
    return http.msgpack("POST", "/v1/messages", body, token=sender.token)


def queued(relay: RelayProcess, device_id: str) -> int:
    """Envelopes stored for ``device_id``, read from the relay's database (SQLite file or PostgreSQL)."""
    url = relay.env.get("TETHERLESS_DATABASE")
    if url:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM envelopes WHERE recipient = %s", (device_id,)).fetchone()
            return int(row[0]) if row else 0
    db = sqlite3.connect(f"file:{relay.data_dir / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM envelopes WHERE recipient = ?", (device_id,)).fetchone()[0])
    finally:
        db.close()


@pytest.fixture(params=["sqlite", "postgres"])
def any_relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayProcess]:
    """A relay on SQLite, or on a fresh PostgreSQL database (where wake-ups travel by LISTEN/NOTIFY)."""
    with contextlib.ExitStack() as stack:
        env = {}
        if request.param == "postgres":
            env["TETHERLESS_DATABASE"] = stack.enter_context(fresh_database("tl_e2e"))
            env["TETHERLESS_NAME"] = "devices.test"  # a shared database needs a relay name (decision 0008)
        process = RelayProcess(tmp_path / "relay-data", env=env)
        process.start()
        try:
            yield process
        finally:
            assert process.stop() == 0


def test_revocation_cuts_a_device_off(any_relay: RelayProcess, opened: list[Stream]) -> None:
    relay = any_relay
    http = Http11(relay.url)
    account = Account(http, relay.name)
    lost = Device()
    account.accept(add(account, lost, account.first))
    keeper = account.first.peer(account.id, relay.name)
    thief = lost.peer(account.id, relay.name)
    login(http, keeper)
    login(http, thief)
    for _ in range(2):
        assert send(http, keeper, thief.address).status == 201
    assert queued(relay, lost.device_id) == 2
    stream = Stream(http, thief.token)
    opened.append(stream)
    keeper_stream = Stream(http, keeper.token)
    opened.append(keeper_stream)
    assert [stream.next()["type"], stream.next()["type"]] == ["envelope", "envelope"]  # type: ignore[index]
    stale_challenge = codec.decode(
        http.msgpack("POST", "/v1/auth/challenge", {"device_id": lost.device_id}).body, Challenge
    )

    accepted = account.accept(remove(account, lost, account.first))

    # the revoked device's open stream gets the change, then ends
    assert stream.next() == {"type": "device_list", "account_id": account.id, "version": accepted.version}
    assert stream.next() is None
    assert keeper_stream.next() == {"type": "device_list", "account_id": account.id, "version": accepted.version}
    # its tokens, challenges and sessions are dead
    answer = http.get("/v1/inbox", token=thief.token)
    assert (answer.status, answer.code) == (401, "device_revoked")
    answer = http.msgpack("POST", "/v1/auth/challenge", {"device_id": lost.device_id})
    assert (answer.status, answer.code) == (401, "device_revoked")
    answer = http.msgpack(
        "POST",
        "/v1/auth/session",
        {"device_id": lost.device_id, "nonce": stale_challenge.nonce, "signature": b"\x00" * 64},
    )
    assert (answer.status, answer.code) == (401, "device_revoked")
    # its queued envelopes are gone, and nothing new reaches it
    assert queued(relay, lost.device_id) == 0
    answer = send(http, keeper, thief.address)
    assert (answer.status, answer.code) == (410, "recipient_revoked")
    # the chain is served whole and verifies; the keeper goes on
    account.verify()
    assert send(http, keeper, keeper.address).status == 201
    assert "relay_devices_revoked_total 1.0" in http.get("/metrics").body.decode()

    # an approval by the revoked device counts for nothing: its signature is by no device of the
    # previous version (nor a device the version adds), so the version is refused as bad_signature
    newcomer = Device()
    account.refuse(add(account, newcomer, lost), 401, "bad_signature")
    # and it cannot come back
    dl = next_version(account.head, add_devices=[lost.entry()], now_ms=now_ms())
    account.refuse(
        signed_list(dl, [approve(dl, account.first.signing_key), approve(dl, lost.signing_key)]),
        422,
        "invalid_device_list",
    )


# -- bad input: exact code, unchanged chain --------------------------------------------------------


def test_bad_versions_change_nothing(relay: RelayProcess, http: Http11) -> None:
    account = Account(http, relay.name)
    second = Device()
    account.accept(add(account, second, account.first))
    old = account.head
    account.accept(add(account, Device(), account.first))

    newcomer = Device()
    good = add(account, newcomer, account.first)
    dl = good.device_list
    # breaking the hash chain, a gap, a replay of an old version: device_list_conflict
    broken = msgspec.structs.replace(dl, prev_hash=b"\x01" * 32)
    account.refuse(
        signed_list(broken, [approve(broken, account.first.signing_key), approve(broken, newcomer.signing_key)]),
        409,
        "device_list_conflict",
    )
    gap = msgspec.structs.replace(dl, version=dl.version + 1)
    account.refuse(
        signed_list(gap, [approve(gap, account.first.signing_key), approve(gap, newcomer.signing_key)]),
        409,
        "device_list_conflict",
    )
    replay = add_to(old, newcomer, account.first)
    account.refuse(replay, 409, "device_list_conflict")
    # a version breaking the policy rules: threshold above the number of approvers it could ever have
    impossible = next_version(account.head, policy=Policy(threshold=16), now_ms=now_ms())
    account.refuse(
        signed_list(impossible, [approve(impossible, account.first.signing_key)]), 422, "invalid_device_list"
    )
    # no approval at all by a device of the previous version
    unapproved = signed_list(dl, [approve(dl, newcomer.signing_key)])
    account.refuse(unapproved, 403, "policy_not_met")
    # a wrong signature
    forged = msgspec.structs.replace(
        good, signatures=[msgspec.structs.replace(s, signature=b"\x00" * 64) for s in good.signatures]
    )
    account.refuse(forged, 401, "bad_signature")
    # back-dated by more than 10 minutes
    dated = msgspec.structs.replace(dl, created_at_ms=account.head.created_at_ms)
    if now_ms() - dated.created_at_ms <= 10 * 60 * 1000:
        dated = msgspec.structs.replace(dl, created_at_ms=now_ms() + 3_600_000)  # or post-dated
    account.refuse(
        signed_list(dated, [approve(dated, account.first.signing_key), approve(dated, newcomer.signing_key)]),
        422,
        "invalid_device_list",
    )
    # another account's path
    other = Account(http, relay.name)
    before = other.chain_bytes()
    answer = http.msgpack("POST", other.path, {"signed": good})
    assert (answer.status, answer.code) == (422, "invalid_device_list")
    assert other.chain_bytes() == before
    # an unknown account
    nobody = Device()
    unposted = genesis_v2(nobody.signing_key, bytes(nobody.box_key.public_key), now_ms=now_ms()).device_list
    orphan = add_to(unposted, Device(), nobody)
    answer = http.msgpack("POST", f"/v1/accounts/{unposted.account_id}/devices", {"signed": orphan})
    assert (answer.status, answer.code) == (404, "unknown_account")
    # malformed and mistyped bodies
    before = account.chain_bytes()
    for content_type, body in ((codec.MSGPACK, b"\xc1"), (codec.JSON, b"{not json")):
        answer = http.request("POST", account.path, body, {"content-type": content_type})
        assert (answer.status, answer.code) == (400, "malformed_body")
    answer = http.request("POST", account.path, b'{"signed": 5}', {"content-type": codec.JSON})
    assert (answer.status, answer.code) == (422, "invalid_field")
    answer = http.request("POST", account.path, b"", {"content-type": codec.JSON})
    assert (answer.status, answer.code) == (400, "malformed_body")
    assert account.chain_bytes() == before
    # after all that, the good version is still accepted
    account.accept(good)
    account.verify()


def add_to(prev: DeviceList, new: Device, *approvers: Device) -> SignedDeviceList:
    dl = next_version(prev, add_devices=[new.entry()], now_ms=now_ms())
    return signed_list(dl, [approve(dl, d.signing_key) for d in (*approvers, new)])


# -- configuration: per-account rate limit, rp id and origin allowlist --------------------------


@pytest.fixture
def strict_relay(tmp_path: Path) -> Iterator[RelayProcess]:
    env = {
        "TETHERLESS_RATE_ACCOUNT_LIST_CHANGES_PER_SECOND": "0.001",
        "TETHERLESS_RATE_ACCOUNT_LIST_CHANGES_BURST": "2",
        "TETHERLESS_WEBAUTHN_RP_ID": "example.org",
        "TETHERLESS_WEBAUTHN_ORIGINS": "https://app.example.org",
    }
    process = RelayProcess(tmp_path / "strict", env=env)
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0


def test_rate_limit_rp_id_and_origins_from_config(strict_relay: RelayProcess) -> None:
    http = Http11(strict_relay.url)
    account = Account(http, strict_relay.name)
    peer = account.first.peer(account.id, strict_relay.name)
    login(http, peer)
    options = begin(http, peer)
    assert options.rp_id == "example.org"
    # a subdomain origin is valid for the rp id, but not in webauthn_origins
    elsewhere = SoftAuthenticator(rp_id="example.org", origin="https://other.example.org")
    answer = complete(http, peer, elsewhere.make_credential(options.challenge))
    assert (answer.status, answer.code) == (401, "webauthn_invalid")
    app = SoftAuthenticator(rp_id="example.org", origin="https://app.example.org")
    answer = complete(http, peer, app.make_credential(begin(http, peer).challenge))
    assert answer.status == 200, answer.body
    credential = codec.decode(answer.body, WebAuthnCredential)
    dl = next_version(account.head, add_credentials=[credential], now_ms=now_ms())
    signatures = [approve(dl, account.first.signing_key)]
    wrong = app.get_assertion(list_hash(dl), origin="https://other.example.org")
    account.refuse(signed_list(dl, signatures, webauthn_assertions=[wrong]), 401, "webauthn_invalid")
    account.accept(signed_list(dl, signatures, webauthn_assertions=[app.get_assertion(list_hash(dl))]))
    # the per-account budget (burst 2) is spent by the two posts above
    before = account.chain_bytes()
    answer = account.post(add(account, Device(), account.first))
    assert (answer.status, answer.code) == (429, "rate_limited")
    assert answer.headers["retry-after"]
    assert account.chain_bytes() == before


def test_federated_envelopes_to_a_revoked_device_are_rejected(tmp_path: Path) -> None:
    with mesh(tmp_path, ["a.test", "b.test"]) as m:
        a, b = m["a.test"], m["b.test"]
        http = Http11(b.url)
        account = Account(http, b.name)
        lost = Device()
        account.accept(add(account, lost, account.first))
        account.accept(remove(account, lost, account.first))
        a_key = nacl.signing.SigningKey((a.data_dir / "relay.key").read_bytes())
        envelope = FederatedEnvelope(
            id=os.urandom(16),
            recipient=f"{lost.device_id}.{account.id}@b.test",
            sent_at_ms=now_ms(),
            expires_at_ms=now_ms() + 60_000,
            ciphertext=b"sealed",
        )
        body = codec.encode(DeliverRequest(envelopes=[envelope]))
        headers = federation.sign_request(
            a_key,
            method="POST",
            authority=f"127.0.0.1:{b.port}",
            path="/federation/v1/deliver",
            body=body,
            origin="a.test",
            destination="b.test",
            created=int(time.time()),
            nonce=base64.urlsafe_b64encode(os.urandom(18)).decode(),
        )
        answer = http.request(
            "POST",
            "/federation/v1/deliver",
            body,
            dict(headers) | {"content-type": codec.MSGPACK, "accept": codec.MSGPACK},
        )
        assert answer.status == 200, answer.body
        (result,) = codec.decode(answer.body, DeliverResponse).results
        assert (result.outcome, result.code) == ("rejected", "recipient_revoked")
        assert queued(b, lost.device_id) == 0
