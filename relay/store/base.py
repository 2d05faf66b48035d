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
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec
import trio


class StoreUnavailableError(Exception):
    """The store cannot serve the request now (closed, disk full, I/O error)."""


class StartupRefusedError(Exception):
    """This process must not serve from this store: it belongs to another relay name or relay key, or its
    schema needs newer code. The message is one line for the operator (docs/operations.md "Replicas")."""


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


def envelope_digest(recipient: str, ciphertext: bytes) -> bytes:
    """What identifies an envelope's content for idempotency checks (16 bytes): BLAKE2b of the recipient address
    as the sender wrote it, NUL, and the ciphertext. 8 bytes of it are kept by the rows of keys stored apart
    (migration 0008: envelopes for other relays, and every key below the compact schema floor)."""
    return hashlib.blake2b(recipient.encode() + b"\x00" + ciphertext, digest_size=16).digest()


class NewEnvelope(msgspec.Struct, frozen=True, gc=False):
    """One envelope to store.

    Its idempotency digest (:meth:`idempotency_digest`) is ``digest`` when the caller gave one, else computed from
    ``recipient`` (the address as the sender wrote it) and the ciphertext the first time a send needs it: only
    the keys stored apart (0008 rows) and a key repeated in a batch do, so a fresh local batch in the compact
    schema never computes it. A msgspec struct (built positionally in C; ``gc=False``: it holds only strings,
    bytes and an integer) rather than a frozen dataclass, whose ``__init__`` cost ~2 µs per envelope
    (docs/performance.md, P2 third round).
    """

    recipient_device: str
    recipient_account: str
    idempotency_key: bytes
    envelope_id: bytes
    expires_at_ms: int
    ciphertext: bytes
    # Non-empty: the recipient lives on that relay; the envelope goes to the
    # federation outbox for it (same transaction), not to a local inbox.
    remote_relay: str = ""
    recipient: str = ""
    digest: bytes = b""

    def idempotency_digest(self) -> bytes:
        """``digest`` if given, else :func:`envelope_digest` of ``recipient`` and the ciphertext."""
        return self.digest or envelope_digest(self.recipient, self.ciphertext)


class StoredEnvelope(msgspec.Struct, frozen=True, gc=False):
    """The result for one :class:`NewEnvelope`, in submission order.

    A msgspec struct for the reason :class:`InboxRecord` is one: a send builds one per envelope, positionally,
    in C (docs/performance.md, P2). ``gc=False``: it holds only bytes, integers, a bool and a string.
    """

    envelope_id: bytes
    sent_at_ms: int
    duplicate: bool
    recipient_device: str


class InboxRecord(msgspec.Struct, frozen=True, gc=False):
    """One inbox row, fields in the order of the store's SELECT.

    A msgspec struct rather than a dataclass: a page reads up to 1,000 of these, and building them from the
    row tuples (``itertools.starmap``) then runs in C, ~0.05 µs each against ~1.2 µs for a frozen dataclass
    (docs/performance.md, P5). ``gc=False``: it holds only integers and bytes, so it can never be in a cycle.
    """

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
    enrolments: int = 0  # enrolment offers forgotten without ever getting a proposal


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
    """Delivery state of one peer relay (``queued``: envelopes in its outbox still to send; ``failed``: envelopes
    that failed for good and are kept, unsent, until they expire or ``admin federation retry``)."""

    peer: str
    queued: int
    failures: int
    next_attempt_at_ms: int
    last_attempt_at_ms: int | None
    last_success_at_ms: int | None
    last_error: str
    delivered: int
    failed: int = 0


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
    RECIPIENT_REVOKED = "recipient_revoked"


# -- device lists v2, revocation, WebAuthn (docs/crypto.md §3.3, §4, §6) -------------------------------


