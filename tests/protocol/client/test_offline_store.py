"""The offline-first client's pure parts: the engine's transition table, backoff, and the local store's sealing."""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import pytest

from protocol.client.localdb import LocalDB, TamperedRowError
from protocol.client.store import SEALED_COLUMNS, ClientStore, HistoryMessage
from protocol.client.sync import TRANSITIONS, backoff_delay

STATES = {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values())
EVENTS = {e for _, e in TRANSITIONS}


def test_transition_table_is_closed_and_every_state_can_stop() -> None:
    assert {"stopped", "connecting", "catching_up", "live", "backoff", "revoked"} == STATES
    for state in STATES - {"stopped", "revoked"}:
        assert TRANSITIONS[(state, "cancel")] == "stopped"
        assert TRANSITIONS[(state, "revoked")] == "revoked"
    # revoked is terminal; stopped only starts
    assert [e for (s, e) in TRANSITIONS if s == "revoked"] == []
    assert [e for (s, e) in TRANSITIONS if s == "stopped"] == ["start"]
    assert TRANSITIONS[("backoff", "timer")] == "connecting"
    assert TRANSITIONS[("live", "failed")] == "backoff"
    assert {(s, e) for s in STATES for e in EVENTS} - set(TRANSITIONS)  # the rest is refused


