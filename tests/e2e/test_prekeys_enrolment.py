"""Prekeys and enrolment on a real relay process: exact answers and codes, and bad input changes nothing.

docs/crypto.md §5.2 (enrolment) and §7.2 (prekeys); every refusal is checked
for its code *and* for the store being unchanged afterwards (counts read
back, the lookup id still free or still open).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nacl.public
import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from protocol import codec, device_list, enrolment, prekeys
from protocol.ids import device_id_for
from protocol.messages import (
    AccountCreated,
    ClaimPrekeysResponse,
    DeviceEntry,
    DeviceListChain,
    EnrolmentBundle,
    EnrolmentOffer,
    EnrolmentOfferAccepted,
    EnrolmentProposal,
    EnrolmentProposalAccepted,
    PrekeyCounts,
    PrekeyKind,
    SignedPrekey,
)
from tests.e2e.http11 import Answer, Http11, Peer, login, register
from tests.e2e.test_federation import mesh
from tests.relay_process import RelayProcess

MLKEM_PUBLIC = MLKEM768PrivateKey.from_seed_bytes(bytes(range(64))).public_key().public_bytes_raw()
NOW_MS = 1_700_000_000_000


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    # Lookups are limited per device; this module's tests approve with many fresh devices anyway,
    # and the limit itself is tested on the short-TTL relay below (default 10 per minute).
    env = {"TETHERLESS_RATE_ENROLMENT_LOOKUPS_PER_MINUTE": "1000"}
    process = RelayProcess(tmp_path_factory.mktemp("prekeys") / "data", env=env)
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0


@pytest.fixture(scope="module")
def http(relay: RelayProcess) -> Http11:
    return Http11(relay.url)


def user(http: Http11, name: str = "user") -> Peer:
    peer = register(http, name)
    login(http, peer)
    return peer


def prekey(
    peer: Peer | nacl.signing.SigningKey, kind: PrekeyKind, key_id: int, public: bytes | None = None
) -> SignedPrekey:
    key = peer.signing_key if isinstance(peer, Peer) else peer
    device = device_id_for(bytes(key.verify_key))
    if public is None:
        public = MLKEM_PUBLIC if kind.startswith("mlkem") else bytes([key_id % 256]) * 32
    return prekeys.sign_prekey(key, device, kind, key_id, public, NOW_MS)


def upload(http: Http11, peer: Peer, **body: object) -> Answer:
    return http.msgpack("PUT", "/v1/prekeys", body, peer.token)


def counts(http: Http11, peer: Peer) -> PrekeyCounts:
    answer = http.get("/v1/prekeys", peer.token)
    assert answer.status == 200, answer.body
    return codec.decode(answer.body, PrekeyCounts, codec.JSON)


def full_upload(http: Http11, peer: Peer, one_time: int = 0, pq_one_time: int = 0) -> PrekeyCounts:
    answer = upload(
        http,
        peer,
        signed_prekey=prekey(peer, "x25519-signed", 1),
        last_resort=prekey(peer, "mlkem768-last-resort", 1),
        one_time=[prekey(peer, "x25519-one-time", i) for i in range(1, one_time + 1)]
        + [prekey(peer, "mlkem768-one-time", i) for i in range(1, pq_one_time + 1)],
    )
    assert answer.status == 200, answer.body
    return codec.decode(answer.body, PrekeyCounts)


def claim(http: Http11, claimer: Peer, *addresses: str) -> ClaimPrekeysResponse:
    answer = http.msgpack("POST", "/v1/prekeys/claim", {"devices": list(addresses)}, claimer.token)
    assert answer.status == 200, answer.body
    return codec.decode(answer.body, ClaimPrekeysResponse)


def entry(peer: Peer) -> DeviceEntry:
    return DeviceEntry(
        device_id=peer.device_id,
        sign_key=bytes(peer.signing_key.verify_key),
        box_key=bytes(peer.box_key.public_key),
        added_at_ms=0,
    )


# -- prekeys ---------------------------------------------------------------------------------------------


def test_upload_counts_and_claim(http: Http11) -> None:
    alice, bob = user(http, "alice"), user(http, "bob")
    assert counts(http, alice) == PrekeyCounts(x25519_one_time=0, mlkem_one_time=0)
    assert full_upload(http, alice, one_time=2, pq_one_time=1) == PrekeyCounts(
        x25519_one_time=2, mlkem_one_time=1, signed_prekey_id=1, last_resort_id=1
    )
    (bundle,) = claim(http, bob, alice.address).bundles
    prekeys.verify_bundle(bundle, entry(alice))  # what a sender checks against the verified list
    assert (bundle.pq_prekey.kind, bundle.pq_prekey.key_id) == ("mlkem768-one-time", 1)
    assert bundle.one_time_prekey is not None
    assert bundle.one_time_prekey.key_id == 1
    assert counts(http, alice) == PrekeyCounts(
        x25519_one_time=1, mlkem_one_time=0, signed_prekey_id=1, last_resort_id=1
    )
    # the next claim gets the next one-time key and, no PQ one-time key being left, the last-resort key
    (bundle,) = claim(http, bob, alice.address).bundles
    assert bundle.one_time_prekey is not None
    assert (bundle.one_time_prekey.key_id, bundle.pq_prekey.kind) == (2, "mlkem768-last-resort")


def test_exhausted_device_gets_a_bundle_without_one_time_key(http: Http11) -> None:
    alice, bob = user(http, "alice"), user(http, "bob")
    full_upload(http, alice)
    (bundle,) = claim(http, bob, alice.address).bundles
    assert bundle.one_time_prekey is None
    assert bundle.pq_prekey == prekey(alice, "mlkem768-last-resort", 1)
    prekeys.verify_bundle(bundle, entry(alice))


def test_one_time_keys_per_claiming_account_and_device_are_limited(http: Http11) -> None:
    alice, bob, carol = user(http, "alice"), user(http, "bob"), user(http, "carol")
    full_upload(http, alice, one_time=10, pq_one_time=10)
    bundles = claim(http, bob, *[alice.address] * 4).bundles
    assert [b.one_time_prekey is not None for b in bundles] == [True, True, True, False]
    assert [b.pq_prekey.kind for b in bundles] == ["mlkem768-one-time"] * 3 + ["mlkem768-last-resort"]
    assert claim(http, bob, alice.address).bundles[0].one_time_prekey is None  # still within the hour
    assert claim(http, carol, alice.address).bundles[0].one_time_prekey is not None  # another account
    assert counts(http, alice) == PrekeyCounts(
        x25519_one_time=6, mlkem_one_time=6, signed_prekey_id=1, last_resort_id=1
    )


def test_missing_devices(http: Http11, relay: RelayProcess) -> None:
    alice, bob, no_keys = user(http, "alice"), user(http, "bob"), user(http, "nokeys")
    full_upload(http, alice, one_time=1)
    unknown = f"{'q' * 32}.{alice.parsed.account}@{relay.name}"
    wrong_account = f"{alice.device_id}.{bob.parsed.account}@{relay.name}"
    remote = f"{alice.device_id}.{alice.parsed.account}@elsewhere.example"
    answer = claim(http, bob, unknown, alice.address, wrong_account, no_keys.address, remote)
    assert [b.address for b in answer.bundles] == [alice.address]
    assert sorted(answer.missing) == sorted([unknown, wrong_account, no_keys.address, remote])


@pytest.mark.parametrize(
    "devices",
    [[], ["not-an-address"], ["a" * 32 + "@relay.example"]],  # empty, malformed, an account (not a device)
)
def test_bad_claims(http: Http11, devices: list[str]) -> None:
    alice, bob = user(http, "alice"), user(http, "bob")
    before = full_upload(http, alice, one_time=1)
    answer = http.msgpack("POST", "/v1/prekeys/claim", {"devices": devices}, bob.token)
    assert (answer.status, answer.code) == (422, "invalid_field")
    assert counts(http, alice) == before


def bad_upload(http: Http11, peer: Peer, body: dict[str, object], code: str = "prekey_invalid") -> None:
    before = counts(http, peer)
    answer = upload(http, peer, **body)
    assert (answer.status, answer.code) == (422, code), answer.body
    assert counts(http, peer) == before


def test_bad_prekey_signature_changes_nothing(http: Http11) -> None:
    alice = user(http, "alice")
    full_upload(http, alice, one_time=1)
    forged = msgspec.structs.replace(prekey(alice, "x25519-one-time", 5), signature=bytes(64))
    bad_upload(http, alice, {"one_time": [prekey(alice, "x25519-one-time", 4), forged]})
    other = nacl.signing.SigningKey.generate()  # signed by a key that is not the device's
    bad_upload(http, alice, {"signed_prekey": prekey(other, "x25519-signed", 9)})


def test_wrong_lengths_and_kinds_change_nothing(http: Http11) -> None:
    alice = user(http, "alice")
    full_upload(http, alice)
    bad_upload(http, alice, {"signed_prekey": prekey(alice, "x25519-signed", 2, bytes(33))})
    bad_upload(http, alice, {"last_resort": prekey(alice, "mlkem768-last-resort", 2, bytes(32))})
    bad_upload(http, alice, {"last_resort": prekey(alice, "mlkem768-last-resort", 2, b"\xff" * 1184)})
    bad_upload(http, alice, {"signed_prekey": prekey(alice, "x25519-one-time", 2)})  # wrong slot
    bad_upload(http, alice, {"one_time": [prekey(alice, "x25519-signed", 2)]})
    bad_upload(http, alice, {"signed_prekey": prekey(alice, "x25519-signed", 2, bytes(1185))}, "invalid_field")


def test_reused_key_id_changes_nothing(http: Http11) -> None:
    alice, bob = user(http, "alice"), user(http, "bob")
    full_upload(http, alice, one_time=2)
    claim(http, bob, alice.address)  # serves (and deletes) one-time key 1
    bad_upload(http, alice, {"one_time": [prekey(alice, "x25519-one-time", 3), prekey(alice, "x25519-one-time", 1)]})
    bad_upload(http, alice, {"signed_prekey": prekey(alice, "x25519-signed", 1, bytes([7]) * 32)})
    # the very same keys again are a retried upload: accepted, nothing changes
    before = counts(http, alice)
    answer = upload(http, alice, signed_prekey=prekey(alice, "x25519-signed", 1))
    assert answer.status == 200
    assert codec.decode(answer.body, PrekeyCounts) == before


def test_too_many_one_time_keys(http: Http11) -> None:
    alice = user(http, "alice")
    full_upload(http, alice, one_time=200)
    bad_upload(http, alice, {"one_time": [prekey(alice, "x25519-one-time", 201)]}, "invalid_field")


def test_prekeys_need_a_token(http: Http11) -> None:
    assert http.get("/v1/prekeys").code == "missing_token"
    assert http.msgpack("PUT", "/v1/prekeys", {}).code == "missing_token"
    assert http.msgpack("POST", "/v1/prekeys/claim", {"devices": ["abc@relay"]}).code == "missing_token"


# -- enrolment ------------------------------------------------------------------------------------------


@dataclass
class NewDevice:
    """A device N that wants to join an account: its keys and its link secret K."""

    signing_key: nacl.signing.SigningKey
    box_key: nacl.public.PrivateKey
    secret: bytes
    relay: str

    @property
    def lookup(self) -> str:
        return enrolment.lookup_id_text(enrolment.lookup_id(self.secret, self.relay))

    def offer(self, **changes: object) -> EnrolmentOffer:
        device = device_id_for(bytes(self.signing_key.verify_key))
        bundle = EnrolmentBundle(
            signed_prekey=prekeys.sign_prekey(self.signing_key, device, "x25519-signed", 1, bytes(range(32)), NOW_MS),
            pq_prekey=prekeys.sign_prekey(self.signing_key, device, "mlkem768-last-resort", 1, MLKEM_PUBLIC, NOW_MS),
        )
        offer = enrolment.make_offer(
            self.secret, self.relay, self.signing_key, bytes(self.box_key.public_key), bundle, NOW_MS
        )
        return msgspec.structs.replace(offer, **changes)


def new_device(relay: RelayProcess) -> NewDevice:
    secret = enrolment.new_link_secret(os.urandom(15))
    return NewDevice(nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate(), secret, relay.name)


def proposal_for(approver: Peer, http: Http11, device: NewDevice, *, include_new: bool = True) -> EnrolmentProposal:
    chain = codec.decode(http.get(f"/v1/accounts/{approver.parsed.account}/devices").body, DeviceListChain, codec.JSON)
    head = chain.versions[-1].device_list
    new_entry = device_list.device_entry(
        bytes(device.signing_key.verify_key), bytes(device.box_key.public_key), added_at_ms=int(time.time() * 1000)
    )
    now_ms = int(time.time() * 1000)
    version = device_list.next_version(head, add_devices=[new_entry] if include_new else [], now_ms=now_ms)
    signed = device_list.signed_list(version, [device_list.approve(version, approver.signing_key)])
    tag = enrolment.approval_tag(
        device.secret, device.relay, version.account_id, version.version, device_list.list_hash(version)
    )
    return EnrolmentProposal(signed=signed, approval_tag=tag)


def post_offer(http: Http11, offer: EnrolmentOffer) -> Answer:
    return http.msgpack("POST", "/v1/enrolments", offer)


def test_enrolment_flow(http: Http11, relay: RelayProcess) -> None:
    alice = user(http, "alice")
    device = new_device(relay)
    started = time.time() * 1000
    answer = post_offer(http, device.offer())
    assert answer.status == 201, answer.body
    accepted = codec.decode(answer.body, EnrolmentOfferAccepted)
    assert started + 590_000 <= accepted.expires_at_ms <= time.time() * 1000 + 600_000  # 10 minutes
    # N polls: nothing yet
    assert http.get(f"/v1/enrolments/{device.lookup}/proposal").status == 204
    # A derives the lookup id from the typed code and checks the offer's MAC
    typed = enrolment.link_code_text(device.secret).upper().replace("-", " ")
    secret = enrolment.parse_link_code(typed)
    lookup = enrolment.lookup_id_text(enrolment.lookup_id(secret, relay.name))
    answer = http.get(f"/v1/enrolments/{lookup}", alice.token)
    assert answer.status == 200, answer.body
    offer = codec.decode(answer.body, EnrolmentOffer, codec.JSON)
    assert offer == device.offer()
    enrolment.verify_offer_mac(secret, offer)
    enrolment.verify_offer_prekeys(offer)
    proposal = proposal_for(alice, http, device)
    answer = http.msgpack("POST", f"/v1/enrolments/{lookup}/proposal", proposal, alice.token)
    assert answer.status == 201, answer.body
    assert codec.decode(answer.body, EnrolmentProposalAccepted).expires_at_ms == accepted.expires_at_ms
    # the same proposal again is an idempotent retry
    again = http.msgpack("POST", f"/v1/enrolments/{lookup}/proposal", proposal, alice.token)
    assert again.status == 201
    # N fetches the proposal (repeatably) and checks the approval tag
    for _ in range(2):
        answer = http.get(f"/v1/enrolments/{device.lookup}/proposal", accept=codec.MSGPACK)
        assert answer.status == 200, answer.body
        fetched = codec.decode(answer.body, EnrolmentProposal)
        assert fetched == proposal
    version = fetched.signed.device_list
    enrolment.verify_approval_tag(
        device.secret, relay.name, version.account_id, version.version, device_list.list_hash(version),
        fetched.approval_tag,
    )  # fmt: skip
    # the code is used now: the offer is gone for approvers, a second offer or proposal is refused
    assert http.get(f"/v1/enrolments/{lookup}", alice.token).code == "enrolment_used"
    assert (post_offer(http, device.offer()).status, post_offer(http, device.offer()).code) == (409, "enrolment_used")
    other = proposal_for(alice, http, device)
    other = msgspec.structs.replace(other, approval_tag=bytes(32))
    answer = http.msgpack("POST", f"/v1/enrolments/{lookup}/proposal", other, alice.token)
    assert (answer.status, answer.code) == (409, "enrolment_used")
    assert codec.decode(
        http.get(f"/v1/enrolments/{lookup}/proposal", accept=codec.MSGPACK).body, EnrolmentProposal
    ) == (proposal)
    # the offer's bundle is N's prekey bundle once it is in the account
    prekeys.verify_bundle(
        enrolment.offer_bundle(offer, alice.parsed.account),
        DeviceEntry(
            device_id=device_id_for(offer.sign_key), sign_key=offer.sign_key, box_key=offer.box_key, added_at_ms=0
        ),
    )
    # N self-signs the version and posts it (docs/crypto.md §5.2 step 4); then it is a device of the account
    own = device_list.approve(version, device.signing_key)
    signed = device_list.signed_list(version, [*fetched.signed.signatures, own])
    answer = http.msgpack("POST", f"/v1/accounts/{version.account_id}/devices", {"signed": signed})
    assert answer.status == 201, answer.body
    joined = Peer(device.signing_key, device.box_key, AccountCreated(
        account_id=version.account_id,
        device_id=device_id_for(offer.sign_key),
        address=f"{device_id_for(offer.sign_key)}.{version.account_id}@{relay.name}",
    ))  # fmt: skip
    login(http, joined)
    full_upload(http, joined, one_time=1)
    (bundle,) = claim(http, user(http, "bob"), joined.address).bundles
    prekeys.verify_bundle(bundle, entry(joined))


def enrol(http: Http11, relay: RelayProcess, approver: Peer) -> Peer:
    """The whole §5.2 flow, briefly: a new device joins ``approver``'s account and logs in."""
    device = new_device(relay)
    assert post_offer(http, device.offer()).status == 201
    proposal = proposal_for(approver, http, device)
    path = f"/v1/enrolments/{device.lookup}/proposal"
    assert http.msgpack("POST", path, proposal, approver.token).status == 201
    fetched = codec.decode(http.get(path, accept=codec.MSGPACK).body, EnrolmentProposal)
    version = fetched.signed.device_list
    own = device_list.approve(version, device.signing_key)
    signed = device_list.signed_list(version, [*fetched.signed.signatures, own])
    answer = http.msgpack("POST", f"/v1/accounts/{version.account_id}/devices", {"signed": signed})
    assert answer.status == 201, answer.body
    device_id = device_id_for(bytes(device.signing_key.verify_key))
    created = AccountCreated(
        account_id=version.account_id, device_id=device_id, address=f"{device_id}.{version.account_id}@{relay.name}"
    )
    joined = Peer(device.signing_key, device.box_key, created)
    login(http, joined)
    return joined


