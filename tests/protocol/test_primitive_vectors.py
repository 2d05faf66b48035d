"""protocol/vectors/primitives.json: RFC 7748 and RFC 8032 known answers and strict Ed25519 rejections."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.errors import ErrorCode, TetherlessError
from protocol.signing import verify

from . import vectors_primitives

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "primitives.json").read_text()
)


def _x25519(scalar: bytes, u: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(scalar).exchange(X25519PublicKey.from_public_bytes(u))


def test_the_file_is_what_the_generator_writes() -> None:
    assert vectors_primitives.build() == VECTORS


@pytest.mark.parametrize("case", VECTORS["x25519_rfc7748"]["section_5_2"], ids=["vector1", "vector2"])
def test_x25519_rfc7748_section_5_2(case: dict[str, str]) -> None:
    assert _x25519(bytes.fromhex(case["scalar"]), bytes.fromhex(case["u"])).hex() == case["output"]


def test_x25519_rfc7748_iterated_and_section_6_1() -> None:
    rfc = VECTORS["x25519_rfc7748"]
    k = u = bytes([9]) + bytes(31)
    for i in range(1, 1001):
        k, u = _x25519(k, u), k
        if str(i) in rfc["iterated"]:
            assert k.hex() == rfc["iterated"][str(i)]
    dh = rfc["section_6_1"]
    for who in ("alice", "bob"):
        private = X25519PrivateKey.from_private_bytes(bytes.fromhex(dh[f"{who}_private"]))
        assert private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex() == dh[f"{who}_public"]
    assert _x25519(bytes.fromhex(dh["alice_private"]), bytes.fromhex(dh["bob_public"])).hex() == dh["shared"]
    assert _x25519(bytes.fromhex(dh["bob_private"]), bytes.fromhex(dh["alice_public"])).hex() == dh["shared"]


@pytest.mark.parametrize("point", VECTORS["x25519_rfc7748"]["zero_output_points"])
def test_x25519_all_zero_output_is_refused(point: str) -> None:
    with pytest.raises(ValueError, match=r"zero|Error computing shared key"):
        _x25519(bytes.fromhex(VECTORS["x25519_rfc7748"]["section_5_2"][0]["scalar"]), bytes.fromhex(point))


@pytest.mark.parametrize("case", VECTORS["ed25519_rfc8032"], ids=lambda c: c["name"])
def test_ed25519_rfc8032_section_7_1(case: dict[str, str]) -> None:
    key = nacl.signing.SigningKey(bytes.fromhex(case["secret"]))
    message = bytes.fromhex(case["message"])
    assert bytes(key.verify_key).hex() == case["public"]
    assert key.sign(message).signature.hex() == case["signature"]
    verify(bytes.fromhex(case["public"]), message, bytes.fromhex(case["signature"]))


def test_ed25519_strict_rejections_are_refused() -> None:
    cases = VECTORS["ed25519_strict_rejections"]
    assert len(cases) > 30
    for case in cases:
        with pytest.raises(TetherlessError) as info:
            verify(bytes.fromhex(case["public"]), bytes.fromhex(case["message"]), bytes.fromhex(case["signature"]))
        assert info.value.code is ErrorCode.BAD_SIGNATURE, case["why"]
