"""The inbox's send and receive rules, shared by both engines (docs/protocol.md, DESIGN.md §5).

The SQL in ``sql/inbox.py`` and ``sql/federation.py`` reads the recipients'
``devices`` rows and the idempotency / dedup rows under the engine's
serialisation (SQLite: the writer thread; PostgreSQL: the recipients' row
locks), calls :func:`plan_send` or :func:`plan_received`, and writes what they
return. Pure functions of what was read, like ``log_rules.plan_append``:
the engines cannot disagree on a decision, and every rule is testable
without a database.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from protocol.errors import ErrorCode, TetherlessError

from .base import NewEnvelope, ReceivedEnvelope, ReceivedOutcome, StoredEnvelope

# Idempotency rows keep this much of the envelope digest (migration 0008): a key
# reused for another envelope is told from a retry unless 64 bits collide, which
# only the key's own sender could arrange, against itself.
STORED_DIGEST_BYTES = 8
# Idempotency rows are forgotten by the hour: one small integer to index, deleted a bucket at a time.
FORGET_BUCKET_MS = 3_600_000


KEY_HASH_BYTES = 12
# From this schema floor on (migration 0009's ``-- contract: 9``, docs/decisions/0009-compact-idempotency.md)
# a send keeps, for an envelope stored in a local inbox, only a pointer from its key to the inbox row, and an
# acknowledgement leaves a tombstone: see ``sql/inbox.py``. Below it (PostgreSQL while replicas of the
# previous version may share the database) the code writes the 0008 rows the previous version reads.
COMPACT_SCHEMA = 9
CONTENT_DIGEST_BYTES = 8


def key_hash(sender_device: str, idempotency_key: bytes) -> bytes:
    """What an idempotency row is keyed by (migration 0008): the first 12 bytes of
    SHA-256(sender device id, NUL, key); PostgreSQL computes the same in SQL when it migrates old rows.

    12 bytes where the 32-character sender and the 8-64-byte key took 40-100, in the row and again
    in the forget index, and no lookup of the sender's ``devices`` row on the hot path. Device ids
    hold no NUL, so the input is unambiguous; two live (sender, key) pairs collide with probability
    2**-96 per pair (a billion live keys: below 10**-11), and keys are secret to their sender, so
    no one can aim a collision at another sender's key.
    """
    return hashlib.sha256(sender_device.encode() + b"\x00" + idempotency_key).digest()[:KEY_HASH_BYTES]


def key_hashes(sender_device: str, idempotency_keys: Iterable[bytes]) -> dict[bytes, bytes]:
    """:func:`key_hash` of each key (key -> hash), the sender's part encoded once for the batch."""
    prefix, sha256 = sender_device.encode() + b"\x00", hashlib.sha256
    return {key: sha256(prefix + key).digest()[:KEY_HASH_BYTES] for key in idempotency_keys}


def content_digest(ciphertext: bytes) -> bytes:
    """What a tombstone keeps of an acknowledged envelope (migration 0009): the first 8 bytes of
    SHA-256(ciphertext), so a retry after the acknowledgement is still told from a reused key.
    PostgreSQL computes the same in SQL (``Engine.content_digest``)."""
    return hashlib.sha256(ciphertext).digest()[:CONTENT_DIGEST_BYTES]


def stored_digest(digest: bytes) -> bytes:
    """The part of an envelope digest an idempotency row keeps."""
    return digest[:STORED_DIGEST_BYTES]


