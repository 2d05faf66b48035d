"""The epochs part alone (protocol/client/engine/epochs.py): keys that arrive through sessions (account-log.md §17,
crypto.md §12) and why an epoch must be rotated (§5.3, §5.6), over a real store with no relay.

A key that arrives through a session is trusted only from this account's own devices and only when it matches the
``key_commitment`` of its epoch's verified key record; before that record is read it waits in
``log_session_keys``. (Moved here from tests/protocol/client/test_sync_account_keys.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

from protocol import codec, log
from protocol.client.engine.epochs import AccountKeyMessage
from protocol.client.sdk import ReceivedMessage
from protocol.client.store import EpochInfo
from protocol.messages import DeviceEntry
from tests.support.engine_parts import ACCOUNT, DEVICE, RELAY, Parts

OTHER_ACCOUNT = "b" * 32
SIBLING = "e" * 32
NOW_S = 1_700_000_000.0


def key_message(sender_account: str, epoch: int, key: bytes) -> ReceivedMessage:
    return ReceivedMessage(
        cursor=1,
        id=os.urandom(16),
        sender=f"{'e' * 32}.{sender_account}@{RELAY}",
        content_type=log.ACCOUNT_KEY_CONTENT_TYPE,
        body=codec.encode(AccountKeyMessage(epoch=epoch, key=key, list_version=2)),
        sent_at_ms=1,
        relay_sent_at_ms=1,
        message_id=os.urandom(16),
    )


def test_a_key_matching_the_commitment_is_stored(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    key = os.urandom(32)
    p.store.put_commitment(1, log.key_commitment(ACCOUNT, 1, key))
    p.epochs.account_key_received(key_message(ACCOUNT, 1, key))
    assert p.store.epoch_key(1) == key
    assert p.report.rejected == 0


def test_a_key_not_matching_the_commitment_is_refused(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    p.store.put_commitment(1, log.key_commitment(ACCOUNT, 1, os.urandom(32)))
    p.epochs.account_key_received(key_message(ACCOUNT, 1, os.urandom(32)))
    assert p.store.epoch_key(1) is None
    assert p.store.session_key(1) is None
    assert p.report.rejected == 1


def test_a_key_from_another_account_is_refused(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    key = os.urandom(32)
    p.store.put_commitment(1, log.key_commitment(ACCOUNT, 1, key))
    p.epochs.account_key_received(key_message(OTHER_ACCOUNT, 1, key))
    assert p.store.epoch_key(1) is None
    assert p.report.rejected == 1


def test_a_key_before_its_record_waits_and_is_not_used(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    key = os.urandom(32)
    p.epochs.account_key_received(key_message(ACCOUNT, 3, key))
    assert p.store.epoch_key(3) is None  # not trusted until the key record's commitment is known
    assert p.store.session_key(3) == key
    assert p.report.rejected == 0


def test_a_malformed_key_message_is_refused(tmp_path: Path) -> None:
    p = Parts(tmp_path)
    p.epochs.account_key_received(key_message(ACCOUNT, 1, b"short"))
    bad = key_message(ACCOUNT, 1, os.urandom(32))
    p.epochs.account_key_received(
        ReceivedMessage(**{**{f: getattr(bad, f) for f in bad.__slots__}, "body": b"\xc1 not msgpack"})
    )
    assert p.store.epoch_key(1) is None
    assert p.store.session_key(1) is None
    assert p.report.rejected == 2


def _entry(device_id: str) -> DeviceEntry:
    return DeviceEntry(device_id=device_id, sign_key=os.urandom(32), box_key=os.urandom(32), added_at_ms=1)


def _epoch_1(p: Parts, granted: list[str], created_at_s: float = NOW_S) -> None:
    p.store.add_grants(1, granted)
    info = EpochInfo(epoch=1, record_format=2, position=1, list_version=1, created_at_ms=int(created_at_s * 1000))
    p.store.put_epoch_info(info)


def test_an_epoch_a_removed_device_holds_must_be_rotated(tmp_path: Path) -> None:
    p = Parts(tmp_path, wall_clock=lambda: NOW_S)
    _epoch_1(p, [DEVICE, SIBLING])
    assert p.epochs.rotation_reason(1, [_entry(DEVICE), _entry(SIBLING)]) is None
    reason = p.epochs.rotation_reason(1, [_entry(DEVICE)])  # the sibling was revoked
    assert reason == "epoch 1 was granted to 1 device(s) no longer in the device list"


def test_an_epoch_is_rotated_on_schedule_by_records_or_age(tmp_path: Path) -> None:
    now = [NOW_S]
    p = Parts(tmp_path, wall_clock=lambda: now[0])
    p.epochs.rotate_after_records = 3
    _epoch_1(p, [DEVICE])
    devices = [_entry(DEVICE)]
    p.store.advance_counter("epoch_records:1", 2)
    assert p.epochs.rotation_reason(1, devices) is None
    p.store.advance_counter("epoch_records:1", 1)
    assert p.epochs.rotation_reason(1, devices) == "epoch 1 reached 3 records"
    p.epochs.rotate_after_records = 1000
    now[0] += p.epochs.rotate_after_seconds
    assert p.epochs.rotation_reason(1, devices) == "epoch 1 is older than 604800 s"
