"""Every message of protocol v1, as frozen, validated msgspec Structs.

One definition, two encodings (MessagePack and JSON; see :mod:`.codec`).
Field constraints are enforced on decode, so a handler never sees a struct
that breaks them. Times are integer milliseconds since the Unix epoch
(``*_ms``); durations carry their unit in the name.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta, Struct

from .ids import ID_PATTERN

API_VERSION: Final = "v1"

DeviceId = Annotated[str, Meta(pattern=ID_PATTERN, description="32 chars of lowercase base32")]
AccountId = Annotated[str, Meta(pattern=ID_PATTERN, description="32 chars of lowercase base32")]
AddressText = Annotated[str, Meta(min_length=3, max_length=400, description="device.account@relay")]
PublicKey = Annotated[bytes, Meta(min_length=32, max_length=32)]
# Signatures are *not* length-constrained here on purpose: a short or garbage
# signature must reach verification and be answered ``bad_signature``.
Signature = Annotated[bytes, Meta(max_length=1024)]
Nonce = Annotated[bytes, Meta(min_length=32, max_length=32)]
EnvelopeId = Annotated[bytes, Meta(min_length=16, max_length=16)]
IdempotencyKey = Annotated[bytes, Meta(min_length=8, max_length=64)]
Millis = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Cursor = Annotated[int, Meta(ge=0, le=2**63 - 1)]
DeviceName = Annotated[str, Meta(max_length=64)]


class Message(Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Base of all protocol messages (unknown fields are ignored for forward compatibility)."""


# -- relay discovery ------------------------------------------------------------


class Limits(Message, frozen=True):
    max_body_bytes: int
    max_batch_envelopes: int
    max_envelope_bytes: int
    max_inbox_envelopes: int
    default_ttl_seconds: int
    max_ttl_seconds: int
    max_page_envelopes: int
    session_ttl_seconds: int
    challenge_ttl_seconds: int
    # account log (docs/account-log.md §3.5); defaults so that older documents still decode
    max_log_batch_records: int = 500
    max_log_record_bytes: int = 1_048_616
    max_page_log_records: int = 500
    max_log_page_bytes: int = 4 * 1024 * 1024
    max_log_bytes: int = 4 * 1024**3  # per account; 0 = unlimited
    max_retention_days: int = 36_500
    # media blobs (docs/blobs.md); defaults so that older documents still decode
    max_blob_bytes: int = 16 * 1024**3  # one blob's ciphertext (Tus-Max-Size)
    blob_quota_bytes: int = 20 * 1024**3  # per account: stored blobs and unfinished uploads; 0 = unlimited
    blob_upload_expiry_seconds: int = 86_400  # an unfinished upload is collected this long after its creation
    blob_ttl_seconds: int = 30 * 86_400  # a stored blob is collected this long after it was stored


class RelayKey(Message, frozen=True):
    """A relay signing key as published for federation; ``valid_until_ms`` is set on a retired key."""

    key_id: Annotated[str, Meta(min_length=1, max_length=64)]
    public_key: PublicKey
    valid_until_ms: Millis | None = None


class WellKnown(Message, frozen=True):
    relay: str
    relay_key: PublicKey
    api_versions: list[str]
    limits: Limits
    federation_endpoint: str | None = None
    relay_keys: list[RelayKey] = msgspec.field(default_factory=list)


# -- device lists, format 2 (docs/crypto.md §3, §6; owner: lists-pure) -------------------


class Policy(Message, frozen=True):
    """Who must approve the next version of a format-2 device list (docs/crypto.md §3.2)."""

    threshold: Annotated[int, Meta(ge=1, le=16)] = 1
    require_webauthn: bool = False
    require_user_verification: bool = False


DEFAULT_POLICY: Final = Policy()


class WebAuthnCredential(Message, frozen=True):
    """A FIDO2 credential in a device list: ``public_key`` is a COSE_Key (alg -7, -8 or -19)."""

    credential_id: Annotated[bytes, Meta(min_length=1, max_length=1023)]
    public_key: Annotated[bytes, Meta(min_length=1, max_length=1024)]
    rp_id: Annotated[str, Meta(min_length=1, max_length=253)]
    added_at_ms: Millis


