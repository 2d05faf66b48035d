"""Every refusal of protocol/log.py with its exact code and detail (docs/security.md "Mutation testing").

The relay is the adversary: it serves key records, grants, records, snapshot parts and manifests it may have
forged, moved or cut. Each test builds a valid object, breaks one thing and asserts which check refused it, so a
test fails when another check (or none) refuses instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import msgspec
import nacl.bindings
import nacl.public
import nacl.signing
import pytest

from protocol import codec, handshake, hybrid, log, padding, signing
from protocol.errors import ErrorCode
from protocol.messages import DeviceEntry
from tests.protocol import test_recovery_backup as rb

ACCOUNT = "a" * 26
RECORD_ID = bytes(range(16))
NONCE = bytes(range(100, 124))
KEY = bytes([0x11]) * 32
KEYS = {1: bytes([0x11]) * 32, 2: bytes([0x22]) * 32}
MALFORMED = ErrorCode.MALFORMED_BODY
BAD_SIGNATURE = ErrorCode.BAD_SIGNATURE


def _signer(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n + 1]) * 32)


def _box(n: int) -> bytes:
    return bytes([n + 2]) * 32


def _seed(n: int) -> bytes:
    return bytes([n]) * 64


def _device(n: int, *, kem: bool = True) -> DeviceEntry:
    return DeviceEntry(
        device_id=f"dev{n}",
        sign_key=bytes(_signer(n).verify_key),
        box_key=bytes(nacl.public.PrivateKey(_box(n)).public_key),
        added_at_ms=1,
        kem_key=handshake.mlkem_public(_seed(n)) if kem else b"",
    )


def _refused(code: ErrorCode, detail: str, call: Callable[[], object]) -> None:
    with pytest.raises(log.InvalidRecordError) as info:
        call()
    assert (info.value.code, info.value.detail) == (code, detail)


def _plaintext(writer: str = "dev0") -> log.LogPlaintext:
    return log.LogPlaintext(writer_device=writer, writer_seq=1, created_at_ms=5, body=log.DeviceState())


# -- records (§4.2) ---------------------------------------------------------------------------------------------


def _sealed(**header: Any) -> bytes:
    return log.seal_record(KEY, _plaintext(), account_id=ACCOUNT, record_id=RECORD_ID, epoch=1, nonce=NONCE, **header)


def test_record_default_kind_is_event_and_binds_every_header_field() -> None:
    ct = _sealed()
    assert log.open_record(KEY, ct, account_id=ACCOUNT, record_id=RECORD_ID, epoch=1, kind="event") == _plaintext()
    ct = _sealed(kind="event")
    assert log.open_record(KEY, ct, account_id=ACCOUNT, record_id=RECORD_ID, epoch=1) == _plaintext()
    full: dict[str, Any] = {"kind": "snapshot", "snapshot_id": bytes(16), "covers": 9, "parts": 2}
    ct = _sealed(**full)
    assert log.open_record(KEY, ct, account_id=ACCOUNT, record_id=RECORD_ID, epoch=1, **full) == _plaintext()
    for field, value in (("snapshot_id", bytes([1]) * 16), ("covers", 8), ("parts", 3), ("kind", "event")):
        header = {**full, field: value}
        _refused(
            MALFORMED,
            "log record does not decrypt",
            functools.partial(log.open_record, KEY, ct, account_id=ACCOUNT, record_id=RECORD_ID, epoch=1, **header),
        )


def test_record_refusals() -> None:
    def opened(ct: bytes) -> Callable[[], object]:
        return lambda: log.open_record(KEY, ct, account_id=ACCOUNT, record_id=RECORD_ID, epoch=1)

    ct = _sealed()
    _refused(MALFORMED, "log record is truncated", opened(ct[:39]))
    _refused(MALFORMED, "log record does not decrypt", opened(ct[:40]))  # nonce and tag: long enough to try
    _refused(MALFORMED, "log record does not decrypt", opened(ct[:-1] + bytes([ct[-1] ^ 1])))
    garbage = NONCE + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        padding.pad(codec.encode({"writer_device": 1})),
        log.record_ad(ACCOUNT, RECORD_ID, 1, "event"),
        NONCE,
        KEY,
    )
    with pytest.raises(log.InvalidRecordError) as info:
        opened(garbage)()
    assert info.value.code is MALFORMED
    assert info.value.detail.startswith("log record plaintext: ")


@pytest.mark.parametrize(
    ("key", "nonce", "record_id"), [(KEY[:31], NONCE, RECORD_ID), (KEY, NONCE[:23], RECORD_ID), (KEY, NONCE, bytes(15))]
)
def test_sealing_with_a_wrong_length_is_a_value_error(key: bytes, nonce: bytes, record_id: bytes) -> None:
    with pytest.raises(ValueError, match=r"^key 32, nonce 24 and record id 16 bytes$"):
        log.seal_record(key, _plaintext(), account_id=ACCOUNT, record_id=record_id, epoch=1, nonce=nonce)
    with pytest.raises(ValueError, match=r"^key 32, nonce 24 and record id 16 bytes$"):
        log.seal_signed_record(
            key, _plaintext(), _signer(0), account_id=ACCOUNT, record_id=record_id, epoch=1, nonce=nonce
        )


# -- v1 key records (§5.1) --------------------------------------------------------------------------------------


def _v1(
    devices: list[DeviceEntry], *, creator: int = 0, epoch: int = 2, previous: bytes | None = None
) -> log.KeyEpochRecord:
    ct = log.make_key_record(
        _signer(creator),
        account_id=ACCOUNT,
        creator_device=f"dev{creator}",
        epoch=epoch,
        key=KEY,
        device_list_version=3,
        devices=devices,
        created_at_ms=7,
        ephemeral_keys=[bytes([40 + i]) * 32 for i in range(len(devices))],
        previous_key=previous,
        wrap_nonce=NONCE if previous is not None else b"",
    )
    return log.decode_key_record(ct)


def test_v1_key_record_refusals() -> None:
    devices = [_device(0), _device(1)]
    record = _v1(devices)
    assert record.body.prev_key_wrap == b""  # epoch 1 and grant-only records wrap no previous key

    def verified(
        rec: log.KeyEpochRecord = record, devs: list[DeviceEntry] = devices, **kw: Any
    ) -> Callable[[], object]:
        args: dict[str, Any] = {"account_id": ACCOUNT, "epoch": 2, **kw}
        return lambda: log.verify_key_record(rec, devices=devs, **args)

    verified()()
    _refused(BAD_SIGNATURE, "key record for another account or epoch", verified(epoch=3))
    _refused(BAD_SIGNATURE, "key record for another account or epoch", verified(account_id="b" * 26))
    _refused(BAD_SIGNATURE, "key record creator is not in the device list", verified(devs=[_device(1)]))
    forged = log.KeyEpochRecord(body=record.body, signature=bytes(64))
    _refused(BAD_SIGNATURE, "key record signature does not verify", verified(forged))
    # Grants to a device outside the list, or twice to one device: refused even for a grant-only record.
    _refused(BAD_SIGNATURE, "key record grants a device outside the list", verified(_v1([*devices, _device(2)])))
    twice = _v1([devices[0], devices[1], devices[1]])
    _refused(BAD_SIGNATURE, "key record grants a device outside the list", verified(twice, grant_only=True))
    # A full record that leaves a listed device out: refused by default, allowed for a grant-only record.
    partial = _v1([devices[0]])
    _refused(BAD_SIGNATURE, "key record does not grant exactly the list's devices", verified(partial))
    verified(partial, grant_only=True)()


def test_v1_grant_refusals() -> None:
    record = _v1([_device(0), _device(1)])
    assert log.unwrap_grant(record, device_id="dev1", box_private_key=_box(1)) == KEY
    _refused(
        MALFORMED,
        "key grant does not open",
        lambda: log.unwrap_grant(record, device_id="dev1", box_private_key=_box(0)),
    )

    def regranted(plain: bytes, *, epoch: int = 2, commit_key: bytes = KEY) -> log.KeyEpochRecord:
        sealed = nacl.bindings.crypto_box_seal(plain, _device(1).box_key)
        body = msgspec.structs.replace(
            record.body,
            epoch=epoch,
            grants=[log.KeyGrant(device_id="dev1", sealed=sealed)],
            key_commitment=log.key_commitment(ACCOUNT, epoch, commit_key),
        )
        return log.KeyEpochRecord(body=body, signature=record.signature)

    def unwrapped(rec: log.KeyEpochRecord) -> Callable[[], object]:
        return lambda: log.unwrap_grant(rec, device_id="dev1", box_private_key=_box(1))

    assert unwrapped(regranted(KEY + (2).to_bytes(8, "big")))() == KEY
    # The epoch inside the grant is big-endian and must be the record's; the grant is exactly 40 bytes.
    _refused(MALFORMED, "key grant names another epoch", unwrapped(regranted(KEY + (2).to_bytes(8, "little"))))
    _refused(MALFORMED, "key grant names another epoch", unwrapped(regranted(KEY + (3).to_bytes(8, "big"))))
    _refused(MALFORMED, "key grant names another epoch", unwrapped(regranted(KEY + (2).to_bytes(9, "big"))))
    _refused(
        BAD_SIGNATURE,
        "key grant does not match the key commitment",
        unwrapped(regranted(KEY + (2).to_bytes(8, "big"), commit_key=bytes(32))),
    )


def test_previous_key_wrap_refusals() -> None:
    record = _v1([_device(0)], previous=KEYS[2])
    wrap = record.body.prev_key_wrap
    assert log.unwrap_previous_key(KEY, wrap, account_id=ACCOUNT, epoch=2) == KEYS[2]
    for bad, epoch in ((wrap[:-1] + bytes([wrap[-1] ^ 1]), 2), (wrap, 3), (wrap[:10], 2)):
        _refused(
            MALFORMED,
            "previous epoch key does not unwrap",
            functools.partial(log.unwrap_previous_key, KEY, bad, account_id=ACCOUNT, epoch=epoch),
        )


def test_v1_inconsistent_inputs_are_value_errors() -> None:
    with pytest.raises(ValueError, match=r"^one ephemeral key per device$"):
        log.make_key_record(
            _signer(0),
            account_id=ACCOUNT,
            creator_device="dev0",
            epoch=1,
            key=KEY,
            device_list_version=1,
            devices=[_device(0)],
            created_at_ms=1,
            ephemeral_keys=[],
        )
    for esk, box in ((bytes(31), _device(0).box_key), (bytes([9]) * 32, bytes(31))):
        with pytest.raises(ValueError, match=r"^X25519 keys are 32 bytes$"):
            log.seal_grant(KEY, 1, box, esk)


def test_undecodable_key_records() -> None:
    for decode in (log.decode_key_record, log.decode_any_key_record):
        with pytest.raises(log.InvalidRecordError) as info:
            decode(padding.pad(b"\x01"))
        assert info.value.code is MALFORMED
        assert info.value.detail.startswith("key record: ")
    assert log.decode_recovery_backup(padding.pad(b"\x01")) is None


# -- v2 / v3 key records (§5.1 v2, v3) --------------------------------------------------------------------------


def _randomness(devices: list[DeviceEntry]) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    for n, d in enumerate(devices):
        if d.kem_key:
            seed = _seed(int(d.device_id.removeprefix("dev")))
            ct, _ = handshake.encapsulate(d.kem_key)
            out.append((bytes([60 + n]) * 32, ct, handshake.mlkem_decapsulate(seed, ct)))
    return out


def _v2(
    devices: list[DeviceEntry],
    *,
    rotation: bool = True,
    keys: dict[int, bytes] = KEYS,
    closed: dict[str, int] | None = None,
    epoch: int = 2,
    randomness: list[tuple[bytes, bytes, bytes]] | None = None,
) -> log.KeyEpochRecordV2:
    ct = log.make_key_record_v2(
        _signer(0),
        account_id=ACCOUNT,
        creator_device="dev0",
        epoch=epoch,
        keys=keys,
        rotation=rotation,
        device_list_version=3,
        devices=devices,
        created_at_ms=7,
        wrap_randomness=_randomness(devices) if randomness is None else randomness,
        closed=closed,
    )
    record = log.decode_any_key_record(ct)
    assert isinstance(record, log.KeyEpochRecordV2)
    return record


def _resigned(record: log.KeyEpochRecordV2, **changes: Any) -> log.KeyEpochRecordV2:
    """The record with ``changes`` (to the body, or ``v``/``closed``), signed again by dev0."""
    v = changes.pop("v", record.v)
    closed = changes.pop("closed", record.closed)
    body = msgspec.structs.replace(record.body, **changes)
    layout = log.key_epoch_v2_layout(body, closed if v == log.KEY_RECORD_V3 else None)
    return log.KeyEpochRecordV2(v=v, body=body, signature=signing.sign(_signer(0), layout), closed=closed)


def test_v2_key_record_refusals() -> None:
    devices = [_device(0), _device(1), _device(2, kem=False)]
    record = _v2(devices)
    assert record.v == log.KEY_RECORD_V2

    def verified(rec: log.KeyEpochRecordV2 = record, devs: list[DeviceEntry] = devices, **kw: Any) -> Any:
        args: dict[str, Any] = {"account_id": ACCOUNT, "epoch": 2, **kw}
        return lambda: log.verify_key_record_v2(rec, devices=devs, **args)

    verified()()
    _refused(BAD_SIGNATURE, "key record for another account or epoch", verified(epoch=1))
    _refused(BAD_SIGNATURE, "key record for another account or epoch", verified(account_id="b" * 26))
    _refused(BAD_SIGNATURE, "key record creator is not a key-holding device of the list", verified(devs=devices[1:]))
    forged = log.KeyEpochRecordV2(v=2, body=record.body, signature=bytes(64))
    _refused(BAD_SIGNATURE, "key record signature does not verify", verified(forged))
    # A v2 signature does not verify as v3 (another domain), and back.
    as_v3 = log.KeyEpochRecordV2(v=3, body=record.body, signature=record.signature)
    _refused(BAD_SIGNATURE, "key record signature does not verify", verified(as_v3))
    _refused(BAD_SIGNATURE, "key record grants a device outside the list", verified(devs=devices[:2]))
    twice = _resigned(record, grants=[*record.body.grants, record.body.grants[1]])
    _refused(BAD_SIGNATURE, "key record grants a device outside the list", verified(twice))
    _refused(
        BAD_SIGNATURE, "key record does not grant exactly the list's devices", verified(devs=[*devices, _device(3)])
    )
    grant_only = _v2(devices[:2], rotation=False)
    verified(grant_only)()  # a grant-only record may grant a subset
    # A device with a kem_key must get a wrap, one without must not.
    _refused(
        BAD_SIGNATURE,
        "key record grant does not match the device's keys",
        verified(devs=[devices[0], devices[1], _device(2)]),
    )
    _refused(
        BAD_SIGNATURE,
        "key record grant does not match the device's keys",
        verified(devs=[devices[0], _device(1, kem=False), devices[2]]),
    )


@pytest.mark.parametrize(
    "epochs",
    [[1], [1, 1, 2], [2, 3]],
    ids=["without its epoch", "an epoch twice", "a later epoch"],
)
def test_v2_commitments_must_name_the_epoch_and_earlier_ones_once(epochs: list[int]) -> None:
    devices = [_device(0)]
    record = _v2(devices)
    commitments = [log.EpochCommitment(epoch=e, commitment=bytes(32)) for e in epochs]
    bad = _resigned(record, commitments=commitments)
    _refused(
        BAD_SIGNATURE,
        "key record commitments do not match its epoch",
        lambda: log.verify_key_record_v2(bad, account_id=ACCOUNT, epoch=2, devices=devices),
    )


def test_v3_close_out_marks() -> None:
    devices = [_device(0), _device(1)]
    record = _v2(devices, closed={"dev9": 4, "dev8": 0})
    assert record.v == log.KEY_RECORD_V3
    assert [(m.device_id, m.last_seq) for m in record.closed] == [("dev8", 0), ("dev9", 4)]
    log.verify_key_record_v2(record, account_id=ACCOUNT, epoch=2, devices=devices)
    assert _v2(devices, closed={}).v == log.KEY_RECORD_V2  # empty marks: a plain v2 record

    def refused(rec: log.KeyEpochRecordV2, detail: str) -> None:
        _refused(
            BAD_SIGNATURE, detail, lambda: log.verify_key_record_v2(rec, account_id=ACCOUNT, epoch=2, devices=devices)
        )

    marks = [log.WriterMark(device_id="dev9", last_seq=4)]
    refused(_resigned(record, v=2, closed=marks), "only a v3 rotation closes writers")
    refused(_resigned(record, rotation=False), "only a v3 rotation closes writers")
    refused(_resigned(record, closed=[*marks, *marks]), "key record closes a writer twice or one it grants")
    refused(
        _resigned(record, closed=[log.WriterMark(device_id="dev1", last_seq=1)]),
        "key record closes a writer twice or one it grants",
    )
    with pytest.raises(ValueError, match=r"^only a rotation closes writers$"):
        _v2(devices, rotation=False, closed={"dev9": 1})


def test_v2_inconsistent_inputs_are_value_errors() -> None:
    for keys in ({1: KEYS[1]}, {2: KEYS[2][:31]}, {2: KEYS[2], 3: KEYS[1]}):
        with pytest.raises(ValueError, match=r"^keys must hold the record's epoch and no later one, 32 bytes each$"):
            _v2([_device(0)], keys=keys)
    with pytest.raises(ValueError, match=r"^one wrap randomness per device with a kem_key$"):
        _v2([_device(0, kem=False)], randomness=[(bytes(32), b"", b"")])


def test_v2_grant_refusals() -> None:
    devices = [_device(0), _device(1), _device(2, kem=False)]
    record = _v2(devices)

    def unwrap(rec: log.KeyEpochRecordV2, n: int = 1, seed: bytes | None = None) -> dict[int, bytes] | None:
        return log.unwrap_grant_v2(
            rec, device_id=f"dev{n}", box_private_key=_box(n), kem_seed=_seed(n) if seed is None else seed
        )

    assert unwrap(record) == KEYS
    assert unwrap(record, 3) is None  # not granted
    assert unwrap(record, 2) is None  # granted through its session: an empty wrap
    assert unwrap(record, 1, b"") is None  # this device has no ML-KEM seed
    _refused(MALFORMED, "key grant does not open", lambda: unwrap(record, 1, _seed(0)))

    def regranted(keys: list[log.EpochKey], commitments: dict[int, bytes] | None = None) -> log.KeyEpochRecordV2:
        """dev1's grant rewrapped around ``keys`` (the relay cannot do this, but a writer holding the keys can)."""
        esk, ct, ss = _randomness([devices[1]])[0]
        context = log.grant_context(ACCOUNT, 2, 3, "dev0", "dev1")
        recipient = hybrid.HybridRecipient(x25519_public=devices[1].box_key, kem_public=devices[1].kem_key)
        payload = codec.encode(log.GrantPayload(keys=keys))
        wrapped = hybrid.seal(
            recipient, payload, context=context, ephemeral_private_key=esk, kem_ciphertext=ct, kem_shared_secret=ss
        )
        grants = [
            log.HybridGrant(device_id=g.device_id, wrapped=wrapped if g.device_id == "dev1" else g.wrapped)
            for g in record.body.grants
        ]
        changes: dict[str, Any] = {"grants": grants}
        if commitments is not None:
            commits = [log.EpochCommitment(epoch=e, commitment=c) for e, c in commitments.items()]
            changes["commitments"] = commits
        return _resigned(record, **changes)

    assert unwrap(regranted([log.EpochKey(epoch=e, key=k) for e, k in KEYS.items()])) == KEYS
    _refused(
        BAD_SIGNATURE,
        "key grant does not match the key commitment",
        lambda: unwrap(regranted([log.EpochKey(epoch=2, key=KEYS[1])])),
    )
    _refused(
        BAD_SIGNATURE,
        "key grant does not match the key commitment",
        lambda: unwrap(regranted([log.EpochKey(epoch=3, key=KEYS[2])])),
    )
    _refused(
        BAD_SIGNATURE,
        "key grant does not carry every committed epoch",
        lambda: unwrap(regranted([log.EpochKey(epoch=2, key=KEYS[2])])),
    )


