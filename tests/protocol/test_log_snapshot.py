"""Snapshot parts and manifests (protocol/log.py, docs/account-log.md §6.1): ids, split/join, seal/open."""

from __future__ import annotations

import pytest

from protocol import log
from protocol.errors import ErrorCode

ACCOUNT = "a" * 32
KEY = bytes(range(32))
NONCE = bytes(24)


def _state(covers: int = 7, n: int = 40) -> log.SnapshotState:
    messages = [
        log.SnapshotMessage(
            position=i + 1,
            record_id=bytes([i]) * 16,
            message_uid=bytes([i]) * 16,
            sender=f"dev.{ACCOUNT}@relay.test",
            direction="sent",
            recipients=["b@relay.test"],
            pair_seq=i + 1,
            sent_at_ms=1000 + i,
            relay_sent_at_ms=2000 + i,
            content_type="text/plain",
            body=f"message {i}".encode() * 5,
        )
        for i in range(n)
    ]
    return log.SnapshotState(covers=covers, messages=messages, gaps=[log.SnapshotGap(after=0, upto=1)])


def test_ids_are_deterministic_and_distinct() -> None:
    sid = log.snapshot_id(ACCOUNT, "dev", 7)
    assert sid == log.snapshot_id(ACCOUNT, "dev", 7)
    assert len({sid, log.snapshot_id(ACCOUNT, "dev", 8), log.snapshot_id(ACCOUNT, "other", 7)}) == 3
    ids = {log.snapshot_part_id(sid, i) for i in range(5)} | {log.snapshot_manifest_id(sid)}
    assert len(ids) == 6
    assert all(len(i) == 16 for i in ids)


def test_split_join_round_trip_in_any_order() -> None:
    state = _state()
    chunks = log.split_snapshot(state, 300)
    assert len(chunks) > 3
    assert chunks == log.split_snapshot(state, 300)  # same state, same bytes: a retry resumes cleanly
    parts = [log.SnapshotPart(index=i, total=len(chunks), covers=7, data=c) for i, c in enumerate(chunks)]
    assert log.join_snapshot(list(reversed(parts)), 7) == state


@pytest.mark.parametrize("damage", ["missing", "repeated", "total", "covers"])
def test_join_refuses_incomplete_or_foreign_parts(damage: str) -> None:
    chunks = log.split_snapshot(_state(), 300)
    parts = [log.SnapshotPart(index=i, total=len(chunks), covers=7, data=c) for i, c in enumerate(chunks)]
    if damage == "missing":
        parts = parts[:-1]
    elif damage == "repeated":
        parts = [*parts, parts[0]]
    elif damage == "total":
        parts = [log.SnapshotPart(index=p.index, total=p.total + 1, covers=7, data=p.data) for p in parts]
    with pytest.raises(log.InvalidRecordError) as caught:
        log.join_snapshot(parts, 8 if damage == "covers" else 7)
    assert caught.value.code is ErrorCode.MALFORMED_BODY


def test_part_and_manifest_seal_open_and_bind_their_header() -> None:
    sid = log.snapshot_id(ACCOUNT, "dev", 7)
    part = log.SnapshotPart(index=2, total=3, covers=7, data=b"x" * 1000)
    sealed = log.seal_snapshot_part(KEY, part, account_id=ACCOUNT, snapshot=sid, epoch=1, nonce=NONCE)
    rid = log.snapshot_part_id(sid, 2)
    assert log.open_snapshot_part(KEY, sealed, account_id=ACCOUNT, record_id=rid, snapshot=sid, epoch=1) == part
    for kwargs in (
        {"record_id": log.snapshot_part_id(sid, 1)},  # another part's slot
        {"snapshot": log.snapshot_id(ACCOUNT, "dev", 8)},  # another snapshot
        {"epoch": 2},
        {"account_id": "b" * 32},
    ):
        args = {"account_id": ACCOUNT, "record_id": rid, "snapshot": sid, "epoch": 1, **kwargs}
        with pytest.raises(log.InvalidRecordError):
            log.open_snapshot_part(KEY, sealed, **args)  # type: ignore[arg-type]
    manifest = log.SnapshotManifest(writer_device="dev", created_at_ms=5, covers=7, part_hashes=[b"h" * 32] * 3)
    sealed = log.seal_snapshot_manifest(KEY, manifest, account_id=ACCOUNT, snapshot=sid, epoch=1, nonce=NONCE)
    opened = log.open_snapshot_manifest(KEY, sealed, account_id=ACCOUNT, snapshot=sid, epoch=1, covers=7, parts=3)
    assert opened == manifest
    for covers, parts in ((8, 3), (7, 2)):  # the relay-visible header is bound
        with pytest.raises(log.InvalidRecordError):
            log.open_snapshot_manifest(
                KEY, sealed, account_id=ACCOUNT, snapshot=sid, epoch=1, covers=covers, parts=parts
            )


def test_a_full_part_fits_the_relay_record_limit() -> None:
    sid = log.snapshot_id(ACCOUNT, "dev", 1)
    part = log.SnapshotPart(index=99, total=100, covers=10**9, data=b"\xff" * log.SNAPSHOT_PART_BYTES)
    sealed = log.seal_snapshot_part(KEY, part, account_id=ACCOUNT, snapshot=sid, epoch=1, nonce=NONCE)
    assert len(sealed) == 1024 * 1024 + 40  # limits.max_log_record_bytes (docs/account-log.md §3.5)
    with pytest.raises(ValueError, match="part_bytes"):
        log.split_snapshot(_state(), log.SNAPSHOT_PART_BYTES + 1)
