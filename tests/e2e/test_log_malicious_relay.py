"""The relay is the adversary of the account log (account-log.md §4.6, §5.4; docs/security.md "Account log").

Real relay processes and the real client; the attacker holds a revoked device's keys and edits the relay's
SQLite database (it is the relay), or answers the client's requests itself where the relay's own rules would
have refused first (``_LyingRelay``: the real relay behind it, with its revocation rule switched off in its
database). Every attack ends in the documented client error and an unchanged ``history --json``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from protocol import handshake, log
from protocol.client import devices
from protocol.client.api import RelayApi
from protocol.client.home import make_engine
from protocol.client.sdk import RelayClient
from protocol.client.sync import SyncOutcome
from protocol.errors import ErrorCode, RemoteError
from protocol.messages import AppendResponse, LogRecordIn
from tests.e2e.offline_client import cli, history, init_device, keystore, link_device, load, run_engine
from tests.relay_process import RelayProcess

KIND = {"event": 1, "state": 2, "key": 3}


@dataclass
class Account:
    relay: RelayProcess
    a1: Path
    a2: Path
    a2_id: str
    account: str
    bob: str


@pytest.fixture
def account(tmp_path: Path) -> Iterator[Account]:
    """A1 and A2 (linked) in one account, Bob elsewhere; "m1" logged under epoch 1; then A2 is revoked."""
    relay = RelayProcess(tmp_path / "relay-data")
    relay.start()
    try:
        a1, a2, b = tmp_path / "a1", tmp_path / "a2", tmp_path / "b"
        init_device(relay.url, a1, "a1")
        bob = init_device(relay.url, b, "bob")
        a2_address = trio.run(link_device, relay.url, a1, a2, "a2")
        assert cli(a1, "send", bob, "--text", "m1").returncode == 0
        assert trio.run(run_engine, a1) == 0
        assert trio.run(run_engine, a2) == 0
        a2_id = a2_address.split(".", 1)[0]
        account_id = a2_address.split(".", 1)[1].split("@", 1)[0]
        yield Account(relay, a1, a2, a2_id, account_id, bob)
    finally:
        relay.stop()


def _revoke(acc: Account) -> None:
    async def revoke() -> None:
        async with RelayClient.connect(acc.relay.url, keys=keystore(acc.a1).load()) as client:
            await devices.revoke_device(client, acc.a2_id)

    trio.run(revoke)


def _db(relay: RelayProcess) -> sqlite3.Connection:
    conn = sqlite3.connect(relay.data_dir / "relay.sqlite3", timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def _insert(relay: RelayProcess, account: str, records: list[tuple[bytes, str, int, bytes, int | None]]) -> list[int]:
    """The relay appends records nobody legitimately wrote (``record_id, kind, epoch, ciphertext, list version``)."""
    conn = _db(relay)
    try:
        conn.execute("BEGIN IMMEDIATE")
        head = conn.execute("SELECT head FROM log_heads WHERE account_id = ?", (account,)).fetchone()[0]
        positions = []
        for record_id, kind, epoch, ciphertext, version in records:
            head += 1
            conn.execute(
                "INSERT INTO log_records (account_id, position, record_id, kind, epoch, committed_at_ms, "
                "device_list_version, size, ciphertext) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?)",
                (account, head, record_id, KIND[kind], epoch, version, len(ciphertext), ciphertext),
            )
            positions.append(head)
        conn.execute("UPDATE log_heads SET head = ? WHERE account_id = ?", (head, account))
        conn.execute("COMMIT")
        return positions
    finally:
        conn.close()


def _texts(home: Path) -> list[str]:
    return [m["text"] for m in history(home)]


def _forged_event(acc: Account, epoch: int, text: str) -> tuple[bytes, bytes]:
    """A ``message-sent`` record that the revoked A2 signs and seals under an epoch key it holds."""
    _, keys, store = load(acc.a2)
    key = store.epoch_key(epoch)
    assert key is not None
    uid = os.urandom(16)
    record_id = log.message_record_id(acc.account, keys.address, uid)
    plaintext = log.LogPlaintext(
        writer_device=keys.device_id,
        writer_seq=99,
        created_at_ms=1,
        body=log.MessageSent(
            message_uid=uid,
            sender=keys.address,
            recipients=[acc.bob],
            pair_seq=1,
            sent_at_ms=1,
            content_type="text/plain; charset=utf-8",
            body=text.encode(),
        ),
    )
    nonce = os.urandom(log.NONCE_BYTES)
    ciphertext = log.seal_signed_record(
        key, plaintext, keys.signing_key, account_id=acc.account, record_id=record_id, epoch=epoch, nonce=nonce
    )
    store.db.close()
    return record_id, ciphertext


def _rotated(acc: Account) -> list[dict[str, Any]]:
    """A2 revoked; A1 sends "after" and syncs: epoch 2 (v2, without A2) and "after" under it."""
    _revoke(acc)
    assert cli(acc.a1, "send", acc.bob, "--text", "after").returncode == 0
    assert cli(acc.a1, "sync").returncode == 0
    _, _, store = load(acc.a1)
    assert store.newest_epoch() == 2
    info = store.epoch_info(2)
    assert info is not None
    assert info.record_format == 2
    assert acc.a2_id not in store.granted(2)  # the removed device gets no grant for the next epoch
    store.db.close()
    before = history(acc.a1)
    assert [m["text"] for m in before] == ["m1", "after"]
    assert all(m["authenticated"] for m in before)
    return before


# -- the attacks ------------------------------------------------------------------------------------------


def test_record_signed_with_a_revoked_devices_keys_is_refused(account: Account) -> None:
    """The relay inserts a record the revoked A2 signed under epoch 1 (whose key it holds) after the rotation."""
    before = _rotated(account)
    record_id, ciphertext = _forged_event(account, 1, "forged by the revoked device")
    [position] = _insert(account.relay, account.account, [(record_id, "event", 1, ciphertext, None)])
    result = cli(account.a1, "sync")
    assert result.returncode == 0, result.stderr
    assert f"refused log record at position {position} (epoch 1): log_epoch_stale" in result.stderr
    assert history(account.a1) == before


def test_stale_epoch_served_with_the_rotation_hidden(account: Account) -> None:
    """The relay hides the newest key record and serves an old-epoch record: the reader remembers the epoch."""
    before = _rotated(account)
    conn = _db(account.relay)
    try:
        conn.execute("DELETE FROM log_records WHERE account_id = ? AND kind = 3 AND epoch = 2", (account.account,))
        conn.execute("UPDATE log_heads SET epoch = 1, rekey_after_version = 0 WHERE account_id = ?", (account.account,))
    finally:
        conn.close()
    record_id, ciphertext = _forged_event(account, 1, "old epoch, served late")
    [position] = _insert(account.relay, account.account, [(record_id, "event", 1, ciphertext, None)])
    result = cli(account.a1, "sync")
    assert f"refused log record at position {position} (epoch 1): log_epoch_stale" in result.stderr
    assert history(account.a1) == before


def test_replayed_and_reordered_records_change_nothing(account: Account) -> None:
    """The relay serves epoch-1 records again after the rotation and swaps two records' positions."""
    before = _rotated(account)
    conn = _db(account.relay)
    try:
        rows = conn.execute(
            "SELECT record_id, kind, epoch, ciphertext, device_list_version FROM log_records "
            "WHERE account_id = ? AND kind = 1 ORDER BY position",
            (account.account,),
        ).fetchall()
        conn.execute("DROP INDEX log_records_id")  # the relay no longer keeps record ids unique
    finally:
        conn.close()
    replayed = [(r[0], "event", r[2], r[3], r[4]) for r in rows]
    positions = _insert(account.relay, account.account, replayed)
    result = cli(account.a1, "sync")
    assert result.returncode == 0, result.stderr
    stale = [p for p, r in zip(positions, rows, strict=True) if r[2] == 1]
    for p in stale:  # a replay under the old epoch lands after the rotation: refused
        assert f"refused log record at position {p} (epoch 1): log_epoch_stale" in result.stderr
    assert history(account.a1) == before  # a replay under the current epoch is the same record: deduplicated


