"""The sync engine's handling of ``tetherless/account-key`` session messages (account-log.md §17, crypto.md §12).

A key that arrives through a session is trusted only from this account's own
devices and only when it matches the ``key_commitment`` of its epoch's
verified key record; before that record is read it waits in
``log_session_keys``.
"""

from __future__ import annotations

import os
from pathlib import Path

from protocol import codec, log
from protocol.client.keystore import DeviceKeys
from protocol.client.localdb import LocalDB
from protocol.client.sdk import ReceivedMessage
from protocol.client.store import ClientStore
from protocol.client.sync import AccountKeyMessage, SyncEngine

ACCOUNT = "a" * 32
OTHER_ACCOUNT = "b" * 32
RELAY = "relay.test"


def engine(tmp_path: Path) -> SyncEngine:
    keys = DeviceKeys(
        signing_seed=os.urandom(32),
        box_private_key=os.urandom(32),
        relay_url="http://127.0.0.1:1",
        account_id=ACCOUNT,
        device_id="d" * 32,
        address=f"{'d' * 32}.{ACCOUNT}@{RELAY}",
        device_name="test",
        list_format=2,
    )
    return SyncEngine(keys, ClientStore(LocalDB.open(tmp_path, os.urandom(32))))


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
    e = engine(tmp_path)
    key = os.urandom(32)
    e.store.put_commitment(1, log.key_commitment(ACCOUNT, 1, key))
    e._account_key_received(key_message(ACCOUNT, 1, key))
    assert e.store.epoch_key(1) == key
    assert e.rejected == 0


def test_a_key_not_matching_the_commitment_is_refused(tmp_path: Path) -> None:
    e = engine(tmp_path)
    e.store.put_commitment(1, log.key_commitment(ACCOUNT, 1, os.urandom(32)))
    e._account_key_received(key_message(ACCOUNT, 1, os.urandom(32)))
    assert e.store.epoch_key(1) is None
    assert e.store.session_key(1) is None
    assert e.rejected == 1


def test_a_key_from_another_account_is_refused(tmp_path: Path) -> None:
    e = engine(tmp_path)
    key = os.urandom(32)
    e.store.put_commitment(1, log.key_commitment(ACCOUNT, 1, key))
    e._account_key_received(key_message(OTHER_ACCOUNT, 1, key))
    assert e.store.epoch_key(1) is None
    assert e.rejected == 1


def test_a_key_before_its_record_waits_and_is_not_used(tmp_path: Path) -> None:
    e = engine(tmp_path)
    key = os.urandom(32)
    e._account_key_received(key_message(ACCOUNT, 3, key))
    assert e.store.epoch_key(3) is None  # not trusted until the key record's commitment is known
    assert e.store.session_key(3) == key
    assert e.rejected == 0


def test_a_malformed_key_message_is_refused(tmp_path: Path) -> None:
    e = engine(tmp_path)
    e._account_key_received(key_message(ACCOUNT, 1, b"short"))
    bad = key_message(ACCOUNT, 1, os.urandom(32))
    e._account_key_received(
        ReceivedMessage(**{**{f: getattr(bad, f) for f in bad.__slots__}, "body": b"\xc1 not msgpack"})
    )
    assert e.store.epoch_key(1) is None
    assert e.store.session_key(1) is None
    assert e.rejected == 2
