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


# -- accounts and devices ---------------------------------------------------------


class DeviceEntry(Message, frozen=True):
    device_id: DeviceId
    sign_key: PublicKey
    box_key: PublicKey
    added_at_ms: Millis
    name: DeviceName = ""


class DeviceList(Message, frozen=True):
    """Version ``version`` of an account's device list; ``prev_hash`` chains versions (empty for genesis)."""

    account_id: AccountId
    version: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    created_at_ms: Millis
    devices: Annotated[list[DeviceEntry], Meta(min_length=1, max_length=256)]
    prev_hash: Annotated[bytes, Meta(max_length=32)] = b""


class DeviceListSignature(Message, frozen=True):
    device_id: DeviceId
    signature: Signature


class SignedDeviceList(Message, frozen=True):
    device_list: DeviceList
    signatures: Annotated[list[DeviceListSignature], Meta(min_length=1, max_length=256)]


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


StreamItem = InboxEnvelope | Heartbeat


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
)
