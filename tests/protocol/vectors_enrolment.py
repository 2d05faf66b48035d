"""The ``enrolment`` section of protocol/vectors/v2.json: link codes and their derivations (crypto.md §5.1)
and signed prekeys (§7.1).

Everything here is deterministic: fixed link secrets, Ed25519 seeds and an
ML-KEM-768 key from a fixed seed. ``python -m tests.protocol.vectors_gen``
writes it (only when the construction changes on purpose);
tests/protocol/test_vectors.py checks the file against this computation and
tests/protocol/test_enrolment.py recomputes the values independently.
"""

from __future__ import annotations

import hashlib
from typing import Any

import nacl.signing
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey

from protocol import enrolment, prekeys
from protocol.ids import device_id_for

SECRETS = ["00" * 15, "ff" * 15, "000102030405060708090a0b0c0d0e"]
RELAYS = ["relay.example", "127.0.0.1:8080"]
SIGN_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"  # RFC 8032 test 1
BOX_KEY = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
MLKEM_SEED = bytes(range(64))
CREATED_AT_MS = 1_700_000_000_000


def link_case(secret_hex: str, relay: str) -> dict[str, Any]:
    secret = bytes.fromhex(secret_hex)
    sign_key = bytes(nacl.signing.SigningKey(bytes.fromhex(SIGN_SEED)).verify_key)
    box_key = bytes.fromhex(BOX_KEY)
    lookup = enrolment.lookup_id(secret, relay)
    list_hash = bytes(range(32))
    return {
        "secret": secret_hex,
        "relay": relay,
        "code": enrolment.link_code_text(secret),
        "qr": enrolment.link_qr(relay, secret),
        "lookup_id": lookup.hex(),
        "lookup_id_text": enrolment.lookup_id_text(lookup),
        "k_offer": enrolment.k_offer(secret, relay).hex(),
        "k_approve": enrolment.k_approve(secret, relay).hex(),
        "offer": {
            "sign_key": sign_key.hex(),
            "box_key": BOX_KEY,
            "created_at_ms": CREATED_AT_MS,
            "offer_mac": enrolment.offer_mac(secret, relay, sign_key, box_key, CREATED_AT_MS).hex(),
        },
        "approval": {
            "account_id": device_id_for(sign_key),
            "version": 2,
            "list_hash": list_hash.hex(),
            "approval_tag": enrolment.approval_tag(secret, relay, device_id_for(sign_key), 2, list_hash).hex(),
        },
    }


def prekey_cases() -> list[dict[str, Any]]:
    key = nacl.signing.SigningKey(bytes.fromhex(SIGN_SEED))
    device_id = device_id_for(bytes(key.verify_key))
    mlkem_public = MLKEM768PrivateKey.from_seed_bytes(MLKEM_SEED).public_key().public_bytes_raw()
    publics = {
        prekeys.X25519_SIGNED: bytes.fromhex(BOX_KEY),
        prekeys.X25519_ONE_TIME: bytes(range(32)),
        prekeys.MLKEM_LAST_RESORT: mlkem_public,
        prekeys.MLKEM_ONE_TIME: mlkem_public,
    }
    cases = []
    for key_id, (kind, public) in enumerate(publics.items(), start=1):
        signed = prekeys.sign_prekey(key, device_id, kind, key_id, public, CREATED_AT_MS)  # type: ignore[arg-type]
        layout = prekeys.prekey_layout(device_id, kind, key_id, public, CREATED_AT_MS)
        cases.append(
            {
                "seed": SIGN_SEED,
                "device_id": device_id,
                "kind": kind,
                "key_id": key_id,
                "public_key": public.hex(),
                "created_at_ms": CREATED_AT_MS,
                "layout_sha256": hashlib.sha256(layout).hexdigest(),
                "signature": signed.signature.hex(),
            }
        )
    return cases


def compute() -> dict[str, Any]:
    return {
        "mlkem_seed": MLKEM_SEED.hex(),
        "link_codes": [link_case(s, r) for s in SECRETS for r in RELAYS],
        "prekeys": prekey_cases(),
    }
