"""Compute the protocol v1 test vectors from their inputs (and regenerate protocol/vectors/v1.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nacl.signing

from protocol import auth, codec, device_list, signing
from protocol.errors import TetherlessError
from protocol.ids import Address, account_id_for, device_id_for
from protocol.messages import Challenge, Heartbeat, InboxEnvelope, OutboundEnvelope, SendRequest

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "v1.json"

SEEDS = ["00" * 32, "01" * 32, "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"]


def _field(spec: dict[str, Any]) -> signing.Field:
    ((kind, value),) = spec.items()
    return {"i": lambda v: int(v), "b": bytes.fromhex, "s": str}[kind](value)


def ids(seed_hex: str) -> dict[str, str]:
    key = bytes(nacl.signing.SigningKey(bytes.fromhex(seed_hex)).verify_key)
    return {"seed": seed_hex, "sign_key": key.hex(), "device_id": device_id_for(key), "account_id": account_id_for(key)}


def layout_case(domain: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    raw = signing.layout(domain, *[_field(f) for f in fields])
    return {"domain": domain, "fields": fields, "bytes": raw.hex()}


def challenge_case(seed_hex: str, relay: str, nonce_hex: str, expires_at_ms: int) -> dict[str, Any]:
    key = nacl.signing.SigningKey(bytes.fromhex(seed_hex))
    device = device_id_for(bytes(key.verify_key))
    challenge = Challenge(relay=relay, device_id=device, nonce=bytes.fromhex(nonce_hex), expires_at_ms=expires_at_ms)
    return {
        "seed": seed_hex,
        "relay": relay,
        "device_id": device,
        "nonce": nonce_hex,
        "expires_at_ms": expires_at_ms,
        "layout": auth.challenge_layout(relay, device, challenge.nonce, expires_at_ms).hex(),
        "signature": auth.sign_challenge(key, challenge).hex(),
    }


def genesis_case(seed_hex: str, box_key_hex: str, name: str, now_ms: int) -> dict[str, Any]:
    key = nacl.signing.SigningKey(bytes.fromhex(seed_hex))
    signed = device_list.genesis(key, bytes.fromhex(box_key_hex), name=name, now_ms=now_ms)
    return {
        "seed": seed_hex,
        "box_key": box_key_hex,
        "name": name,
        "now_ms": now_ms,
        "layout": device_list.list_layout(signed.device_list).hex(),
        "hash": device_list.list_hash(signed.device_list).hex(),
        "signature": signed.signatures[0].signature.hex(),
        "msgpack": codec.encode(signed).hex(),
    }


def encodings() -> dict[str, Any]:
    envelope = InboxEnvelope(
        cursor=42,
        id=bytes(range(16)),
        sent_at_ms=1_700_000_000_000,
        expires_at_ms=1_702_592_000_000,
        ciphertext=b"\x00\x01opaque",
    )
    send = SendRequest(
        envelopes=[
            OutboundEnvelope(
                recipient="aaaa@relay.example", idempotency_key=bytes(range(16)), ciphertext=b"ct", ttl_seconds=60
            )
        ]
    )
    heartbeat = Heartbeat(cursor=42, at_ms=1_700_000_000_500)
    return {
        "inbox_envelope": {
            "msgpack": codec.encode(envelope).hex(),
            "json": codec.encode(envelope, codec.JSON).decode(),
        },
        "send_request": {"msgpack": codec.encode(send).hex(), "json": codec.encode(send, codec.JSON).decode()},
        "stream_msgpack": (codec.encode_stream_item(envelope) + codec.encode_stream_item(heartbeat)).hex(),
        "stream_jsonl": (
            codec.encode_stream_item(envelope, codec.JSON) + codec.encode_stream_item(heartbeat, codec.JSON)
        ).decode(),
    }


def address_case(text: str) -> dict[str, Any]:
    try:
        parsed = Address.parse(text)
    except TetherlessError:
        return {"text": text, "parsed": None}
    return {"text": text, "parsed": {"device": parsed.device, "account": parsed.account, "relay": parsed.relay}}


ADDRESSES = [
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@relay.example",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@Relay.Example:8443",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@[::1]:8080",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@relay.example",
    "aaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@relay.example",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@bad host",
]


def build() -> dict[str, Any]:
    return {
        "version": "v1",
        "ids": [ids(seed) for seed in SEEDS],
        "layouts": [
            layout_case("example", [{"i": 1}, {"b": "00ff"}, {"s": "héllo"}]),
            layout_case("empty", []),
        ],
        "challenge": challenge_case(SEEDS[2], "relay.example:8443", "11" * 32, 1_700_000_060_000),
        "genesis": genesis_case(SEEDS[1], "22" * 32, "laptop", 1_700_000_000_000),
        "encodings": encodings(),
        "addresses": [address_case(a) for a in ADDRESSES],
    }


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {VECTORS}", file=sys.stderr)
