"""The sessions section of protocol/vectors/v2.json (made by tests/protocol/vectors_sessions.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from protocol import handshake, session
from protocol.session import ResponderKeys
from tests.protocol import vectors_sessions

V2 = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "v2.json"


@pytest.fixture(scope="module")
def section() -> dict[str, Any]:
    if not V2.exists() or "sessions" not in json.loads(V2.read_text(encoding="utf-8")):
        pytest.fail("protocol/vectors/v2.json has no sessions section: regenerate it (tests/protocol/vectors_gen.py)")
    data: dict[str, Any] = json.loads(V2.read_text(encoding="utf-8"))["sessions"]
    return data


def test_section_matches_computation(section: dict[str, Any]) -> None:
    assert vectors_sessions.sessions_section() == section, "session output changed: check, then regenerate on purpose"


def test_hkdf_rfc5869_a1(section: dict[str, Any]) -> None:
    # RFC 5869 Appendix A.1, OKM as printed in the RFC.
    assert section["plumbing"]["hkdf_rfc5869_a1"]["okm"] == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_aead_rfc8439_2_8_2(section: dict[str, Any]) -> None:
    case = section["plumbing"]["aead_rfc8439_2_8_2"]
    assert case["ciphertext"] == (
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b"
        "1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
        "3ff4def08e4b7a9de576d26586cec64b6116"
    )
    assert case["tag"] == "1ae10b594f09e26a7e902ecbd0600691"


def test_mlkem_keygen_and_recorded_decapsulation(section: dict[str, Any]) -> None:
    keygen = section["mlkem768"]["keygen"]
    ek = handshake.mlkem_public(bytes.fromhex(keygen["seed"]))
    assert hashlib.sha256(ek).hexdigest() == keygen["ek_sha256"]
    dec = section["mlkem768"]["decapsulation"]
    ss = handshake.mlkem_decapsulate(bytes.fromhex(dec["seed"]), bytes.fromhex(dec["ciphertext"]))
    assert ss.hex() == dec["shared_secret"]


def test_pqxdh_responder_reproduces_the_initiators_keys(section: dict[str, Any]) -> None:
    case = section["pqxdh"]
    dec = section["mlkem768"]["decapsulation"]
    a, b = case["initiator"], case["responder"]
    result = handshake.respond(
        own_device_id=b["address"].split(".")[0],
        identity_private_key=bytes.fromhex(b["identity_private"]),
        peer_device_id=a["address"].split(".")[0],
        peer_identity_key=handshake.x25519_public(bytes.fromhex(a["identity_private"])),
        signed_prekey_id=case["signed_prekey_id"],
        signed_prekey_private=bytes.fromhex(b["signed_prekey_private"]),
        pq_prekey_id=case["pq_prekey_id"],
        pq_last_resort=case["pq_last_resort"],
        pq_seed=bytes.fromhex(b["pq_seed"]),
        one_time_prekey_id=case["one_time_prekey_id"],
        one_time_prekey_private=bytes.fromhex(b["one_time_prekey_private"]),
        ephemeral_key=handshake.x25519_public(bytes.fromhex(case["ephemeral_private"])),
        kem_ciphertext=bytes.fromhex(dec["ciphertext"]),
    )
    assert result.transcript_hash.hex() == case["transcript_hash"]
    assert result.shared_key.hex() == case["shared_key"]
    assert result.associated_data.hex() == case["associated_data"]
    assert result.session_id.hex() == case["session_id"]
    assert case["kem_shared_secret"] == dec["shared_secret"]


def test_conversation_envelopes_open_in_the_recorded_order(section: dict[str, Any]) -> None:
    conv = section["conversation"]
    b = section["pqxdh"]["responder"]
    a = section["pqxdh"]["initiator"]
    envelopes = [bytes.fromhex(e["ciphertext"]) for e in conv["envelopes"]]
    assert [len(e) for e in envelopes] == [48 + 2048] * 3 + [48 + 512] * 2
    bob_ik = bytes.fromhex(b["identity_private"])
    first = session.parse_inner(session.open_outer(envelopes[0], bob_ik))
    assert first is not None
    assert first.kind == session.KIND_PREKEY
    state, content = session.accept_prekey(
        own_address=b["address"],
        identity_private_key=bob_ik,
        sealed=first,
        sender_identity_key=handshake.x25519_public(bytes.fromhex(a["identity_private"])),
        keys=ResponderKeys(
            signed_prekey_private=bytes.fromhex(b["signed_prekey_private"]),
            pq_seed=bytes.fromhex(b["pq_seed"]),
            one_time_prekey_private=bytes.fromhex(b["one_time_prekey_private"]),
        ),
        entropy=bytes(32),
        now_ms=0,
        skipped_ttl_ms=10**12,
    )
    assert content.body == b"a1"
    for index, body in ((2, b"a3"), (1, b"a2")):
        sealed = session.parse_inner(session.open_outer(envelopes[index], bob_ik))
        assert sealed is not None
        state, content = session.decrypt(state, sealed, entropy=bytes(32), now_ms=0, skipped_ttl_ms=10**12)
        assert content.body == body
    assert [o["body"] for o in conv["opened"]] == ["a1", "a3", "a2", "b2"]
    assert len(conv["alice_skipped"]) == 1  # b1 was never delivered: its key waits in Alice's skipped keys