@dataclass(frozen=True, slots=True)
class DeviceListHead:
    """The newest version of an account's device list (``signed``: MessagePack SignedDeviceList), and the
    ids of the account's devices removed by any version (they may never come back)."""

    version: int
    signed: bytes
    removed_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CredentialUse:
    """A WebAuthn credential whose assertion approved a version, with the assertion's sign counter."""

    credential_id: bytes
    public_key: bytes
    rp_id: str
    sign_count: int


@dataclass(frozen=True, slots=True)
class NewCredential:
    """A credential a version adds: it must be registered (pending) for the account with these keys."""

    credential_id: bytes
    public_key: bytes
    rp_id: str


@dataclass(frozen=True, slots=True)
class DeviceListUpdate:
    """One verified device-list version to commit on top of version ``version - 1`` (compare-and-set)."""

    account_id: str
    version: int
    signed: bytes
    added: Sequence[DeviceRecord]
    removed: Sequence[str]  # device ids this version revokes
    assertions: Sequence[CredentialUse] = ()
    added_credentials: Sequence[NewCredential] = ()
    removed_credentials: Sequence[bytes] = ()


@dataclass(frozen=True, slots=True)
class DeviceListCommitted:
    """What a committed version changed: every device of the account (to wake) and the revoked ones."""

    devices: list[str]
    revoked: list[str]
    envelopes_deleted: int


@dataclass(frozen=True, slots=True)
class DeviceStreamState:
    """What an inbox stream re-checks: the device's account, whether it is revoked, the list's head version."""

    account_id: str
    revoked: bool
    list_version: int


@dataclass(frozen=True, slots=True)
class StoredCredential:
    credential_id: bytes
    public_key: bytes
    rp_id: str
    sign_count: int
    status: str  # "pending" or "active"
    registered_by: str


# -- prekeys and enrolment (docs/crypto.md §5, §7) -------------------------------------------------------

PREKEY_SIGNED = "x25519-signed"
PREKEY_LAST_RESORT = "mlkem768-last-resort"
PREKEY_X25519_ONE_TIME = "x25519-one-time"
PREKEY_MLKEM_ONE_TIME = "mlkem768-one-time"


@dataclass(frozen=True, slots=True)
class StoredPrekey:
    """A public prekey as uploaded (``kind`` is one of the four kind strings); the service verified it."""

    kind: str
    key_id: int
    public_key: bytes
    created_at_ms: int
    signature: bytes


@dataclass(frozen=True, slots=True)
class PrekeyState:
    """One-time keys left per kind and the current signed / last-resort key ids (None: none uploaded)."""

    x25519_one_time: int
    mlkem_one_time: int
    signed_prekey_id: int | None
    last_resort_id: int | None


@dataclass(frozen=True, slots=True)
class ClaimedBundle:
    """What a claim served for one device; the one-time keys in it are deleted by the same transaction."""

    device_id: str
    account_id: str
    box_key: bytes
    signed_prekey: StoredPrekey
    pq_prekey: StoredPrekey  # mlkem768-one-time if one was left (and the pair limit allowed), else last-resort
    one_time_prekey: StoredPrekey | None


@dataclass(frozen=True, slots=True)
class EnrolmentRecord:
    """An enrolment offer (MessagePack ``EnrolmentOffer``) and, once posted, its proposal."""

    lookup_id: bytes
    offer: bytes
    created_at_ms: int
    expires_at_ms: int
    proposal: bytes | None = None
    proposer_device: str | None = None


# -- account log (docs/account-log.md) ------------------------------------------------------------

LOG_KINDS: tuple[str, ...] = ("event", "state", "key", "snapshot_part", "snapshot")


@dataclass(frozen=True, slots=True)
class NewLogRecord:
    """One record to append; ``kind`` is one of :data:`LOG_KINDS`. ``ciphertext`` is opaque."""

    record_id: bytes
    kind: str
    epoch: int
    ciphertext: bytes
    snapshot_id: bytes | None = None
    covers: int | None = None
    parts: int | None = None
    device_list_version: int | None = None