def test_key_record_granting_outside_the_verified_list_is_refused(account: Account) -> None:
    """The revoked A2 signs a rotation to epoch 3 naming the old list version it was in (granting itself)."""
    before = _rotated(account)
    _, keys, a2_store = load(account.a2)
    a2_store.db.close()

    async def old_list() -> tuple[int, list[Any]]:
        async with RelayClient.connect(account.relay.url, keys=keystore(account.a1).load()) as client:
            chain = await client.device_chain(account.account)
            version = chain.head.version - 1  # the version before the revocation: A1 and A2
            entries = await client.list_at(account.account, version)
            assert entries is not None
            return version, entries

    version, entries = trio.run(old_list)
    key = os.urandom(32)
    randomness = []
    for entry in entries:
        if entry.kem_key:
            ct, ss = handshake.encapsulate(entry.kem_key)
            randomness.append((os.urandom(32), ct, ss))
    forged = log.make_key_record_v2(
        keys.signing_key,
        account_id=account.account,
        creator_device=keys.device_id,
        epoch=3,
        keys={3: key},
        rotation=True,
        device_list_version=version,
        devices=entries,
        created_at_ms=1,
        wrap_randomness=randomness,
    )
    [position] = _insert(account.relay, account.account, [(os.urandom(16), "key", 3, forged, version)])
    result = cli(account.a1, "sync")
    assert result.returncode == 0, result.stderr
    assert f"refused log record at position {position} (epoch 3): bad_signature" in result.stderr
    _, _, store = load(account.a1)
    assert store.epoch_key(3) is None
    assert store.newest_epoch() == 2
    store.db.close()
    assert history(account.a1) == before


