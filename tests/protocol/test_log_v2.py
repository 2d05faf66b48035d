"""The hybrid wrap, v2 key records and signed records against protocol/vectors/log-v2.json (account-log.md §4.6,
§5.1 v2; crypto.md §12.1), with an independent second derivation of the combiner from its specification.

Regenerate the vectors (only when the format changes on purpose): ``.venv/bin/python -m tests.protocol.test_log_v2``.
ML-KEM encapsulation draws its own randomness, so its ciphertexts are *inputs* of the vectors (kept from the file
when it exists); everything else, including the shared secrets (decapsulation is deterministic), is recomputed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import msgspec
import nacl.bindings
import nacl.public
import nacl.signing
import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from protocol import codec, handshake, hybrid, log, padding, signing
from protocol.errors import ErrorCode
from protocol.messages import DeviceEntry

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "log-v2.json"
ACCOUNT = "a" * 26
RECORD_ID = bytes(range(16))
NONCE = bytes(range(100, 124))
KEYS = {1: bytes([0x11]) * 32, 2: bytes([0x22]) * 32}
CONTEXT = b"tetherless test context"


def _seed(n: int) -> bytes:
    return bytes([n]) * 64


def _box(n: int) -> bytes:
    return bytes([n + 2]) * 32


def _signer(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([n + 1]) * 32)


def _device(n: int, *, kem: bool = True, role: str = "device") -> DeviceEntry:
    return DeviceEntry(
        device_id=f"dev{n}",
        sign_key=bytes(_signer(n).verify_key),
        box_key=bytes(nacl.public.PrivateKey(_box(n)).public_key),
        added_at_ms=1,
        name=f"d{n}",
        kem_key=handshake.mlkem_public(_seed(n)) if kem else b"",
        role=role,  # type: ignore[arg-type]
    )


def _plaintext(writer: str = "dev0") -> log.LogPlaintext:
    return log.LogPlaintext(
        writer_device=writer,
        writer_seq=1,
        created_at_ms=1_764_000_000_000,
        body=log.DeviceState(registers={"theme": b"dark"}),
    )


def _kem_inputs(existing: dict[str, Any] | None, name: str, seed: bytes) -> tuple[bytes, bytes]:
    """(CT, SS) for one wrap: the stored ciphertext if there is one (SS by deterministic decapsulation)."""
    if existing is not None and name in existing.get("kem_ciphertexts", {}):
        ct = bytes.fromhex(existing["kem_ciphertexts"][name])
    else:
        ct, _ = handshake.encapsulate(handshake.mlkem_public(seed))
    return ct, handshake.mlkem_decapsulate(seed, ct)


def build(existing: dict[str, Any] | None = None) -> dict[str, Any]:
    wrap_ct, wrap_ss = _kem_inputs(existing, "wrap", _seed(1))
    recipient = hybrid.HybridRecipient(x25519_public=_device(1).box_key, kem_public=_device(1).kem_key)
    wrapped = hybrid.seal(
        recipient, b"payload", context=CONTEXT, ephemeral_private_key=bytes([7]) * 32, kem_ciphertext=wrap_ct,
        kem_shared_secret=wrap_ss,
    )  # fmt: skip
    devices = [_device(0), _device(1), _device(2, kem=False)]
    grant0 = _kem_inputs(existing, "grant0", _seed(0))
    grant1 = _kem_inputs(existing, "grant1", _seed(1))
    key_record = log.make_key_record_v2(
        _signer(0),
        account_id=ACCOUNT,
        creator_device="dev0",
        epoch=2,
        keys=KEYS,
        rotation=True,
        device_list_version=3,
        devices=devices,
        created_at_ms=1_764_000_000_000,
        wrap_randomness=[(bytes([8]) * 32, *grant0), (bytes([9]) * 32, *grant1)],
    )
    signed = log.seal_signed_record(
        KEYS[2], _plaintext(), _signer(0), account_id=ACCOUNT, record_id=RECORD_ID, epoch=2, kind="state", nonce=NONCE
    )
    return {
        "kem_ciphertexts": {"wrap": wrap_ct.hex(), "grant0": grant0[0].hex(), "grant1": grant1[0].hex()},
        "hybrid_wrap": {
            "x25519_private": _box(1).hex(),
            "kem_seed": _seed(1).hex(),
            "ephemeral_private": (bytes([7]) * 32).hex(),
            "context": CONTEXT.hex(),
            "payload": b"payload".hex(),
            "kem_shared_secret": wrap_ss.hex(),
            "wrapped": wrapped.hex(),
        },
        "key_record_v2": {
            "epoch": 2,
            "device_list_version": 3,
            "creator_seed": (bytes([1]) * 32).hex(),
            "ciphertext": key_record.hex(),
        },
        "signed_record": {
            "key": KEYS[2].hex(),
            "nonce": NONCE.hex(),
            "record_id": RECORD_ID.hex(),
            "epoch": 2,
            "kind": "state",
            "ad": log.record_v2_ad(ACCOUNT, RECORD_ID, 2, "state").hex(),
            "ciphertext": signed.hex(),
        },
    }


def _vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def test_vectors_match_the_computation() -> None:
    data = _vectors()
    assert build(data) == data


# -- the combiner, derived a second time from its specification (crypto.md §12.1) ---------------------------


def _layout(domain: str, *fields: bytes) -> bytes:
    out = b"tetherless/v1/" + domain.encode() + b"\x00"
    for f in fields:
        out += b"b" + len(f).to_bytes(4, "big") + f
    return out


def _hkdf_sha256(salt: bytes, ikm: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def test_the_combiner_matches_an_independent_derivation() -> None:
    case = _vectors()["hybrid_wrap"]
    wrapped = bytes.fromhex(case["wrapped"])
    epk, kem_ct, sealed = wrapped[:32], wrapped[32:1120], wrapped[1120:]
    sk_x = x25519.X25519PrivateKey.from_private_bytes(bytes.fromhex(case["x25519_private"]))
    sk_m = mlkem.MLKEM768PrivateKey.from_seed_bytes(bytes.fromhex(case["kem_seed"]))
    ss_x = sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(epk))
    ss_m = sk_m.decapsulate(kem_ct)
    pk_x = sk_x.public_key().public_bytes_raw()
    pk_m = sk_m.public_key().public_bytes_raw()
    context = bytes.fromhex(case["context"])
    key = _hkdf_sha256(
        _layout("hybrid-wrap-salt"),
        _layout("hybrid-wrap-ikm", ss_m, ss_x),
        _layout("hybrid-wrap", context, epk, kem_ct, pk_x, hashlib.sha256(pk_m).digest()),
    )
    plain = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(sealed, context, bytes(12), key)
    assert plain == bytes.fromhex(case["payload"])
    # Without the ML-KEM secret (a classical-only derivation) the same wrap does not open.
    classical = _hkdf_sha256(
        _layout("hybrid-wrap-salt"),
        _layout("hybrid-wrap-ikm", bytes(32), ss_x),
        _layout("hybrid-wrap", context, epk, kem_ct, pk_x, hashlib.sha256(pk_m).digest()),
    )
    with pytest.raises(nacl.exceptions.CryptoError):
        nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(sealed, context, bytes(12), classical)


def _open(wrapped: bytes, context: bytes = CONTEXT) -> bytes:
    return hybrid.open_wrap(_box(1), _seed(1), wrapped, context=context)


def test_hybrid_wrap_opens_only_unchanged() -> None:
    wrapped = bytes.fromhex(_vectors()["hybrid_wrap"]["wrapped"])
    assert _open(wrapped) == b"payload"
    zeroed = wrapped[:32] + bytes(1088) + wrapped[1120:]
    other_ct, _ = handshake.encapsulate(_device(1).kem_key)
    swapped = wrapped[:32] + other_ct + wrapped[1120:]
    other_epk = handshake.x25519_public(bytes([5]) * 32) + wrapped[32:]
    for bad in (zeroed, swapped, other_epk, wrapped[:-1] + bytes([wrapped[-1] ^ 1]), wrapped[:100]):
        with pytest.raises(hybrid.HybridWrapError) as info:
            _open(bad)
        assert info.value.code is ErrorCode.MALFORMED_BODY
    with pytest.raises(hybrid.HybridWrapError):
        _open(wrapped, b"another context")
    with pytest.raises(hybrid.HybridWrapError):  # another device's keys
        hybrid.open_wrap(_box(0), _seed(0), wrapped, context=CONTEXT)


# -- key records v2 --------------------------------------------------------------------------------------


def _key_record() -> log.KeyEpochRecordV2:
    record = log.decode_any_key_record(bytes.fromhex(_vectors()["key_record_v2"]["ciphertext"]))
    assert isinstance(record, log.KeyEpochRecordV2)
    return record


def test_v2_key_record_verifies_and_grants_every_epoch() -> None:
    record = _key_record()
    devices = [_device(0), _device(1), _device(2, kem=False)]
    log.verify_key_record_v2(record, account_id=ACCOUNT, epoch=2, devices=devices)
    for n in (0, 1):
        keys = log.unwrap_grant_v2(record, device_id=f"dev{n}", box_private_key=_box(n), kem_seed=_seed(n))
        assert keys == KEYS
    # dev2 has no ML-KEM key: no wrap in the log (it gets the keys through its session), never a sealed box.
    assert log.unwrap_grant_v2(record, device_id="dev2", box_private_key=_box(2), kem_seed=b"") is None
    assert next(g for g in record.body.grants if g.device_id == "dev2").wrapped == b""


def test_v2_key_record_epoch_keys_are_independent() -> None:
    record = _key_record()
    assert not hasattr(record.body, "prev_key_wrap")
    # K[2] opens only epoch 2's records: a record of epoch 1 does not open with it.
    ct = log.seal_signed_record(
        KEYS[1], _plaintext(), _signer(0), account_id=ACCOUNT, record_id=RECORD_ID, epoch=1, nonce=NONCE
    )
    with pytest.raises(log.InvalidRecordError):
        log.open_signed_record(
            KEYS[2], ct, writers={"dev0": _device(0).sign_key}, account_id=ACCOUNT, record_id=RECORD_ID, epoch=1
        )


def test_v2_key_record_refusals() -> None:
    record = _key_record()
    devices = [_device(0), _device(1), _device(2, kem=False)]

    def refused(devs: list[DeviceEntry], rec: log.KeyEpochRecordV2 = record, epoch: int = 2) -> ErrorCode:
        with pytest.raises(log.InvalidRecordError) as info:
            log.verify_key_record_v2(rec, account_id=ACCOUNT, epoch=epoch, devices=devs)
        return info.value.code

    # A device removed from the list but granted by the record: refused (a revoked device gets no key).
    assert refused(devices[:2]) is ErrorCode.BAD_SIGNATURE
    # A list with a device the rotation did not grant: refused.
    assert refused([*devices, _device(3)]) is ErrorCode.BAD_SIGNATURE
    assert refused(devices, epoch=3) is ErrorCode.BAD_SIGNATURE
    assert refused(devices, log.KeyEpochRecordV2(v=2, body=record.body, signature=bytes(64))) is ErrorCode.BAD_SIGNATURE
    # The device's kem_key changed (a device with a kem_key must get a wrap, and one without none).
    assert refused([devices[0], devices[1], _device(2)]) is ErrorCode.BAD_SIGNATURE
    # An integration-role device never receives grants.
    assert refused([devices[0], devices[1], _device(2, kem=False, role="integration")]) is ErrorCode.BAD_SIGNATURE


def test_v2_grant_with_a_zeroed_or_swapped_mlkem_share_does_not_open() -> None:
    record = _key_record()
    grant = next(g for g in record.body.grants if g.device_id == "dev1")
    other = next(g for g in record.body.grants if g.device_id == "dev0")
    for wrapped in (
        grant.wrapped[:32] + bytes(1088) + grant.wrapped[1120:],
        grant.wrapped[:32] + other.wrapped[32:1120] + grant.wrapped[1120:],
    ):
        grants = [
            log.HybridGrant(device_id=g.device_id, wrapped=wrapped if g is grant else g.wrapped)
            for g in record.body.grants
        ]
        body = msgspec.structs.replace(record.body, grants=grants)
        tampered = log.KeyEpochRecordV2(v=2, body=body, signature=record.signature)
        with pytest.raises(log.InvalidRecordError):
            log.unwrap_grant_v2(tampered, device_id="dev1", box_private_key=_box(1), kem_seed=_seed(1))


def test_v1_key_records_still_decode() -> None:
    v1 = json.loads((VECTORS.parent / "log-record.json").read_text())["key_epoch"]["ciphertext"]
    assert isinstance(log.decode_any_key_record(bytes.fromhex(v1)), log.KeyEpochRecord)


# -- signed records --------------------------------------------------------------------------------------


def _signed() -> bytes:
    return bytes.fromhex(_vectors()["signed_record"]["ciphertext"])


def _open_signed(ct: bytes, writers: dict[str, bytes] | None = None, **header: Any) -> log.LogPlaintext:
    fields: dict[str, Any] = {"account_id": ACCOUNT, "record_id": RECORD_ID, "epoch": 2, "kind": "state"}
    fields.update(header)
    return log.open_signed_record(
        KEYS[2], ct, writers={"dev0": _device(0).sign_key} if writers is None else writers, **fields
    )


def test_signed_record_opens_with_its_writer() -> None:
    assert _open_signed(_signed()) == _plaintext()


def test_signed_record_from_a_device_that_does_not_hold_the_epoch_is_refused() -> None:
    with pytest.raises(log.InvalidRecordError) as info:
        _open_signed(_signed(), writers={"dev1": _device(1).sign_key})
    assert info.value.code is ErrorCode.BAD_SIGNATURE
    with pytest.raises(log.InvalidRecordError) as info:  # right id, another key: the signature fails
        _open_signed(_signed(), writers={"dev0": _device(1).sign_key})
    assert info.value.code is ErrorCode.BAD_SIGNATURE


def test_signed_record_whose_inner_writer_lies_is_refused() -> None:
    # dev0 signs a payload that claims dev1 wrote it: the signer, not the claim, is the writer.
    ad = log.record_v2_ad(ACCOUNT, RECORD_ID, 2, "state")
    payload = codec.encode(_plaintext("dev1"))
    signature = signing.sign(_signer(0), log.record_signature_layout(ad, "dev0", payload))
    signed = log.SignedRecordPayload(writer_device="dev0", signature=signature, payload=payload)
    ct = NONCE + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        padding.pad(codec.encode(signed)), ad, NONCE, KEYS[2]
    )
    with pytest.raises(log.InvalidRecordError) as info:
        _open_signed(ct, writers={"dev0": _device(0).sign_key, "dev1": _device(1).sign_key})
    assert info.value.code is ErrorCode.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("field", "value"), [("account_id", "b" * 26), ("record_id", bytes(16)), ("epoch", 3), ("kind", "event")]
)
def test_signed_record_header_tampering_fails(field: str, value: object) -> None:
    with pytest.raises(log.InvalidRecordError):
        _open_signed(_signed(), **{field: value})


def test_v1_and_v2_records_do_not_open_as_each_other() -> None:
    v1 = log.seal_record(KEYS[2], _plaintext(), account_id=ACCOUNT, record_id=RECORD_ID, epoch=2, kind="state",
                         nonce=NONCE)  # fmt: skip
    with pytest.raises(log.InvalidRecordError):
        _open_signed(v1)
    with pytest.raises(log.InvalidRecordError):
        log.open_record(KEYS[2], _signed(), account_id=ACCOUNT, record_id=RECORD_ID, epoch=2, kind="state")


if __name__ == "__main__":
    VECTORS.write_text(
        json.dumps(build(json.loads(VECTORS.read_text()) if VECTORS.exists() else None), indent=2, sort_keys=True)
        + "\n"
    )