def test_backoff_is_full_jitter_within_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(1, 40):
        cap = min(60.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # jitter spreads over the whole window
    assert backoff_delay(1, rng, floor=5.0) >= 5.0  # Retry-After is a floor
    assert all(backoff_delay(30, rng, max_backoff=1.0) <= 1.0 for _ in range(100))


@pytest.fixture
def store(tmp_path: Path) -> ClientStore:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return ClientStore(LocalDB.open(home, os.urandom(32)))


def test_secret_columns_are_sealed_per_row(store: ClientStore, tmp_path: Path) -> None:
    first = store.enqueue("bob@relay.example", "text/plain", b"canary-one", peer="bob@relay.example")
    second = store.enqueue("bob@relay.example", "text/plain", b"canary-two", peer="bob@relay.example")
    assert (first.pair_seq, second.pair_seq) == (1, 2)
    raw = (tmp_path / "home" / "state.db").read_bytes() + (tmp_path / "home" / "state.db-wal").read_bytes()
    assert b"canary-one" not in raw
    assert b"bob@relay.example" not in raw
    # A sealed body moved to another row does not open there.
    store.db.execute(
        "UPDATE outbox_entries SET body = (SELECT body FROM outbox_entries WHERE local_id = ?) WHERE local_id = ?",
        (first.local_id, second.local_id),
    )
    with pytest.raises(TamperedRowError):
        store.outbox_entry(second.local_id)


def _received(store: ClientStore, msg_key: bytes, **fields: object) -> bool:
    """``upsert_message`` of a received message with defaults for every field not given."""
    defaults: dict[str, object] = {
        "message_uid": msg_key,
        "sender_device": "dev",
        "direction": "received",
        "pair_seq": 1,
        "sent_at_ms": 1,
        "relay_sent_at_ms": 2,
        "via": "inbox",
        "sender": "dev.acct@relay",
        "recipients": ["me.acct2@relay"],
        "content_type": "text/plain",
        "body": b"",
    }
    return store.upsert_message(msg_key=msg_key, **{**defaults, **fields})  # type: ignore[arg-type]


def test_messages_are_unique_per_sender_and_uid(store: ClientStore) -> None:
    same = {"message_uid": b"u" * 16, "body": b"hi"}
    assert _received(store, b"k" * 16, **same)
    assert not _received(store, b"k" * 16, log_position=5, **same)  # merged: now logged
    # The same (sender device, message uid) under another key is the same message: merged, not added.
    assert not _received(store, b"j" * 16, **same)
    assert store.message_count() == 1
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute(
            "INSERT INTO history_messages (msg_key, message_uid, uid_index, sender_index, via, local_seq, meta, "
            "sender, recipients, content_type, body) SELECT ?, message_uid, uid_index, sender_index, via, local_seq, "
            "meta, sender, recipients, content_type, body FROM history_messages",
            (b"z" * 16,),
        )
    [message] = [m for m in store.history() if m.msg_key == b"k" * 16]
    assert message.log_position == 5


def test_ack_point_waits_for_pending_and_held_messages(store: ClientStore) -> None:
    with store.transaction():
        store.set_cursor("inbox_received", 10)
    assert store.ack_point() == 10
    store.add_pending(b"r" * 16, "event", b"x", inbox_cursor=7)
    assert store.ack_point() == 6
    store.drop_pending(b"r" * 16)
    _received(store, b"h" * 16, sender_device="s", pair_seq=3, relay_sent_at_ms=1, sender="s.a@r", recipients=[])
    store.hold(b"h" * 16, 4)
    assert store.ack_point() == 3
    assert not store.has_predecessors("s", 3)
    store.release(b"h" * 16, late=False)
    assert store.ack_point() == 10


def test_rekey_covers_every_sealed_column(store: ClientStore, tmp_path: Path) -> None:
    """SEALED_COLUMNS is complete: after LocalDB.rekey, every table this module writes reads back under the
    new DEK only (a column missing from it would stay under the old key and fail here)."""
    entry = store.enqueue("bob@relay.example", "text/plain", b"queued body", peer="bob@relay.example")
    store.put_envelopes(entry.local_id, [("dev.bob@relay.example", b"i" * 16, b"ciphertext")])
    _received(store, b"k" * 16, message_uid=b"u" * 16, body=b"hi")
    _received(store, b"h" * 16, pair_seq=3)
    store.hold(b"h" * 16, 4)
    store.add_pending(b"r" * 16, "event", b"pending plaintext")
    store.put_epoch_key(1, b"e" * 32, b"src")
    new_dek = os.urandom(32)
    assert store.db.rekey(new_dek, SEALED_COLUMNS) >= 10
    store.db.close()
    fresh = ClientStore(LocalDB.open(tmp_path / "home", new_dek))
    assert fresh.outbox_entry(entry.local_id) == entry
    assert [e[1] for e in fresh.envelopes(entry.local_id)] == ["dev.bob@relay.example"]
    message = fresh.message(b"k" * 16)
    assert message is not None
    assert (message.sender, message.recipients, message.body) == ("dev.acct@relay", ["me.acct2@relay"], b"hi")
    assert [h[1:4] for h in fresh.held()] == [("dev", 3, 4)]
    assert [p.plaintext for p in fresh.pending()] == [b"pending plaintext"]
    assert fresh.epoch_key(1) == b"e" * 32
    assert fresh.db.dek_check_opens()
    # Every BLOB column of this module's tables is either sealed (listed) or a non-secret id/ciphertext.
    plain = {("outbox_envelopes", "idempotency_key"), ("outbox_envelopes", "ciphertext"),
             ("outbox_envelopes", "accepted_id"), ("history_messages", "msg_key"),
             ("history_messages", "message_uid"), ("outbox_entries", "message_uid"), ("log_pending", "record_id"),
             ("log_epoch_keys", "source"),
             ("history_messages", "uid_index"), ("history_messages", "sender_index"),
             ("contacts", "name_index"), ("contacts", "address_index")}  # keyed hashes  # fmt: skip
    for table in SEALED_COLUMNS:
        blobs = {r[1] for r in fresh.db.execute(f'PRAGMA table_info("{table}")') if r[2].upper() == "BLOB"}
        sealed = {column for column, _ in SEALED_COLUMNS[table][1]}
        assert blobs - sealed == {c for t, c in plain if t == table}, table


def test_history_metadata_is_sealed_and_still_ordered_and_filtered(store: ClientStore, tmp_path: Path) -> None:
    """account-log.md §8: the sender, direction and times are sealed; ordering and the ``since_ms`` filter
    still work (on opened values), and the per-sender order runs on a keyed hash."""
    for n, sent_at in enumerate((1_700_000_000_111, 1_700_000_000_222, 1_700_000_000_333), start=1):
        _received(store, bytes([n]) * 16, sender_device="devsecret", pair_seq=n, sent_at_ms=sent_at,
                  relay_sent_at_ms=sent_at + 7, log_position=10 * n)  # fmt: skip
    rows = store.db.execute("SELECT * FROM history_messages").fetchall()
    cells = {cell for row in rows for cell in row}
    assert not cells & {"devsecret", "received", 1_700_000_000_111, 1_700_000_000_118}
    raw = (tmp_path / "home" / "state.db").read_bytes() + (tmp_path / "home" / "state.db-wal").read_bytes()
    assert b"devsecret" not in raw
    assert [m.sent_at_ms for m in store.history(since_ms=1_700_000_000_200)] == [1_700_000_000_222, 1_700_000_000_333]
    assert [m.pair_seq for m in store.history(since_ms=1_700_000_000_200, limit=1)] == [2]
    assert [m.pair_seq for m in store.history(since_position=10, limit=1)] == [2]
    assert store.has_predecessors("devsecret", 3)
    assert not store.has_predecessors("other", 2)
    # The merge of a later relay time reaches the sealed column.
    _received(
        store, b"\x01" * 16, sender_device="devsecret", message_uid=b"\x01" * 16, relay_sent_at_ms=1_800_000_000_000
    )
    message = store.message(b"\x01" * 16)
    assert message is not None
    assert (message.sender_device, message.direction, message.relay_sent_at_ms) == (
        "devsecret",
        "received",
        1_800_000_000_000,
    )


def test_history_newest_is_the_newest_matches_oldest_first_and_opens_no_older_row(
    store: ClientStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``history --limit N`` (issue 14): the newest N in log order — logged ones by position, then the ones not
    logged yet — after the sealed filters (the peer, ``since_ms``), and older rows are never read or opened."""
    senders = ["a.x@relay", "b.y@relay", "a.x@relay", "b.y@relay", "a.x@relay"]
    positions: list[int | None] = [30, 10, 20, None, None]  # inserted out of log order on purpose
    for n, (sender, position) in enumerate(zip(senders, positions, strict=True), start=1):
        _received(store, bytes([n]) * 16, sender=sender, pair_seq=n, sent_at_ms=n, log_position=position)
    in_log_order = [2, 3, 1, 4, 5]  # positions 10, 20, 30, then the unlogged ones in local order
    assert [m.pair_seq for m in store.history()] == in_log_order
    assert [m.pair_seq for m in store.history(newest=2)] == [4, 5]
    assert [m.pair_seq for m in store.history(newest=4)] == [3, 1, 4, 5]
    assert [m.pair_seq for m in store.history(newest=9)] == in_log_order
    assert store.history(newest=0) == []
    assert [m.pair_seq for m in store.history(limit=2)] == [2, 3]  # the oldest: unchanged
    # The filter runs before the limit: the newest two of b, not the newest two that happen to be b's.
    from_b = store.history(newest=2, where=lambda m: m.sender == "b.y@relay")
    assert [m.pair_seq for m in from_b] == [2, 4]
    assert [m.pair_seq for m in store.history(newest=2, since_ms=4)] == [4, 5]
    assert [m.pair_seq for m in store.history(newest=2, since_position=10)] == [4, 5]
    with pytest.raises(ValueError, match="limit or newest"):
        store.history(limit=1, newest=1)

    opened: list[int] = []
    open_row = store._message_row

    def counting(row: object) -> HistoryMessage:
        message = open_row(row)
        opened.append(message.pair_seq)
        return message

    monkeypatch.setattr(store, "_message_row", counting)
    store.history(newest=1)
    assert opened == [5]  # the SQL limit: one row read
    opened.clear()
    store.history(newest=1, where=lambda m: m.sender == "b.y@relay")
    assert opened == [5, 4]  # opened newest first until one matched
