"""The inbox side of the sync engine (docs/account-log.md §9, §10 "Receive"): inbox pages and stream items become
history rows and ``message-received`` records (held back until their predecessors are here), then the ack."""

from __future__ import annotations

from collections.abc import Sequence

from ... import log
from ...errors import TetherlessError
from ...ids import Address
from ..sdk import InboxItem, ReceivedMessage, RejectedMessage
from ..store import HistoryMessage
from .base import Context, OnMessage, Part, guarded
from .epochs import Epochs
from .pending import HoldBack


class Inbox(Part):
    """Reads the inbox into the local history and acknowledges what is logged (custody rule D5).

    Owns no state of its own: the ``inbox_received`` / ``inbox_acked`` cursors and held messages are in
    ``state.db``. Account-key session messages go to :class:`~protocol.client.engine.epochs.Epochs`."""

    def __init__(
        self, ctx: Context, epochs: Epochs, holdback: HoldBack, *, on_message: OnMessage | None = None
    ) -> None:
        super().__init__(ctx)
        self._epochs = epochs
        self._holdback = holdback
        self._on_message = on_message

    async def read(self) -> bool:
        """Page the inbox from ``inbox_received`` to its end, applying each page. True if anything was applied.

        Raises ``RetryError`` / ``RevokedError``. Idempotent (messages are deduplicated by sender and uid);
        cancellation keeps the pages committed before it."""
        changed = False
        while True:
            batch = await guarded(self._relay.inbox_page(self._store.cursor("inbox_received")))
            if batch.items or batch.next_cursor > self._store.cursor("inbox_received"):
                self.apply(batch.items, batch.next_cursor)
                changed = True
            if not batch.more:
                return changed

    def apply(self, items: Sequence[InboxItem], next_cursor: int) -> None:
        """Store one page (or one stream item) and move ``inbox_received`` to ``next_cursor``, in one transaction:
        upsert the messages, hold each until its predecessors are here, queue the released ones for the log.
        A refused envelope is reported and acknowledged with the page (one bad message never blocks the others).
        Local only; idempotent; ``on_message`` runs after the commit for new messages."""
        store = self._store
        new: list[tuple[HistoryMessage, int, bytes]] = []
        with store.page():  # the page and inbox_received together, or neither (§10 "Receive")
            for item in items:
                if isinstance(item, RejectedMessage):
                    # Acknowledged with the page (one bad message never blocks the others), never silent.
                    self._report.rejected += 1
                    self._report.warn(
                        item.warning,
                        f"refused message (envelope {item.id.hex()}, inbox cursor {item.cursor}): "
                        f"{item.warning}: {item.code.value}: {item.detail}",
                    )
                    continue
                assert isinstance(item, ReceivedMessage)
                if item.content_type == log.ACCOUNT_KEY_CONTENT_TYPE:
                    self._epochs.account_key_received(item)
                    continue
                message = self._received(item)
                is_new = store.upsert_message(
                    msg_key=message.msg_key,
                    message_uid=message.message_uid,
                    sender_device=message.sender_device,
                    direction="received",
                    pair_seq=message.pair_seq,
                    sent_at_ms=message.sent_at_ms,
                    relay_sent_at_ms=message.relay_sent_at_ms,
                    via="inbox",
                    sender=message.sender,
                    recipients=message.recipients,
                    content_type=message.content_type,
                    body=message.body,
                    inbox_seen=True,
                )
                store.set_writer(message.msg_key, self._keys.device_id)  # this device logs it (§9)
                row = store.db.execute(
                    "SELECT log_position FROM history_messages WHERE msg_key = ?", (message.msg_key,)
                ).fetchone()
                if row is not None and row[0] is None and not store.is_pending(message.msg_key):
                    # Logged only in pair_seq order (§9): held back until its predecessors are here.
                    store.hold(message.msg_key, item.cursor)
                if is_new:
                    new.append((message, item.cursor, item.id))
            store.set_cursor("inbox_received", max(next_cursor, store.cursor("inbox_received")))
            self._holdback.release()
        for message, cursor, envelope_id in new:
            if self._on_message is not None:
                self._on_message(message, cursor, envelope_id)

    def _received(self, item: ReceivedMessage) -> HistoryMessage:
        pair_seq, content_type, body = 0, item.content_type, item.body
        if item.content_type == log.FRAME_CONTENT_TYPE:
            try:
                frame = log.unframe_message(item.body)
                pair_seq, content_type, body = frame.pair_seq, frame.content_type, frame.body
            except TetherlessError:
                pass
        return HistoryMessage(
            msg_key=log.message_record_id(self._keys.account_id, item.sender, item.message_id),
            message_uid=item.message_id,
            sender_device=Address.parse(item.sender).device,
            direction="received",
            pair_seq=pair_seq,
            sent_at_ms=item.sent_at_ms,
            relay_sent_at_ms=item.relay_sent_at_ms,
            log_position=None,
            via="inbox",
            late=False,
            sender=item.sender,
            recipients=[self._keys.address],
            content_type=content_type,
            body=body,
        )

    def has_unacked(self) -> bool:
        """Whether logged messages wait for their ack (local only)."""
        return self._store.ack_point() > self._store.cursor("inbox_acked")

    async def ack(self) -> None:
        """``POST /v1/inbox/ack up_to`` the highest cursor whose messages are all logged (custody rule D5), then
        ``inbox_acked``. Raises ``RetryError`` / ``RevokedError``. Idempotent; a cancellation before the local
        commit acks again next time (the relay answers the same)."""
        point = self._store.ack_point()
        if point > self._store.cursor("inbox_acked"):
            await guarded(self._relay.ack(point))
            with self._store.transaction():
                self._store.set_cursor("inbox_acked", point)


__all__ = ["Inbox"]
