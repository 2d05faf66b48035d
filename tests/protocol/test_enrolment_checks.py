"""The checks of protocol/enrolment.py that mutation testing found unpinned (docs/security.md "Mutation testing").

Every error here is what a user reads after typing or scanning a code, or what the approving device
reports about an offer fetched from the relay, so each is asserted with its exact text: a test that
only checks the type passes when a different check than the one it names refused.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import msgspec
import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from protocol import enrolment, prekeys
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import device_id_for
from protocol.messages import DeviceEntry, EnrolmentBundle, EnrolmentOffer

SECRET = bytes(range(15))
RELAY = "relay.example"
CODE = enrolment.link_code_text(SECRET).removeprefix(enrolment.CODE_PREFIX)
ACCOUNT = "a" * 32


def refuses(message: str, call: Callable[..., object], *args: object) -> None:
    """``call(*args)`` raises ``ValueError`` with exactly ``message``."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call(*args)


# -- typed codes ------------------------------------------------------------------------------------


def test_a_code_whose_letters_begin_with_tl_is_not_taken_for_the_prefix() -> None:
    secret = base64.b32decode("TL" + "A" * 22)
    text = enrolment.link_code_text(secret)
    assert text == "tl-tlaa-aaaa-aaaa-aaaa-aaaa-aaaa"
    for typed in (text, text.removeprefix("tl-"), text.replace("-", ""), text.removeprefix("tl-").replace("-", "")):
        assert enrolment.parse_link_code(typed) == secret, typed


def test_codes_and_lookup_ids_keep_every_character() -> None:
    """Base32 of 15 and 10 bytes has no padding: nothing is stripped, also a trailing x (or a)."""
    for last in "XA":
        secret = base64.b32decode("A" * 23 + last)
        text = enrolment.link_code_text(secret)
        assert text == "tl-aaaa-aaaa-aaaa-aaaa-aaaa-aaa" + last.lower()
        assert enrolment.parse_link_code(text) == secret
        assert enrolment.parse_link_qr(enrolment.link_qr(RELAY, secret)) == (RELAY, secret)
        raw = base64.b32decode("A" * 15 + last)
        assert enrolment.lookup_id_text(raw) == "a" * 15 + last.lower()
        assert enrolment.parse_lookup_id(enrolment.lookup_id_text(raw)) == raw


def test_a_bad_character_is_named_with_the_alphabet() -> None:
    message = "the link code contains '0' (codes use letters a-z and digits 2-7 only)"
    refuses(message, enrolment.parse_link_code, CODE[:-1] + "0")


# -- scanned codes ----------------------------------------------------------------------------------

QR = enrolment.link_qr(RELAY, SECRET)
K = f"k={CODE.replace('-', '')}"


def test_the_qr_payload_is_spelled_out() -> None:
    # crypto.md §5.1: tetherless:link?v=1&r=<relay>&k=<base32(K)>, the relay's port colon kept as is
    assert enrolment.link_qr("relay.example:8443", SECRET) == f"tetherless:link?v=1&r=relay.example:8443&{K}"


def test_unknown_and_empty_qr_fields_are_ignored() -> None:
    """A later payload may add fields (also without a value); a version-1 reader still finds r and k."""
    for payload in (QR + "&future=1", QR + "&flag", QR + "&", f"tetherless:link?v=1&&r={RELAY}&{K}"):
        assert enrolment.parse_link_qr(payload) == (RELAY, SECRET), payload


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("https://relay.example/link", "not a Tetherless link code QR"),
        (f"tetherless:link?v=2&r={RELAY}&{K}", "unsupported link code version"),
        (f"tetherless:link?r={RELAY}&{K}", "unsupported link code version"),
        (f"tetherless:link?v=1&{K}", "the QR link code lacks the relay or the code"),
        (f"tetherless:link?v=1&r=&{K}", "the QR link code lacks the relay or the code"),
        (f"tetherless:link?v=1&r={RELAY}&r=evil.example&{K}", "the QR link code lacks the relay or the code"),
        (f"tetherless:link?v=1&r={RELAY}&{K}&{K}", "the QR link code lacks the relay or the code"),
        # no k at all reads as an empty code (the user is told how long a code is)
        (f"tetherless:link?v=1&r={RELAY}", "the QR link code lacks the relay or the code"),
    ],
)
def test_bad_qr_payloads_are_refused_with_their_reason(payload: str, message: str) -> None:
    refuses(message, enrolment.parse_link_qr, payload)


