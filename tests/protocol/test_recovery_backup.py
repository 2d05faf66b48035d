"""Recovery backup records (account-log.md §5.7, crypto.md §3.4 and §12.2) against protocol/vectors/recovery-v2.json.

Regenerate the vector (only when the format changes on purpose): ``.venv/bin/python -m tests.protocol.vectors_gen``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import nacl.public
import nacl.signing
import pytest

from protocol import codec, handshake, hybrid, log, padding, recovery, signing
from protocol.errors import ErrorCode
from protocol.messages import DeviceEntry
from tests.protocol.vectors_gen import build_recovery_v2

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "recovery-v2.json"
ACCOUNT = "a" * 26
KEYS = {1: bytes([0x11]) * 32, 2: bytes([0x22]) * 32, 3: bytes([0x33]) * 32}
OLD_SECRET = bytes(range(20))
NEW_SECRET = bytes(range(20, 40))


def _signer(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n + 1]) * 32)


def _device(n: int, *, role: str = "device") -> DeviceEntry:
    return DeviceEntry(
        device_id=f"dev{n}",
        sign_key=bytes(_signer(n).verify_key),
        box_key=bytes(nacl.public.PrivateKey(bytes([n + 2]) * 32).public_key),
        added_at_ms=1,
        kem_key=handshake.mlkem_public(bytes([n]) * 64),
        role=role,  # type: ignore[arg-type]
    )


def _recovery(secret: bytes = OLD_SECRET) -> recovery.RecoveryKeys:
    return recovery.recovery_keys(secret, ACCOUNT)


def _hash(secret: bytes = OLD_SECRET) -> bytes:
    return recovery.backup_key_hash(recovery.backup_recipient(_recovery(secret)))


def _backup(
    *,
    secret: bytes = OLD_SECRET,
    writer: int = 0,
    epoch: int = 3,
    version: int = 5,
    keys: dict[int, bytes] | None = None,
    kem: tuple[bytes, bytes] | None = None,
) -> bytes:
    recipient = recovery.backup_recipient(_recovery(secret))
    kem_ct, kem_ss = kem if kem is not None else handshake.encapsulate(recipient.kem_public)
    return log.make_recovery_backup(
        _signer(writer),
        account_id=ACCOUNT,
        writer_device=f"dev{writer}",
        epoch=epoch,
        keys=KEYS if keys is None else keys,
        device_list_version=version,
        recipient=recipient,
        created_at_ms=1_764_000_000_000,
        ephemeral_private_key=bytes([7]) * 32,
        kem_ciphertext=kem_ct,
        kem_shared_secret=kem_ss,
    )


def _decoded(ciphertext: bytes) -> log.RecoveryBackupRecord:
    record = log.decode_recovery_backup(ciphertext)
    assert record is not None
    return record


def _verify(record: log.RecoveryBackupRecord, **overrides: Any) -> None:
    args: dict[str, Any] = {
        "account_id": ACCOUNT,
        "epoch": 3,
        "devices": [_device(0), _device(1)],
        "backup_key_hash": _hash(),
        "epoch_list_version": 4,
    }
    log.verify_recovery_backup(record, **{**args, **overrides})


def _resigned(record: log.RecoveryBackupRecord, **changes: Any) -> log.RecoveryBackupRecord:
    body = msgspec.structs.replace(record.backup, **changes)
    return log.RecoveryBackupRecord(backup=body, signature=signing.sign(_signer(0), log.recovery_backup_layout(body)))


# -- the vector ---------------------------------------------------------------------------------------------


def test_vector_is_what_the_code_computes() -> None:
    vector = json.loads(VECTORS.read_text(encoding="utf-8"))
    assert build_recovery_v2(vector) == vector


def test_vector_text_to_backup_keys_to_a_record_that_opens() -> None:
    vector = json.loads(VECTORS.read_text(encoding="utf-8"))
    keys = recovery.recovery_keys(recovery.parse_recovery_secret(vector["text"]), vector["account_id"])
    recipient = recovery.backup_recipient(keys)
    assert recipient.x25519_public.hex() == vector["backup_x25519_public"]
    assert recipient.kem_public.hex() == vector["backup_kem_public"]
    assert recovery.backup_key_hash(recipient).hex() == vector["recovery_backup_key_hash"]
    record = _decoded(bytes.fromhex(vector["ciphertext"]))
    writer = DeviceEntry(
        device_id=vector["writer_device"],
        sign_key=bytes.fromhex(vector["writer_sign_key"]),
        box_key=b"\x09" * 32,
        added_at_ms=1,
    )
    log.verify_recovery_backup(
        record,
        account_id=vector["account_id"],
        epoch=vector["epoch"],
        devices=[writer],
        backup_key_hash=bytes.fromhex(vector["recovery_backup_key_hash"]),
        epoch_list_version=vector["device_list_version"],
    )
    opened = log.open_recovery_backup(record, keys)
    assert {str(e): k.hex() for e, k in opened.items()} == vector["keys"]
    # The context is part of the format: the wrap opens with exactly the documented bytes.
    plain = hybrid.open_wrap(
        keys.x25519_private, keys.mlkem_seed, record.backup.wrapped, context=bytes.fromhex(vector["context"])
    )
    assert codec.decode(plain, log.GrantPayload).keys[0].epoch == 1


# -- opening ---------------------------------------------------------------------------------------------


def test_backup_opens_with_the_recovery_key_and_checks_commitments() -> None:
    record = _decoded(_backup())
    _verify(record)
    assert log.open_recovery_backup(record, _recovery()) == KEYS


def test_zeroed_or_swapped_mlkem_share_does_not_open() -> None:
    record = _decoded(_backup())
    wrapped = record.backup.wrapped
    x, kem_end = hybrid.X25519_BYTES, hybrid.X25519_BYTES + hybrid.MLKEM_CIPHERTEXT_BYTES
    zeroed = wrapped[:x] + bytes(hybrid.MLKEM_CIPHERTEXT_BYTES) + wrapped[kem_end:]
    other = _decoded(_backup()).backup.wrapped  # a fresh encapsulation to the same key
    swapped = wrapped[:x] + other[x:kem_end] + wrapped[kem_end:]
    for bad in (zeroed, swapped):
        tampered = _resigned(record, wrapped=bad)  # even a signature by a listed device does not help
        with pytest.raises(log.InvalidRecordError) as info:
            log.open_recovery_backup(tampered, _recovery())
        assert info.value.code is ErrorCode.MALFORMED_BODY


@pytest.mark.parametrize(
    "change", [{"epoch": 4}, {"device_list_version": 6}, {"writer_device": "dev1"}, {"account_id": "b" * 26}]
)
def test_a_moved_context_does_not_open(change: dict[str, Any]) -> None:
    record = _decoded(_backup())
    commitments = [
        log.EpochCommitment(epoch=c.epoch, commitment=c.commitment)
        for c in record.backup.commitments
        if c.epoch <= change.get("epoch", 3)
    ]
    moved = _resigned(record, commitments=commitments, **change)
    with pytest.raises(log.InvalidRecordError) as info:
        log.open_recovery_backup(moved, _recovery())
    assert info.value.code is ErrorCode.MALFORMED_BODY


def test_keys_that_do_not_match_the_commitments_are_refused() -> None:
    record = _decoded(_backup())
    wrong = [log.EpochCommitment(epoch=c.epoch, commitment=bytes(32)) for c in record.backup.commitments]
    with pytest.raises(log.InvalidRecordError) as info:
        log.open_recovery_backup(_resigned(record, commitments=wrong), _recovery())
    assert info.value.code is ErrorCode.BAD_SIGNATURE


def test_old_recovery_key_opens_nothing_written_after_its_replacement() -> None:
    after = _decoded(_backup(secret=NEW_SECRET))
    _verify(after, backup_key_hash=_hash(NEW_SECRET))
    assert log.open_recovery_backup(after, _recovery(NEW_SECRET)) == KEYS
    with pytest.raises(log.InvalidRecordError) as info:
        log.open_recovery_backup(after, _recovery(OLD_SECRET))
    assert info.value.code is ErrorCode.BAD_SIGNATURE
    # Not only the hash check: the old private keys do not open the wrap either.
    context = log.recovery_backup_context(ACCOUNT, 3, 5, "dev0", _hash(NEW_SECRET))
    old = _recovery(OLD_SECRET)
    with pytest.raises(hybrid.HybridWrapError):
        hybrid.open_wrap(old.x25519_private, old.mlkem_seed, after.backup.wrapped, context=context)


# -- verification against the list ---------------------------------------------------------------------------


def test_hash_mismatch_against_the_list_is_refused() -> None:
    record = _decoded(_backup())
    for committed in (_hash(NEW_SECRET), b""):
        with pytest.raises(log.InvalidRecordError, match="does not commit") as info:
            _verify(record, backup_key_hash=committed)
        assert info.value.code is ErrorCode.BAD_SIGNATURE


def test_a_relay_swapping_the_backup_keys_is_refused() -> None:
    record = _decoded(_backup())
    other = recovery.backup_recipient(_recovery(NEW_SECRET))
    swapped = log.RecoveryBackupRecord(
        backup=msgspec.structs.replace(record.backup, x25519_public=other.x25519_public, kem_public=other.kem_public),
        signature=record.signature,
    )
    with pytest.raises(log.InvalidRecordError, match="signature"):
        _verify(swapped)


@pytest.mark.parametrize(
    ("devices", "why"),
    [
        ([_device(1)], "not a device of the list"),  # dev0 is not (or no longer) listed
        ([_device(0, role="integration"), _device(1)], "not a device of the list"),
        ([_device(0, role="archiver"), _device(1)], "not a device of the list"),
    ],
)
def test_writer_must_be_a_listed_device_role(devices: list[DeviceEntry], why: str) -> None:
    with pytest.raises(log.InvalidRecordError, match=why):
        _verify(_decoded(_backup()), devices=devices)


def test_forged_signature_and_other_epoch_or_account_are_refused() -> None:
    record = _decoded(_backup())
    forged = log.RecoveryBackupRecord(
        backup=record.backup, signature=signing.sign(_signer(1), log.recovery_backup_layout(record.backup))
    )
    with pytest.raises(log.InvalidRecordError, match="signature"):
        _verify(forged)
    with pytest.raises(log.InvalidRecordError, match="another account or epoch"):
        _verify(record, epoch=2)
    with pytest.raises(log.InvalidRecordError, match="another account or epoch"):
        _verify(record, account_id="b" * 26)


def test_backup_naming_a_list_older_than_its_epoch_is_refused() -> None:
    """A device removed at version 5 (the epoch's rotation names 5) cannot back up that epoch under version 4."""
    record = _decoded(_backup(version=4))
    _verify(record, epoch_list_version=4)
    with pytest.raises(log.InvalidRecordError, match="older device list"):
        _verify(record, epoch_list_version=5)


def test_commitments_must_name_the_epoch_and_earlier_ones_once() -> None:
    record = _decoded(_backup())
    c = record.backup.commitments
    for bad in ([c[0], c[1]], [c[0], c[0], c[2]], [*c, log.EpochCommitment(epoch=4, commitment=bytes(32))]):
        with pytest.raises(log.InvalidRecordError, match="commitments"):
            _verify(_resigned(record, commitments=bad))


# -- decoding and building -------------------------------------------------------------------------------------


def test_backup_and_key_records_never_decode_as_each_other() -> None:
    backup = _backup()
    with pytest.raises(log.InvalidRecordError):
        log.decode_any_key_record(backup)
    key_record = log.make_key_record_v2(
        _signer(0),
        account_id=ACCOUNT,
        creator_device="dev0",
        epoch=1,
        keys={1: KEYS[1]},
        rotation=True,
        device_list_version=1,
        devices=[_device(0)],
        created_at_ms=1,
        wrap_randomness=[(bytes([9]) * 32, *handshake.encapsulate(_device(0).kem_key))],
    )
    assert log.decode_recovery_backup(key_record) is None
    assert log.decode_recovery_backup(b"") is None
    assert log.decode_recovery_backup(padding.pad(b"\x81\xa6backup\xc0")) is None


def test_inconsistent_inputs_and_ids() -> None:
    with pytest.raises(ValueError, match="epoch"):
        _backup(keys={1: KEYS[1]})  # the record's epoch (3) is missing
    with pytest.raises(ValueError, match="epoch"):
        _backup(epoch=2)  # a later epoch's key
    first = log.recovery_backup_id(ACCOUNT, 3, _hash())
    assert first == log.recovery_backup_id(ACCOUNT, 3, _hash())
    assert len(first) == log.RECORD_ID_BYTES
    assert first not in {
        log.recovery_backup_id(ACCOUNT, 4, _hash()),
        log.recovery_backup_id(ACCOUNT, 3, _hash(NEW_SECRET)),
    }
