"""Signed prekeys and bundle checks (protocol/prekeys.py, docs/crypto.md §7.1)."""

from __future__ import annotations

import msgspec
import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from protocol import codec, prekeys
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import device_id_for
from protocol.messages import DeviceEntry, PrekeyBundle, PrekeyKind, PrekeyUpload, SignedPrekey
from protocol.signing import layout

KEY = nacl.signing.SigningKey(bytes([1]) * 32)
SIGN_KEY = bytes(KEY.verify_key)
DEVICE = device_id_for(SIGN_KEY)
BOX_KEY = bytes([2]) * 32
MLKEM = MLKEM768PrivateKey.from_seed_bytes(bytes(range(64))).public_key().public_bytes_raw()
ENTRY = DeviceEntry(device_id=DEVICE, sign_key=SIGN_KEY, box_key=BOX_KEY, added_at_ms=1)
ADDRESS = f"{DEVICE}.{'a' * 32}@relay.example"


def signed(kind: PrekeyKind, key_id: int = 1, public: bytes | None = None) -> SignedPrekey:
    if public is None:
        public = MLKEM if kind.startswith("mlkem") else bytes([key_id]) * 32
    return prekeys.sign_prekey(KEY, DEVICE, kind, key_id, public, 1_700_000_000_000)


def invalid(fn: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(TetherlessError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert info.value.code is ErrorCode.PREKEY_INVALID
    return info.value.detail


def test_layout_is_the_documented_one() -> None:
    assert prekeys.prekey_layout(DEVICE, "x25519-signed", 7, b"k", 9) == layout(
        "prekey", DEVICE, "x25519-signed", 7, b"k", 9
    )


@pytest.mark.parametrize("kind", ["x25519-signed", "mlkem768-last-resort", "x25519-one-time", "mlkem768-one-time"])
def test_every_kind_signs_and_verifies(kind: PrekeyKind) -> None:
    key = signed(kind)
    prekeys.verify_prekey(SIGN_KEY, DEVICE, key)
    prekeys.verify_prekey(SIGN_KEY, DEVICE, key, kind=kind)
    # and survives the wire in both encodings
    for media in (codec.MSGPACK, codec.JSON):
        assert codec.decode(codec.encode(key, media), SignedPrekey, media) == key


def test_bad_signatures() -> None:
    key = signed("x25519-signed")
    other = nacl.signing.SigningKey(bytes([3]) * 32)
    cases = [
        msgspec.structs.replace(key, signature=b""),
        msgspec.structs.replace(key, signature=bytes(64)),
        msgspec.structs.replace(key, key_id=2),  # the signature covers the id …
        msgspec.structs.replace(key, created_at_ms=1),  # … the time …
        msgspec.structs.replace(key, public_key=bytes([9]) * 32),  # … and the key
        prekeys.sign_prekey(other, DEVICE, "x25519-signed", 1, key.public_key, key.created_at_ms),
    ]
    for case in cases:
        assert "signature" in invalid(prekeys.verify_prekey, SIGN_KEY, DEVICE, case)
    # a signature for another device id does not verify for this one
    assert "signature" in invalid(prekeys.verify_prekey, SIGN_KEY, "b" * 32, key)


def test_kind_is_in_the_signature() -> None:
    x25519 = signed("x25519-one-time")
    relabelled = msgspec.structs.replace(x25519, kind="x25519-signed")
    invalid(prekeys.verify_prekey, SIGN_KEY, DEVICE, relabelled)


@pytest.mark.parametrize(
    ("kind", "length"),
    [("x25519-signed", 31), ("x25519-one-time", 33), ("x25519-signed", 1184), ("mlkem768-one-time", 32),
     ("mlkem768-last-resort", 1183), ("mlkem768-one-time", 0)],
)  # fmt: skip
def test_wrong_length_for_kind(kind: PrekeyKind, length: int) -> None:
    key = prekeys.sign_prekey(KEY, DEVICE, kind, 1, bytes([5]) * length, 1)  # correctly signed, wrong length
    assert f"is {prekeys.KEY_BYTES[kind]} bytes, not {length}" in invalid(prekeys.verify_prekey, SIGN_KEY, DEVICE, key)


def test_mlkem_key_rejected_by_the_library() -> None:
    # 1184 bytes whose coefficients are all 4095 (>= q = 3329): not a valid encapsulation key
    bogus = b"\xff" * 1184
    key = prekeys.sign_prekey(KEY, DEVICE, "mlkem768-last-resort", 1, bogus, 1)
    assert "ML-KEM-768" in invalid(prekeys.verify_prekey, SIGN_KEY, DEVICE, key)


def test_expected_kind() -> None:
    assert "expected a x25519-signed" in invalid(
        prekeys.verify_prekey, SIGN_KEY, DEVICE, signed("x25519-one-time"), kind="x25519-signed"
    )


def test_public_key_above_mlkem_size_is_refused_on_decode() -> None:
    key = msgspec.to_builtins(signed("x25519-signed"))
    key["public_key"] = bytes(1185)
    with pytest.raises(TetherlessError) as info:
        codec.decode(codec.encode(key), SignedPrekey)
    assert info.value.code is ErrorCode.INVALID_FIELD
    key["public_key"] = bytes(32)
    key["kind"] = "x448-signed"
    with pytest.raises(TetherlessError) as info:
        codec.decode(codec.encode(key), SignedPrekey)
    assert info.value.code is ErrorCode.INVALID_FIELD
    upload = {"one_time": [msgspec.to_builtins(signed("x25519-one-time", i)) for i in range(1, 202)]}
    with pytest.raises(TetherlessError) as info:
        codec.decode(codec.encode(upload), PrekeyUpload)
    assert info.value.code is ErrorCode.INVALID_FIELD


# -- bundles --------------------------------------------------------------------------------------------


def bundle(**changes: object) -> PrekeyBundle:
    good = PrekeyBundle(
        address=ADDRESS,
        identity_key=BOX_KEY,
        signed_prekey=signed("x25519-signed"),
        pq_prekey=signed("mlkem768-one-time", 4),
        one_time_prekey=signed("x25519-one-time", 6),
    )
    return msgspec.structs.replace(good, **changes)


def test_good_bundles_verify() -> None:
    prekeys.verify_bundle(bundle(), ENTRY)
    prekeys.verify_bundle(bundle(one_time_prekey=None, pq_prekey=signed("mlkem768-last-resort", 2)), ENTRY)


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"identity_key": bytes(32)}, "box_key"),
        ({"address": f"{'b' * 32}.{'a' * 32}@relay.example"}, "another device"),
        ({"signed_prekey": signed("x25519-one-time")}, "expected a x25519-signed"),
        ({"pq_prekey": signed("x25519-one-time")}, "pq_prekey has kind"),
        ({"one_time_prekey": signed("mlkem768-one-time")}, "expected a x25519-one-time"),
        (
            {"one_time_prekey": prekeys.sign_prekey(nacl.signing.SigningKey(bytes(32)), DEVICE, "x25519-one-time", 1,
                                                    bytes(32), 1)},
            "signature",
        ),
    ],
)  # fmt: skip
def test_bad_bundles(changes: dict[str, object], detail: str) -> None:
    assert detail in invalid(prekeys.verify_bundle, bundle(**changes), ENTRY)
