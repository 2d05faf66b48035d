"""The outbox as a product (docs/account-log.md §10 "Outbox entry states"): each entry's own state, the one
table that says which failure is whose, the size rule, and ``retry`` / ``cancel``.

The sync engine (:mod:`protocol.client.sync`) moves entries through the steps of §10; this module holds what
is decided without the network, so it is unit-tested without processes:

- :func:`outbox_view` — every entry as an :class:`OutboxView` (state, reason code and text, the unreachable
  destination, the next attempt). No printing: the command line formats it.
- :func:`classify` — an exception met while preparing or posting one entry → :class:`Home` (the home relay
  or this device: the engine backs off as a whole), :class:`Transient` (this entry's destination: the entry
  waits, nothing else does) or :class:`Permanent` (this entry fails, nothing else does).
- :func:`enqueue` — step 1 of §10 after the local checks (:func:`check_body`: empty, too large).
- :func:`retry`, :func:`cancel`.

Pure except for the :class:`~protocol.client.store.ClientStore` calls, which are small local transactions.
"""

from __future__ import annotations

import enum
import random
from typing import Final

import msgspec

from .. import padding
from ..errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError
from ..ids import Address
from ..payload import SEAL_OVERHEAD_BYTES
from .chains import DeviceListRejectedError
from .sessions import PrekeysUnavailableError
from .store import ClientStore, OutboxEntry

#: The relay's default ``limits.max_envelope_bytes`` (relay/config.py), used until a relay told its own.
DEFAULT_MAX_ENVELOPE_BYTES: Final = 256 * 1024
#: An upper bound of everything an envelope's padded inner part holds besides the body: the message frame
#: (pair_seq, content type), the sealed content (sender, recipient, times, ids, signature) and, on a session's
#: first message, the hybrid handshake (X25519 keys, the 1,088-byte ML-KEM ciphertext, prekey ids). The bound
#: is checked by tests/protocol/client/test_outbox.py against a real first session message.
INNER_OVERHEAD_BYTES: Final = 4096
#: The longest a transient failure delays an entry (then it is tried again, forever, until cancelled).
MAX_RETRY_SECONDS: Final = 300.0
_LIMITS_TABLE: Final = "outbox_limits"
_TARGETS_TABLE: Final = "outbox_targets"

#: Codes that fail one entry for good (account-log.md §10): the recipient, its relay or the envelope itself
#: is refused, and asking again gives the same answer.
PERMANENT_CODES: Final = frozenset(
    {
        ErrorCode.ENVELOPE_TOO_LARGE,
        ErrorCode.BODY_TOO_LARGE,
        ErrorCode.UNKNOWN_RECIPIENT,
        ErrorCode.RECIPIENT_REVOKED,
        ErrorCode.UNKNOWN_ACCOUNT,
        ErrorCode.UNKNOWN_DEVICE,
        ErrorCode.REMOTE_RECIPIENT,
        ErrorCode.PEER_FORBIDDEN,
        ErrorCode.PEER_ADDRESS_REFUSED,
        ErrorCode.UNKNOWN_RELAY,
        ErrorCode.IDEMPOTENCY_CONFLICT,
        ErrorCode.INVALID_FIELD,
    }
)
#: Codes about the entry's destination that a later attempt may not meet: the entry waits, the others go on.
TRANSIENT_CODES: Final = frozenset({ErrorCode.PEER_UNAVAILABLE, ErrorCode.INBOX_FULL, ErrorCode.PREKEY_INVALID})
#: Codes about the home relay or this device: the engine's supervisor handles them for every entry at once.
HOME_CODES: Final = frozenset(
    {
        ErrorCode.UNAVAILABLE,
        ErrorCode.RATE_LIMITED,
        ErrorCode.INTERNAL,
        ErrorCode.DEVICE_REVOKED,
        ErrorCode.MISSING_TOKEN,
        ErrorCode.INVALID_TOKEN,
        ErrorCode.TOKEN_EXPIRED,
        ErrorCode.TOKEN_REVOKED,
    }
)


class OutboxState(enum.StrEnum):
    """What a person is told about one entry (account-log.md §10 "Outbox entry states")."""

    QUEUED = "queued"
    RETRYING = "retrying"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


class OutboxView(msgspec.Struct, frozen=True):
    """One entry as the SDK shows it. ``reason_code`` is a stable code of protocol/errors.py (empty: none);
    ``reason`` its one-line text; ``destination`` the relay that cannot be reached (``retrying`` only; empty
    when the wait is not about reachability); ``next_attempt_at_ms`` 0 unless ``retrying``."""

    local_id: int
    recipient: str
    state: OutboxState
    stored_state: str
    reason_code: str
    reason: str
    destination: str
    next_attempt_at_ms: int
    attempts: int
    created_at_ms: int