# -- signed records (§4.6) --------------------------------------------------------------------------------------


def test_signed_record_refusals() -> None:
    writers = {"dev0": _device(0).sign_key}
    ct = log.seal_signed_record(
        KEY, _plaintext(), _signer(0), account_id=ACCOUNT, record_id=RECORD_ID, epoch=1, kind="state", nonce=NONCE
    )

    def opened(c: bytes, w: dict[str, bytes] = writers, kind: str = "state") -> Callable[[], object]:
        return lambda: log.open_signed_record(
            KEY, c, writers=w, account_id=ACCOUNT, record_id=RECORD_ID, epoch=1, kind=kind
        )

    assert opened(ct)() == _plaintext()
    # The default kind, sealing and opening, is "event".
    header: dict[str, Any] = {"account_id": ACCOUNT, "record_id": RECORD_ID, "epoch": 1}
    default = log.seal_signed_record(KEY, _plaintext(), _signer(0), nonce=NONCE, **header)
    assert opened(default, kind="event")() == _plaintext()
    event = log.seal_signed_record(KEY, _plaintext(), _signer(0), nonce=NONCE, kind="event", **header)
    assert log.open_signed_record(KEY, event, writers=writers, **header) == _plaintext()
    _refused(MALFORMED, "log record is truncated", opened(ct[:39]))
    _refused(MALFORMED, "log record does not decrypt", opened(ct[:40]))
    _refused(MALFORMED, "log record does not decrypt", opened(ct, kind="event"))
    _refused(BAD_SIGNATURE, "log record writer does not hold this epoch", opened(ct, {"dev1": _device(1).sign_key}))
    _refused(BAD_SIGNATURE, "log record signature does not verify", opened(ct, {"dev0": _device(1).sign_key}))
    ad = log.record_v2_ad(ACCOUNT, RECORD_ID, 1, "state")

    def sealed_signed(payload: bytes, inner: bytes | None = None) -> bytes:
        signature = signing.sign(_signer(0), log.record_signature_layout(ad, "dev0", payload))
        signed = log.SignedRecordPayload(writer_device="dev0", signature=signature, payload=payload)
        plain = codec.encode(signed) if inner is None else inner
        return NONCE + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(padding.pad(plain), ad, NONCE, KEY)

    with pytest.raises(log.InvalidRecordError) as info:
        opened(sealed_signed(b"", inner=codec.encode({"writer_device": 1})))()
    assert (info.value.code, info.value.detail.startswith("log record: ")) == (MALFORMED, True)
    with pytest.raises(log.InvalidRecordError) as info:
        opened(sealed_signed(codec.encode({"writer_device": 1})))()
    assert (info.value.code, info.value.detail.startswith("log record plaintext: ")) == (MALFORMED, True)
    _refused(
        BAD_SIGNATURE,
        "log record names another writer than its signer",
        opened(sealed_signed(codec.encode(_plaintext("dev1"))), {**writers, "dev1": _device(1).sign_key}),
    )