def test_a_revoked_devices_prekeys_are_gone(http: Http11, relay: RelayProcess) -> None:
    alice, bob = user(http, "alice"), user(http, "bob")
    second = enrol(http, relay, alice)
    full_upload(http, second, one_time=3, pq_one_time=3)
    chain = codec.decode(http.get(f"/v1/accounts/{alice.parsed.account}/devices").body, DeviceListChain, codec.JSON)
    head = chain.versions[-1].device_list
    version = device_list.next_version(head, remove_device_ids=[second.device_id], now_ms=int(time.time() * 1000))
    signed = device_list.signed_list(version, [device_list.approve(version, alice.signing_key)])
    answer = http.msgpack("POST", f"/v1/accounts/{alice.parsed.account}/devices", {"signed": signed})
    assert answer.status == 201, answer.body
    answer = claim(http, bob, second.address, alice.address)
    assert (answer.bundles, sorted(answer.missing)) == ([], sorted([second.address, alice.address]))
    assert http.get("/v1/prekeys", second.token).code == "device_revoked"
    db = sqlite3.connect(f"file:{relay.data_dir / 'relay.sqlite3'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT count(*) FROM prekeys WHERE device_id = ?", (second.device_id,)).fetchone() == (0,)
    finally:
        db.close()
    metrics = http.get("/metrics").body.decode()
    for name in ("relay_prekeys_uploaded_total", "relay_enrolments_created_total", "relay_enrolments_used_total"):
        assert name in metrics


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"relay": "other.example"}, "invalid_field"),
        ({"bundle": "swap"}, "prekey_invalid"),
        ({"bundle": "foreign"}, "prekey_invalid"),
        ({"bundle": "short"}, "prekey_invalid"),
    ],
)
def test_bad_offers_change_nothing(http: Http11, relay: RelayProcess, changes: dict[str, object], code: str) -> None:
    device = new_device(relay)
    good = device.offer()
    device_id = device_id_for(good.sign_key)
    other = nacl.signing.SigningKey.generate()
    bundles = {
        "swap": EnrolmentBundle(signed_prekey=good.bundle.pq_prekey, pq_prekey=good.bundle.signed_prekey),
        "foreign": EnrolmentBundle(
            signed_prekey=prekeys.sign_prekey(other, device_id, "x25519-signed", 1, bytes(32), NOW_MS),
            pq_prekey=good.bundle.pq_prekey,
        ),
        "short": EnrolmentBundle(
            signed_prekey=good.bundle.signed_prekey,
            pq_prekey=prekeys.sign_prekey(device.signing_key, device_id, "mlkem768-last-resort", 1, bytes(32), NOW_MS),
        ),
    }
    if "bundle" in changes:
        changes = {"bundle": bundles[str(changes["bundle"])]}
    answer = post_offer(http, msgspec.structs.replace(good, **changes))
    assert (answer.status, answer.code) == (422, code)
    # nothing was stored: the lookup id is free, and the good offer is accepted under it
    assert http.get(f"/v1/enrolments/{device.lookup}/proposal").code == "enrolment_unknown"
    assert post_offer(http, good).status == 201


