"""This implementation against the committed protocol test vectors (v1.json, v2.json)."""

from __future__ import annotations

import hashlib
import json

import nacl.signing
import pytest

from protocol import codec, device_list, recovery, signing, webauthn
from protocol.messages import (
    DeviceListChain,
    InboxEnvelope,
    SendRequest,
    SignedDeviceList,
    StreamItem,
    WebAuthnAssertion,
    WebAuthnCredential,
    WebAuthnRegistration,
)
from tests.protocol import vectors_gen

VECTORS = json.loads(vectors_gen.VECTORS.read_text(encoding="utf-8"))


def test_file_matches_computation() -> None:
    assert vectors_gen.build() == VECTORS, "protocol output changed: check the change, then regenerate on purpose"


@pytest.mark.parametrize("case", VECTORS["ids"], ids=lambda c: c["seed"][:8])
def test_ids(case: dict[str, str]) -> None:
    assert vectors_gen.ids(case["seed"]) == case


def test_layout_bytes_spelled_out() -> None:
    # Written by hand from docs/protocol.md §3, independent of the generator.
    expected = (
        b"tetherless/v1/example\x00"
        + b"i"
        + (1).to_bytes(8, "big")
        + b"b"
        + (2).to_bytes(4, "big")
        + b"\x00\xff"
        + b"s"
        + (6).to_bytes(4, "big")
        + "héllo".encode()
    )
    assert VECTORS["layouts"][0]["bytes"] == expected.hex()


def test_challenge_signature_verifies() -> None:
    case = VECTORS["challenge"]
    key = nacl.signing.SigningKey(bytes.fromhex(case["seed"]))
    signing.verify(bytes(key.verify_key), bytes.fromhex(case["layout"]), bytes.fromhex(case["signature"]))


def test_genesis_round_trip() -> None:
    case = VECTORS["genesis"]
    signed = codec.decode(bytes.fromhex(case["msgpack"]), SignedDeviceList)
    device_list.verify_genesis(signed)
    assert device_list.list_hash(signed.device_list).hex() == case["hash"]


def test_encodings_decode_both_ways() -> None:
    enc = VECTORS["encodings"]
    a = codec.decode(bytes.fromhex(enc["inbox_envelope"]["msgpack"]), InboxEnvelope)
    b = codec.decode(enc["inbox_envelope"]["json"].encode(), InboxEnvelope, codec.JSON)
    assert a == b
    s1 = codec.decode(bytes.fromhex(enc["send_request"]["msgpack"]), SendRequest)
    s2 = codec.decode(enc["send_request"]["json"].encode(), SendRequest, codec.JSON)
    assert s1 == s2
    items = list(codec.StreamDecoder(StreamItem).feed(bytes.fromhex(enc["stream_msgpack"])))
    lines = list(codec.StreamDecoder(StreamItem, codec.JSON).feed(enc["stream_jsonl"].encode()))
    assert items == lines
    assert len(items) == 2
    assert items[0] == a


# -- protocol v2 (protocol/vectors/v2.json) ----------------------------------------------------------

VECTORS_V2 = json.loads(vectors_gen.VECTORS_V2.read_text(encoding="utf-8"))


@pytest.mark.parametrize("section", list(vectors_gen.V2_SECTIONS))
def test_v2_file_matches_computation(section: str) -> None:
    assert vectors_gen.V2_SECTIONS[section]() == VECTORS_V2[section], "regenerate v2.json only on purpose"


def test_v2_device_list_chain_verifies() -> None:
    case = VECTORS_V2["device_lists"]
    versions = [codec.decode(bytes.fromhex(v["msgpack"]), SignedDeviceList) for v in case["versions"]]
    for signed, v in zip(versions, case["versions"], strict=True):
        assert device_list.list_layout(signed.device_list).hex() == v["layout"]
        assert hashlib.sha256(bytes.fromhex(v["layout"])).hexdigest() == v["hash"]
        assert signed.device_list.format == 2
    result = device_list.verify_chain(
        DeviceListChain(account_id=case["account_id"], versions=versions), case["account_id"]
    )
    assert result.mark == (5, bytes.fromhex(case["versions"][4]["hash"]))
    assert result.head.account_key_epoch == 1
    assert result.head.policy.require_webauthn
    seeds = case["inputs"]["device_seeds"][1:]
    assert sorted(d.sign_key for d in result.devices) == sorted(
        bytes(nacl.signing.SigningKey(bytes.fromhex(seed)).verify_key) for seed in seeds
    )
    assert result.counters == {versions[1].device_list.credentials[0].credential_id: 2}


def test_v2_genesis_layout_spelled_out() -> None:
    # Written from docs/crypto.md §3.1, independent of protocol.device_list.
    case = VECTORS_V2["device_lists"]
    genesis = codec.decode(bytes.fromhex(case["versions"][0]["msgpack"]), SignedDeviceList).device_list
    (device,) = genesis.devices
    expected = signing.layout(
        "device-list/2",
        case["account_id"],
        1,
        b"",
        genesis.created_at_ms,
        1,  # threshold
        0,  # require_webauthn
        0,  # require_user_verification
        0,  # account_key_epoch
        genesis.recovery_key,
        b"",
        1,
        device.device_id,
        device.sign_key,
        bytes.fromhex(case["inputs"]["box_keys"][0]),
        genesis.created_at_ms,
        0,
    )
    assert expected.hex() == case["versions"][0]["layout"]


def test_v2_webauthn_assertion_verifies() -> None:
    case = VECTORS_V2["webauthn"]
    credential = WebAuthnCredential(
        credential_id=bytes.fromhex(case["credential_id"]),
        public_key=bytes.fromhex(case["cose_public_key"]),
        rp_id=case["rp_id"],
        added_at_ms=0,
    )
    a = case["assertion"]
    assertion = WebAuthnAssertion(
        credential_id=credential.credential_id,
        authenticator_data=bytes.fromhex(a["authenticator_data"]),
        client_data_json=a["client_data_json"].encode(),
        signature=bytes.fromhex(a["signature"]),
    )
    result = webauthn.verify_assertion(
        credential, assertion, challenge=bytes.fromhex(a["challenge"]), require_user_verification=True
    )
    assert (result.sign_count, result.user_verified) == (a["sign_count"], a["user_verified"])
    r = case["registration"]
    registration = WebAuthnRegistration(
        credential_id=credential.credential_id,
        client_data_json=r["client_data_json"].encode(),
        attestation_object=bytes.fromhex(r["attestation_object"]),
    )
    registered = webauthn.verify_registration(
        registration, challenge=bytes.fromhex(r["challenge"]), rp_id=case["rp_id"], added_at_ms=0
    )
    assert registered.credential == credential
    assert registered.attestation_type == "self"


@pytest.mark.parametrize("case", VECTORS_V2["recovery"]["cases"], ids=lambda c: c["entropy"][:8])
def test_v2_recovery_text_to_keys(case: dict[str, str]) -> None:
    entropy = recovery.parse_recovery_secret(case["text"])
    assert entropy.hex() == case["entropy"]
    keys = recovery.recovery_keys(entropy, case["account_id"])
    assert keys.public_key.hex() == case["recovery_key"]
    assert keys.backup_seed.hex() == case["backup_seed"]
    assert len(case["text"]) == len("tlr-") + 36 + 8