# -- snapshots (§6.1) -------------------------------------------------------------------------------------------


SNAPSHOT = log.snapshot_id(ACCOUNT, "dev0", 9)


def test_snapshot_ids_bind_every_input() -> None:
    ids = {
        SNAPSHOT,
        log.snapshot_id("b" * 26, "dev0", 9),
        log.snapshot_id(ACCOUNT, "dev1", 9),
        log.snapshot_id(ACCOUNT, "dev0", 8),
        log.snapshot_part_id(SNAPSHOT, 0),
        log.snapshot_part_id(SNAPSHOT, 1),
        log.snapshot_manifest_id(SNAPSHOT),
    }
    assert len(ids) == 7
    assert all(len(i) == 16 for i in ids)
    assert log.snapshot_id(ACCOUNT, "dev0", 9) == signing.digest("log-snapshot-id", ACCOUNT, "dev0", 9)[:16]
    assert log.snapshot_part_id(SNAPSHOT, 1) == signing.digest("log-snapshot-part-id", SNAPSHOT, 1)[:16]
    assert log.snapshot_manifest_id(SNAPSHOT) == signing.digest("log-snapshot-manifest-id", SNAPSHOT)[:16]


def test_split_snapshot_bounds() -> None:
    state = log.SnapshotState(covers=9, messages=[])
    data = codec.encode(state)
    assert log.split_snapshot(state, 1) == [data[i : i + 1] for i in range(len(data))]
    assert log.split_snapshot(state, log.SNAPSHOT_PART_BYTES) == [data]
    for bad in (0, log.SNAPSHOT_PART_BYTES + 1):
        with pytest.raises(ValueError, match=rf"^part_bytes must be between 1 and {log.SNAPSHOT_PART_BYTES}$"):
            log.split_snapshot(state, bad)