@dataclass(frozen=True, slots=True)
class LogAppended:
    """The result for one :class:`NewLogRecord`, in submission order (``duplicate``: stored before)."""

    record_id: bytes
    position: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class LogAppendOutcome:
    head: int
    results: list[LogAppended]


@dataclass(frozen=True, slots=True)
class StoredLogRecord:
    """A committed record; ``ciphertext`` is empty for a stubbed snapshot part (``size`` is still its length)."""

    position: int
    record_id: bytes
    kind: str
    epoch: int
    committed_at_ms: int
    size: int
    ciphertext: bytes
    snapshot_id: bytes | None = None
    covers: int | None = None
    parts: int | None = None
    device_list_version: int | None = None


@dataclass(frozen=True, slots=True)
class LogSnapshotInfo:
    """The newest complete snapshot: its manifest's position and header."""

    snapshot_id: bytes
    position: int
    covers: int
    parts: int
    epoch: int
    committed_at_ms: int


@dataclass(frozen=True, slots=True)
class LogPageRecord:
    """A page of one account's log, with ``head``, ``horizon`` and ``snapshot`` read in the same transaction."""

    records: list[StoredLogRecord]
    head: int
    horizon: int
    snapshot: LogSnapshotInfo | None


@dataclass(frozen=True, slots=True)
class LogSweepReport:
    """One retention sweep step: records deleted, snapshot records emptied, and whether more work is due now."""

    deleted: int = 0
    emptied: int = 0
    more: bool = False


@dataclass(frozen=True, slots=True)
class LogRetentionRecord:
    """``days`` None means forever."""

    days: int | None
    horizon: int
    updated_at_ms: int


# -- media blobs (docs/blobs.md; migration 0011) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class NewBlobUpload:
    """A tus upload to create (``upload_id``: 32 lowercase hex, random; also its storage key)."""

    upload_id: str
    account_id: str
    device_id: str
    length: int
    sha256: bytes | None
    capability_hash: bytes | None
    created_at_ms: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class BlobUploadRecord:
    """An upload as committed: ``offset`` bytes are durable in storage; ``blob_id`` is set once it is a blob."""

    upload_id: str
    account_id: str
    device_id: str
    length: int
    offset: int
    sha256: bytes | None
    capability_hash: bytes | None
    storage_state: str
    created_at_ms: int
    expires_at_ms: int
    blob_id: str | None


@dataclass(frozen=True, slots=True)
class BlobRecord:
    """A stored blob and the SHA-256 of every capability that may download it."""

    blob_id: str
    account_id: str
    sha256: bytes
    length: int
    storage_key: str
    created_at_ms: int
    expires_at_ms: int
    capability_hashes: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class BlobTrash:
    """Storage to drop: an unfinished upload (``storage_state`` not None: abort it) or a completed object."""

    storage_key: str
    storage_state: str | None


@dataclass(frozen=True, slots=True)
class BlobCollection:
    """What one collector step removed from the database (the storage work is in ``trash``)."""

    uploads: int  # unfinished uploads past their expiry
    blobs: int  # blobs past their expiry
    trash: tuple[BlobTrash, ...]
    more: bool  # a batch was full: call again


# -- the Store protocols, by role (a service depends on the roles it uses; Store is their union) ------


class AccountStore(Protocol):
    """Accounts and their devices (SQL in sql/accounts.py). All methods are async and never block the trio loop."""

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


