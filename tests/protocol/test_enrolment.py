"""Link codes and their derivations (protocol/enrolment.py, crypto.md §5.1), against protocol/vectors/v2.json."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

import msgspec
import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from protocol import enrolment, prekeys
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import device_id_for
from protocol.messages import DeviceEntry, EnrolmentBundle
from protocol.signing import layout
from tests.protocol import vectors_gen

SECRET = bytes(range(15))
RELAY = "relay.example"


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    """The section as committed (tests/protocol/test_vectors.py checks it equals the computation)."""
    data: dict[str, Any] = json.loads(vectors_gen.VECTORS_V2.read_text(encoding="utf-8"))["enrolment"]
    return data


def _hkdf(ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with hmac, independent of the library call the module makes."""
    prk = hmac.new(bytes(32), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def test_vectors_recomputed_independently(vectors: dict[str, Any]) -> None:
    assert len(vectors["link_codes"]) == 6
    for case in vectors["link_codes"]:
        secret, relay = bytes.fromhex(case["secret"]), case["relay"]
        lookup = _hkdf(secret, layout("link-lookup", relay), 10)
        assert lookup.hex() == case["lookup_id"]
        k_offer = _hkdf(secret, layout("link-offer", relay), 32)
        k_approve = _hkdf(secret, layout("link-approve", relay), 32)
        assert (k_offer.hex(), k_approve.hex()) == (case["k_offer"], case["k_approve"])
        offer = case["offer"]
        message = layout(
            "link-offer",
            relay,
            lookup,
            bytes.fromhex(offer["sign_key"]),
            bytes.fromhex(offer["box_key"]),
            offer["created_at_ms"],
        )
        assert hmac.new(k_offer, message, hashlib.sha256).hexdigest() == offer["offer_mac"]
        approval = case["approval"]
        message = layout(
            "link-approval",
            relay,
            lookup,
            approval["account_id"],
            approval["version"],
            bytes.fromhex(approval["list_hash"]),
        )
        assert hmac.new(k_approve, message, hashlib.sha256).hexdigest() == approval["approval_tag"]
        assert enrolment.parse_link_code(case["code"]) == secret
        assert enrolment.parse_link_qr(case["qr"]) == (relay, secret)
        assert enrolment.parse_lookup_id(case["lookup_id_text"]) == lookup


def test_prekey_vectors_verify(vectors: dict[str, Any]) -> None:
    kinds = set()
    for case in vectors["prekeys"]:
        layout_bytes = prekeys.prekey_layout(
            case["device_id"], case["kind"], case["key_id"], bytes.fromhex(case["public_key"]), case["created_at_ms"]
        )
        assert hashlib.sha256(layout_bytes).hexdigest() == case["layout_sha256"]
        key = nacl.signing.SigningKey(bytes.fromhex(case["seed"]))
        nacl.signing.VerifyKey(bytes(key.verify_key)).verify(layout_bytes, bytes.fromhex(case["signature"]))
        kinds.add(case["kind"])
    assert len(kinds) == 4


# -- the code as text and as a QR payload -------------------------------------------------------------


def test_code_text_shape() -> None:
    text = enrolment.link_code_text(SECRET)
    assert re.fullmatch(r"tl-([a-z2-7]{4}-){5}[a-z2-7]{4}", text), text


@pytest.mark.parametrize(
    "transform",
    [
        lambda t: t,
        str.upper,
        lambda t: t.replace("-", ""),
        lambda t: t.replace("-", " "),
        lambda t: "  " + t.removeprefix("tl-") + "\n",
        lambda t: t[3:].upper().replace("-", " - "),
    ],
)
def test_parse_ignores_case_dashes_spaces_and_prefix(transform: Any) -> None:
    assert enrolment.parse_link_code(transform(enrolment.link_code_text(SECRET))) == SECRET


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "has 0"),
        ("tl-abcd", "has 4"),
        ("tl-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa-a", "has 25"),
        ("tl-aaaa-aaaa-aaaa-aaaa-aaaa-aaa0", "'0'"),
        ("tl-aaaa-aaaa-aaaa-aaaa-aaaa-aa18", "'1', '8'"),
        ("tl_aaaa-aaaa-aaaa-aaaa-aaaa-aaaa", "'_'"),
    ],
)
def test_malformed_codes_raise_clear_value_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        enrolment.parse_link_code(text)


def test_qr_round_trip_and_rejects() -> None:
    qr = enrolment.link_qr("Relay.Example:8443", SECRET)
    assert qr.startswith("tetherless:link?v=1&r=Relay.Example:8443&k=")
    assert enrolment.parse_link_qr(qr) == ("relay.example:8443", SECRET)
    for bad in ("https://example.com", "tetherless:link?v=2&r=a&k=b", "tetherless:link?v=1&k=aaaa"):
        with pytest.raises(ValueError, match=r"."):
            enrolment.parse_link_qr(bad)