def _part(index: int = 0, total: int = 1, covers: int = 9, data: bytes | None = None) -> log.SnapshotPart:
    chunk = codec.encode(log.SnapshotState(covers=covers, messages=[])) if data is None else data
    return log.SnapshotPart(index=index, total=total, covers=covers, data=chunk)


def test_join_snapshot_refusals() -> None:
    assert log.join_snapshot([_part()], 9) == log.SnapshotState(covers=9, messages=[])
    _refused(MALFORMED, "snapshot parts are missing or repeated", lambda: log.join_snapshot([_part(1, 2)], 9))
    _refused(MALFORMED, "snapshot parts are missing or repeated", lambda: log.join_snapshot([_part(0, 2)], 9))
    _refused(MALFORMED, "snapshot parts are for another position", lambda: log.join_snapshot([_part()], 8))
    state8 = codec.encode(log.SnapshotState(covers=8, messages=[]))
    _refused(MALFORMED, "snapshot state is for another position", lambda: log.join_snapshot([_part(data=state8)], 9))
    with pytest.raises(log.InvalidRecordError) as info:
        log.join_snapshot([_part(data=b"\xc1")], 9)
    assert (info.value.code, info.value.detail.startswith("snapshot state: ")) == (MALFORMED, True)


def test_snapshot_part_refusals() -> None:
    part = _part(1, 2)
    ct = log.seal_snapshot_part(KEY, part, account_id=ACCOUNT, snapshot=SNAPSHOT, epoch=1, nonce=NONCE)
    part_id = log.snapshot_part_id(SNAPSHOT, 1)

    def opened(c: bytes, record_id: bytes = part_id) -> Callable[[], object]:
        return lambda: log.open_snapshot_part(
            KEY, c, account_id=ACCOUNT, record_id=record_id, snapshot=SNAPSHOT, epoch=1
        )

    assert opened(ct)() == part
    _refused(MALFORMED, "snapshot part is truncated", opened(ct[:39]))
    _refused(MALFORMED, "snapshot part does not decrypt", opened(ct[:40]))
    _refused(MALFORMED, "snapshot part does not decrypt", opened(ct, log.snapshot_part_id(SNAPSHOT, 0)))
    # A part sealed under the id of another index: it opens (the AD names the id it was sealed under) but the
    # index inside is not that id's.
    ad = log.record_ad(ACCOUNT, log.snapshot_part_id(SNAPSHOT, 0), 1, "snapshot_part", SNAPSHOT)
    moved = NONCE + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        padding.pad(codec.encode(part)), ad, NONCE, KEY
    )
    _refused(
        MALFORMED, "snapshot part is stored under another record id", opened(moved, log.snapshot_part_id(SNAPSHOT, 0))
    )
    not_a_part = NONCE + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        padding.pad(codec.encode({"index": "x"})),
        log.record_ad(ACCOUNT, part_id, 1, "snapshot_part", SNAPSHOT),
        NONCE,
        KEY,
    )
    with pytest.raises(log.InvalidRecordError) as info:
        opened(not_a_part)()
    assert (info.value.code, info.value.detail.startswith("snapshot part: ")) == (MALFORMED, True)
    for key, nonce in ((KEY[:31], NONCE), (KEY, NONCE[:23])):
        with pytest.raises(ValueError, match=r"^key 32 and nonce 24 bytes$"):
            log.seal_snapshot_part(key, part, account_id=ACCOUNT, snapshot=SNAPSHOT, epoch=1, nonce=nonce)


