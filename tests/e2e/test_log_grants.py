"""Post-quantum key grants, scheduled rotation and the move of a legacy (v1) log to v2 (account-log.md §5.1 v2,
§5.3, §18; crypto.md §12.1), with a real relay and the real client."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from protocol import log
from protocol.client.sdk import RelayClient
from protocol.messages import LogRecord, LogRecordIn
from tests.e2e.offline_client import cli, history, init_device, keystore, link_device, load, run_engine
from tests.relay_process import RelayProcess

ROTATE_EVERY_2 = {"TETHERLESS_LOG_ROTATE_RECORDS": "2"}


async def _log(relay_url: str, home: Path) -> list[LogRecord]:
    async with RelayClient.connect(relay_url, keys=keystore(home).load()) as client:
        page = await client.api.log_page(after=0, limit=500)
        return page.records


def test_scheduled_rotation_keys_are_independent_and_grant_the_current_list(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay-data")
    relay.start()
    try:
        a1, a2, b = tmp_path / "a1", tmp_path / "a2", tmp_path / "b"
        init_device(relay.url, a1, "a1")
        bob = init_device(relay.url, b, "bob")
        trio.run(link_device, relay.url, a1, a2, "a2")
        for n in range(5):
            assert cli(a1, "send", bob, "--text", f"m{n}", env=ROTATE_EVERY_2).returncode == 0
            assert cli(a1, "sync", env=ROTATE_EVERY_2).returncode == 0
        records = trio.run(_log, relay.url, a1)
        epochs = sorted({r.epoch for r in records if r.kind == "key"})
        assert len(epochs) >= 3  # after every 2 records a new epoch
        _, keys, store = load(a1)
        for record in records:
            if record.kind != "key" or log.decode_recovery_backup(record.ciphertext) is not None:
                continue  # recovery backups (account-log.md §5.7) are key-kind records of their own layout
            key_record = log.decode_any_key_record(record.ciphertext)
            assert isinstance(key_record, log.KeyEpochRecordV2)  # only hybrid grants are written
            assert all(g.wrapped for g in key_record.body.grants)  # format 3: every device has an ML-KEM key
            assert len(key_record.body.grants) == 2  # exactly A1 and A2
        for record in records:
            if record.kind != "event" or record.epoch < 2:
                continue
            info = store.epoch_info(record.epoch)
            assert info is not None
            kwargs = {"writers": info.writers, "account_id": keys.account_id, "record_id": record.record_id}
            current, previous = store.epoch_key(record.epoch), store.epoch_key(record.epoch - 1)
            assert current is not None
            assert previous is not None
            opened = log.open_signed_record(current, record.ciphertext, epoch=record.epoch, **kwargs)
            assert opened.writer_device == keys.device_id
            # The previous epoch's key does not open it (no backward or forward chain between epochs).
            for other in (previous, store.epoch_key(record.epoch + 1) or os.urandom(32)):
                try:
                    log.open_signed_record(other, record.ciphertext, epoch=record.epoch, **kwargs)
                except log.InvalidRecordError:
                    continue
                raise AssertionError("another epoch's key opened a record")
        store.db.close()
        # A2, offline throughout, catches up through its hybrid grants alone.
        assert trio.run(run_engine, a2) == 0
        assert [m["text"] for m in history(a2)] == [f"m{n}" for n in range(5)]
        assert all(m["authenticated"] and m["writer"] == keys.device_id for m in history(a2))
    finally:
        relay.stop()


def test_a_legacy_v1_log_keeps_opening_and_moves_to_v2_on_the_next_rotation(tmp_path: Path) -> None:
    """A log as the previous client wrote it (v1 key record with sealed-box grants, unsigned records), and a
    home holding its key as that client stored it: both keep working; the next sync rotates to a v2 epoch."""
    relay = RelayProcess(tmp_path / "relay-data")
    relay.start()
    try:
        a1, a2, b = tmp_path / "a1", tmp_path / "a2", tmp_path / "b"
        init_device(relay.url, a1, "a1")
        bob = init_device(relay.url, b, "bob")
        trio.run(link_device, relay.url, a1, a2, "a2")
        _, keys, store = load(a1)
        key = os.urandom(32)
        uid = os.urandom(16)
        legacy = log.LogPlaintext(
            writer_device=keys.device_id,
            writer_seq=1,
            created_at_ms=1,
            body=log.MessageSent(
                message_uid=uid,
                sender=keys.address,
                recipients=[bob],
                pair_seq=1,
                sent_at_ms=1_764_000_000_000,
                content_type="text/plain; charset=utf-8",
                body=b"written by the v1 client",
            ),
        )
        record_id = log.message_record_id(keys.account_id, keys.address, uid)

        async def write_v1_log() -> int:
            async with RelayClient.connect(relay.url, keys=keys) as client:
                chain = await client.device_chain(keys.account_id)
                key_record = log.make_key_record(
                    keys.signing_key,
                    account_id=keys.account_id,
                    creator_device=keys.device_id,
                    epoch=1,
                    key=key,
                    device_list_version=chain.head.version,
                    devices=chain.devices,
                    created_at_ms=1,
                    ephemeral_keys=[os.urandom(32) for _ in chain.devices],
                )
                event = log.seal_record(
                    key, legacy, account_id=keys.account_id, record_id=record_id, epoch=1, nonce=os.urandom(24)
                )
                records = [
                    LogRecordIn(
                        record_id=os.urandom(16),
                        kind="key",
                        epoch=1,
                        ciphertext=key_record,
                        device_list_version=chain.head.version,
                    ),
                    LogRecordIn(record_id=record_id, kind="event", epoch=1, ciphertext=event),
                ]
                response = await client.api.log_append(records, expected_head=0)
                return response.head

        head = trio.run(write_v1_log)
        with store.transaction():  # A1's home as the v1 client left it: the key, the grants, the cursor
            store.put_epoch_key(1, key, b"")
            store.add_grants(1, [keys.device_id, load(a2)[1].device_id])
            store.set_cursor("log", head)
        store.db.close()
        assert cli(a1, "send", bob, "--text", "after the upgrade").returncode == 0
        assert cli(a1, "sync").returncode == 0
        records = trio.run(_log, relay.url, a1)
        records = [r for r in records if log.decode_recovery_backup(r.ciphertext) is None]  # backups: §5.7
        kinds = [(r.kind, r.epoch) for r in records]
        assert kinds[:2] == [("key", 1), ("event", 1)]
        assert ("key", 2) in kinds
        assert isinstance(log.decode_any_key_record(records[kinds.index(("key", 2))].ciphertext), log.KeyEpochRecordV2)
        assert kinds[-1] == ("event", 2)  # the new message went under the v2 epoch, signed
        # A2 (a device of the same account, never synced) reads both: the legacy record flagged.
        assert trio.run(run_engine, a2) == 0
        shown = history(a2)
        assert [m["text"] for m in shown] == ["written by the v1 client", "after the upgrade"]
        assert [(m["writer"], m["authenticated"]) for m in shown] == [(None, False), (keys.device_id, True)]
    finally:
        relay.stop()