@pytest.mark.parametrize(
    "lookup",
    ["abc", "a" * 15, "a" * 17, "0" * 16, "aaaaaaaaaaaaaaa%2F", "a" * 64, "aaaaaaaaaaaaaaaa"],
)
def test_malformed_or_unknown_lookup_ids(http: Http11, relay: RelayProcess, lookup: str) -> None:
    alice = user(http, "alice")
    proposal = proposal_for(alice, http, new_device(relay))
    answers = [
        http.get(f"/v1/enrolments/{lookup}", alice.token),
        http.get(f"/v1/enrolments/{lookup}/proposal"),
        http.msgpack("POST", f"/v1/enrolments/{lookup}/proposal", proposal, alice.token),
    ]
    assert [(a.status, a.code) for a in answers] == [(404, "enrolment_unknown")] * 3


def test_mistyped_code_finds_nothing(http: Http11, relay: RelayProcess) -> None:
    alice = user(http, "alice")
    device = new_device(relay)
    assert post_offer(http, device.offer()).status == 201
    code = enrolment.link_code_text(device.secret)
    typo = code[:-1] + ("a" if code[-1] != "a" else "b")
    lookup = enrolment.lookup_id_text(enrolment.lookup_id(enrolment.parse_link_code(typo), relay.name))
    assert http.get(f"/v1/enrolments/{lookup}", alice.token).code == "enrolment_unknown"
    with pytest.raises(ValueError, match="'0'"):
        enrolment.parse_link_code(code[:-1] + "0")
    # the real code still works
    assert http.get(f"/v1/enrolments/{device.lookup}", alice.token).status == 200


