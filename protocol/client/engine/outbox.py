"""The outbox side of the sync engine (docs/account-log.md §10, crypto.md §8.5): queued entries are sealed once and
stored, sealed ones posted with their stored bytes, posted ones queued for the log. Which failure fails an entry
and which makes it wait is decided by the pure :mod:`protocol.client.outbox`."""

from __future__ import annotations

from typing import Final

from ... import log
from ...errors import ErrorCode, TetherlessError
from ...ids import Address
from ...messages import OutboundEnvelope
from .. import outbox
from ..outbox import describe
from ..sdk import Recipients
from ..store import OutboxEntry, encode_plaintext
from .base import Context, Part, RetryError, guarded, raise_guarded
from .lists import DeviceLists

_POST_BATCH: Final = 100


class Outbox(Part):
    """Moves outbox entries ``queued → sealed → posted`` (the ``message-sent`` record queued with the last step).

    Owns, for this run: the entries that waited (their backoff applies), the destination relays found
    unreachable (with the verdict and until when entries to them wait), and whether the home relay's envelope
    size limit was noted (:func:`protocol.client.outbox.check_body`)."""

    def __init__(self, ctx: Context, lists: DeviceLists) -> None:
        super().__init__(ctx)
        self._lists = lists
        self._waited: set[int] = set()
        self._unreachable: dict[str, tuple[outbox.Transient, int]] = {}
        self._limits_noted = False

    def has_work(self) -> bool:
        """Whether entries wait to be sealed, posted or logged (perhaps queued by another process); local only."""
        return bool(self._store.outbox(("queued", "sealed", "posted")))

    async def flush(self, only: int | None = None) -> bool:
        """Seal queued entries, post sealed ones (in outbox order, batched). True if anything moved.

        Sealing follows crypto.md §8.5: the recipients and sessions are resolved first (network), then
        one local transaction re-checks that the entry is still ``queued``, advances the ratchets (v2)
        or seals the boxes (v1), and stores the finished envelopes with ``state = sealed``; only then
        are they posted, and every retry posts those identical bytes.

        One entry never stops another (account-log.md §10 "Outbox entry states"): each failure is
        classified by :func:`protocol.client.outbox.classify`. A permanent one fails that entry only; a
        transient one (its destination relay unreachable, no prekeys, the recipient's inbox full) makes
        that entry — and, in this run, the other entries to the same destination — wait with a backoff
        (``next_attempt_at_ms``; a new engine, e.g. the next ``tetherless sync``, and ``only`` try it once
        at once); only a failure of the home relay (``RetryError``) or this device's revocation
        (``RevokedError``) leaves this method. Cancellation: the local transactions are atomic and
        every step is redone from the stored state.
        """
        store = self._store
        changed = False
        now = store.now_ms()
        due = [e for e in store.outbox(("queued", "sealed")) if self._due(e, only, now)]
        if due and not self._limits_noted:
            known = await guarded(self._relay.well_known())
            outbox.remember_max_envelope_bytes(store, known.limits.max_envelope_bytes)
            self._limits_noted = True
        queued = [e for e in due if e.state == "queued"]
        for start in range(0, len(queued), _POST_BATCH):
            chunk = queued[start : start + _POST_BATCH]
            prepared = [(entry, await self._prepare(entry)) for entry in chunk]
            with store.transaction():
                for entry, outcome in prepared:
                    current = store.outbox_entry(entry.local_id)
                    if current is None or current.state != "queued":
                        continue  # another process sealed (or cancelled) it first: its outcome wins
                    if isinstance(outcome, outbox.Transient):
                        self._wait(current, outcome)
                    elif isinstance(outcome, outbox.Permanent):
                        self._fail(current, outcome)
                        changed = True
                    else:
                        # ``current``, not ``entry``: a failure just before may have given its pair_seq back.
                        store.put_envelopes(current.local_id, self._seal(current, outcome))
                        store.reschedule(current.local_id, "sealed")
                        changed = True
        now = store.now_ms()
        sealed = [e for e in store.outbox(("sealed",)) if self._due(e, only, now)]
        for start in range(0, len(sealed), _POST_BATCH):
            chunk = sealed[start : start + _POST_BATCH]
            batch: list[tuple[int, int, OutboundEnvelope]] = []
            for entry in chunk:
                for n, recipient, key, ciphertext, accepted, _ in store.envelopes(entry.local_id):
                    if accepted is None:
                        envelope = OutboundEnvelope(recipient=recipient, idempotency_key=key, ciphertext=ciphertext)
                        batch.append((entry.local_id, n, envelope))
            refused: set[int] = set()
            for i in range(0, len(batch), _POST_BATCH):
                await self._post(batch[i : i + _POST_BATCH], refused)
            with store.transaction():
                for entry in chunk:
                    self._posted(entry.local_id)
            changed = True
        return changed

    def _due(self, entry: OutboxEntry, only: int | None, now_ms: int) -> bool:
        """Whether to work on ``entry`` now: ``only`` names it, or it did not wait in this run, or its wait is over."""
        if only is not None:
            return entry.local_id == only
        return entry.local_id not in self._waited or entry.next_attempt_at_ms <= now_ms

    async def _prepare(self, entry: OutboxEntry) -> Recipients | outbox.Transient | outbox.Permanent:
        """Who gets an entry and how (network only, nothing sealed yet), or why it waits or fails for good.

        v2 (sessions, crypto.md §9) when this device has sessions and the recipient's account has a
        format-2 list: sessions are started from claimed prekey bundles where missing (through this
        relay, also for remote addresses). Otherwise v1 sealed boxes to the devices' box keys. When the
        recipient's relay cannot be reached, the targets of the last successful preparation are used if
        every session exists already (account-log.md §10: the home relay queues remote envelopes itself).
        Raises ``RetryError`` / ``RevokedError`` only (the home relay, this device).
        """
        store = self._store
        refused = outbox.special_use_relay(entry.recipient)
        if refused is not None:
            return refused
        try:
            address = Address.parse(entry.recipient)
        except TetherlessError as exc:
            return outbox.Permanent(exc.code.value, describe(exc))
        blocked = self._unreachable.get(address.relay)
        if blocked is not None and blocked[1] > store.now_ms():
            return await self._cached_recipients(entry) or blocked[0]
        try:
            recipients = await self._resolve(entry)
        except Exception as exc:  # classified; a failure of the home relay or of this device is re-raised
            verdict = outbox.classify(exc, address.relay)
            if isinstance(verdict, outbox.Home):
                await raise_guarded(exc)
                raise
            if isinstance(verdict, outbox.Transient) and verdict.destination:
                delay = outbox.retry_delay_seconds(entry.attempts, self._rng, verdict.retry_after_seconds)
                self._unreachable[address.relay] = (verdict, store.now_ms() + int(delay * 1000))
                return await self._cached_recipients(entry) or verdict
            return verdict
        outbox.remember_targets(store, entry.recipient, outbox.CachedTargets(v2=recipients.v2, v1=recipients.v1))
        return recipients

    async def _resolve(self, entry: OutboxEntry) -> Recipients:
        """The verified recipient devices of ``entry`` and, for v2, their sessions: the SDK's step 1 of sealing
        (:meth:`~protocol.client.sdk.RelayClient.resolve_recipients`, no fan-out: this account's other devices
        read what is sent from the log). Raises what the SDK raises, and ``unknown_recipient`` when nobody but
        this device would get the message."""
        recipients = await self._relay.resolve_recipients(entry.recipient)
        if not recipients.v1 and not recipients.v2:
            raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "that account has no other device to send to")
        return recipients

    async def _cached_recipients(self, entry: OutboxEntry) -> Recipients | None:
        """The last verified targets of ``entry``'s recipient, if they can be used without its relay (v2: every
        session exists), else None."""
        cached = outbox.cached_targets(self._store, entry.recipient)
        if cached is None:
            return None
        if cached.v2 is not None:
            sessions = self._relay.sessions
            if sessions is None or not cached.v2 or not all(sessions.has_session(a) for a in cached.v2):
                return None
            version, _ = await self._lists.current()
            return Recipients(v2=list(cached.v2), sender_list_version=version)
        return Recipients(v1=list(cached.v1)) if cached.v1 else None

    def _wait(self, entry: OutboxEntry, verdict: outbox.Transient) -> None:
        """A transient failure: ``entry`` waits (``retrying``) with a backoff; the others go on."""
        self._waited.add(entry.local_id)
        delay = outbox.retry_delay_seconds(entry.attempts, self._rng, verdict.retry_after_seconds)
        self._store.note_attempt(
            entry.local_id,
            verdict.reason,
            self._store.now_ms() + int(delay * 1000),
            reason_code=verdict.code,
            destination=verdict.destination,
        )

    def _fail(self, entry: OutboxEntry, verdict: outbox.Permanent) -> None:
        """A permanent failure of ``entry`` only. Before anything was sealed, its ``pair_seq`` is given back."""
        store = self._store
        with store.transaction():
            if not store.envelopes(entry.local_id):
                store.give_back_pair_seq(entry)
            store.set_outbox_state(entry.local_id, "failed", error=verdict.reason, reason_code=verdict.code)

    def _seal(self, entry: OutboxEntry, recipients: Recipients) -> list[tuple[str, bytes, bytes]]:
        """The envelopes of one entry (one per recipient device), sealed by the SDK's step 2
        (:meth:`~protocol.client.sdk.RelayClient.seal_envelopes`) with the entry's ``message_uid`` as every
        envelope's message id and ``log.envelope_key(uid, device)`` as its idempotency key. Called inside the
        outbox transaction: a v2 seal stores the advanced session state in that same transaction (crypto.md §8.5)."""
        sealed = self._relay.seal_envelopes(
            recipients,
            message_id=lambda _: entry.message_uid,
            sent_at_ms=entry.sent_at_ms,
            content_type=log.FRAME_CONTENT_TYPE,
            body=log.frame_message(entry.pair_seq, entry.content_type, entry.body),
        )
        return [(e.recipient, log.envelope_key(entry.message_uid, e.recipient), e.ciphertext) for e in sealed]

    async def _post(self, batch: list[tuple[int, int, OutboundEnvelope]], refused: set[int]) -> None:
        """``POST /v1/messages`` with the stored bytes and keys; the receipts in one transaction.

        The relay takes or refuses a batch as a whole (protocol.md §5), so a batch refused for an entry's
        reason is split in halves until the refused envelope is alone: every other envelope is committed.
        A refused envelope fails its entry (added to ``refused``: its other envelopes are not posted), or
        makes it wait (``inbox_full``); a device removed from an account address since sealing loses only
        its own envelope. Raises ``RetryError`` / ``RevokedError`` for the home relay and this device.
        """
        batch = [b for b in batch if b[0] not in refused]
        if not batch:
            return
        try:
            response = await self._relay.send_envelopes([b[2] for b in batch])
        except Exception as exc:  # classified; a failure of the home relay or of this device is re-raised
            verdict = outbox.classify(exc, "")
            if isinstance(verdict, outbox.Home):
                await raise_guarded(exc)
                raise
            if len(batch) > 1:
                half = len(batch) // 2
                await self._post(batch[:half], refused)
                await self._post(batch[half:], refused)
                return
            self._refused(batch[0], verdict, refused)
            return
        if len(response.accepted) != len(batch):
            raise RetryError(f"the relay answered {len(response.accepted)} receipts for {len(batch)} envelopes")
        with self._store.transaction():
            for (local_id, n, _), accepted in zip(batch, response.accepted, strict=True):
                self._store.set_receipt(local_id, n, accepted.id, accepted.sent_at_ms)

    def _refused(
        self, item: tuple[int, int, OutboundEnvelope], verdict: outbox.Transient | outbox.Permanent, refused: set[int]
    ) -> None:
        store = self._store
        local_id, n, _ = item
        with store.transaction():
            entry = store.outbox_entry(local_id)
            if entry is None or entry.state != "sealed":
                return  # cancelled meanwhile
            if isinstance(verdict, outbox.Transient):
                self._wait(entry, verdict)
                refused.add(local_id)
                return
            removed = verdict.code in (ErrorCode.UNKNOWN_RECIPIENT.value, ErrorCode.RECIPIENT_REVOKED.value)
            to_account = "." not in entry.recipient.split("@", 1)[0]
            if removed and to_account and len(store.envelopes(local_id)) > 1:
                store.drop_envelope(local_id, n)  # that device left the account; the others still get it
                return
            self._fail(entry, verdict)
            refused.add(local_id)

    def _posted(self, local_id: int) -> None:
        """Step 4 of §10: the ``message-sent`` record and the local message, with ``state = posted``."""
        store, me = self._store, self._keys
        entry = store.outbox_entry(local_id)
        if entry is None or entry.state != "sealed":
            return
        envelopes = store.envelopes(local_id)
        if any(e[4] is None for e in envelopes):
            return
        relay_ms = max((e[5] or 0) for e in envelopes)
        record_id = log.message_record_id(me.account_id, me.address, entry.message_uid)
        recipients = [e[1] for e in envelopes]
        plaintext = log.LogPlaintext(
            writer_device=me.device_id,
            writer_seq=0,
            created_at_ms=store.now_ms(),
            body=log.MessageSent(
                message_uid=entry.message_uid,
                sender=me.address,
                recipients=recipients,
                pair_seq=entry.pair_seq,
                sent_at_ms=entry.sent_at_ms,
                content_type=entry.content_type,
                body=entry.body,
                envelope_ids=[e[4] for e in envelopes if e[4] is not None],
                relay_sent_at_ms=relay_ms,
            ),
        )
        with store.transaction():
            store.upsert_message(
                msg_key=record_id,
                message_uid=entry.message_uid,
                sender_device=me.device_id,
                direction="sent",
                pair_seq=entry.pair_seq,
                sent_at_ms=entry.sent_at_ms,
                relay_sent_at_ms=relay_ms,
                via="local",
                sender=me.address,
                recipients=recipients,
                content_type=entry.content_type,
                body=entry.body,
            )
            store.set_writer(record_id, me.device_id)
            store.add_pending(record_id, "event", encode_plaintext(plaintext), outbox_local_id=local_id)
            store.set_outbox_state(local_id, "posted")


__all__ = ["Outbox"]
