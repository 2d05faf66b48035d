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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


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

    async def close(self) -> None:
        """Finish pending writes and close. Idempotent."""


__all__: Sequence[str] = (
    "ChallengeOutcome",
    "ConsumedChallenge",
    "DeviceRecord",
    "ExpiryReport",
    "InboxRecord",
    "NewEnvelope",
    "SessionRecord",
    "Store",
    "StoreUnavailableError",
    "StoredEnvelope",
)