def forget_bucket(forget_at_ms: int) -> int:
    """The bucket of a key to forget at ``forget_at_ms``: its end is at or after it (never forgotten early)."""
    return -(-forget_at_ms // FORGET_BUCKET_MS)


def forgettable_buckets(now_ms: int) -> int:
    """Buckets up to this one have ended at ``now_ms``: their keys may be forgotten."""
    return now_ms // FORGET_BUCKET_MS


class Recipient(msgspec.Struct, frozen=True, gc=False):
    """A recipient's ``devices`` row as read for a send: ``last_seq`` is 0 where the engine assigns cursors;
    ``device_no`` is the inbox's integer key for the device (0: not read). A msgspec struct: one is built per
    recipient of every send, positionally in C (a frozen dataclass took ~2 µs; docs/performance.md, P2)."""

    account_id: str
    revoked: bool
    queued: int
    last_seq: int = 0
    device_no: int = 0


class EarlierSend(msgspec.Struct, frozen=True, gc=False):
    """What an earlier send stored for (sender, key).

    ``recipient_no`` 0: a 0008 idempotency row, ``digest`` its :func:`stored_digest`. Otherwise the key
    points at an inbox row (migration 0009) of device ``recipient_no`` and ``digest`` is the
    :func:`content_digest` of its ciphertext (computed from the row, or kept by its tombstone).
    """

    envelope_id: bytes
    digest: bytes
    sent_at_ms: int
    recipient_no: int = 0

    def same_envelope(self, env: NewEnvelope, recipients: Mapping[str, Recipient]) -> bool:
        """Whether ``env`` is a retry of this send (else its key was reused for another envelope)."""
        if not self.recipient_no:
            return self.digest == stored_digest(env.idempotency_digest())
        dev = recipients.get(env.recipient_device)
        return (
            not env.remote_relay
            and dev is not None
            and dev.device_no == self.recipient_no
            and self.digest == content_digest(env.ciphertext)
        )


class InboxGrowth(msgspec.Struct, gc=False):
    """What a plan adds to one inbox: the ``queued`` count and cursor counter after it (``device_no``: the
    recipient's, as read)."""

    queued: int
    last_seq: int
    added: int = 0
    device_no: int = 0


@dataclass(frozen=True, slots=True)
class SendPlan:
    """What to write for a send, in request order.

    ``local``: (cursor, envelope) for local inboxes (the cursor is meaningful
    only where the engine takes cursors from ``devices``); ``outbox``:
    envelopes for other relays; ``keys``: the envelopes whose idempotency
    key this send claims (first use of each key); ``inboxes``: per device.
    """

    results: list[StoredEnvelope]
    local: list[tuple[int, NewEnvelope]] = field(default_factory=list)
    outbox: list[NewEnvelope] = field(default_factory=list)
    keys: list[NewEnvelope] = field(default_factory=list)
    inboxes: dict[str, InboxGrowth] = field(default_factory=dict)


def plan_send(
    envelopes: Sequence[NewEnvelope],
    recipients: Mapping[str, Recipient],
    earlier: Mapping[bytes, EarlierSend],
    now_ms: int,
    max_inbox: int,
) -> SendPlan:
    """Decide a batch of ``Store.store_envelopes``, envelope by envelope in order.

    - a key stored before (or earlier in this batch) with the same digest:
      the original result, ``duplicate=True``, nothing stored; with another
      digest: raises ``idempotency_conflict``;
    - an envelope for another relay: to the federation outbox;
    - otherwise the recipient must be a known device of the named account
      (else ``unknown_recipient``), not revoked (``recipient_revoked``), with
      fewer than ``max_inbox`` envelopes queued, counting this batch's
      (``inbox_full``).

    Any error refuses the whole batch (the caller's transaction rolls back).
    """
    plan = SendPlan(results=[])
    # Keys claimed earlier in this batch; their EarlierSend is built only when one repeats (rarely).
    pending: dict[bytes, NewEnvelope] = {}
    for env in envelopes:
        first = pending.get(env.idempotency_key)
        seen = (
            EarlierSend(first.envelope_id, stored_digest(first.idempotency_digest()), now_ms)
            if first is not None
            else earlier.get(env.idempotency_key)
        )
        if seen is not None:
            if not seen.same_envelope(env, recipients):
                raise TetherlessError(
                    ErrorCode.IDEMPOTENCY_CONFLICT, "idempotency key already used for another envelope"
                )
            plan.results.append(StoredEnvelope(seen.envelope_id, seen.sent_at_ms, True, env.recipient_device))
            continue
        if env.remote_relay:
            plan.outbox.append(env)
        else:
            inbox = plan.inboxes.get(env.recipient_device)
            if inbox is None:
                dev = recipients.get(env.recipient_device)
                if dev is None or dev.account_id != env.recipient_account:
                    raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "no such device on this relay")
                if dev.revoked:
                    raise TetherlessError(ErrorCode.RECIPIENT_REVOKED, "the recipient device was revoked")
                inbox = plan.inboxes[env.recipient_device] = InboxGrowth(dev.queued, dev.last_seq, 0, dev.device_no)
            if inbox.queued >= max_inbox:
                raise TetherlessError(ErrorCode.INBOX_FULL, "the recipient's inbox is full")
            inbox.queued += 1
            inbox.last_seq += 1
            inbox.added += 1
            plan.local.append((inbox.last_seq, env))
        plan.keys.append(env)
        pending[env.idempotency_key] = env
        plan.results.append(StoredEnvelope(env.envelope_id, now_ms, False, env.recipient_device))
    return plan


@dataclass(frozen=True, slots=True)
class ReceivePlan:
    """What to store for a federated delivery: (outcome, recipient device) per envelope in order, and the
    stored ones as (cursor, envelope) with the inboxes they grow."""

    results: list[tuple[ReceivedOutcome, str]]
    stored: list[tuple[int, ReceivedEnvelope]] = field(default_factory=list)
    inboxes: dict[str, InboxGrowth] = field(default_factory=dict)


def plan_received(
    envelopes: Sequence[ReceivedEnvelope],
    recipients: Mapping[str, Recipient],
    seen: frozenset[bytes] | set[bytes],
    max_inbox: int,
) -> ReceivePlan:
    """Decide ``Store.federation_store_received``: never raises, each envelope gets its own outcome.

    In this order: an origin id stored before (``seen``) or earlier in this
    delivery is ``DUPLICATE``; an unknown device, or one of another account,
    ``UNKNOWN_RECIPIENT``; a revoked one ``RECIPIENT_REVOKED``; a full inbox
    (counting this delivery) ``INBOX_FULL``; else ``STORED``.
    """
    plan = ReceivePlan(results=[])
    ids = set(seen)
    for env in envelopes:
        device = env.recipient_device
        if env.origin_envelope_id in ids:
            plan.results.append((ReceivedOutcome.DUPLICATE, device))
            continue
        dev = recipients.get(device)
        if dev is None or dev.account_id != env.recipient_account:
            plan.results.append((ReceivedOutcome.UNKNOWN_RECIPIENT, device))
            continue
        if dev.revoked:
            plan.results.append((ReceivedOutcome.RECIPIENT_REVOKED, device))
            continue
        inbox = plan.inboxes.get(device) or InboxGrowth(dev.queued, dev.last_seq, 0, dev.device_no)
        if inbox.queued >= max_inbox:
            plan.results.append((ReceivedOutcome.INBOX_FULL, device))
            continue
        plan.inboxes[device] = inbox
        inbox.queued += 1
        inbox.last_seq += 1
        inbox.added += 1
        ids.add(env.origin_envelope_id)
        plan.stored.append((inbox.last_seq, env))
        plan.results.append((ReceivedOutcome.STORED, device))
    return plan