class WebAuthnAssertion(Message, frozen=True):
    """A WebAuthn ``get`` assertion whose challenge is the ``list_hash`` of the version it approves.

    Lengths are bounded but otherwise unchecked here: a garbage assertion
    must reach verification and be answered ``webauthn_invalid``.
    """

    credential_id: Annotated[bytes, Meta(min_length=1, max_length=1023)]
    authenticator_data: Annotated[bytes, Meta(max_length=2048)]
    client_data_json: Annotated[bytes, Meta(max_length=4096)]
    signature: Signature


class PostDeviceListRequest(Message, frozen=True):
    """``POST /v1/accounts/{account_id}/devices``: the next version with its approvals."""

    signed: SignedDeviceList


class DeviceListAccepted(Message, frozen=True):
    account_id: AccountId
    version: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    list_hash: Annotated[bytes, Meta(min_length=32, max_length=32)]


class DeviceListChanged(Message, frozen=True, tag="device_list"):
    """Inbox-stream item: the account's device list has a new version; fetch and verify it."""

    account_id: AccountId
    version: Annotated[int, Meta(ge=1, le=2**63 - 1)]


# -- accounts and devices ---------------------------------------------------------


DeviceRole = Literal["device", "integration", "archiver"]
# The closed set of scopes (docs/crypto.md §3.6): only role ``integration`` has scopes.
DeviceScope = Literal["receive", "send"]


class DeviceEntry(Message, frozen=True, omit_defaults=True):
    """One device of a device list. ``kem_key``/``role``/``scopes`` are format 3 (docs/crypto.md §3.6).

    Fields at their default are not encoded, so format-1/2 entries encode
    exactly as before; ``name`` uses a ``default_factory`` because msgspec
    omits a factory default only for collections: it stays encoded even when
    empty, as formats 1 and 2 always encoded it.
    """

    device_id: DeviceId
    sign_key: PublicKey
    box_key: PublicKey
    added_at_ms: Millis
    name: DeviceName = msgspec.field(default_factory=str)
    # ML-KEM-768 encapsulation key (1184 bytes in format 3, empty in formats 1/2): post-quantum key grants.
    kem_key: Annotated[bytes, Meta(max_length=1184)] = b""
    role: DeviceRole = "device"
    scopes: Annotated[list[DeviceScope], Meta(max_length=8)] = msgspec.field(default_factory=list)


class DeviceList(Message, frozen=True, omit_defaults=True):
    """Version ``version`` of an account's device list; ``prev_hash`` chains versions (empty for genesis).

    ``format`` 1 is docs/protocol.md §4; format 2 (docs/crypto.md §3.1) adds
    the policy, WebAuthn credentials, recovery key and account-key epoch;
    format 3 (docs/crypto.md §3.6) adds each device's ML-KEM key, role and
    scopes (in :class:`DeviceEntry`). Fields at their default are not encoded, so a format-1 list encodes
    exactly as before; ``prev_hash`` has no default for the same reason (an
    empty one must still be encoded).
    """

    account_id: AccountId
    version: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    created_at_ms: Millis
    devices: Annotated[list[DeviceEntry], Meta(min_length=1, max_length=256)]
    prev_hash: Annotated[bytes, Meta(max_length=32)]
    format: Annotated[int, Meta(ge=1, le=3)] = 1
    policy: Policy = DEFAULT_POLICY
    credentials: Annotated[list[WebAuthnCredential], Meta(max_length=16)] = msgspec.field(default_factory=list)
    recovery_key: Annotated[bytes, Meta(max_length=32)] = b""
    recovery_backup_key_hash: Annotated[bytes, Meta(max_length=32)] = b""
    account_key_epoch: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 0


class DeviceListSignature(Message, frozen=True):
    device_id: DeviceId
    signature: Signature


class SignedDeviceList(Message, frozen=True, omit_defaults=True):
    """A list version with its approvals (not hashed). ``signatures`` may be empty only in format 2."""

    device_list: DeviceList
    signatures: Annotated[list[DeviceListSignature], Meta(max_length=256)]
    recovery_signatures: Annotated[list[Signature], Meta(max_length=2)] = msgspec.field(default_factory=list)
    webauthn_assertions: Annotated[list[WebAuthnAssertion], Meta(max_length=32)] = msgspec.field(default_factory=list)


