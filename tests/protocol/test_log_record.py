"""protocol/log.py against protocol/vectors/log-record.json, and tampering with every header field.

Regenerate the vectors (only when the format changes on purpose):
``.venv/bin/python -m tests.protocol.test_log_record``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing
import pytest

from protocol import log
from protocol.errors import ErrorCode
from protocol.messages import DeviceEntry

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "log-record.json"
KEY = bytes(range(32))
NONCE = bytes(range(100, 124))
ACCOUNT = "a" * 26
RECORD_ID = bytes(range(16))
SENDER = "d" * 26 + "." + ACCOUNT + "@relay.example"
UID = bytes(range(200, 216))


def _plaintext() -> log.LogPlaintext:
    return log.LogPlaintext(
        writer_device="w" * 26,
        writer_seq=7,
        created_at_ms=1_764_000_000_000,
        body=log.MessageSent(
            message_uid=UID,
            sender=SENDER,
            recipients=["b" * 26 + "@relay.example"],
            pair_seq=3,
            sent_at_ms=1_764_000_000_001,
            content_type="text/plain; charset=utf-8",
            body=b"hello",
        ),
    )


def _devices() -> tuple[nacl.signing.SigningKey, list[DeviceEntry], list[bytes]]:
    seeds = [bytes([i]) * 32 for i in (1, 2)]
    boxes = [bytes([i]) * 32 for i in (3, 4)]
    devices = []
    for n, (seed, box) in enumerate(zip(seeds, boxes, strict=True)):
        sk = nacl.signing.SigningKey(seed)
        devices.append(
            DeviceEntry(
                device_id=f"dev{n}",
                sign_key=bytes(sk.verify_key),
                box_key=bytes(nacl.public.PrivateKey(box).public_key),
                name=f"d{n}",
                added_at_ms=1,
            )
        )
    return nacl.signing.SigningKey(seeds[0]), devices, boxes


def build() -> dict[str, Any]:
    ct = log.seal_record(KEY, _plaintext(), account_id=ACCOUNT, record_id=RECORD_ID, epoch=2, nonce=NONCE)
    signer, devices, _ = _devices()
    key_ct = log.make_key_record(
        signer,
        account_id=ACCOUNT,
        creator_device="dev0",
        epoch=2,
        key=KEY,
        device_list_version=3,
        devices=devices,
        created_at_ms=1_764_000_000_000,
        ephemeral_keys=[bytes([9]) * 32, bytes([10]) * 32],
        previous_key=bytes(32),
        wrap_nonce=NONCE,
    )
    return {
        "record": {
            "key": KEY.hex(),
            "nonce": NONCE.hex(),
            "account_id": ACCOUNT,
            "record_id": RECORD_ID.hex(),
            "epoch": 2,
            "kind": "event",
            "ad": log.record_ad(ACCOUNT, RECORD_ID, 2, "event").hex(),
            "ciphertext": ct.hex(),
        },
        "ids": {
            "message_record_id": log.message_record_id(ACCOUNT, SENDER, UID).hex(),
            "envelope_key": log.envelope_key(UID, SENDER).hex(),
        },
        "key_epoch": {"epoch": 2, "device_list_version": 3, "ciphertext": key_ct.hex()},
    }


def test_vectors_match_the_computation() -> None:
    assert json.loads(VECTORS.read_text()) == build()


def test_record_opens_to_the_plaintext() -> None:
    case = json.loads(VECTORS.read_text())["record"]
    opened = log.open_record(KEY, bytes.fromhex(case["ciphertext"]), account_id=ACCOUNT, record_id=RECORD_ID, epoch=2)
    assert opened == _plaintext()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("account_id", "b" * 26),
        ("record_id", bytes(16)),
        ("epoch", 3),
        ("kind", "state"),
        ("snapshot_id", bytes(16)),
        ("covers", 1),
        ("parts", 1),
    ],
)
def test_tampering_with_a_header_field_fails(field: str, value: object) -> None:
    ct = bytes.fromhex(json.loads(VECTORS.read_text())["record"]["ciphertext"])
    header: dict[str, Any] = {"account_id": ACCOUNT, "record_id": RECORD_ID, "epoch": 2, "kind": "event"}
    header[field] = value
    with pytest.raises(log.InvalidRecordError) as info:
        log.open_record(KEY, ct, **header)
    assert info.value.code is ErrorCode.MALFORMED_BODY


def test_flipped_ciphertext_byte_fails() -> None:
    ct = bytearray(bytes.fromhex(json.loads(VECTORS.read_text())["record"]["ciphertext"]))
    ct[40] ^= 1
    with pytest.raises(log.InvalidRecordError):
        log.open_record(KEY, bytes(ct), account_id=ACCOUNT, record_id=RECORD_ID, epoch=2)


def test_message_ids_are_deterministic_and_separated() -> None:
    assert log.message_record_id(ACCOUNT, SENDER, UID) == log.message_record_id(ACCOUNT, SENDER, UID)
    assert log.message_record_id(ACCOUNT, SENDER, UID) != log.message_record_id("b" * 26, SENDER, UID)
    assert log.envelope_key(UID, SENDER) != log.envelope_key(UID, SENDER + "x")


def test_key_record_verifies_unwraps_and_chains() -> None:
    case = json.loads(VECTORS.read_text())["key_epoch"]
    record = log.decode_key_record(bytes.fromhex(case["ciphertext"]))
    _, devices, boxes = _devices()
    log.verify_key_record(record, account_id=ACCOUNT, epoch=2, devices=devices)
    assert log.unwrap_grant(record, device_id="dev1", box_private_key=boxes[1]) == KEY
    assert log.unwrap_grant(record, device_id="nobody", box_private_key=boxes[1]) is None
    previous = log.unwrap_previous_key(KEY, record.body.prev_key_wrap, account_id=ACCOUNT, epoch=2)
    assert previous == bytes(32)
    # A list with a device the record did not grant: refused (a revoked device must not get keys).
    with pytest.raises(log.InvalidRecordError):
        log.verify_key_record(record, account_id=ACCOUNT, epoch=2, devices=devices[:1])
    log.verify_key_record(record, account_id=ACCOUNT, epoch=2, devices=devices, grant_only=True)
    with pytest.raises(log.InvalidRecordError):
        log.verify_key_record(record, account_id=ACCOUNT, epoch=3, devices=devices)
    forged = log.KeyEpochRecord(body=record.body, signature=bytes(64))
    with pytest.raises(log.InvalidRecordError) as info:
        log.verify_key_record(forged, account_id=ACCOUNT, epoch=2, devices=devices)
    assert info.value.code is ErrorCode.BAD_SIGNATURE
    # The wrong box key does not open a grant.
    with pytest.raises(log.InvalidRecordError):
        log.unwrap_grant(record, device_id="dev1", box_private_key=boxes[0])


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(build(), indent=2, sort_keys=True) + "\n")