def test_proposals_that_are_refused_change_nothing(http: Http11, relay: RelayProcess) -> None:
    alice, mallory = user(http, "alice"), user(http, "mallory")
    device = new_device(relay)
    assert post_offer(http, device.offer()).status == 201
    path = f"/v1/enrolments/{device.lookup}/proposal"
    # a device of another account proposing alice's list, and one proposing its own
    answer = http.msgpack("POST", path, proposal_for(alice, http, device), mallory.token)
    assert (answer.status, answer.code) == (403, "forbidden")
    # mallory's own account adding the device is fine for the relay; here it lacks the device
    answer = http.msgpack("POST", path, proposal_for(mallory, http, device, include_new=False), mallory.token)
    assert (answer.status, answer.code) == (422, "invalid_field")
    answer = http.msgpack("POST", path, {"signed": "x", "approval_tag": bytes(32)}, alice.token)
    assert (answer.status, answer.code) == (422, "invalid_field")
    answer = http.msgpack("POST", path, proposal_for(alice, http, device))
    assert (answer.status, answer.code) == (401, "missing_token")
    # unchanged: no proposal, the offer is still open to alice
    assert http.get(path).status == 204
    assert http.get(f"/v1/enrolments/{device.lookup}", alice.token).status == 200
    assert http.msgpack("POST", path, proposal_for(alice, http, device), alice.token).status == 201


