"""The log appender alone (protocol/client/engine/log.py): it never appends under an epoch a removed device holds
(account-log.md §5.4 "clients enforce", §5.6), whatever the relay would accept; otherwise it appends, signed, and
settles the pending records."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from protocol import log
from protocol.client.engine.base import LogRekeyError
from protocol.client.engine.log import LogAppender
from protocol.client.store import EpochInfo, encode_plaintext
from protocol.messages import AppendRequest, AppendResponse, AppendResult, DeviceEntry
from tests.support.engine_parts import DEVICE, SENDER, Parts

SIBLING = "e" * 32


def _entry(device_id: str) -> DeviceEntry:
    return DeviceEntry(device_id=device_id, sign_key=os.urandom(32), box_key=os.urandom(32), added_at_ms=1)


def _setup(parts: Parts, current: list[str]) -> list[AppendRequest]:
    """Epoch 1 (v2) granted to this device and a sibling; the verified list now holds ``current``; one record
    pending. Returns the appends the relay received."""
    store = parts.store
    store.put_epoch_key(1, os.urandom(32), b"test")
    store.add_grants(1, [DEVICE, SIBLING])
    info = EpochInfo(epoch=1, record_format=2, position=1, list_version=1, created_at_ms=1_700_000_000_000)
    store.put_epoch_info(info)
    plaintext = log.LogPlaintext(
        writer_device=DEVICE,
        writer_seq=0,
        created_at_ms=1,
        body=log.MessageReceived(
            message_uid=os.urandom(16),
            sender=SENDER,
            sender_sign_key=b"",
            recipient=parts.keys.address,
            pair_seq=0,
            sent_at_ms=1,
            relay_sent_at_ms=1,
            content_type="text/plain",
            body=b"hi",
        ),
    )
    store.add_pending(os.urandom(16), "event", encode_plaintext(plaintext))
    appended: list[AppendRequest] = []

    async def device_chain(account_id: str) -> Any:
        return SimpleNamespace(devices=[_entry(d) for d in current], head=SimpleNamespace(version=2, format=2))

    async def log_append(request: AppendRequest) -> AppendResponse:
        appended.append(request)
        records = enumerate(request.records)
        results = [AppendResult(record_id=r.record_id, position=10 + i, duplicate=False) for i, r in records]
        return AppendResponse(head=10 + len(results), results=results)

    parts.relay.device_chain = device_chain  # type: ignore[method-assign]
    parts.relay.log_append = log_append  # type: ignore[attr-defined]
    return appended


def test_nothing_is_appended_under_an_epoch_a_removed_device_holds(tmp_path: Path) -> None:
    parts = Parts(tmp_path, wall_clock=lambda: 1_700_000_001.0)
    appended = _setup(parts, current=[DEVICE])  # the sibling was revoked; the rotation did not land
    appender = LogAppender(parts.ctx, parts.lists, parts.epochs)
    with pytest.raises(LogRekeyError, match="no longer in the device list"):
        trio.run(appender.append)
    assert appended == []
    assert parts.store.pending_count() == 1  # kept for after the rotation


def test_records_are_appended_signed_numbered_and_settled(tmp_path: Path) -> None:
    parts = Parts(tmp_path, wall_clock=lambda: 1_700_000_001.0)
    appended = _setup(parts, current=[DEVICE, SIBLING])
    appender = LogAppender(parts.ctx, parts.lists, parts.epochs)
    assert trio.run(appender.append)
    [request] = appended
    [record] = request.records
    assert (record.kind, record.epoch) == ("event", 1)
    assert parts.store.pending_count() == 0
    assert parts.store.counter("writer_seq") == 1  # numbered when first sealed (account-log.md §4.6)
    assert not trio.run(appender.append)  # nothing left


def test_a_retry_after_a_lost_answer_and_a_restart_seals_the_same_writer_seq(tmp_path: Path) -> None:
    """The relay may hold the first attempt (its answer lost) or not (the process died before sending): either
    way the retry, here by a fresh appender as after a restart, carries the number given the first time. A second
    number would leave a false ``log_writer_gap`` for every reader (account-log.md §4.6)."""
    parts = Parts(tmp_path, wall_clock=lambda: 1_700_000_001.0)
    appended = _setup(parts, current=[DEVICE, SIBLING])
    answered = parts.relay.log_append  # type: ignore[attr-defined]

    async def lost(request: AppendRequest) -> AppendResponse:
        appended.append(request)
        raise OSError("connection reset before the answer")

    parts.relay.log_append = lost  # type: ignore[attr-defined]
    with pytest.raises(OSError, match="connection reset"):
        trio.run(LogAppender(parts.ctx, parts.lists, parts.epochs).append)
    assert parts.store.pending_count() == 1
    parts.relay.log_append = answered  # type: ignore[attr-defined]
    assert trio.run(LogAppender(parts.ctx, parts.lists, parts.epochs).append)  # a new process: nothing in memory
    key = parts.store.epoch_key(1)
    assert key is not None
    seqs = []
    for request in appended:
        [record] = request.records
        plaintext = log.open_signed_record(
            key,
            record.ciphertext,
            writers={DEVICE: bytes(parts.keys.signing_key.verify_key)},
            account_id=parts.keys.account_id,
            record_id=record.record_id,
            epoch=1,
        )
        seqs.append(plaintext.writer_seq)
    assert seqs == [1, 1]
    assert parts.store.counter("writer_seq") == 1
