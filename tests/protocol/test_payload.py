"""Version-1 payload crypto (protocol/payload.py)."""

from __future__ import annotations

import hashlib
import os
import random

import msgspec
import nacl.public
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec, padding, payload, signing
from protocol.errors import ErrorCode
from protocol.ids import account_id_for, device_id_for
from protocol.payload import InvalidPayloadError, PayloadCipher, SealedBoxCipher, SealedContent

RELAY = "relay.test"


class Party:
    def __init__(self, seed: int) -> None:
        self.signing_key = nacl.signing.SigningKey(hashlib.sha256(b"sign%d" % seed).digest())
        self.box_key = nacl.public.PrivateKey(hashlib.sha256(b"box%d" % seed).digest())
        sign_key = bytes(self.signing_key.verify_key)
        self.address = f"{device_id_for(sign_key)}.{account_id_for(sign_key)}@{RELAY}"

    def cipher(self) -> SealedBoxCipher:
        return SealedBoxCipher(signing_key=self.signing_key, box_private_key=bytes(self.box_key), address=self.address)


ALICE, BOB, MALLORY = Party(1), Party(2), Party(3)
ESK = hashlib.sha256(b"ephemeral").digest()
MID = b"m" * 16


def seal_to_bob(body: bytes = b"hello", *, sender: Party = ALICE, **overrides: object) -> bytes:
    args: dict[str, object] = {
        "signing_key": sender.signing_key,
        "sender": sender.address,
        "recipient": BOB.address,
        "recipient_box_key": bytes(BOB.box_key.public_key),
        "sent_at_ms": 1_790_000_000_000,
        "message_id": MID,
        "content_type": "text/plain; charset=utf-8",
        "body": body,
        "ephemeral_private_key": ESK,
    }
    args.update(overrides)
    return payload.seal(**args)  # type: ignore[arg-type]


def open_as_bob(ciphertext: bytes) -> payload.Opened:
    return payload.open(ciphertext, box_private_key=bytes(BOB.box_key), own_address=BOB.address)


def reseal(content: SealedContent, to: Party = BOB) -> bytes:
    """Encrypt hand-made content, bypassing seal()'s checks (an attacker's view)."""
    return bytes(nacl.public.SealedBox(to.box_key.public_key).encrypt(padding.pad(codec.encode(content))))


def signed_content(**fields: object) -> SealedContent:
    base: dict[str, object] = {
        "sender": ALICE.address,
        "sender_sign_key": bytes(ALICE.signing_key.verify_key),
        "recipient": BOB.address,
        "sent_at_ms": 5,
        "message_id": MID,
        "content_type": "text/plain",
        "body": b"hi",
    }
    base.update(fields)
    signer: nacl.signing.SigningKey = base.pop("signer", ALICE.signing_key)  # type: ignore[assignment]
    layout = payload.content_layout(**base)  # type: ignore[arg-type]
    return SealedContent(**base, signature=signing.sign(signer, layout))  # type: ignore[arg-type]


def test_round_trip() -> None:
    opened = open_as_bob(seal_to_bob(b"hello"))
    assert opened.body == b"hello"
    assert opened.sender == ALICE.address
    assert opened.sender_sign_key == bytes(ALICE.signing_key.verify_key)
    assert opened.recipient == BOB.address
    assert opened.sent_at_ms == 1_790_000_000_000
    assert opened.message_id == MID
    assert opened.content_type == "text/plain; charset=utf-8"


def test_deterministic_given_the_ephemeral_key() -> None:
    assert seal_to_bob() == seal_to_bob()
    assert seal_to_bob() != seal_to_bob(ephemeral_private_key=os.urandom(32))