MANIFEST = log.SnapshotManifest(writer_device="dev0", created_at_ms=5, covers=9, part_hashes=[bytes(32), bytes(32)])


def _manifest(signed: bool, manifest: log.SnapshotManifest = MANIFEST, key: bytes = KEY, nonce: bytes = NONCE) -> bytes:
    return log.seal_snapshot_manifest(
        key,
        manifest,
        account_id=ACCOUNT,
        snapshot=SNAPSHOT,
        epoch=1,
        nonce=nonce,
        signing_key=_signer(0) if signed else None,
    )


def _open_manifest(ct: bytes, writers: dict[str, bytes] | None, covers: int = 9, parts: int = 2) -> Any:
    return lambda: log.open_snapshot_manifest(
        KEY, ct, account_id=ACCOUNT, snapshot=SNAPSHOT, epoch=1, covers=covers, parts=parts, writers=writers
    )


def test_unsigned_manifest_refusals() -> None:
    ct = _manifest(signed=False)
    assert _open_manifest(ct, None)() == MANIFEST
    _refused(MALFORMED, "snapshot manifest is truncated", _open_manifest(ct[:39], None))
    _refused(MALFORMED, "snapshot manifest does not decrypt", _open_manifest(ct, None, covers=8))
    _refused(MALFORMED, "snapshot manifest does not decrypt", _open_manifest(ct, None, parts=1))
    # An unsigned manifest does not open where a signed one is required (another AD domain).
    _refused(MALFORMED, "snapshot manifest does not decrypt", _open_manifest(ct, {"dev0": _device(0).sign_key}))


