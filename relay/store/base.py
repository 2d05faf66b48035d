"""The storage interface every backend implements.

Contract shared by all implementations (one contract test suite checks it):

- Every write method commits durably before it returns; if it raises, it
  changed nothing (each call is atomic).
- Methods raise :class:`protocol.errors.TetherlessError` for conditions the
  caller must report (``account_exists``, ``unknown_recipient``,
  ``idempotency_conflict``, ``inbox_full``) and :class:`StoreUnavailableError` when
  the database cannot be used right now.
- Cancellation: a cancelled caller stops waiting, but a write already handed
  to the backend may still commit. Writes are designed to be retried safely
  (idempotency keys, idempotent acknowledgements).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio


class StoreUnavailableError(Exception):
    """The store cannot serve the request now (closed, disk full, I/O error)."""


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    account_id: str
    sign_key: bytes
    box_key: bytes
    created_at_ms: int
    revoked_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    device_id: str
    account_id: str
    expires_at_ms: int
    revoked_at_ms: int | None


class ChallengeOutcome(enum.Enum):
    OK = "ok"
    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class ConsumedChallenge:
    outcome: ChallengeOutcome
    expires_at_ms: int = 0


@dataclass(frozen=True, slots=True)
class NewEnvelope:
    """One envelope to store: ``digest`` identifies its content for idempotency checks."""

    recipient_device: str
    recipient_account: str
    idempotency_key: bytes
    digest: bytes
    envelope_id: bytes
    expires_at_ms: int
    ciphertext: bytes
    # Non-empty: the recipient lives on that relay; the envelope goes to the
    # federation outbox for it (same transaction), not to a local inbox.
    remote_relay: str = ""


@dataclass(frozen=True, slots=True)
class StoredEnvelope:
    """The result for one :class:`NewEnvelope`, in submission order."""

    envelope_id: bytes
    sent_at_ms: int
    duplicate: bool
    recipient_device: str


@dataclass(frozen=True, slots=True)
class InboxRecord:
    cursor: int
    envelope_id: bytes
    sent_at_ms: int
    expires_at_ms: int
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class ExpiryReport:
    envelopes: int
    challenges: int
    sessions: int
    idempotency_keys: int
    federation: int = 0  # expired outbox envelopes, dedup ids and signature nonces


# -- federation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One envelope waiting in the federation outbox for ``peer``; ``seq`` orders and names it."""

    seq: int
    peer: str
    envelope_id: bytes
    recipient: str  # full address on the peer
    sent_at_ms: int
    expires_at_ms: int
    ciphertext: bytes
    attempts: int


@dataclass(frozen=True, slots=True)
class PeerState:
    """Delivery state of one peer relay (``queued``: envelopes in its outbox)."""

    peer: str
    queued: int
    failures: int
    next_attempt_at_ms: int
    last_attempt_at_ms: int | None
    last_success_at_ms: int | None
    last_error: str
    delivered: int


@dataclass(frozen=True, slots=True)
class ReceivedEnvelope:
    """An envelope another relay delivered; (origin, ``origin_envelope_id``) deduplicates it."""

    origin_envelope_id: bytes
    recipient_device: str
    recipient_account: str
    envelope_id: bytes  # the local id (fresh: a peer cannot choose ids of our envelopes)
    expires_at_ms: int
    ciphertext: bytes


class ReceivedOutcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    UNKNOWN_RECIPIENT = "unknown_recipient"
    INBOX_FULL = "inbox_full"