def test_byte_compatible_with_libsodium_sealed_box() -> None:
    ciphertext = seal_to_bob(b"compat")
    # The ephemeral public key leads, as in crypto_box_seal.
    assert ciphertext[:32] == bytes(nacl.public.PrivateKey(ESK).public_key)
    plaintext = nacl.public.SealedBox(BOB.box_key).decrypt(ciphertext)
    content = codec.decode(padding.unpad(plaintext), SealedContent)
    assert content.body == b"compat"
    assert content.sender == ALICE.address
    # And the other way: libsodium's own seal opens with our open().
    assert open_as_bob(reseal(signed_content())).body == b"hi"


def test_ciphertext_size_is_a_bucket_plus_overhead() -> None:
    small, larger = seal_to_bob(b""), seal_to_bob(b"x" * 100)
    assert len(small) == len(larger)
    assert padding.is_bucket(len(small) - payload.SEAL_OVERHEAD_BYTES)
    big = seal_to_bob(b"x" * 70_000)
    assert len(big) - payload.SEAL_OVERHEAD_BYTES == 128 * 1024


@pytest.mark.parametrize("position", [0, 31, 32, 47, 48, 100, -1])
def test_tampered_ciphertext_is_malformed(position: int) -> None:
    ciphertext = bytearray(seal_to_bob())
    ciphertext[position] ^= 0x01
    with pytest.raises(InvalidPayloadError) as info:
        open_as_bob(bytes(ciphertext))
    assert info.value.code is ErrorCode.MALFORMED_BODY


# Fixed garbage (pytest-xdist workers must collect the same ids): random-looking, seeded.
@pytest.mark.parametrize(
    "ciphertext",
    [b"", b"x", random.Random(47).randbytes(47), random.Random(48).randbytes(48), random.Random(600).randbytes(600)],
    ids=["empty", "one-byte", "garbage-47", "garbage-48", "garbage-600"],
)
def test_garbage_is_malformed(ciphertext: bytes) -> None:
    with pytest.raises(InvalidPayloadError) as info:
        open_as_bob(ciphertext)
    assert info.value.code is ErrorCode.MALFORMED_BODY


def test_other_device_cannot_decrypt() -> None:
    with pytest.raises(InvalidPayloadError) as info:
        payload.open(seal_to_bob(), box_private_key=bytes(MALLORY.box_key), own_address=MALLORY.address)
    assert info.value.code is ErrorCode.MALFORMED_BODY


def test_message_signed_for_another_recipient_is_rejected() -> None:
    # Mallory received a message signed for Mallory and re-encrypts it to Bob.
    content = signed_content(recipient=MALLORY.address)
    with pytest.raises(InvalidPayloadError, match="another recipient") as info:
        open_as_bob(reseal(content))
    assert info.value.code is ErrorCode.BAD_SIGNATURE


def test_recipient_comparison_ignores_relay_case() -> None:
    content = signed_content(recipient=BOB.address.replace(RELAY, RELAY.upper()))
    assert open_as_bob(reseal(content)).body == b"hi"


def test_forged_sender_key_is_rejected() -> None:
    # Mallory claims Alice's address but signs with her own key.
    content = signed_content(sender_sign_key=bytes(MALLORY.signing_key.verify_key), signer=MALLORY.signing_key)
    with pytest.raises(InvalidPayloadError, match="sender address") as info:
        open_as_bob(reseal(content))
    assert info.value.code is ErrorCode.BAD_SIGNATURE


def test_account_address_as_sender_is_rejected() -> None:
    account_only = ALICE.address.split(".", 1)[1]
    with pytest.raises(InvalidPayloadError) as info:
        open_as_bob(reseal(signed_content(sender=account_only)))
    assert info.value.code is ErrorCode.BAD_SIGNATURE