def test_signed_manifest_refusals() -> None:
    writers = {"dev0": _device(0).sign_key}
    ct = _manifest(signed=True)
    assert _open_manifest(ct, writers)() == MANIFEST
    _refused(MALFORMED, "snapshot manifest does not decrypt", _open_manifest(ct, None))
    _refused(MALFORMED, "snapshot manifest is truncated", _open_manifest(ct[:39], writers))
    _refused(MALFORMED, "snapshot manifest does not decrypt", _open_manifest(ct, writers, covers=8))
    _refused(BAD_SIGNATURE, "snapshot manifest writer does not hold this epoch", _open_manifest(ct, {"dev1": b""}))
    _refused(
        BAD_SIGNATURE, "snapshot manifest signature does not verify", _open_manifest(ct, {"dev0": _device(1).sign_key})
    )
    # Sealed by the writer it names, which is not in the epoch's writers.
    dev1 = _manifest(signed=True, manifest=msgspec.structs.replace(MANIFEST, writer_device="dev1"))
    _refused(BAD_SIGNATURE, "snapshot manifest writer does not hold this epoch", _open_manifest(dev1, writers))
    # dev0 signs a manifest that names dev1 as its writer.
    lying = _raw_manifest(msgspec.structs.replace(MANIFEST, writer_device="dev1"), signed=True, parts=2)
    _refused(
        BAD_SIGNATURE,
        "snapshot manifest names another writer than its signer",
        _open_manifest(lying, {**writers, "dev1": _device(1).sign_key}),
    )
    for key, nonce in ((KEY[:31], NONCE), (KEY, NONCE[:23])):
        for signed in (True, False):
            with pytest.raises(ValueError, match=r"^key 32 and nonce 24 bytes$"):
                _manifest(signed, key=key, nonce=nonce)