class AuthStore(Protocol):
    """Authentication challenges and sessions (SQL in sql/auth.py)."""

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
        """Revoke one session (``token_hash``) or, with None, all of the device's. Returns how many.

        Idempotent. Every process watching revocations (:meth:`watch_session_revocations`) hears of the
        device on commit, also when no row changed."""

    async def watch_session_revocations(
        self,
        notify: Callable[[str], None],
        listening: Callable[[bool], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``notify(device_id)`` in the trio thread after a commit by *any* process revoked sessions of
        that device (:meth:`revoke_sessions`, or a device-list version removing the device); until cancelled.

        Unlike the wake-ups, a lost notice would let a cache outlive a revocation, so the watch says when
        it can lose them: ``listening(True)`` once every later commit will be heard (the first time before
        ``task_status.started()``, again after each reconnection), ``listening(False)`` when notices may be
        lost from now on (the listening connection failed; also when the watch ends, whether cancelled or
        raising). SQLite, one process that makes every revocation itself, calls ``listening(True)`` once
        and sends nothing. Raises ``StoreUnavailableError`` if closed.
        """


class InboxStore(Protocol):
    """Inboxes: sending, reading and acknowledging envelopes (SQL in sql/inbox.py; rules in inbox_rules.py)."""

    async def store_envelopes(
        self, sender_device: str, envelopes: Sequence[NewEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[StoredEnvelope]:
        """Store a batch atomically, deduplicating per (sender, idempotency key).

        A retry answers the original result (``duplicate=True``) while the key
        is remembered: at least until the envelope expires, acknowledged or not.
        ``forget_at_ms`` bounds keys kept as their own rows (envelopes for other
        relays, and every key below the compact schema floor); in the compact
        schema a key of a local envelope points at its inbox row or tombstone
        and is forgotten with it (sql/inbox.py). Raises ``unknown_recipient``,
        ``idempotency_conflict`` or ``inbox_full``; then nothing of the batch is
        stored. Idempotent per key; a cancelled call may or may not have
        committed (a retry with the same keys tells which).
        """

    async def read_inbox(self, device_id: str, after: int, limit: int, now_ms: int) -> list[InboxRecord]:
        """Unexpired envelopes with cursor > ``after``, in cursor order, at most ``limit``."""

    async def acknowledge(self, device_id: str, up_to: int | None, envelope_ids: Sequence[bytes]) -> int:
        """Remove acknowledged envelopes of this device's inbox only (in the compact schema a tombstone stays
        until the envelope's expiry, for retries of its send); returns how many. Idempotent."""

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


class FederationStore(Protocol):
    """The federation outbox and envelopes received from other relays (SQL in sql/federation.py)."""

    # -- sending side (outbox rows are written by store_envelopes) ------------------------

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

    async def federation_outbox_fail(self, peer: str, seqs: Sequence[int], reason: str, now_ms: int) -> None:
        """End ``peer``'s outbox rows ``seqs`` as failed for good with ``reason`` (a name that does not exist, a
        permanent refusal): never sent again nor counted as queued, kept until they expire or
        :meth:`federation_retry_now`; the peer's last error becomes ``reason`` and its backoff is reset (its
        other rows go on). Idempotent."""

    async def federation_peer_states(self) -> list[PeerState]:
        """State of every known peer (with an outbox or a delivery history), by name."""

    async def federation_retry_now(self, peer: str | None) -> int:
        """Make ``peer`` (None: every peer) and its held and failed envelopes due at once; returns peers affected."""

    async def federation_take_lease(self, peer: str, holder: str, now_ms: int, lease_ms: int) -> bool:
        """Take or renew the lease on sending ``peer``'s outbox for ``holder`` (one replica) until
        ``now_ms + lease_ms``; False while another holder's lease has not expired.

        One conditional upsert, so of replicas racing for a free lease exactly
        one wins. Idempotent for the holder (renews). Cancellation: the
        upsert commits or not; a lease taken but not known expires.
        """

    async def federation_release_leases(self, holder: str) -> None:
        """Give up every lease of ``holder`` (at shutdown), so another replica sends at once. Idempotent."""

    # -- receiving side -----------------------------------------------------------------

    async def federation_remember_nonce(self, origin: str, nonce: str, forget_at_ms: int) -> bool:
        """Remember a signature nonce of ``origin``; False if it was already remembered (a replay)."""

    async def federation_store_received(
        self, origin: str, envelopes: Sequence[ReceivedEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[tuple[ReceivedOutcome, str]]:
        """Store envelopes delivered by ``origin`` in one transaction; (outcome, recipient device) each.

        Never raises for one envelope's problem: an unknown recipient is
        ``UNKNOWN_RECIPIENT``, a revoked one ``RECIPIENT_REVOKED``, a full
        inbox ``INBOX_FULL`` (all store nothing for that envelope), an (origin, id) seen before ``DUPLICATE``.
        Ids are remembered until ``forget_at_ms``.
        """


class DeviceStore(Protocol):
    """Device lists v2, revocation and WebAuthn (SQL in sql/devices.py)."""

    async def get_device_list_head(self, account_id: str) -> DeviceListHead | None:
        """The account's newest device-list version, or None for an unknown account."""

    async def append_device_list(self, update: DeviceListUpdate, now_ms: int) -> DeviceListCommitted:
        """Commit a verified version atomically, if the head is still ``update.version - 1``.

        In one transaction: the head check (else ``device_list_conflict``;
        ``unknown_account``), WebAuthn counters (each assertion's count must
        be above the stored one unless both are 0, else ``webauthn_replayed``;
        then stored), added credentials must be pending for the account with
        the same key and rp id (else ``webauthn_invalid``) and become active,
        removed credentials are deleted, added devices are inserted (a device
        id known on this relay: ``invalid_device_list``), removed devices are
        revoked: their sessions revoked, inbox envelopes, auth challenges,
        WebAuthn registrations and prekeys deleted. Any error changes nothing.
        """

    async def device_stream_state(self, device_id: str) -> DeviceStreamState | None:
        """The device's revocation state and its account's head version, or None for an unknown device."""

    async def put_webauthn_registration(
        self, challenge: bytes, account_id: str, device_id: str, expires_at_ms: int
    ) -> None:
        """Remember a registration ceremony begun by ``device_id`` (single use, like auth challenges)."""

    async def consume_webauthn_registration(
        self, challenge: bytes, account_id: str, device_id: str, now_ms: int
    ) -> ChallengeOutcome:
        """Burn a registration challenge; UNKNOWN also when it was issued to another device or account."""

    async def put_webauthn_credential(
        self, account_id: str, device_id: str, credential: NewCredential, sign_count: int, now_ms: int
    ) -> None:
        """Store a registered credential as pending (replacing a pending one with the same id).

        Raises ``webauthn_invalid`` when the id is an active credential of the account.
        """

    async def get_webauthn_credentials(self, account_id: str) -> list[StoredCredential]:
        """The account's credentials (pending and active), by id."""


class PrekeyStore(Protocol):
    """Prekeys and enrolment offers (SQL in sql/prekeys.py; rules in prekey_rules.py)."""

    async def put_prekeys(self, device_id: str, prekeys: Sequence[StoredPrekey], max_one_time: int) -> PrekeyState:
        """Store verified prekeys of ``device_id`` atomically and return what it then holds.

        A signed or last-resort key replaces the current one of its kind;
        one-time keys are added. Key ids only increase per (device, kind): an
        id at or below the highest ever stored is ``prekey_invalid`` unless
        the very same key is still stored (a retried upload: skipped). More
        than ``max_one_time`` stored keys of one one-time kind is
        ``invalid_field``. Any error stores nothing.
        """

    async def get_prekey_state(self, device_id: str) -> PrekeyState:
        """Counts and current ids of ``device_id``'s prekeys (zeros and None for an unknown device)."""

    async def claim_prekeys(
        self,
        claimer_account: str,
        targets: Sequence[tuple[str, str]],
        now_ms: int,
        one_time_limit: int,
        window_ms: int,
    ) -> list[ClaimedBundle | None]:
        """One bundle per (account id, device id) target, in order; None for an unknown or revoked device,
        a device of another account, or one without a signed prekey or any ML-KEM key (nothing is served).

        In one transaction: per device the signed prekey, the lowest-id
        ``mlkem768-one-time`` key else the last-resort key, and the lowest-id
        ``x25519-one-time`` key if any; served one-time keys are deleted, so
        concurrent claims (any replica) never serve a key twice. At most
        ``one_time_limit`` keys of each one-time kind are served per
        (``claimer_account``, device) within ``window_ms``; past that the
        bundle has none of that kind. A device named twice gets two bundles.
        """

    async def delete_device_prekeys(self, device_id: str) -> int:
        """Delete every prekey of ``device_id`` (and its id high-water marks); returns the keys deleted.

        Revocation does the same inside its own transaction (``sql/prekeys.delete_device_prekeys``).
        Idempotent.
        """

    async def create_enrolment(
        self, lookup_id: bytes, offer: bytes, created_at_ms: int, expires_at_ms: int, forget_at_ms: int
    ) -> None:
        """Store an offer; raises ``enrolment_used`` when an offer with this lookup id is stored (even expired).

        The row is kept until ``forget_at_ms`` (then :meth:`expire` deletes it).
        """

    async def get_enrolment(self, lookup_id: bytes) -> EnrolmentRecord | None:
        """The offer (and proposal) under ``lookup_id``, or None. Expired rows are returned until forgotten."""

    async def put_enrolment_proposal(
        self, lookup_id: bytes, proposal: bytes, proposer_device: str, now_ms: int
    ) -> EnrolmentRecord:
        """Attach the proposal to the offer atomically; returns the updated record.

        Raises ``enrolment_unknown``, ``enrolment_expired`` (``expires_at_ms``
        <= ``now_ms``) or ``enrolment_used`` (another proposal is stored). The
        same proposal by the same device again is answered like the first
        (idempotent retry).
        """


class LogStore(Protocol):
    """The account log (docs/account-log.md §7.4; SQL in sql/log.py; rules in log_rules.py)."""

    async def append_log(
        self,
        account_id: str,
        records: Sequence[NewLogRecord],
        expected_head: int | None,
        now_ms: int,
        max_bytes: int,
    ) -> LogAppendOutcome:
        """Append a batch to ``account_id``'s log atomically, at dense positions ``head + 1 …`` in order.

        Ids already stored are answered with their original positions and
        ``duplicate=True``; when every id exists, nothing is checked. Otherwise,
        in this order: ``expected_head`` (``log_conflict`` with ``head``), the
        epoch rules (``log_epoch_stale`` with ``epoch``, ``log_rekey_required``),
        the quota ``max_bytes`` (0 = unlimited; ``log_quota``), snapshot
        manifests (``snapshot_incomplete``; ``invalid_field`` when ``covers``
        is above the head). Any error stores nothing.
        """

    async def read_log(
        self, account_id: str, after: int, limit: int, max_bytes: int, full_parts: bool
    ) -> LogPageRecord:
        """Up to ``limit`` records with position > ``after`` in order, at most ``max_bytes`` of ciphertext
        (but at least one record); snapshot parts stubbed unless ``full_parts``. ``limit=0``: header only."""

    async def log_snapshot(self, account_id: str) -> LogSnapshotInfo | None:
        """The newest complete snapshot, or None."""

    async def read_snapshot_parts(
        self, account_id: str, snapshot_id: bytes, after: int, limit: int, max_bytes: int
    ) -> LogPageRecord:
        """The parts of the newest snapshot (full ciphertext) with position > ``after``; raises ``no_snapshot``
        unless ``snapshot_id`` is the newest complete snapshot."""

    async def get_log_retention(self, account_id: str) -> LogRetentionRecord:
        """The account's retention (forever when never set)."""

    async def set_log_retention(self, account_id: str, days: int | None, now_ms: int) -> LogRetentionRecord:
        """Set retention (``days`` None: forever); takes effect at the next sweep."""

    async def sweep_log(self, now_ms: int, batch: int) -> LogSweepReport:
        """One step of retention (§6.2), at most ``batch`` records per account: delete records older than the
        account's ``days`` (raising ``horizon``), and empty (ciphertext b"", size 0; the position stays) parts
        and manifests of snapshots superseded over 7 days ago or never completed within 24 hours.

        Never touches the newest complete snapshot, its parts, or ``key`` records. Call again while ``more``.
        """

    async def note_revocation(self, account_id: str, device_list_version: int) -> None:
        """Device list version ``device_list_version`` revoked a device: until a ``key`` record for a new epoch
        names a list version >= it, appends other than that key record get ``log_rekey_required``."""

    async def watch_log_commits(
        self, notify: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Call ``notify(account_id)`` in the trio thread after log appends made by *any* process; until
        cancelled. Same contract as :meth:`watch_inbox_commits`."""


class BlobStore(Protocol):
    """Media blob metadata: uploads, blobs, capabilities, the storage trash (SQL in sql/blobs.py). The bytes live
    in a :class:`relay.blobs.base.BlobStorage`; rules (limits, digests, who may download) in the blob service."""

    async def create_blob_upload(
        self, upload: NewBlobUpload, quota_bytes: int, blob_expires_at_ms: int
    ) -> BlobUploadRecord:
        """Create an upload atomically, under the account's lock; returns it (storage state "").

        When ``upload.sha256`` names a blob the account stores, the upload is
        born complete (offset = length, ``blob_id`` the stored blob's), its
        capability hash is added to that blob and the blob's expiry raised to
        at least ``blob_expires_at_ms``: within one account only. Otherwise
        raises ``blob_quota_exceeded`` when the account's stored blobs plus its
        unfinished uploads plus ``upload.length`` exceed ``quota_bytes`` (0:
        no quota). Any error stores nothing. Not idempotent (the id is new).
        """

    async def set_blob_upload_state(self, upload_id: str, state: str) -> None:
        """Record the backend's state of a new upload (after ``BlobStorage.start``). Idempotent."""

    async def get_blob_upload(self, upload_id: str) -> BlobUploadRecord | None:
        """The upload, or None (never created, terminated, discarded or collected)."""

    async def lease_blob_upload(self, upload_id: str, offset: int, holder: str, now_ms: int, until_ms: int) -> bool:
        """Take (or renew, for the same ``holder``) the right to append to an unfinished upload whose committed
        offset is ``offset``, until ``until_ms``; False when another holder's lease has not expired, the offset
        moved, or the upload is gone or finished. One conditional update. Idempotent for the holder."""

    async def release_blob_lease(self, upload_id: str, holder: str) -> None:
        """Give the lease up (a failed append). Idempotent; a lease another holder took is left alone."""

    async def commit_blob_append(self, upload_id: str, holder: str, offset: int, new_offset: int, state: str) -> bool:
        """Record bytes the backend made durable: the offset moves from ``offset`` to ``new_offset`` with the
        backend's new ``state``, and the lease is released. False (nothing changed) unless ``holder`` still
        holds the lease at ``offset``: the upload was terminated, collected or taken over meanwhile."""

    async def finish_blob_upload(
        self, upload_id: str, sha256: bytes, blob_expires_at_ms: int, now_ms: int
    ) -> str | None:
        """Turn a fully appended upload whose bytes hash to ``sha256`` into a blob; returns the blob id.

        The blob id is the upload id, unless the account already stores
        ``sha256``: then the upload joins that blob (capability added, expiry
        raised) and its own storage goes to the trash. Idempotent: a finished
        upload returns its blob id; a missing or not fully appended one None.
        """

    async def discard_blob_upload(self, upload_id: str, completed: bool, now_ms: int) -> bool:
        """Delete an upload (termination; a digest mismatch). An unfinished upload's storage goes to the trash
        (``completed``: the backend already completed the object, so it is deleted rather than aborted). A
        finished upload's row goes, its blob stays. False when there was none. Idempotent."""

    async def get_blob(self, blob_id: str) -> BlobRecord | None:
        """The blob with its capability hashes, or None. Expired blobs are returned until collected."""

    async def delete_blob(self, blob_id: str, account_id: str, now_ms: int) -> bool:
        """Delete ``account_id``'s blob (its storage to the trash); False when it has no such blob. Idempotent."""

    async def collect_blobs(self, now_ms: int, batch: int) -> BlobCollection:
        """Delete up to ``batch`` uploads and ``batch`` blobs past their expiry in one transaction; their storage
        goes to the trash (a finished upload's row goes alone). Call again while ``more``."""

    async def blob_trash(self, limit: int) -> list[BlobTrash]:
        """Storage still to drop, oldest first."""

    async def forget_blob_trash(self, storage_keys: Sequence[str]) -> None:
        """The backend dropped these keys' bytes. Idempotent."""

    async def blob_usage(self, account_id: str) -> int:
        """Bytes counted against ``account_id``'s quota (stored blobs, unfinished uploads' declared lengths)."""

    async def blob_stored_bytes(self) -> int:
        """Bytes of all stored blobs (the ``relay_blob_stored_bytes`` gauge)."""


class Store(
    AccountStore, AuthStore, InboxStore, FederationStore, DeviceStore, PrekeyStore, LogStore, BlobStore, Protocol
):
    """Relay storage: every role, and what spans them. All methods are async and never block the trio loop."""

    async def expire(self, now_ms: int) -> ExpiryReport:
        """Delete everything past its expiry (every topic, one transaction)."""

    async def bind_identity(
        self, relay_name: str | None, effective_name: str, key_id: str, retired_key_ids: Sequence[str], now_ms: int
    ) -> list[str]:
        """Check this process against the relay identity recorded in the store, recording it at first start.

        ``relay_name`` None: the name is not bound (SQLite without an explicit
        name) but a recorded one is still enforced against ``effective_name``
        (the name served). ``key_id`` is the current
        relay key's fingerprint; ``retired_key_ids`` those the mounted rotation
        file lists. Returns what changed (lines to log). Raises
        :class:`StartupRefusedError` on another name, or a key that is neither
        the recorded one nor its rotation (relay/store/sql/identity.py).
        Idempotent; one transaction, so replicas starting together agree.
        """

    async def close(self) -> None:
        """Finish pending writes and close. Idempotent."""


__all__: Sequence[str] = (
    "LOG_KINDS",
    "PREKEY_LAST_RESORT",
    "PREKEY_MLKEM_ONE_TIME",
    "PREKEY_SIGNED",
    "PREKEY_X25519_ONE_TIME",
    "AccountStore",
    "AuthStore",
    "BlobCollection",
    "BlobRecord",
    "BlobStore",
    "BlobTrash",
    "BlobUploadRecord",
    "ChallengeOutcome",
    "ClaimedBundle",
    "ConsumedChallenge",
    "CredentialUse",
    "DeviceListCommitted",
    "DeviceListHead",
    "DeviceListUpdate",
    "DeviceRecord",
    "DeviceStore",
    "DeviceStreamState",
    "EnrolmentRecord",
    "ExpiryReport",
    "FederationStore",
    "InboxRecord",
    "InboxStore",
    "LogAppendOutcome",
    "LogAppended",
    "LogPageRecord",
    "LogRetentionRecord",
    "LogSnapshotInfo",
    "LogStore",
    "LogSweepReport",
    "NewBlobUpload",
    "NewCredential",
    "NewEnvelope",
    "NewLogRecord",
    "OutboxRecord",
    "PeerState",
    "PrekeyState",
    "PrekeyStore",
    "ReceivedEnvelope",
    "ReceivedOutcome",
    "SessionRecord",
    "StartupRefusedError",
    "Store",
    "StoreUnavailableError",
    "StoredCredential",
    "StoredEnvelope",
    "StoredLogRecord",
    "StoredPrekey",
    "envelope_digest",
)