@pytest.mark.parametrize("field", ["body", "sent_at_ms", "message_id", "content_type", "sender", "recipient"])
def test_any_changed_field_breaks_the_signature(field: str) -> None:
    good = signed_content()
    changed = {
        "body": b"ho",
        "sent_at_ms": 6,
        "message_id": b"n" * 16,
        "content_type": "text/html",
        "sender": ALICE.address.replace(RELAY, "other.test"),
        "recipient": BOB.address.replace(RELAY, "other.test"),
    }[field]
    tampered = msgspec.structs.replace(good, **{field: changed})
    with pytest.raises(InvalidPayloadError) as info:
        payload.open(
            reseal(tampered),
            box_private_key=bytes(BOB.box_key),
            own_address=tampered.recipient,
        )
    assert info.value.code is ErrorCode.BAD_SIGNATURE


@pytest.mark.parametrize("signature", [b"", b"x" * 63, b"x" * 64, b"x" * 65])
def test_bad_signature_bytes(signature: bytes) -> None:
    content = msgspec.structs.replace(signed_content(), signature=signature)
    with pytest.raises(InvalidPayloadError) as info:
        open_as_bob(reseal(content))
    assert info.value.code is ErrorCode.BAD_SIGNATURE


def test_bad_padding_and_bad_msgpack_inside_the_box_are_malformed() -> None:
    box = nacl.public.SealedBox(BOB.box_key.public_key)
    for plaintext in (b"not padded", padding.pad(b"\xc1"), padding.pad(codec.encode({"sender": 1}))):
        with pytest.raises(InvalidPayloadError) as info:
            open_as_bob(bytes(box.encrypt(plaintext)))
        assert info.value.code is ErrorCode.MALFORMED_BODY


def test_seal_refuses_a_sender_address_of_another_key() -> None:
    with pytest.raises(ValueError, match="sender address"):
        seal_to_bob(sender=ALICE, signing_key=MALLORY.signing_key)


@pytest.mark.parametrize(
    ("name", "value"),
    [("ephemeral_private_key", b"short"), ("recipient_box_key", b"short"), ("recipient_box_key", bytes(32))],
)
def test_seal_refuses_bad_keys(name: str, value: bytes) -> None:
    with pytest.raises(ValueError, match="key"):
        seal_to_bob(**{name: value})


def test_cipher_interface() -> None:
    alice: PayloadCipher = ALICE.cipher()
    bob: PayloadCipher = BOB.cipher()
    assert alice.entropy_bytes == 32
    ciphertext = alice.seal(
        recipient=BOB.address,
        recipient_box_key=bytes(BOB.box_key.public_key),
        sent_at_ms=7,
        message_id=MID,
        content_type="application/octet-stream",
        body=b"\x00\x01",
        entropy=ESK,
    )
    opened = bob.open(ciphertext)
    assert (opened.sender, opened.body, opened.sent_at_ms) == (ALICE.address, b"\x00\x01", 7)
    with pytest.raises(InvalidPayloadError):
        alice.open(ciphertext)


@settings(max_examples=50, deadline=None)
@given(
    body=st.binary(max_size=5000),
    content_type=st.text(min_size=1, max_size=50),
    sent_at_ms=st.integers(min_value=0, max_value=2**63 - 1),
    message_id=st.binary(min_size=8, max_size=64),
    esk=st.binary(min_size=32, max_size=32),
)
def test_round_trip_property(body: bytes, content_type: str, sent_at_ms: int, message_id: bytes, esk: bytes) -> None:
    ciphertext = seal_to_bob(
        body, content_type=content_type, sent_at_ms=sent_at_ms, message_id=message_id, ephemeral_private_key=esk
    )
    assert padding.is_bucket(len(ciphertext) - payload.SEAL_OVERHEAD_BYTES)
    opened = open_as_bob(ciphertext)
    assert (opened.body, opened.content_type, opened.sent_at_ms, opened.message_id) == (
        body,
        content_type,
        sent_at_ms,
        message_id,
    )


@settings(max_examples=50, deadline=None)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_bit_flip_is_detected(position: int, bit: int) -> None:
    ciphertext = bytearray(seal_to_bob())
    ciphertext[position % len(ciphertext)] ^= 1 << bit
    with pytest.raises(InvalidPayloadError):
        open_as_bob(bytes(ciphertext))
