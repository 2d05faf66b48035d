"""The inbox part alone (protocol/client/engine/inbox.py; docs/account-log.md §9, §10 "Receive"): a real store on
a temporary home, inbox pages from a fake relay, no process."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from protocol import codec, log
from protocol.client.engine.epochs import AccountKeyMessage
from protocol.client.engine.inbox import Inbox
from protocol.client.engine.pending import mark_logged
from protocol.client.sdk import ReceivedMessage, RejectedMessage
from protocol.client.store import HistoryMessage
from protocol.errors import ErrorCode
from tests.support.engine_parts import ACCOUNT, RELAY, Parts, received


def _inbox(parts: Parts, seen: list[tuple[HistoryMessage, int | None, bytes | None]] | None = None) -> Inbox:
    on_message = (lambda m, c, i: seen.append((m, c, i))) if seen is not None else None
    return Inbox(parts.ctx, parts.epochs, parts.holdback, on_message=on_message)


def test_a_page_is_stored_queued_for_the_log_and_announced_after_the_commit(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    seen: list[tuple[HistoryMessage, int | None, bytes | None]] = []
    inbox = _inbox(parts, seen)
    first, second = received(1, 1, "one"), received(2, 2, "two")
    parts.relay.queue_inbox([first, second], next_cursor=2)

    assert trio.run(inbox.read)
    assert parts.store.cursor("inbox_received") == 2
    assert [m.text for m, _, _ in seen] == ["one", "two"]
    assert [(c, i) for _, c, i in seen] == [(1, first.id), (2, second.id)]
    assert parts.store.pending_count() == 2  # both message-received records, predecessors complete
    assert not trio.run(inbox.read)  # nothing new: the relay pages from the cursor
    assert parts.relay.calls[-1] == ("inbox_page", 2)


def test_a_message_waits_for_its_predecessor_and_holds_the_ack_back(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    inbox = _inbox(parts)
    inbox.apply([received(1, 2, "second")], next_cursor=1)
    assert parts.store.pending_count() == 0  # held back (§9): its pair_seq 1 is not here
    assert parts.store.ack_point() == 0  # a held message is not acknowledged (custody rule D5)
    trio.run(inbox.ack)
    assert parts.relay.acks == []

    inbox.apply([received(2, 1, "first")], next_cursor=2)
    assert parts.store.pending_count() == 2  # the gap filled: both released
    for record in parts.store.pending(10):
        with parts.store.transaction():
            mark_logged(parts.store, record.record_id, 1)
    trio.run(inbox.ack)
    assert parts.relay.acks == [2]
    assert parts.store.cursor("inbox_acked") == 2
    trio.run(inbox.ack)
    assert parts.relay.acks == [2]  # idempotent: nothing more to acknowledge


def test_a_refused_envelope_is_reported_and_does_not_block_the_page(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    inbox = _inbox(parts)
    bad = RejectedMessage(cursor=1, id=os.urandom(16), code=ErrorCode.BAD_SIGNATURE, detail="forged")
    inbox.apply([bad, received(2, 1, "fine")], next_cursor=2)
    assert parts.report.rejected == 1
    assert parts.report.warnings[0]["warning"] == "message_refused"
    assert "bad_signature: forged" in parts.report.refusals[0]
    assert parts.store.cursor("inbox_received") == 2
    assert [m.text for m in parts.store.history()] == ["fine"]


def test_an_account_key_message_goes_to_the_epochs_not_to_the_history(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    inbox = _inbox(parts)
    key = os.urandom(32)
    grant = ReceivedMessage(
        cursor=1,
        id=os.urandom(16),
        sender=f"{'e' * 32}.{ACCOUNT}@{RELAY}",
        content_type=log.ACCOUNT_KEY_CONTENT_TYPE,
        body=codec.encode(AccountKeyMessage(epoch=1, key=key, list_version=1)),
        sent_at_ms=1,
        relay_sent_at_ms=1,
        message_id=os.urandom(16),
    )
    inbox.apply([grant], next_cursor=1)
    assert parts.store.session_key(1) == key  # waits for its key record's commitment (account-log.md §17)
    assert parts.store.history() == []
    assert parts.store.cursor("inbox_received") == 1