class CreateAccountRequest(Message, frozen=True):
    """``POST /v1/accounts``: a genesis device list signed by its only device."""

    signed: SignedDeviceList


class AccountCreated(Message, frozen=True):
    account_id: AccountId
    device_id: DeviceId
    address: AddressText


class DeviceListChain(Message, frozen=True):
    """``GET /v1/accounts/{account}/devices``: every version, genesis first."""

    account_id: AccountId
    versions: list[SignedDeviceList]


# -- authentication ----------------------------------------------------------------


class ChallengeRequest(Message, frozen=True):
    device_id: DeviceId


class Challenge(Message, frozen=True):
    """A single-use nonce bound to this relay, one device and an expiry."""

    relay: str
    device_id: DeviceId
    nonce: Nonce
    expires_at_ms: Millis


class SessionRequest(Message, frozen=True):
    device_id: DeviceId
    nonce: Nonce
    signature: Signature


class Session(Message, frozen=True):
    token: str
    account_id: AccountId
    device_id: DeviceId
    expires_at_ms: Millis


class RevokeSessionsRequest(Message, frozen=True):
    """``DELETE /v1/auth/session`` body (optional): revoke every token of the device."""

    all_sessions: bool = False


class SessionsRevoked(Message, frozen=True):
    revoked: int


# -- messages ------------------------------------------------------------------------


class OutboundEnvelope(Message, frozen=True):
    """One envelope as a sender submits it. ``ciphertext`` is opaque to the relay."""

    recipient: AddressText
    idempotency_key: IdempotencyKey
    ciphertext: Annotated[bytes, Meta(min_length=1)]
    ttl_seconds: Annotated[int, Meta(ge=1)] | None = None


class SendRequest(Message, frozen=True):
    envelopes: Annotated[list[OutboundEnvelope], Meta(min_length=1)]


class Accepted(Message, frozen=True):
    id: EnvelopeId
    sent_at_ms: Millis
    duplicate: bool = False


class SendResponse(Message, frozen=True):
    """One :class:`Accepted` per submitted envelope, in submission order."""

    accepted: list[Accepted]


class InboxEnvelope(Message, frozen=True, tag="envelope"):
    cursor: Cursor
    id: EnvelopeId
    sent_at_ms: Millis
    expires_at_ms: Millis
    ciphertext: bytes


class Heartbeat(Message, frozen=True, tag="heartbeat"):
    """Sent on an idle stream so that both sides notice a dead connection."""

    cursor: Cursor
    at_ms: Millis


StreamItem = InboxEnvelope | Heartbeat | DeviceListChanged


class InboxPage(Message, frozen=True):
    envelopes: list[InboxEnvelope]
    next_cursor: Cursor
    more: bool


class AckRequest(Message, frozen=True):
    """Acknowledge everything up to and including ``up_to`` and/or individual ``ids``."""

    up_to: Cursor | None = None
    ids: Annotated[list[EnvelopeId], Meta(max_length=10_000)] = msgspec.field(default_factory=list)


class AckResponse(Message, frozen=True):
    acknowledged: int


class Health(Message, frozen=True):
    status: str


# -- federation (relay to relay; docs/federation.md) -------------------------------------------


class FederatedEnvelope(Message, frozen=True):
    """One envelope as the sender's relay forwards it; ``id`` is the origin's envelope id (dedup key)."""

    id: EnvelopeId
    recipient: AddressText
    sent_at_ms: Millis
    expires_at_ms: Millis
    ciphertext: Annotated[bytes, Meta(min_length=1)]


class DeliverRequest(Message, frozen=True):
    """``POST /federation/v1/deliver``, signed by the origin relay."""

    envelopes: Annotated[list[FederatedEnvelope], Meta(min_length=1)]


DeliveryOutcome = Literal["stored", "duplicate", "rejected", "deferred"]


class DeliveryResult(Message, frozen=True):
    """``stored``/``duplicate``: done; ``rejected``: never retry (``code`` says why); ``deferred``: retry later."""

    id: EnvelopeId
    outcome: DeliveryOutcome
    code: str = ""


class DeliverResponse(Message, frozen=True):
    results: list[DeliveryResult]