def view(entry: OutboxEntry, now_ms: int) -> OutboxView:
    """The :class:`OutboxView` of one stored entry at ``now_ms`` (a due ``retrying`` entry's next attempt is
    ``now_ms``). Pure."""
    # A wait that is over still shows as retrying, with its reason, until the next attempt ran: only a success
    # (sealing, posting) or ``retry`` clears the reason. ``now_ms`` only tells whether that attempt is due.
    waiting = entry.state in ("queued", "sealed") and bool(entry.last_error)
    if entry.state == "failed":
        state = OutboxState.FAILED
    elif waiting:
        state = OutboxState.RETRYING
    elif entry.state == "sealed":
        state = OutboxState.SENDING
    elif entry.state in ("posted", "logged"):
        state = OutboxState.DELIVERED
    else:
        state = OutboxState.QUEUED
    shown = state in (OutboxState.FAILED, OutboxState.RETRYING)
    return OutboxView(
        local_id=entry.local_id,
        recipient=entry.recipient,
        state=state,
        stored_state=entry.state,
        reason_code=entry.reason_code if shown else "",
        reason=entry.last_error if shown else "",
        destination=entry.destination if state is OutboxState.RETRYING else "",
        next_attempt_at_ms=max(entry.next_attempt_at_ms, now_ms) if state is OutboxState.RETRYING else 0,
        attempts=entry.attempts,
        created_at_ms=entry.created_at_ms,
    )


def outbox_view(store: ClientStore) -> list[OutboxView]:
    """Every entry not yet logged, in enqueue order. Reads only; idempotent."""
    now = store.now_ms()
    return [view(entry, now) for entry in store.outbox()]


# -- classification ------------------------------------------------------------------------------------------


class Home(msgspec.Struct, frozen=True):
    """Not this entry's fault: re-raise, the supervisor backs off (or stops: revoked) for every entry."""


class Transient(msgspec.Struct, frozen=True):
    """This entry's destination failed for now: the entry waits (``retrying``), nothing else does."""

    code: str
    reason: str
    destination: str
    retry_after_seconds: float | None = None


class Permanent(msgspec.Struct, frozen=True):
    """This entry can never be delivered as it is: it fails with ``code`` and ``reason``."""

    code: str
    reason: str


Verdict = Home | Transient | Permanent


def describe(exc: BaseException) -> str:
    """One line: ``code: detail`` for errors with a code, else the exception's text."""
    if isinstance(exc, TetherlessError):
        return f"{exc.code.value}: {exc.detail}" if exc.detail else exc.code.value
    return str(exc) or type(exc).__name__


def classify(exc: BaseException, destination: str) -> Verdict:
    """Whose failure ``exc`` is, met while preparing or posting an entry addressed to relay ``destination``.

    The one table of account-log.md §10: :data:`HOME_CODES`, transport errors, 5xx and 429 of the home relay
    and anything unknown are :class:`Home`; :data:`TRANSIENT_CODES` and missing prekeys :class:`Transient`;
    :data:`PERMANENT_CODES`, a device list that does not verify and any other 4xx :class:`Permanent`.
    Pure and total.
    """
    if isinstance(exc, PrekeysUnavailableError):
        return Transient(ErrorCode.PREKEY_INVALID.value, f"waiting for prekeys: {exc}", "")
    if isinstance(exc, RemoteError):
        if exc.code in HOME_CODES:
            return Home()
        if exc.code in TRANSIENT_CODES:
            unreachable = destination if exc.code is ErrorCode.PEER_UNAVAILABLE else ""
            return Transient(exc.code.value, describe(exc), unreachable, exc.retry_after_seconds)
        if exc.code in PERMANENT_CODES or (400 <= exc.http_status < 500 and exc.http_status != 429):
            return Permanent(exc.code.value, describe(exc))
        return Home()
    if isinstance(exc, UnknownRemoteError):
        if exc.http_status >= 500 or exc.http_status == 429:
            return Home()
        return Permanent("rejected", f"the relay answered HTTP {exc.http_status}")
    if isinstance(exc, DeviceListRejectedError):
        return Permanent(exc.code.value, describe(exc))
    if isinstance(exc, TetherlessError):  # a local check: the address, a bundle that does not verify
        if exc.code is ErrorCode.DEVICE_REVOKED:
            return Home()
        if exc.code is ErrorCode.PREKEY_INVALID:
            return Transient(exc.code.value, describe(exc), "")
        return Permanent(exc.code.value, describe(exc))
    return Home()