def _raw_manifest(manifest: log.SnapshotManifest | log.SnapshotPart, *, signed: bool, parts: int) -> bytes:
    """``manifest`` sealed (and, ``signed``, signed by dev0) under a header of ``parts`` parts at covers 9: what a
    writer can make that :func:`log.seal_snapshot_manifest` would not."""
    domain = log.RECORD_V2_DOMAIN if signed else log.RECORD_DOMAIN
    ad = log.record_ad(ACCOUNT, log.snapshot_manifest_id(SNAPSHOT), 1, "snapshot", SNAPSHOT, 9, parts, domain=domain)
    payload = codec.encode(manifest)
    if signed:
        signature = signing.sign(_signer(0), log.record_signature_layout(ad, "dev0", payload))
        payload = codec.encode(log.SignedRecordPayload(writer_device="dev0", signature=signature, payload=payload))
    return NONCE + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(padding.pad(payload), ad, NONCE, KEY)


def test_manifest_disagreeing_with_its_header_or_undecodable() -> None:
    for signed, writers in ((False, None), (True, {"dev0": _device(0).sign_key})):
        three = _raw_manifest(MANIFEST, signed=signed, parts=3)  # 2 part hashes, stored as 3 parts
        _refused(MALFORMED, "snapshot manifest disagrees with its header", _open_manifest(three, writers, parts=3))
        covers = _raw_manifest(msgspec.structs.replace(MANIFEST, covers=8), signed=signed, parts=2)
        _refused(MALFORMED, "snapshot manifest disagrees with its header", _open_manifest(covers, writers))
        with pytest.raises(log.InvalidRecordError) as info:
            _open_manifest(_raw_manifest(log.SnapshotPart(0, 1, 9, b""), signed=signed, parts=2), writers)()
        assert (info.value.code, info.value.detail.startswith("snapshot manifest: ")) == (MALFORMED, True)