def test_secret_must_be_fifteen_bytes() -> None:
    for wrong in (b"", bytes(14), bytes(16)):
        with pytest.raises(ValueError, match="15 random bytes"):
            enrolment.new_link_secret(wrong)


@pytest.mark.parametrize("text", ["", "a" * 15, "a" * 17, "aaaaaaaaaaaaaaa1", "aaaaaaaaaaaaaaa=", "aaaaaaaaaaaaaaa\n"])
def test_malformed_lookup_ids(text: str) -> None:
    assert enrolment.parse_lookup_id(text) is None


def test_derivations_are_separated() -> None:
    lookup = enrolment.lookup_id(SECRET, RELAY)
    assert len(lookup) == 10
    assert len(enrolment.lookup_id_text(lookup)) == 16
    assert lookup != enrolment.lookup_id(SECRET, "other.example")  # another relay finds nothing
    assert enrolment.k_offer(SECRET, RELAY) != enrolment.k_approve(SECRET, RELAY)
    assert enrolment.parse_lookup_id(enrolment.lookup_id_text(lookup).upper()) == lookup


# -- offers and approvals -----------------------------------------------------------------------------


def new_device() -> tuple[nacl.signing.SigningKey, bytes, EnrolmentBundle]:
    key = nacl.signing.SigningKey(bytes(range(32)))
    device_id = device_id_for(bytes(key.verify_key))
    mlkem = MLKEM768PrivateKey.from_seed_bytes(bytes(64)).public_key().public_bytes_raw()
    bundle = EnrolmentBundle(
        signed_prekey=prekeys.sign_prekey(key, device_id, "x25519-signed", 1, bytes(range(32)), 5),
        pq_prekey=prekeys.sign_prekey(key, device_id, "mlkem768-last-resort", 1, mlkem, 5),
    )
    return key, bytes([9]) * 32, bundle


def test_offer_mac_proves_the_code_and_the_keys() -> None:
    key, box_key, bundle = new_device()
    offer = enrolment.make_offer(SECRET, RELAY, key, box_key, bundle, 1234)
    assert offer.lookup_id == enrolment.lookup_id(SECRET, RELAY)
    enrolment.verify_offer_mac(SECRET, offer)
    enrolment.verify_offer_prekeys(offer)
    wrong_secret = bytes(15)
    tampered = [
        msgspec.structs.replace(offer, box_key=bytes(32)),
        msgspec.structs.replace(offer, created_at_ms=1235),
        msgspec.structs.replace(offer, lookup_id=bytes(10)),
        msgspec.structs.replace(offer, relay="other.example"),
    ]
    with pytest.raises(enrolment.LinkCodeMismatchError):
        enrolment.verify_offer_mac(wrong_secret, offer)
    for changed in tampered:
        with pytest.raises(enrolment.LinkCodeMismatchError):
            enrolment.verify_offer_mac(SECRET, changed)


def test_offer_prekeys_must_be_signed_by_the_offered_key_with_the_right_kinds() -> None:
    key, box_key, bundle = new_device()
    other = nacl.signing.SigningKey(bytes([7]) * 32)
    foreign = EnrolmentBundle(
        signed_prekey=prekeys.sign_prekey(
            other, device_id_for(bytes(key.verify_key)), "x25519-signed", 1, bytes(32), 5
        ),
        pq_prekey=bundle.pq_prekey,
    )
    swapped = EnrolmentBundle(signed_prekey=bundle.pq_prekey, pq_prekey=bundle.signed_prekey)
    for bad in (foreign, swapped):
        offer = enrolment.make_offer(SECRET, RELAY, key, box_key, bad, 1234)
        with pytest.raises(TetherlessError) as info:
            enrolment.verify_offer_prekeys(offer)
        assert info.value.code is ErrorCode.PREKEY_INVALID


def test_approval_tag_binds_the_version() -> None:
    tag = enrolment.approval_tag(SECRET, RELAY, "a" * 32, 2, bytes(32))
    enrolment.verify_approval_tag(SECRET, RELAY, "a" * 32, 2, bytes(32), tag)
    for args in (("b" * 32, 2, bytes(32)), ("a" * 32, 3, bytes(32)), ("a" * 32, 2, bytes([1]) * 32)):
        with pytest.raises(enrolment.LinkCodeMismatchError):
            enrolment.verify_approval_tag(SECRET, RELAY, *args, tag)


def test_offer_bundle_is_the_new_devices_prekey_bundle() -> None:
    key, box_key, bundle = new_device()
    offer = enrolment.make_offer(SECRET, RELAY, key, box_key, bundle, 1234)
    as_bundle = enrolment.offer_bundle(offer, "a" * 32)
    assert as_bundle.address == f"{device_id_for(offer.sign_key)}.{'a' * 32}@{RELAY}"
    entry = DeviceEntry(
        device_id=device_id_for(offer.sign_key), sign_key=offer.sign_key, box_key=box_key, added_at_ms=1
    )
    prekeys.verify_bundle(as_bundle, entry)