# -- prekeys and enrolment (docs/crypto.md §5, §7; protocol/prekeys.py, protocol/enrolment.py) ----------

PrekeyKind = Literal["x25519-signed", "mlkem768-last-resort", "x25519-one-time", "mlkem768-one-time"]
PrekeyId = Annotated[int, Meta(ge=0, le=2**32 - 1)]
# The exact length per kind (X25519 32, ML-KEM-768 1184) is checked by protocol.prekeys.verify_prekey
# (``prekey_invalid``), not here, so a wrong length gets the documented prekey code.
PrekeyPublicKey = Annotated[bytes, Meta(max_length=1184)]
MAX_ONE_TIME_PREKEYS: Final = 200
LookupId = Annotated[bytes, Meta(min_length=10, max_length=10)]
Mac = Annotated[bytes, Meta(min_length=32, max_length=32)]


class SignedPrekey(Message, frozen=True):
    """A public prekey signed by its device: ``Sig(sign_key, layout("prekey", device_id, kind, key_id, …))``."""

    kind: PrekeyKind
    key_id: PrekeyId
    public_key: PrekeyPublicKey
    created_at_ms: Millis
    signature: Signature


class PrekeyUpload(Message, frozen=True):
    """``PUT /v1/prekeys``: replace the signed/last-resort key (if given) and add one-time keys."""

    signed_prekey: SignedPrekey | None = None
    last_resort: SignedPrekey | None = None
    one_time: Annotated[list[SignedPrekey], Meta(max_length=MAX_ONE_TIME_PREKEYS)] = msgspec.field(default_factory=list)


class PrekeyCounts(Message, frozen=True):
    """What the relay holds for the device: one-time keys left per kind, current signed/last-resort ids."""

    x25519_one_time: Annotated[int, Meta(ge=0)]
    mlkem_one_time: Annotated[int, Meta(ge=0)]
    signed_prekey_id: PrekeyId | None = None
    last_resort_id: PrekeyId | None = None


class ClaimPrekeysRequest(Message, frozen=True):
    """``POST /v1/prekeys/claim``: one bundle per named device (addresses, any relay)."""

    devices: Annotated[list[AddressText], Meta(min_length=1, max_length=256)]


class PrekeyBundle(Message, frozen=True):
    """What a sender needs to start a session with ``address`` (``protocol.prekeys.verify_bundle``)."""

    address: AddressText
    identity_key: PublicKey
    signed_prekey: SignedPrekey
    pq_prekey: SignedPrekey
    one_time_prekey: SignedPrekey | None = None


class ClaimPrekeysResponse(Message, frozen=True):
    bundles: list[PrekeyBundle]
    missing: list[AddressText]


class FederatedClaimRequest(Message, frozen=True):
    """``POST /federation/v1/prekeys/claim`` (signed by the claimant's relay): bundles of the callee's devices.

    ``claimer_account`` is the claiming account on the origin relay; the
    per-pair one-time limit counts under (``claimer_account``, origin).
    """

    claimer_account: AccountId
    devices: Annotated[list[AddressText], Meta(min_length=1, max_length=256)]


class EnrolmentBundle(Message, frozen=True):
    """The new device's prekeys in an enrolment offer: a signed prekey and a PQ last-resort key."""

    signed_prekey: SignedPrekey
    pq_prekey: SignedPrekey


class EnrolmentOffer(Message, frozen=True):
    """``POST /v1/enrolments`` by a new device N (no token); ``offer_mac`` per docs/crypto.md §5.1."""

    relay: Annotated[str, Meta(min_length=1, max_length=300)]
    lookup_id: LookupId
    sign_key: PublicKey
    box_key: PublicKey
    bundle: EnrolmentBundle
    created_at_ms: Millis
    offer_mac: Mac
    # N's long-term ML-KEM-768 key for its format-3 entry (docs/crypto.md §3.6); covered by offer_mac.
    kem_key: Annotated[bytes, Meta(max_length=1184)] = b""


class EnrolmentOfferAccepted(Message, frozen=True):
    expires_at_ms: Millis


class EnrolmentProposal(Message, frozen=True):
    """``POST /v1/enrolments/{lookup_id}/proposal``: a version adding N, with ``approval_tag`` (§5.1)."""

    signed: SignedDeviceList
    approval_tag: Mac