# -- expiry and the lookup limit (a relay with a one-second TTL and the default lookup limit) -------------


@pytest.fixture(scope="module")
def short_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    env = {"TETHERLESS_ENROLMENT_TTL_SECONDS": "1"}
    process = RelayProcess(tmp_path_factory.mktemp("short-ttl") / "data", env=env)
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0


def test_expired_offer(short_relay: RelayProcess) -> None:
    http = Http11(short_relay.url)
    alice = user(http, "alice")
    device = new_device(short_relay)
    answer = post_offer(http, device.offer())
    assert answer.status == 201
    expires_at_ms = codec.decode(answer.body, EnrolmentOfferAccepted).expires_at_ms
    proposal = proposal_for(alice, http, device)
    time.sleep(max(0.0, expires_at_ms / 1000 - time.time()) + 0.1)
    assert (http.get(f"/v1/enrolments/{device.lookup}", alice.token).status) == 410
    assert http.get(f"/v1/enrolments/{device.lookup}", alice.token).code == "enrolment_expired"
    answer = http.msgpack("POST", f"/v1/enrolments/{device.lookup}/proposal", proposal, alice.token)
    assert (answer.status, answer.code) == (410, "enrolment_expired")
    answer = http.get(f"/v1/enrolments/{device.lookup}/proposal")
    assert (answer.status, answer.code) == (410, "enrolment_expired")
    answer = post_offer(http, device.offer())
    assert (answer.status, answer.code) == (409, "enrolment_used")