def test_lookup_id_text_names_the_length() -> None:
    refuses("a lookup id is 10 bytes", enrolment.lookup_id_text, bytes(9))


# -- offers -----------------------------------------------------------------------------------------


def new_device(**kinds: prekeys.PrekeyKind) -> tuple[nacl.signing.SigningKey, EnrolmentBundle]:
    """A new device's key and bundle; ``kinds`` overrides the kind either prekey is signed as."""
    key = nacl.signing.SigningKey(bytes(range(32)))
    device_id = device_id_for(bytes(key.verify_key))
    mlkem = MLKEM768PrivateKey.from_seed_bytes(bytes(64)).public_key().public_bytes_raw()
    signed_kind = kinds.get("signed", prekeys.X25519_SIGNED)
    pq_kind = kinds.get("pq", prekeys.MLKEM_LAST_RESORT)
    return key, EnrolmentBundle(
        signed_prekey=prekeys.sign_prekey(key, device_id, signed_kind, 1, bytes(range(32)), 5),
        pq_prekey=prekeys.sign_prekey(key, device_id, pq_kind, 1, mlkem, 5),
    )


def offer_with(**kinds: prekeys.PrekeyKind) -> EnrolmentOffer:
    key, bundle = new_device(**kinds)
    return enrolment.make_offer(SECRET, RELAY, key, bytes([9]) * 32, bundle, 1234)


def prekey_detail(offer: EnrolmentOffer) -> str:
    with pytest.raises(TetherlessError) as info:
        enrolment.verify_offer_prekeys(offer)
    assert info.value.code is ErrorCode.PREKEY_INVALID
    return info.value.detail


def test_each_offered_prekey_must_have_its_own_kind() -> None:
    """A one-time key is validly signed but is not what the offer's slot promises (crypto.md §5.1)."""
    enrolment.verify_offer_prekeys(offer_with())
    assert prekey_detail(offer_with(signed=prekeys.X25519_ONE_TIME)) == (
        "expected a x25519-signed prekey, got x25519-one-time"
    )
    assert prekey_detail(offer_with(pq=prekeys.MLKEM_ONE_TIME)) == (
        "expected a mlkem768-last-resort prekey, got mlkem768-one-time"
    )


def test_an_offer_built_with_a_short_sign_key_is_prekey_invalid() -> None:
    """The wire type fixes the length; an offer built in process is still refused with the documented code."""
    offer = msgspec.structs.replace(offer_with(), sign_key=bytes(31))
    assert prekey_detail(offer) == "sign_key is not an Ed25519 public key"


def test_mac_mismatches_say_which_side_is_wrong() -> None:
    offer = offer_with()
    with pytest.raises(enrolment.LinkCodeMismatchError) as info:
        enrolment.verify_offer_mac(bytes(15), offer)
    assert str(info.value) == "the code does not match this device's offer"
    tag = enrolment.approval_tag(SECRET, RELAY, ACCOUNT, 2, bytes(32))
    with pytest.raises(enrolment.LinkCodeMismatchError) as info:
        enrolment.verify_approval_tag(bytes(15), RELAY, ACCOUNT, 2, bytes(32), tag)
    assert str(info.value) == "the proposal was not made by a device that knows the link code"


def test_offer_bundle_carries_the_one_time_prekey_it_is_given() -> None:
    offer = offer_with()
    key, _ = new_device()
    device_id = device_id_for(offer.sign_key)
    one_time = prekeys.sign_prekey(key, device_id, prekeys.X25519_ONE_TIME, 7, bytes([3]) * 32, 5)
    bundle = enrolment.offer_bundle(offer, ACCOUNT, one_time)
    assert bundle.one_time_prekey == one_time
    entry = DeviceEntry(device_id=device_id, sign_key=offer.sign_key, box_key=offer.box_key, added_at_ms=1)
    prekeys.verify_bundle(bundle, entry)
    assert enrolment.offer_bundle(offer, ACCOUNT).one_time_prekey is None