class EnrolmentProposalAccepted(Message, frozen=True):
    """The proposal is stored; N can fetch it until ``expires_at_ms`` (the offer's expiry)."""

    expires_at_ms: Millis


# -- account log (docs/account-log.md §3.6) ----------------------------------------------------

RecordId = Annotated[bytes, Meta(min_length=16, max_length=16, description="16 bytes chosen by the client")]
SnapshotId = Annotated[bytes, Meta(min_length=16, max_length=16)]
Position = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Epoch = Annotated[int, Meta(ge=1, le=2**62)]
LogKind = Literal["event", "state", "key", "snapshot_part", "snapshot"]
RetentionMode = Literal["forever", "days"]


class LogRecordIn(Message, frozen=True):
    """One record as a device appends it. ``ciphertext`` is opaque to the relay (XChaCha20-Poly1305).

    ``snapshot_id`` goes with ``snapshot_part`` and ``snapshot`` records; ``covers`` and ``parts`` only
    with ``snapshot`` manifests; ``device_list_version`` only with ``key`` records (and is required there).
    """

    record_id: RecordId
    kind: LogKind
    epoch: Epoch
    ciphertext: Annotated[bytes, Meta(min_length=1)]
    snapshot_id: SnapshotId | None = None
    covers: Position | None = None
    parts: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    device_list_version: Annotated[int, Meta(ge=1, le=2**62)] | None = None


class AppendRequest(Message, frozen=True):
    """``POST /v1/log``: an atomic batch; with ``expected_head`` it commits only if the head is still that."""

    records: Annotated[list[LogRecordIn], Meta(min_length=1)]
    expected_head: Position | None = None


class AppendResult(Message, frozen=True):
    record_id: RecordId
    position: Position
    duplicate: bool = False


class AppendResponse(Message, frozen=True):
    """One :class:`AppendResult` per submitted record, in submission order, and the head after the append."""

    head: Position
    results: list[AppendResult]


class LogRecord(Message, frozen=True, tag="record"):
    """A committed record. ``ciphertext`` is empty when a snapshot part is stubbed; ``size`` is always its length."""

    position: Position
    record_id: RecordId
    kind: LogKind
    epoch: Epoch
    committed_at_ms: Millis
    ciphertext: bytes
    size: Annotated[int, Meta(ge=0)]
    snapshot_id: SnapshotId | None = None
    covers: Position | None = None
    parts: int | None = None
    device_list_version: int | None = None


class LogHeartbeat(Message, frozen=True, tag="log_heartbeat"):
    """Sent on an idle log stream: the head as committed now."""

    head: Position
    at_ms: Millis


LogStreamItem = LogRecord | LogHeartbeat


class SnapshotRef(Message, frozen=True):
    """The newest complete snapshot: its manifest's ``position`` and the highest position it supersedes."""

    snapshot_id: SnapshotId
    position: Position
    covers: Position
    parts: int
    epoch: Epoch
    committed_at_ms: Millis


class LogPage(Message, frozen=True):
    records: list[LogRecord]
    next_after: Position
    head: Position
    horizon: Position
    more: bool
    snapshot: SnapshotRef | None = None


class LogRetention(Message, frozen=True):
    """Retention of the account's log; ``horizon`` and ``updated_at_ms`` are set in responses only."""

    mode: RetentionMode
    days: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    horizon: Position = 0
    updated_at_ms: Millis = 0


# -- sessions (docs/crypto.md §7.3-§9; inside ciphertexts only, never on the wire in the clear) --------
# Encoded as arrays (``array_like``), not maps: field names would cost ~130 bytes per message and push a
# 200-byte message out of the 512-byte bucket (crypto.md §10). Trailing unknown elements are ignored.

ContentTypeText = Annotated[str, Meta(min_length=1, max_length=255)]


class RatchetMessage(Message, frozen=True, array_like=True):
    """One Double Ratchet message (protocol/ratchet.py); ``ciphertext`` is ChaCha20-Poly1305 of a ``Content``."""

    ratchet_key: PublicKey
    previous_chain_length: Annotated[int, Meta(ge=0, le=2**32 - 1)]
    n: Annotated[int, Meta(ge=0, le=2**32 - 1)]
    ciphertext: bytes


