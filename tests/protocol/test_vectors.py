"""This implementation against the committed protocol v1 test vectors."""

from __future__ import annotations

import json

import nacl.signing
import pytest

from protocol import codec, device_list, signing
from protocol.messages import InboxEnvelope, SendRequest, SignedDeviceList, StreamItem
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