class Store(Protocol):
    """Relay storage. All methods are async and never block the trio loop."""

    async def create_account(
        self, account_id: str, device: DeviceRecord, signed_device_list: bytes, now_ms: int
    ) -> None:
        """Create an account with its genesis device list and first device.

        Raises ``account_exists`` if the account (or the device) exists.
        """

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, or None when unknown (revoked devices are returned, with ``revoked_at_ms``)."""

    async def get_device_lists(self, account_id: str) -> list[bytes] | None:
        """Every stored signed device list version, oldest first; None for an unknown account."""

    async def put_challenge(self, nonce: bytes, device_id: str, expires_at_ms: int) -> None:
        """Remember an issued challenge."""

    async def consume_challenge(self, nonce: bytes, device_id: str, now_ms: int) -> ConsumedChallenge:
        """Atomically mark the challenge used and say what state it was in.

        Only an ``OK`` outcome may lead to a session; any call burns the nonce.
        """

    async def create_session(
        self, token_hash: bytes, device_id: str, account_id: str, created_at_ms: int, expires_at_ms: int
    ) -> None:
        """Store a new session (by the hash of its token)."""

    async def get_session(self, token_hash: bytes) -> SessionRecord | None:
        """The session for a token hash, or None."""

    async def revoke_sessions(self, device_id: str, token_hash: bytes | None, now_ms: int) -> int:
        """Revoke one session (``token_hash``) or, with None, all of the device's. Returns how many."""

    async def store_envelopes(
        self, sender_device: str, envelopes: Sequence[NewEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[StoredEnvelope]:
        """Store a batch atomically, deduplicating per (sender, idempotency key).

        Raises ``unknown_recipient``, ``idempotency_conflict`` or ``inbox_full``;
        then nothing of the batch is stored.
        """

    async def read_inbox(self, device_id: str, after: int, limit: int, now_ms: int) -> list[InboxRecord]:
        """Unexpired envelopes with cursor > ``after``, in cursor order, at most ``limit``."""

    async def acknowledge(self, device_id: str, up_to: int | None, envelope_ids: Sequence[bytes]) -> int:
        """Delete acknowledged envelopes of this device's inbox only; returns how many. Idempotent."""

    async def expire(self, now_ms: int) -> ExpiryReport:
        """Delete everything past its expiry."""

    async def watch_inbox_commits(
        self, notify: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call ``notify(device_id)`` in the trio thread after inbox commits made by *any* process; until cancelled.

        For stores shared by several relay processes (PostgreSQL) this is how a
        replica learns about envelopes sent through another one. Best effort:
        a wake-up may be lost (e.g. while reconnecting), so readers must also
        poll. ``task_status.started()`` is called once watching has begun.
        Cancellation stops watching; raises ``StoreUnavailableError`` if closed.
        """

    # -- federation: sending side (outbox rows are written by store_envelopes) ------------

    async def federation_due_peers(self, now_ms: int) -> list[PeerState]:
        """Every peer with envelopes in its outbox, and whether due (``next_attempt_at_ms`` <= now)."""

    async def federation_outbox_batch(self, peer: str, now_ms: int, limit: int) -> list[OutboxRecord]:
        """Up to ``limit`` unexpired outbox envelopes for ``peer`` that may be tried now, oldest first."""

    async def federation_outbox_settle(
        self, peer: str, done: Sequence[int], deferred: Sequence[int], deferred_until_ms: int, now_ms: int
    ) -> None:
        """After an answered delivery: delete ``done`` seqs, hold ``deferred`` ones until the given time,
        and mark the peer healthy (failures reset). Idempotent."""

    async def federation_peer_failed(
        self, peer: str, error: str, failures: int, next_attempt_at_ms: int, now_ms: int
    ) -> None:
        """Record a failed delivery attempt: nothing is sent to ``peer`` before ``next_attempt_at_ms``."""

    async def federation_peer_states(self) -> list[PeerState]:
        """State of every known peer (with an outbox or a delivery history), by name."""

    async def federation_retry_now(self, peer: str | None) -> int:
        """Make ``peer`` (None: every peer) and its held envelopes due at once; returns peers affected."""

    # -- federation: receiving side -----------------------------------------------------

    async def federation_remember_nonce(self, origin: str, nonce: str, forget_at_ms: int) -> bool:
        """Remember a signature nonce of ``origin``; False if it was already remembered (a replay)."""

    async def federation_store_received(
        self, origin: str, envelopes: Sequence[ReceivedEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[tuple[ReceivedOutcome, str]]:
        """Store envelopes delivered by ``origin`` in one transaction; (outcome, recipient device) each.

        Never raises for one envelope's problem: an unknown or revoked recipient
        is ``UNKNOWN_RECIPIENT``, a full inbox ``INBOX_FULL`` (both store
        nothing for that envelope), an (origin, id) seen before ``DUPLICATE``.
        Ids are remembered until ``forget_at_ms``.
        """

    async def close(self) -> None:
        """Finish pending writes and close. Idempotent."""


__all__: Sequence[str] = (
    "ChallengeOutcome",
    "ConsumedChallenge",
    "DeviceRecord",
    "ExpiryReport",
    "InboxRecord",
    "NewEnvelope",
    "OutboxRecord",
    "PeerState",
    "ReceivedEnvelope",
    "ReceivedOutcome",
    "SessionRecord",
    "Store",
    "StoreUnavailableError",
    "StoredEnvelope",
)
