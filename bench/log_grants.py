"""Cost of the account log's v2 grants, rotations and signed records, next to v1 measured in the same run.

    python -m bench.log_grants [--runs N] [--seconds S] [--smoke] [--out FILE]

Pure CPU, one process (pinned to one core with taskset when available), as ``bench.crypto``; the figure is the
median over ``--runs`` of microseconds per operation (account-log.md §4.6, §5.5; crypto.md §12.1):

- ``v1_grant_seal`` / ``v1_grant_open``: a v1 sealed-box grant of one epoch key (the baseline);
- ``hybrid_grant_wrap`` / ``hybrid_grant_unwrap``: one v2 grant (ML-KEM-768 encapsulation included) and its
  opening (decapsulation included), one epoch key;
- ``v1_record_seal`` / ``v1_record_open``: an ``event`` record of a 200-byte message, v1 layout (the baseline);
- ``signed_record_seal`` / ``signed_record_open``: the same record signed by its writer (v2 layout);
- ``rotation_3_devices`` / ``rotation_10_devices``: a whole v2 rotation record for 3 / 10 devices
  (key, encapsulations, wraps, signature) — the client's CPU cost of one rotation;
- ``verify_rotation_10_devices``: a reader's check of that record plus opening its own grant;
- ``rotation_v3_closing_1_writer``: a v3 rotation for the 9 remaining devices that closes one removed writer
  at its last ``writer_seq`` (§5.1 v3) — what a revocation costs the device that rotates;
- ``recovery_backup_write_12_epochs`` / ``recovery_backup_open_12_epochs``: a recovery backup record (§5.7)
  holding 12 epoch keys (a year of monthly rotations), and its opening with the keys derived from the
  recovery secret at enrolment (derivation included).

Sizes (bytes per grant, per record, of a rotation record) are exact, reported under ``sizes``.
Writes JSON to bench/results/log-grants-<time>.json (or ``--out``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import nacl.bindings
import nacl.public
import nacl.signing

from bench.common import machine, summary
from bench.crypto import bench_main, measure
from protocol import codec, handshake, hybrid, log, recovery
from protocol.messages import DeviceEntry

ACCOUNT = "a" * 26
BODY = b"x" * 200


class _Device:
    def __init__(self, n: int) -> None:
        self.signing_key = nacl.signing.SigningKey(os.urandom(32))
        self.box_private = os.urandom(32)
        self.kem_seed = os.urandom(64)
        self.entry = DeviceEntry(
            device_id=f"dev{n:02d}",
            sign_key=bytes(self.signing_key.verify_key),
            box_key=bytes(nacl.public.PrivateKey(self.box_private).public_key),
            added_at_ms=1,
            kem_key=handshake.mlkem_public(self.kem_seed),
        )


def _plaintext() -> log.LogPlaintext:
    return log.LogPlaintext(
        writer_device="dev00",
        writer_seq=1,
        created_at_ms=1,
        body=log.MessageSent(
            message_uid=b"u" * 16,
            sender="dev00.acct@relay.bench",
            recipients=["b@relay.bench"],
            pair_seq=1,
            sent_at_ms=1,
            content_type="text/plain; charset=utf-8",
            body=BODY,
        ),
    )


def _rotation(creator: _Device, devices: list[_Device], closed: dict[str, int] | None = None) -> bytes:
    randomness = []
    for d in devices:
        ct, ss = handshake.encapsulate(d.entry.kem_key)
        randomness.append((os.urandom(32), ct, ss))
    return log.make_key_record_v2(
        creator.signing_key,
        account_id=ACCOUNT,
        creator_device=creator.entry.device_id,
        epoch=2,
        keys={2: os.urandom(32)},
        rotation=True,
        device_list_version=1,
        devices=[d.entry for d in devices],
        created_at_ms=1,
        wrap_randomness=randomness,
        closed=closed,
    )


def _backup(writer: _Device, keys: dict[int, bytes], recipient: hybrid.HybridRecipient) -> bytes:
    ct, ss = handshake.encapsulate(recipient.kem_public)
    return log.make_recovery_backup(
        writer.signing_key,
        account_id=ACCOUNT,
        writer_device=writer.entry.device_id,
        epoch=max(keys),
        keys=keys,
        device_list_version=1,
        recipient=recipient,
        created_at_ms=1,
        ephemeral_private_key=os.urandom(32),
        kem_ciphertext=ct,
        kem_shared_secret=ss,
    )


def operations() -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    devices = [_Device(n) for n in range(10)]
    me = devices[1]
    key = os.urandom(32)
    recipient = hybrid.HybridRecipient(x25519_public=me.entry.box_key, kem_public=me.entry.kem_key)
    context = log.grant_context(ACCOUNT, 2, 1, "dev00", me.entry.device_id)
    payload = codec.encode(log.GrantPayload(keys=[log.EpochKey(epoch=2, key=key)]))

    def hybrid_wrap() -> bytes:
        ct, ss = handshake.encapsulate(me.entry.kem_key)
        return hybrid.seal(
            recipient, payload, context=context, ephemeral_private_key=os.urandom(32), kem_ciphertext=ct,
            kem_shared_secret=ss,
        )  # fmt: skip

    wrapped = hybrid_wrap()
    v1_grant = log.seal_grant(key, 2, me.entry.box_key, os.urandom(32))
    v1_public = me.entry.box_key

    def v1_grant_open() -> bytes:
        return bytes(nacl.bindings.crypto_box_seal_open(v1_grant, v1_public, me.box_private))

    plaintext = _plaintext()
    record_id = b"r" * 16
    v1_record = log.seal_record(key, plaintext, account_id=ACCOUNT, record_id=record_id, epoch=2, nonce=b"n" * 24)
    signed = log.seal_signed_record(
        key, plaintext, devices[0].signing_key, account_id=ACCOUNT, record_id=record_id, epoch=2, nonce=b"n" * 24
    )
    writers = {d.entry.device_id: d.entry.sign_key for d in devices}
    rotation_3 = _rotation(devices[0], devices[:3])
    rotation_10 = _rotation(devices[0], devices)
    entries = [d.entry for d in devices]

    def verify_rotation() -> None:
        record = log.decode_any_key_record(rotation_10)
        assert isinstance(record, log.KeyEpochRecordV2)
        log.verify_key_record_v2(record, account_id=ACCOUNT, epoch=2, devices=entries)
        log.unwrap_grant_v2(record, device_id=me.entry.device_id, box_private_key=me.box_private, kem_seed=me.kem_seed)

    secret = os.urandom(20)
    backup_recipient = recovery.backup_recipient(recovery.recovery_keys(secret, ACCOUNT))
    epoch_keys = {e: os.urandom(32) for e in range(1, 13)}
    backup = _backup(devices[0], epoch_keys, backup_recipient)

    def open_backup() -> dict[int, bytes]:
        record = log.decode_recovery_backup(backup)
        assert record is not None
        return log.open_recovery_backup(record, recovery.recovery_keys(secret, ACCOUNT))

    ops: dict[str, Callable[[], Any]] = {
        "v1_grant_seal": lambda: log.seal_grant(key, 2, me.entry.box_key, os.urandom(32)),
        "v1_grant_open": v1_grant_open,
        "hybrid_grant_wrap": hybrid_wrap,
        "hybrid_grant_unwrap": lambda: hybrid.open_wrap(me.box_private, me.kem_seed, wrapped, context=context),
        "v1_record_seal": lambda: log.seal_record(
            key, plaintext, account_id=ACCOUNT, record_id=record_id, epoch=2, nonce=os.urandom(24)
        ),
        "v1_record_open": lambda: log.open_record(key, v1_record, account_id=ACCOUNT, record_id=record_id, epoch=2),
        "signed_record_seal": lambda: log.seal_signed_record(
            key,
            plaintext,
            devices[0].signing_key,
            account_id=ACCOUNT,
            record_id=record_id,
            epoch=2,
            nonce=os.urandom(24),
        ),
        "signed_record_open": lambda: log.open_signed_record(
            key, signed, writers=writers, account_id=ACCOUNT, record_id=record_id, epoch=2
        ),
        "rotation_3_devices": lambda: _rotation(devices[0], devices[:3]),
        "rotation_10_devices": lambda: _rotation(devices[0], devices),
        "verify_rotation_10_devices": verify_rotation,
        "rotation_v3_closing_1_writer": lambda: _rotation(devices[0], devices[:9], closed={"dev09": 41}),
        "recovery_backup_write_12_epochs": lambda: _backup(devices[0], epoch_keys, backup_recipient),
        "recovery_backup_open_12_epochs": open_backup,
    }
    sizes = {
        "v1_grant_bytes": len(v1_grant),
        "hybrid_grant_bytes": len(wrapped),
        "hybrid_grant_overhead_bytes": hybrid.OVERHEAD_BYTES,
        "v1_record_bytes": len(v1_record),
        "signed_record_bytes": len(signed),
        "rotation_record_3_devices_bytes": len(rotation_3),
        "rotation_record_10_devices_bytes": len(rotation_10),
        "rotation_v3_record_9_devices_1_closed_bytes": len(_rotation(devices[0], devices[:9], closed={"dev09": 41})),
        "recovery_backup_12_epochs_bytes": len(backup),
    }
    return ops, sizes


def run(runs: int, seconds: float) -> dict[str, Any]:
    ops, sizes = operations()
    per_run: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(runs):
        for name, fn in ops.items():
            per_run[name].append(measure(fn, seconds))
    results: dict[str, Any] = {}
    for name, values in per_run.items():
        stats = summary(values)
        results[name] = {"us_per_op": stats, "ops_per_second": round(1e6 / stats["median"], 1), "runs": values}

    def ratio(a: str, b: str) -> float:
        return round(results[a]["us_per_op"]["median"] / results[b]["us_per_op"]["median"], 3)

    comparison = {
        "hybrid_wrap_over_v1_grant_seal": ratio("hybrid_grant_wrap", "v1_grant_seal"),
        "hybrid_unwrap_over_v1_grant_open": ratio("hybrid_grant_unwrap", "v1_grant_open"),
        "signed_seal_over_v1_seal": ratio("signed_record_seal", "v1_record_seal"),
        "signed_open_over_v1_open": ratio("signed_record_open", "v1_record_open"),
    }
    return {
        "kind": "log-grants",
        "machine": machine(),
        "runs": runs,
        "seconds": seconds,
        "operations": results,
        "sizes": sizes,
        "comparison": comparison,
    }


def main(argv: list[str] | None = None) -> int:
    return bench_main(argv, module="bench.log_grants", doc=__doc__ or "", run_fn=run, prefix="log-grants")


if __name__ == "__main__":
    raise SystemExit(main())
