"""v3 key records: a rotation's close-out marks for the writers it removes (account-log.md §5.1 v3), against
protocol/vectors/log-v3.json; v2 records keep encoding and verifying exactly as before.

Regenerate the vectors (only when the format changes on purpose):
``.venv/bin/python -m tests.protocol.test_log_writers``.
As in log-v2.json, the ML-KEM ciphertexts are inputs (kept from the file when it exists); the rest is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol import codec, log, padding, signing
from protocol.errors import ErrorCode
from tests.protocol.test_log_v2 import ACCOUNT, _box, _device, _kem_inputs, _seed, _signer

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "log-v3.json"
K3 = bytes([0x33]) * 32
CLOSED = {"dev9": 0, "dev2": 5}  # dev2 wrote records #1..#5 before its removal; dev9 none


def build(existing: dict[str, Any] | None = None) -> dict[str, Any]:
    grant0 = _kem_inputs(existing, "grant0", _seed(0))
    grant1 = _kem_inputs(existing, "grant1", _seed(1))
    ciphertext = log.make_key_record_v2(
        _signer(0),
        account_id=ACCOUNT,
        creator_device="dev0",
        epoch=3,
        keys={3: K3},
        rotation=True,
        device_list_version=4,
        devices=[_device(0), _device(1)],
        created_at_ms=1_764_000_000_000,
        wrap_randomness=[(bytes([8]) * 32, *grant0), (bytes([9]) * 32, *grant1)],
        closed=CLOSED,
    )
    record = log.decode_any_key_record(ciphertext)
    assert isinstance(record, log.KeyEpochRecordV2)
    return {
        "kem_ciphertexts": {"grant0": grant0[0].hex(), "grant1": grant1[0].hex()},
        "key_record_v3": {
            "epoch": 3,
            "device_list_version": 4,
            "creator_seed": (bytes([1]) * 32).hex(),
            "closed": [{"device_id": d, "last_seq": CLOSED[d]} for d in sorted(CLOSED)],
            "signed_layout": log.key_epoch_v2_layout(record.body, record.closed).hex(),
            "ciphertext": ciphertext.hex(),
        },
    }


def _vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def _record() -> log.KeyEpochRecordV2:
    record = log.decode_any_key_record(bytes.fromhex(_vectors()["key_record_v3"]["ciphertext"]))
    assert isinstance(record, log.KeyEpochRecordV2)
    return record


def _refused(record: log.KeyEpochRecordV2) -> ErrorCode:
    with pytest.raises(log.InvalidRecordError) as info:
        log.verify_key_record_v2(record, account_id=ACCOUNT, epoch=3, devices=[_device(0), _device(1)])
    return info.value.code


def _resigned(record: log.KeyEpochRecordV2, **changes: Any) -> log.KeyEpochRecordV2:
    """``record`` changed and signed again by its creator: what only a key-holding device could produce."""
    changed = msgspec.structs.replace(record, **changes)
    layout = log.key_epoch_v2_layout(changed.body, changed.closed if changed.v == 3 else None)
    return msgspec.structs.replace(changed, signature=signing.sign(_signer(0), layout))


def test_vectors_are_reproducible() -> None:
    assert build(_vectors()) == _vectors()


def test_v3_record_verifies_grants_and_carries_its_marks() -> None:
    record = _record()
    assert record.v == 3
    assert [(m.device_id, m.last_seq) for m in record.closed] == [("dev2", 5), ("dev9", 0)]
    log.verify_key_record_v2(record, account_id=ACCOUNT, epoch=3, devices=[_device(0), _device(1)])
    keys = log.unwrap_grant_v2(record, device_id="dev1", box_private_key=_box(1), kem_seed=_seed(1))
    assert keys == {3: K3}


def test_v3_layout_is_the_v2_layout_plus_the_marks_under_its_own_domain() -> None:
    """A second derivation from account-log.md §5.1 v3, field by field."""
    record = _record()
    body = record.body
    fields: list[signing.Field] = [
        body.account_id, body.epoch, body.device_list_version, body.creator_device, body.created_at_ms,
        int(body.rotation), len(body.grants),
    ]  # fmt: skip
    for grant in body.grants:
        fields += [grant.device_id, grant.wrapped]
    fields.append(len(body.commitments))
    for c in body.commitments:
        fields += [c.epoch, c.commitment]
    v2 = signing.layout("log-key-epoch/2", *fields)
    v3 = signing.layout("log-key-epoch/3", *fields, 2, "dev2", 5, "dev9", 0)
    assert log.key_epoch_v2_layout(body) == v2
    assert log.key_epoch_v2_layout(body, record.closed) == v3
    assert bytes.fromhex(_vectors()["key_record_v3"]["signed_layout"]) == v3
    signing.verify(_device(0).sign_key, v3, record.signature)


def test_v2_records_encode_and_verify_as_before() -> None:
    """Migration: a v2 record has no ``closed`` on the wire and still verifies (log-v2.json is unchanged)."""
    v2 = json.loads((VECTORS.parent / "log-v2.json").read_text())["key_record_v2"]["ciphertext"]
    record = log.decode_any_key_record(bytes.fromhex(v2))
    assert isinstance(record, log.KeyEpochRecordV2)
    assert record.v == 2
    assert record.closed == []
    assert padding.pad(codec.encode(record)) == bytes.fromhex(v2)
    assert b"closed" not in codec.encode(record)


def test_the_marks_cannot_be_stripped_changed_or_added() -> None:
    record = _record()
    # The relay strips the marks (a v2 record again): the v3 signature does not verify under the v2 layout.
    assert _refused(msgspec.structs.replace(record, v=2, closed=[])) is ErrorCode.BAD_SIGNATURE
    # It lowers or raises a mark, or drops one writer's.
    lowered = [log.WriterMark(device_id="dev2", last_seq=9), record.closed[1]]
    assert _refused(msgspec.structs.replace(record, closed=lowered)) is ErrorCode.BAD_SIGNATURE
    assert _refused(msgspec.structs.replace(record, closed=record.closed[1:])) is ErrorCode.BAD_SIGNATURE
    # Marks attached to a v2 record (whose signature does not cover them) are refused outright.
    v2_signed = _resigned(record, v=2, closed=[])
    log.verify_key_record_v2(v2_signed, account_id=ACCOUNT, epoch=3, devices=[_device(0), _device(1)])
    assert _refused(msgspec.structs.replace(v2_signed, closed=record.closed)) is ErrorCode.BAD_SIGNATURE


def test_only_a_rotation_closes_writers_it_does_not_grant() -> None:
    record = _record()
    granted = [log.WriterMark(device_id="dev1", last_seq=1)]
    assert _refused(_resigned(record, closed=granted)) is ErrorCode.BAD_SIGNATURE
    twice = [record.closed[0], record.closed[0]]
    assert _refused(_resigned(record, closed=twice)) is ErrorCode.BAD_SIGNATURE
    grant_only = msgspec.structs.replace(record.body, rotation=False)
    assert _refused(_resigned(record, body=grant_only)) is ErrorCode.BAD_SIGNATURE
    with pytest.raises(ValueError, match="only a rotation"):
        log.make_key_record_v2(
            _signer(0), account_id=ACCOUNT, creator_device="dev0", epoch=3, keys={3: K3}, rotation=False,
            device_list_version=4, devices=[], created_at_ms=1, wrap_randomness=[], closed={"dev2": 1},
        )  # fmt: skip


if __name__ == "__main__":
    current = json.loads(VECTORS.read_text()) if VECTORS.exists() else None
    VECTORS.write_text(json.dumps(build(current), indent=2) + "\n")
    print(f"wrote {VECTORS}")