class _LyingRelay:
    """Answers ``409 log_conflict`` to every append that carries a key record; passes everything else to the real
    relay. ``with _LyingRelay() as liar:`` wraps :meth:`RelayApi.log_append` of every client made inside the block
    (the engine connects its own), so the lie reaches the engine exactly where a relay's answer would."""

    def __init__(self) -> None:
        self.refused = 0
        self._real = RelayApi.log_append

    def __enter__(self) -> _LyingRelay:
        real, liar = self._real, self

        async def log_append(
            api: RelayApi, records: Sequence[LogRecordIn], *, expected_head: int | None = None
        ) -> AppendResponse:
            if any(r.kind == "key" for r in records):
                liar.refused += 1
                raise RemoteError(ErrorCode.LOG_CONFLICT, "expected_head is not the head", http_status=409)
            return await real(api, records, expected_head=expected_head)

        RelayApi.log_append = log_append  # type: ignore[method-assign]
        return self

    def __exit__(self, *_: object) -> None:
        RelayApi.log_append = self._real  # type: ignore[method-assign]


def test_relay_answering_409_to_the_rotation_gets_no_record_under_the_old_epoch(account: Account) -> None:
    """After A2's revocation the relay accepts epoch-1 appends (its rule switched off) but refuses every
    rotation: the client stops writing to the log, keeps its outbox, reports ``log_rekey_required`` and
    retries; once the relay behaves, the rotation and the message go through under epoch 2."""
    _revoke(account)
    conn = _db(account.relay)
    try:
        conn.execute("UPDATE log_heads SET rekey_after_version = 0 WHERE account_id = ?", (account.account,))
    finally:
        conn.close()
    before = history(account.a1)

    async def records() -> list[tuple[str, int]]:
        async with RelayClient.connect(account.relay.url, keys=keystore(account.a1).load()) as client:
            page = await client.api.log_page(after=0)
            # A recovery backup is a `key`-kind record too (account-log.md §5.7): named apart here.
            return [("backup" if log.decode_recovery_backup(r.ciphertext) else r.kind, r.epoch) for r in page.records]

    log_before = trio.run(records)
    # `send` posts at once and runs one drain step: the relay accepts its key records here, so the liar below
    # stands in for the relay only from `sync` on; the gate must already hold for the send's own drain step.
    assert cli(account.a1, "send", account.bob, "--text", "after").returncode == 0

    async def lying_sync() -> tuple[SyncOutcome, str, int]:
        ks, keys, store = load(account.a1)
        try:
            engine = make_engine(keys, store)
            with _LyingRelay() as liar:
                code = await engine.run(follow=False, timeout=3)
            return code, engine.last_failure, liar.refused
        finally:
            store.db.close()
            ks.close()

    code, failure, refused = trio.run(lying_sync)
    assert code is SyncOutcome.HOME_UNREACHABLE
    assert failure.startswith("log_rekey_required: ")
    assert refused >= 1

    assert trio.run(records) == log_before  # nothing new under epoch 1 (nor anything else)
    _, _, store = load(account.a1)
    assert store.pending_count() == 1  # "after" waits in log_pending, not lost
    store.db.close()
    assert [m["text"] for m in history(account.a1)] == [m["text"] for m in before] + ["after"]
    result = cli(account.a1, "sync")  # the relay behaves again
    assert result.returncode == 0, result.stderr
    kinds = trio.run(records)
    assert [k for k in kinds if k[0] != "backup"][-2:] == [("key", 2), ("event", 2)]
    assert ("backup", 2) in kinds  # the new epoch is backed up to the recovery key


def test_cli_reports_the_rotation_refusal(account: Account) -> None:
    """The same attack through ``tetherless sync``: the relay keeps refusing the rotation (its head names an
    epoch far ahead) while its revocation rule is off; the CLI exits 3 with the log error, one line."""
    _revoke(account)
    conn = _db(account.relay)
    try:
        conn.execute("UPDATE log_heads SET rekey_after_version = 0 WHERE account_id = ?", (account.account,))
    finally:
        conn.close()
    before = history(account.a1)
    assert cli(account.a1, "send", account.bob, "--text", "after").returncode == 0
    conn = _db(account.relay)
    try:  # the relay now answers log_epoch_stale to the rotation (epoch 2 is "not current + 1")
        conn.execute("UPDATE log_heads SET epoch = 5 WHERE account_id = ?", (account.account,))
    finally:
        conn.close()
    result = cli(account.a1, "sync", "--timeout", "4")
    assert result.returncode == 3
    assert "tetherless: error: log_" in result.stderr
    assert [m["text"] for m in history(account.a1)] == [m["text"] for m in before] + ["after"]
