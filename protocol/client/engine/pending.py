"""The local queue of records waiting for the account log (``log_pending``): what the inbox, the outbox, the log
reader and the snapshots all feed or settle (docs/account-log.md §9, §10)."""

from __future__ import annotations

from ... import log
from ..store import ClientStore, encode_plaintext
from .base import Context, Part


def mark_logged(store: ClientStore, record_id: bytes, position: int) -> None:
    """``record_id`` is in the log at ``position``: drop it from ``log_pending``, note the message's position, and
    mark the outbox entry that queued it ``logged``. Idempotent; call it inside the caller's transaction."""
    row = store.db.execute("SELECT outbox_local_id FROM log_pending WHERE record_id = ?", (record_id,)).fetchone()
    store.drop_pending(record_id)
    store.set_position(record_id, position)
    if row and row[0] is not None:
        store.set_outbox_state(int(row[0]), "logged")


class HoldBack(Part):
    """§9 hold-back: a message received from the inbox is logged only in ``pair_seq`` order, so its
    ``message-received`` record waits until its predecessors are here, or ``holdback_seconds`` passed."""

    def __init__(self, ctx: Context, holdback_seconds: float) -> None:
        super().__init__(ctx)
        self.holdback_seconds = holdback_seconds

    def release(self) -> None:
        """Queue the ``message-received`` record of every held message whose predecessors are all here.

        A message held longer than ``holdback_seconds`` is released with ``late`` (a gap that never filled, e.g.
        a message its sender gave up on). Local only; call it inside the caller's transaction. Idempotent."""
        store = self._store
        now = store.now_ms()
        for msg_key, sender_device, pair_seq, cursor, since in store.held():
            ready = pair_seq <= 0 or store.has_predecessors(sender_device, pair_seq)
            late = not ready and now - (since or now) >= self.holdback_seconds * 1000
            if not (ready or late):
                continue
            message = store.message(msg_key)
            assert message is not None
            plaintext = log.LogPlaintext(
                writer_device=self._keys.device_id,
                writer_seq=0,  # given when it is first sealed (LogAppender)
                created_at_ms=now,
                body=log.MessageReceived(
                    message_uid=message.message_uid,
                    sender=message.sender,
                    sender_sign_key=b"",
                    recipient=self._keys.address,
                    pair_seq=message.pair_seq,
                    sent_at_ms=message.sent_at_ms,
                    relay_sent_at_ms=message.relay_sent_at_ms,
                    content_type=message.content_type,
                    body=message.body,
                    late=late,
                ),
            )
            store.release(msg_key, late=late)
            store.add_pending(msg_key, "event", encode_plaintext(plaintext), inbox_cursor=cursor)


__all__ = ["HoldBack", "mark_logged"]