class PrekeyMessage(Message, frozen=True, array_like=True):
    """A session's first messages (§7.3 step 4): the handshake's public half and a ratchet message."""

    signed_prekey_id: PrekeyId
    pq_prekey_id: PrekeyId
    pq_last_resort: bool
    ephemeral_key: PublicKey
    kem_ciphertext: Annotated[bytes, Meta(min_length=1088, max_length=1088)]
    message: RatchetMessage
    one_time_prekey_id: PrekeyId | None = None


class SealedV2(Message, frozen=True, array_like=True):
    """The padded plaintext of a v2 sealed box is ``0x02`` + this (§9); ``kind`` 1 = prekey, 2 = message."""

    sender: AddressText
    sender_list_version: Annotated[int, Meta(ge=1, le=2**62)]
    kind: Literal[1, 2]
    session_id: Annotated[bytes, Meta(min_length=16, max_length=16)]
    body: bytes


class Content(Message, frozen=True, array_like=True):
    """What a ratchet message encrypts: the message as the application sees it (§8.2)."""

    recipient: AddressText
    sent_at_ms: Millis
    message_id: IdempotencyKey
    content_type: ContentTypeText
    body: bytes


# -- WebAuthn registration (docs/crypto.md §6; owner: relay-devices) ------------------------------


class WebAuthnRegistrationOptions(Message, frozen=True):
    """``POST /v1/webauthn/register/begin``: what the client passes to ``navigator.credentials.create``.

    ``challenge`` is single use, bound to the account and device that asked,
    and expires at ``expires_at_ms`` (120 s). ``user_id`` is the account id's
    ASCII bytes; ``algorithms`` are COSE algorithm ids in preference order.
    """

    challenge: Nonce
    rp_id: str
    rp_name: str
    user_id: bytes
    user_name: str
    algorithms: list[int]
    attestation: str
    user_verification: str
    timeout_ms: int
    expires_at_ms: Millis
    exclude_credentials: list[bytes] = msgspec.field(default_factory=list)


class WebAuthnRegistration(Message, frozen=True):
    """``POST /v1/webauthn/register/complete``: the authenticator's ``create`` response, raw bytes.

    Lengths are bounded but otherwise unchecked here: garbage must reach
    verification and be answered ``webauthn_invalid``.
    """

    credential_id: Annotated[bytes, Meta(min_length=1, max_length=1023)]
    client_data_json: Annotated[bytes, Meta(max_length=4096)]
    attestation_object: Annotated[bytes, Meta(max_length=16384)]


ALL_MESSAGES: Final[tuple[type[Message], ...]] = (
    Limits,
    WellKnown,
    DeviceEntry,
    DeviceList,
    DeviceListSignature,
    SignedDeviceList,
    CreateAccountRequest,
    AccountCreated,
    DeviceListChain,
    ChallengeRequest,
    Challenge,
    SessionRequest,
    Session,
    RevokeSessionsRequest,
    SessionsRevoked,
    OutboundEnvelope,
    SendRequest,
    Accepted,
    SendResponse,
    InboxEnvelope,
    Heartbeat,
    InboxPage,
    AckRequest,
    AckResponse,
    Health,
    RelayKey,
    FederatedEnvelope,
    DeliverRequest,
    DeliveryResult,
    DeliverResponse,
    SignedPrekey,
    PrekeyUpload,
    PrekeyCounts,
    ClaimPrekeysRequest,
    PrekeyBundle,
    ClaimPrekeysResponse,
    EnrolmentBundle,
    EnrolmentOffer,
    EnrolmentOfferAccepted,
    EnrolmentProposal,
    LogRecordIn,
    AppendRequest,
    AppendResult,
    AppendResponse,
    LogRecord,
    LogHeartbeat,
    SnapshotRef,
    LogPage,
    LogRetention,
    Policy,
    WebAuthnCredential,
    WebAuthnAssertion,
    PostDeviceListRequest,
    DeviceListAccepted,
    DeviceListChanged,
    RatchetMessage,
    PrekeyMessage,
    SealedV2,
    Content,
    EnrolmentProposalAccepted,
    WebAuthnRegistrationOptions,
    WebAuthnRegistration,
    FederatedClaimRequest,
)
