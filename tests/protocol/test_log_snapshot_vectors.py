"""Snapshot records (account-log.md §6.1): the parts of a snapshot and its signed manifest, against
protocol/vectors/log-snapshot.json, which the browser client checks too (web/test/logsnapshot.test.ts).

The state (two messages and a copy of a key record) is split into two parts, each sealed under the §4.2 AD with
a fixed nonce; the manifest is signed by its writer under the v2 AD. Everything is deterministic, so the file is
rebuilt byte for byte. Regenerate (only when the format changes on purpose):
``.venv/bin/python -m tests.protocol.test_log_snapshot_vectors``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import nacl.signing
import pytest

from protocol import codec, log
from protocol.errors import ErrorCode, TetherlessError

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "log-snapshot.json"
ACCOUNT = "a" * 26
WRITER = "dev0"
WRITER_SEED = bytes([1]) * 32
KEY = bytes([0x44]) * 32
EPOCH = 2
COVERS = 7
PART_BYTES = 512  # small, so the state needs two parts


def _state() -> log.SnapshotState:
    message = {
        "recipients": ["dev0.aaaaaaaaaaaaaaaaaaaaaaaaaa@relay.test"],
        "relay_sent_at_ms": 1_764_000_000_500,
        "content_type": "text/plain; charset=utf-8",
    }
    return log.SnapshotState(
        covers=COVERS,
        messages=[
            log.SnapshotMessage(
                position=3,
                record_id=bytes([3]) * 16,
                message_uid=bytes([0x33]) * 16,
                sender="dev1.bbbbbbbbbbbbbbbbbbbbbbbbbb@relay.test",
                direction="received",
                pair_seq=1,
                sent_at_ms=1_764_000_000_000,
                body=b"hello from a snapshot",
                **message,
            ),
            log.SnapshotMessage(
                position=5,
                record_id=bytes([5]) * 16,
                message_uid=bytes([0x55]) * 16,
                sender="dev0.aaaaaaaaaaaaaaaaaaaaaaaaaa@relay.test",
                direction="sent",
                pair_seq=1,
                sent_at_ms=1_764_000_001_000,
                body=b"an answer",
                late=False,
                **message,
            ),
        ],
        gaps=[log.SnapshotGap(after=0, upto=1)],
        key_records=[
            log.SnapshotKeyRecord(
                position=2,
                record_id=bytes([2]) * 16,
                epoch=EPOCH,
                device_list_version=1,
                committed_at_ms=1_764_000_000_100,
                ciphertext=b"a key record's ciphertext, copied as is",
            )
        ],
    )


def build() -> dict[str, Any]:
    snapshot = log.snapshot_id(ACCOUNT, WRITER, COVERS)
    chunks = log.split_snapshot(_state(), PART_BYTES)
    parts = []
    for index, chunk in enumerate(chunks):
        part = log.SnapshotPart(index=index, total=len(chunks), covers=COVERS, data=chunk)
        nonce = bytes([0x10 + index]) * log.NONCE_BYTES
        parts.append(
            {
                "record_id": log.snapshot_part_id(snapshot, index).hex(),
                "nonce": nonce.hex(),
                "plaintext": codec.encode(part).hex(),
                "ciphertext": log.seal_snapshot_part(
                    KEY, part, account_id=ACCOUNT, snapshot=snapshot, epoch=EPOCH, nonce=nonce
                ).hex(),
            }
        )
    manifest = log.SnapshotManifest(
        writer_device=WRITER,
        created_at_ms=1_764_000_002_000,
        covers=COVERS,
        part_hashes=[hashlib.sha256(c).digest() for c in chunks],
    )
    nonce = bytes([0x20]) * log.NONCE_BYTES
    signed = log.seal_snapshot_manifest(
        KEY,
        manifest,
        account_id=ACCOUNT,
        snapshot=snapshot,
        epoch=EPOCH,
        nonce=nonce,
        signing_key=nacl.signing.SigningKey(WRITER_SEED),
    )
    return {
        "description": "a snapshot state split into parts (snapshot_part, §4.2 AD) and its signed manifest (§6.1)",
        "account_id": ACCOUNT,
        "writer_device": WRITER,
        "writer_seed": WRITER_SEED.hex(),
        "key": KEY.hex(),
        "epoch": EPOCH,
        "covers": COVERS,
        "part_bytes": PART_BYTES,
        "snapshot_id": snapshot.hex(),
        "state": codec.encode(_state()).hex(),
        "parts": parts,
        "manifest": {
            "record_id": log.snapshot_manifest_id(snapshot).hex(),
            "nonce": nonce.hex(),
            "payload": codec.encode(manifest).hex(),
            "ciphertext": signed.hex(),
        },
    }


def _vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def test_vectors_are_reproducible() -> None:
    assert build() == _vectors()


def test_parts_open_join_and_match_the_signed_manifest() -> None:
    v = _vectors()
    snapshot = bytes.fromhex(v["snapshot_id"])
    parts = [
        log.open_snapshot_part(
            KEY,
            bytes.fromhex(p["ciphertext"]),
            account_id=ACCOUNT,
            record_id=bytes.fromhex(p["record_id"]),
            snapshot=snapshot,
            epoch=EPOCH,
        )
        for p in v["parts"]
    ]
    assert log.join_snapshot(list(reversed(parts)), COVERS) == _state()
    manifest = log.open_snapshot_manifest(
        KEY,
        bytes.fromhex(v["manifest"]["ciphertext"]),
        account_id=ACCOUNT,
        snapshot=snapshot,
        epoch=EPOCH,
        covers=COVERS,
        parts=len(parts),
        writers={WRITER: nacl.signing.SigningKey(WRITER_SEED).verify_key.encode()},
    )
    assert manifest.part_hashes == [hashlib.sha256(p.data).digest() for p in parts]


def test_a_part_moved_to_another_record_id_or_position_is_refused() -> None:
    v = _vectors()
    snapshot = bytes.fromhex(v["snapshot_id"])
    first, second = v["parts"][:2]
    with pytest.raises(TetherlessError) as moved:
        log.open_snapshot_part(
            KEY,
            bytes.fromhex(first["ciphertext"]),
            account_id=ACCOUNT,
            record_id=bytes.fromhex(second["record_id"]),
            snapshot=snapshot,
            epoch=EPOCH,
        )
    assert moved.value.code is ErrorCode.MALFORMED_BODY
    part = log.open_snapshot_part(
        KEY,
        bytes.fromhex(first["ciphertext"]),
        account_id=ACCOUNT,
        record_id=bytes.fromhex(first["record_id"]),
        snapshot=snapshot,
        epoch=EPOCH,
    )
    with pytest.raises(TetherlessError) as missing:
        log.join_snapshot([part], COVERS)
    assert missing.value.code is ErrorCode.MALFORMED_BODY


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {VECTORS}")