# -- recovery backups (§5.7) ------------------------------------------------------------------------------------


def test_recovery_backup_refusals_say_which_check() -> None:
    record = rb._decoded(rb._backup())

    def verified(rec: log.RecoveryBackupRecord = record, **kw: Any) -> Callable[[], object]:
        return lambda: rb._verify(rec, **kw)

    _refused(BAD_SIGNATURE, "recovery backup for another account or epoch", verified(epoch=2))
    _refused(BAD_SIGNATURE, "recovery backup writer is not a device of the list", verified(devices=[rb._device(1)]))
    forged = log.RecoveryBackupRecord(backup=record.backup, signature=bytes(64))
    _refused(BAD_SIGNATURE, "recovery backup signature does not verify", verified(forged))
    _refused(
        BAD_SIGNATURE,
        "recovery backup names a key the device list does not commit to",
        verified(backup_key_hash=rb._hash(rb.NEW_SECRET)),
    )
    _refused(BAD_SIGNATURE, "recovery backup names an older device list than its epoch", verified(epoch_list_version=6))
    _refused(
        BAD_SIGNATURE,
        "recovery backup commitments do not match its epoch",
        verified(rb._resigned(record, commitments=record.backup.commitments[:2])),
    )


def test_recovery_backup_opening_refusals_say_which_check() -> None:
    record = rb._decoded(rb._backup())
    _refused(
        BAD_SIGNATURE,
        "recovery backup is for another recovery key",
        lambda: log.open_recovery_backup(record, rb._recovery(rb.NEW_SECRET)),
    )
    moved = rb._resigned(record, created_at_ms=1)  # still opens: the creation time is not in the wrap's context
    assert log.open_recovery_backup(moved, rb._recovery()) == rb.KEYS
    moved = rb._resigned(record, writer_device="dev1")
    _refused(MALFORMED, "recovery backup does not open", lambda: log.open_recovery_backup(moved, rb._recovery()))
    wrong = [log.EpochCommitment(epoch=c.epoch, commitment=bytes(32)) for c in record.backup.commitments]
    _refused(
        BAD_SIGNATURE,
        "recovery backup keys do not match their commitments",
        lambda: log.open_recovery_backup(rb._resigned(record, commitments=wrong), rb._recovery()),
    )
    with pytest.raises(ValueError, match=r"^keys must hold the record's epoch and no later one, 32 bytes each$"):
        rb._backup(keys={1: rb.KEYS[1]})


# -- message frames and key record decoding ---------------------------------------------------------------------


def test_message_frames_round_trip_and_refuse_garbage() -> None:
    framed = log.frame_message(3, "text/plain", b"hi")
    assert log.unframe_message(framed) == log.MessageFrame(pair_seq=3, content_type="text/plain", body=b"hi")
    with pytest.raises(log.InvalidRecordError) as info:
        log.unframe_message(log.frame_message(0, "text/plain", b"hi"))  # pair_seq starts at 1
    assert info.value.code is MALFORMED
    assert info.value.detail.startswith("message frame: ")


def test_key_record_that_is_neither_version() -> None:
    v1 = _v1([_device(0)])
    garbage = padding.pad(codec.encode({"body": 1, "signature": b""}))
    with pytest.raises(log.InvalidRecordError) as info:
        log.decode_any_key_record(garbage)
    assert info.value.code is MALFORMED
    assert info.value.detail.startswith("key record: ")
    with pytest.raises(log.InvalidRecordError) as info:
        log.decode_any_key_record(b"\x00" * 5)  # not padded
    assert info.value.code is MALFORMED
    assert info.value.detail.startswith("key record: ")
    assert log.decode_any_key_record(padding.pad(codec.encode(v1))) == v1
