"""Writes protocol/vectors/primitives.json: published known answers for the primitives, plus our strict-verify cases.

Run ``.venv/bin/python -m tests.protocol.vectors_primitives`` to regenerate. The
RFC values below are typed from the RFCs (RFC 7748 §5.2 and §6.1, RFC 8032
§7.1 tests 1-3); the Ed25519 rejection cases are derived from first
principles in ``test_ed25519_edge_cases`` (small-order keys, non-canonical
encodings, S ≥ L), so another implementation can check that it refuses them.
``tests/protocol/test_primitive_vectors.py`` checks the file against the
libraries and ``protocol.signing.verify``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.signing

from . import test_ed25519_edge_cases as ed

OUT = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "primitives.json"

RFC7748 = {
    "section_5_2": [
        {
            "scalar": "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "u": "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "output": "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        },
        {
            "scalar": "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "u": "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "output": "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        },
    ],
    "iterated": {
        "1": "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079",
        "1000": "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51",
    },
    "section_6_1": {
        "alice_private": "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        "alice_public": "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
        "bob_private": "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
        "bob_public": "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
        "shared": "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742",
    },
    "zero_output_points": [
        "00" * 32,
        "01" + "00" * 31,
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ],
}

RFC8032 = [
    {
        "name": "test 1",
        "secret": "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "public": "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "message": "",
        "signature": "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    },
    {
        "name": "test 2",
        "secret": "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "public": "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "message": "72",
        "signature": "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    },
    {
        "name": "test 3",
        "secret": "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "public": "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "message": "af82",
        "signature": "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    },
]


def strict_rejections() -> list[dict[str, str]]:
    """(public key, message, signature) triples a strict verifier must refuse, each with why."""
    cases: list[dict[str, str]] = []
    message = ed.MESSAGE

    def add(why: str, public_key: bytes, signature: bytes, msg: bytes = message) -> None:
        cases.append({"why": why, "public": public_key.hex(), "message": msg.hex(), "signature": signature.hex()})

    for key in ed.SMALL_ORDER_KEYS:
        add("small-order public key, R = identity, S = 0", key, ed.IDENTITY_ENCODING + bytes(32))
    for key in ed.NON_CANONICAL:
        add("non-canonical public key (y >= p)", key, ed.IDENTITY_ENCODING + bytes(32))
    signer = nacl.signing.SigningKey(bytes(range(32)))
    for r in ed.NON_CANONICAL:
        add("non-canonical R (y >= p)", bytes(signer.verify_key), r + bytes(32))
    malleable = nacl.signing.SigningKey(bytes(range(1, 33)))
    good = malleable.sign(message).signature
    s = int.from_bytes(good[32:], "little")
    for k in (1, 2, 15):
        add(f"S + {k}L (malleability)", bytes(malleable.verify_key), good[:32] + (s + k * ed.L).to_bytes(32, "little"))
    add("all-zero key and signature", bytes(32), bytes(64))
    add("signature over another message", bytes(signer.verify_key), signer.sign(message).signature, message + b"!")
    return cases


def build() -> dict[str, Any]:
    return {
        "version": "primitives-1",
        "x25519_rfc7748": RFC7748,
        "ed25519_rfc8032": RFC8032,
        "ed25519_strict_rejections": strict_rejections(),
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