def retry_delay_seconds(attempts: int, rng: random.Random, retry_after_seconds: float | None = None) -> float:
    """Full jitter up to ``min(300 s, 2^attempts)``, at least 1 s and at least ``Retry-After``."""
    delay = rng.uniform(0, min(MAX_RETRY_SECONDS, 2.0 ** min(attempts, 16)))
    return max(1.0, delay, retry_after_seconds or 0.0)


def special_use_relay(recipient: str) -> Permanent | None:
    """A recipient whose relay name can never resolve (RFC 6761 §6.4: ``.invalid``), refused before any request."""
    relay = recipient.rpartition("@")[2]
    host = (relay.rsplit(":", 1)[0] if relay.count(":") == 1 else relay).rstrip(".").lower()
    if host == "invalid" or host.endswith(".invalid"):
        return Permanent(
            ErrorCode.PEER_ADDRESS_REFUSED.value,
            f"{ErrorCode.PEER_ADDRESS_REFUSED.value}: {relay} is a special-use name that never resolves (RFC 6761)",
        )
    return None


# -- sizes ---------------------------------------------------------------------------------------------------


class MessageTooLargeError(TetherlessError):
    """The body cannot fit one envelope of the relay's size limit; ``limit_bytes`` is the largest body that does."""

    def __init__(self, size_bytes: int, limit_bytes: int) -> None:
        super().__init__(
            ErrorCode.ENVELOPE_TOO_LARGE,
            f"the message is {size_bytes} bytes; the relay takes at most {limit_bytes} bytes per message",
        )
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class EmptyMessageError(TetherlessError):
    """An empty body: refused, there is nothing to send."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.INVALID_FIELD, "the message is empty")


def max_body_bytes(max_envelope_bytes: int) -> int:
    """The largest body whose envelope fits ``max_envelope_bytes``: the largest padding bucket that fits with
    the outer sealed box (crypto.md §10), less the marker byte and :data:`INNER_OVERHEAD_BYTES`. Pure."""
    room = max_envelope_bytes - SEAL_OVERHEAD_BYTES
    if room < padding.MIN_BUCKET_BYTES:
        return 0
    if room <= padding.LINEAR_STEP_BYTES:
        bucket = 1 << (room.bit_length() - 1)
    else:
        bucket = room // padding.LINEAR_STEP_BYTES * padding.LINEAR_STEP_BYTES
    return max(0, bucket - 1 - INNER_OVERHEAD_BYTES)


def check_body(body: bytes, max_envelope_bytes: int) -> None:
    """Raises :class:`EmptyMessageError` or :class:`MessageTooLargeError` (naming the limit). Pure."""
    if not body:
        raise EmptyMessageError()
    limit = max_body_bytes(max_envelope_bytes)
    if len(body) > limit:
        raise MessageTooLargeError(len(body), limit)


def known_max_envelope_bytes(store: ClientStore) -> int:
    """The home relay's ``limits.max_envelope_bytes`` as last seen, else :data:`DEFAULT_MAX_ENVELOPE_BYTES`."""
    stored = store.db.get(_LIMITS_TABLE, "max_envelope_bytes")
    return int.from_bytes(stored, "big") if stored else DEFAULT_MAX_ENVELOPE_BYTES


def remember_max_envelope_bytes(store: ClientStore, value: int) -> None:
    """Keep the limit the home relay announced, for sends made offline. Idempotent."""
    encoded = value.to_bytes(8, "big")
    if value > 0 and store.db.get(_LIMITS_TABLE, "max_envelope_bytes") != encoded:
        with store.transaction():
            store.db.put(_LIMITS_TABLE, "max_envelope_bytes", encoded)


def enqueue(store: ClientStore, recipient: str, content_type: str, body: bytes) -> OutboxEntry:
    """Step 1 of §10 after the local checks: the entry and its ``pair_seq``, in one transaction.

    Raises ``invalid_field`` (not an address), :class:`EmptyMessageError` and :class:`MessageTooLargeError`
    before anything is stored. Not idempotent: each call queues one more message. Blocking, local.
    """
    Address.parse(recipient)
    check_body(body, known_max_envelope_bytes(store))
    return store.enqueue(recipient, content_type, body)


# -- the recipients of the last successful preparation (a peer that is down, §10) -----------------------------