def test_offer_lookups_are_limited_per_device(short_relay: RelayProcess) -> None:
    http = Http11(short_relay.url)
    alice = user(http, "alice")
    for _ in range(10):
        assert http.get(f"/v1/enrolments/{'a' * 16}", alice.token).code == "enrolment_unknown"
    answer = http.get(f"/v1/enrolments/{'a' * 16}", alice.token)
    assert (answer.status, answer.code) == (429, "rate_limited")
    assert int(answer.headers["retry-after"]) >= 1
    assert http.get(f"/v1/enrolments/{'a' * 16}", user(http, "bob").token).code == "enrolment_unknown"


# -- claims across relays ---------------------------------------------------------------------------------


def test_claims_of_remote_devices_go_to_their_home_relay(tmp_path: Path) -> None:
    with mesh(tmp_path, ["a.test", "b.test"]) as relays:
        on_a, on_b = Http11(relays["a.test"].url), Http11(relays["b.test"].url)
        ann, amy, ben = user(on_a, "ann"), user(on_a, "amy"), user(on_b, "ben")
        full_upload(on_b, ben, one_time=5, pq_one_time=5)
        full_upload(on_a, amy, one_time=1)
        elsewhere = f"{ben.device_id}.{ben.parsed.account}@c.test"  # a relay nobody can reach
        answer = claim(on_a, ann, ben.address, amy.address, elsewhere, ben.address)
        assert [b.address for b in answer.bundles] == [amy.address, ben.address, ben.address]
        assert answer.missing == [elsewhere]
        for bundle in answer.bundles[1:]:
            prekeys.verify_bundle(bundle, entry(ben))
            assert bundle.one_time_prekey is not None
        # the per-pair limit holds across relays: (ann's account, via a.test) has one more of each kind
        bundles = claim(on_a, ann, ben.address, ben.address).bundles
        assert [b.one_time_prekey is not None for b in bundles] == [True, False]
        assert counts(on_b, ben) == PrekeyCounts(
            x25519_one_time=2, mlkem_one_time=2, signed_prekey_id=1, last_resort_id=1
        )
        # an unsigned request to the federation endpoint is refused and serves nothing
        request = {"claimer_account": ann.parsed.account, "devices": [ben.address]}
        assert on_b.msgpack("POST", "/federation/v1/prekeys/claim", request).code == "signature_missing"
        assert counts(on_b, ben).x25519_one_time == 2