class CachedTargets(msgspec.Struct, frozen=True, array_like=True):
    """How an entry to one recipient was sealed the last time its device list could be read and verified:
    v2 device addresses (sessions), or v1 ``(device address, box key)`` pairs."""

    v2: list[str] | None = None
    v1: list[tuple[str, bytes]] | None = None


def _targets_key(store: ClientStore, recipient: str) -> bytes:
    return store.db.blind("outbox-targets", recipient.lower())


def remember_targets(store: ClientStore, recipient: str, targets: CachedTargets) -> None:
    """Keep (sealed, under a keyed hash of the recipient) the verified targets of ``recipient``. Idempotent."""
    store.db.put_struct(_TARGETS_TABLE, _targets_key(store, recipient), targets)


def cached_targets(store: ClientStore, recipient: str) -> CachedTargets | None:
    """The targets :func:`remember_targets` kept for ``recipient``, or None."""
    return store.db.get_struct(_TARGETS_TABLE, _targets_key(store, recipient), CachedTargets)


# -- retry and cancel ------------------------------------------------------------------------------------------


class OutboxError(Exception):
    """A ``retry`` or ``cancel`` that cannot be done; the message is one line for a person."""


class UnknownOutboxEntryError(OutboxError):
    """No entry with that local id in the outbox (never queued, cancelled, or logged and cleaned up)."""


class OutboxCancelError(OutboxError):
    """The entry was already accepted by the relay (``delivered``, or part of it): it cannot be taken back."""


def _entry(store: ClientStore, local_id: int) -> OutboxEntry:
    entry = store.outbox_entry(local_id)
    if entry is None or entry.state == "logged":
        raise UnknownOutboxEntryError(f"no outbox entry {local_id}")
    return entry


def retry(store: ClientStore, local_id: int) -> OutboxView:
    """Make a ``failed`` or ``retrying`` entry due now: ``queued`` (``sending`` if its envelopes were sealed).

    Idempotent: a ``queued``, ``sending`` or ``delivered`` entry is returned as it is (a ``queued`` one loses a
    pending wait). Raises :class:`UnknownOutboxEntryError`. Local only: the next flush (``tetherless sync``)
    sends it. A failed entry that gave its ``pair_seq`` back gets a new one.
    """
    with store.transaction():
        entry = _entry(store, local_id)
        if entry.state in ("failed", "queued", "sealed"):
            sealed = bool(store.envelopes(local_id))
            store.reschedule(local_id, "sealed" if sealed else "queued")
            if not sealed:
                store.renumber(local_id)
        current = store.outbox_entry(local_id)
    assert current is not None
    return view(current, store.now_ms())


def cancel(store: ClientStore, local_id: int) -> OutboxEntry:
    """Remove an entry none of whose envelopes the relay accepted yet; returns what was removed.

    Raises :class:`UnknownOutboxEntryError` and :class:`OutboxCancelError` (already accepted, wholly or in
    part: a message cannot be taken back from its recipients). Gives the entry's ``pair_seq`` back when it can
    (:meth:`ClientStore.give_back_pair_seq`). One transaction; a second call raises
    :class:`UnknownOutboxEntryError`. Another process posting the entry at the same moment may win: then the
    post's receipts are stored and this raises :class:`OutboxCancelError`, or the cancel wins and that
    process finds no entry (it stores nothing for it).
    """
    with store.transaction():
        entry = _entry(store, local_id)
        if entry.state in ("posted", "logged") or any(e[4] is not None for e in store.envelopes(local_id)):
            raise OutboxCancelError(
                f"outbox entry {local_id} was already accepted by the relay; it cannot be cancelled"
            )
        store.give_back_pair_seq(entry)
        store.delete_outbox_entry(local_id)
    return entry


__all__ = [
    "DEFAULT_MAX_ENVELOPE_BYTES",
    "INNER_OVERHEAD_BYTES",
    "CachedTargets",
    "EmptyMessageError",
    "Home",
    "MessageTooLargeError",
    "OutboxCancelError",
    "OutboxError",
    "OutboxState",
    "OutboxView",
    "Permanent",
    "Transient",
    "UnknownOutboxEntryError",
    "Verdict",
    "cached_targets",
    "cancel",
    "check_body",
    "classify",
    "describe",
    "enqueue",
    "known_max_envelope_bytes",
    "max_body_bytes",
    "outbox_view",
    "remember_max_envelope_bytes",
    "remember_targets",
    "retry",
    "special_use_relay",
    "view",
]
