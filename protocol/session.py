"""Sealed sender on sessions: v2 envelope payloads (docs/crypto.md §7.3 step 4-5, §9, §14).

::

    ciphertext = SealedBox(recipient.box_key, pad(inner), ephemeral)
    inner (v2) = 0x02 || codec.encode(SealedV2 {sender, sender_list_version, kind, session_id, body})

``body`` is an encoded :class:`~protocol.messages.PrekeyMessage` (kind 1: the
initiator's messages until it has decrypted anything from the peer) or
:class:`~protocol.messages.RatchetMessage` (kind 2), whose plaintext is an
encoded :class:`~protocol.messages.Content`. The outer layer is v1's, so the
relay cannot tell v1 from v2; :func:`parse_inner` dispatches on the first byte.

Everything here is pure: the caller (``protocol.client.sessions``) supplies
entropy, the ML-KEM encapsulation result, the clock, the verified peer keys and
the prekey privates, and stores the returned :class:`SessionState`. Every
failure to open is :class:`~protocol.payload.InvalidPayloadError`
(``malformed_body`` or ``bad_signature``) and returns no state.
"""

from __future__ import annotations

import hmac
from typing import Final, Literal

import msgspec

from . import codec, handshake, padding, ratchet
from .errors import ErrorCode, TetherlessError
from .ids import Address
from .messages import Content, PrekeyMessage, RatchetMessage, SealedV2
from .payload import InvalidPayloadError, open_box, seal_box, unpad

VERSION_2: Final = 0x02
KIND_PREKEY: Final = 1
KIND_MESSAGE: Final = 2
#: Entropy per sealed message: the outer sealed-box ephemeral key (32) + a next ratchet key (32).
ENTROPY_BYTES: Final = 64

__all__ = [
    "ENTROPY_BYTES",
    "Content",
    "PendingPrekey",
    "PrekeyMessage",
    "RatchetMessage",
    "ResponderKeys",
    "SealedV2",
    "SessionState",
    "accept_prekey",
    "decrypt",
    "open_outer",
    "parse_inner",
    "seal",
    "start",
]


class PendingPrekey(msgspec.Struct, frozen=True, kw_only=True):
    """The handshake fields the initiator repeats in every message until the peer has answered."""

    signed_prekey_id: int
    pq_prekey_id: int
    pq_last_resort: bool
    one_time_prekey_id: int | None
    ephemeral_key: bytes
    kem_ciphertext: bytes


class SessionState(msgspec.Struct, frozen=True, kw_only=True):
    """A session with one peer device, as stored (sealed) by the client."""

    session_id: bytes
    transcript_hash: bytes
    own_address: str
    peer_address: str
    peer_identity_key: bytes
    ratchet: ratchet.RatchetState
    created_at_ms: int
    last_received_ms: int = 0
    pending_prekey: PendingPrekey | None = None


class ResponderKeys(msgspec.Struct, frozen=True, kw_only=True):
    """The private prekeys a :class:`PrekeyMessage` names, loaded by the caller (unknown id → reject)."""

    signed_prekey_private: bytes
    pq_seed: bytes
    one_time_prekey_private: bytes | None = None


def _canonical(text: str) -> str:
    return str(Address.parse(text))


def start(
    *,
    own_address: str,
    identity_private_key: bytes,
    peer_address: str,
    peer_identity_key: bytes,
    prekeys: handshake.PeerPrekeys,
    ephemeral_private_key: bytes,
    ratchet_entropy: bytes,
    kem_ciphertext: bytes,
    kem_shared_secret: bytes,
    now_ms: int,
) -> SessionState:
    """The initiator's new session (§7.3 steps 2-4) from a verified bundle and ``(CT, SS)``.

    Raises ``prekey_invalid`` (bad lengths, low-order keys).
    """
    own = Address.parse(own_address)
    peer = Address.parse(peer_address)
    if not own.device or not peer.device:
        raise ValueError("sessions are between device addresses")
    result = handshake.initiate(
        own_device_id=own.device,
        identity_private_key=identity_private_key,
        peer_device_id=peer.device,
        peer_identity_key=peer_identity_key,
        prekeys=prekeys,
        ephemeral_private_key=ephemeral_private_key,
        kem_ciphertext=kem_ciphertext,
        kem_shared_secret=kem_shared_secret,
    )
    state = ratchet.init_alice(
        shared_key=result.shared_key,
        associated_data=result.associated_data,
        session_id=result.session_id,
        peer_ratchet_key=prekeys.signed_prekey,
        entropy=ratchet_entropy,
    )
    return SessionState(
        session_id=result.session_id,
        transcript_hash=result.transcript_hash,
        own_address=str(own),
        peer_address=str(peer),
        peer_identity_key=peer_identity_key,
        ratchet=state,
        created_at_ms=now_ms,
        pending_prekey=PendingPrekey(
            signed_prekey_id=prekeys.signed_prekey_id,
            pq_prekey_id=prekeys.pq_prekey_id,
            pq_last_resort=prekeys.pq_last_resort,
            one_time_prekey_id=prekeys.one_time_prekey_id,
            ephemeral_key=result.ephemeral_key,
            kem_ciphertext=kem_ciphertext,
        ),
    )


def seal(
    session: SessionState,
    *,
    sender_list_version: int,
    recipient_box_key: bytes,
    sent_at_ms: int,
    message_id: bytes,
    content_type: str,
    body: bytes,
    entropy: bytes,
) -> tuple[SessionState, bytes]:
    """Encrypt one message on ``session``: returns (advanced state, envelope ciphertext).

    ``entropy`` is :data:`ENTROPY_BYTES` fresh bytes (the first 32 are the
    outer ephemeral key; the rest is unused when sending). Store the returned
    state *before* submitting the ciphertext (§8.5).
    """
    if len(entropy) != ENTROPY_BYTES:
        raise ValueError(f"sealing needs {ENTROPY_BYTES} bytes of entropy")
    content = Content(
        recipient=session.peer_address,
        sent_at_ms=sent_at_ms,
        message_id=message_id,
        content_type=content_type,
        body=body,
    )
    state, message = ratchet.encrypt(session.ratchet, codec.encode(content))
    pending = session.pending_prekey
    kind: Literal[1, 2]
    if pending is not None:
        kind = 1
        inner_body = codec.encode(
            PrekeyMessage(
                signed_prekey_id=pending.signed_prekey_id,
                pq_prekey_id=pending.pq_prekey_id,
                pq_last_resort=pending.pq_last_resort,
                one_time_prekey_id=pending.one_time_prekey_id,
                ephemeral_key=pending.ephemeral_key,
                kem_ciphertext=pending.kem_ciphertext,
                message=message,
            )
        )
    else:
        kind, inner_body = 2, codec.encode(message)
    sealed = SealedV2(
        sender=session.own_address,
        sender_list_version=sender_list_version,
        kind=kind,
        session_id=session.session_id,
        body=inner_body,
    )
    inner = bytes([VERSION_2]) + codec.encode(sealed)
    ciphertext = seal_box(padding.pad(inner), recipient_box_key, entropy[:32])
    return msgspec.structs.replace(session, ratchet=state), ciphertext


def open_outer(ciphertext: bytes, box_private_key: bytes) -> bytes:
    """Open the sealed box and unpad: the ``inner`` plaintext of either version."""
    return unpad(open_box(ciphertext, box_private_key))


def parse_inner(inner: bytes) -> SealedV2 | None:
    """Dispatch on the first byte (§14): ``None`` for a v1 ``SealedContent`` map, the ``SealedV2`` for v2.

    Raises ``malformed_body`` for an empty plaintext, a reserved version byte
    (0x03-0x7f and anything else) or an undecodable ``SealedV2``.
    """
    if not inner:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "empty plaintext")
    first = inner[0]
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return None
    if first != VERSION_2:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, f"unknown payload version 0x{first:02x}")
    try:
        sealed = codec.decode(inner[1:], SealedV2)
        Address.parse(sealed.sender)
    except TetherlessError as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, f"sealed v2: {exc.detail or exc.code.value}") from exc
    return sealed


def prekey_message(sealed: SealedV2) -> PrekeyMessage:
    """The ``PrekeyMessage`` of a kind-1 ``SealedV2``; ``malformed_body`` otherwise."""
    if sealed.kind != KIND_PREKEY:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "not a prekey message")
    try:
        return codec.decode(sealed.body, PrekeyMessage)
    except TetherlessError as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, f"prekey message: {exc.detail or exc.code.value}") from exc


def _ratchet_message(sealed: SealedV2) -> RatchetMessage:
    if sealed.kind == KIND_PREKEY:
        return prekey_message(sealed).message
    try:
        return codec.decode(sealed.body, RatchetMessage)
    except TetherlessError as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, f"ratchet message: {exc.detail or exc.code.value}") from exc


def _content(plaintext: bytes, own_address: str) -> Content:
    try:
        content = codec.decode(plaintext, Content)
        recipient = _canonical(content.recipient)
    except TetherlessError as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, f"content: {exc.detail or exc.code.value}") from exc
    if recipient != _canonical(own_address):
        raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "message was encrypted for another recipient")
    return content


def decrypt(
    session: SessionState,
    sealed: SealedV2,
    *,
    entropy: bytes,
    now_ms: int,
    skipped_ttl_ms: int,
) -> tuple[SessionState, Content]:
    """Decrypt a ``SealedV2`` (either kind) on an existing session; the session must match sender and id.

    ``entropy``: 32 bytes for a possible DH ratchet step. Success clears the
    session's pending prekey fields (the peer has answered, §7.3 step 4). On
    failure raises ``InvalidPayloadError`` and ``session`` stays valid.
    """
    if _canonical(sealed.sender) != session.peer_address or not hmac.compare_digest(
        sealed.session_id, session.session_id
    ):
        raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "message is not for this session")
    message = _ratchet_message(sealed)
    state, plaintext = ratchet.decrypt(
        session.ratchet, message, entropy=entropy, now_ms=now_ms, skipped_ttl_ms=skipped_ttl_ms
    )
    content = _content(plaintext, session.own_address)
    return (
        msgspec.structs.replace(session, ratchet=state, pending_prekey=None, last_received_ms=now_ms),
        content,
    )


def accept_prekey(
    *,
    own_address: str,
    identity_private_key: bytes,
    sealed: SealedV2,
    sender_identity_key: bytes,
    keys: ResponderKeys,
    entropy: bytes,
    now_ms: int,
    skipped_ttl_ms: int,
) -> tuple[SessionState, Content]:
    """The responder's side (§7.3 step 5) for a kind-1 message with no session yet.

    ``sender_identity_key`` is the sender's ``box_key`` from its *verified*
    list; ``keys`` are the privates the message names. Recomputes ``SK``,
    checks the ``session_id``, decrypts; only a success returns a session
    (then the caller deletes the one-time privates used and records the
    transcript hash in its replay cache). Raises ``InvalidPayloadError``.
    """
    message = prekey_message(sealed)
    sender = Address.parse(sealed.sender)
    own = Address.parse(own_address)
    if not sender.device or not own.device:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "sessions are between device addresses")
    if (message.one_time_prekey_id is None) != (keys.one_time_prekey_private is None):
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "one-time prekey does not match the message")
    try:
        result = handshake.respond(
            own_device_id=own.device,
            identity_private_key=identity_private_key,
            peer_device_id=sender.device,
            peer_identity_key=sender_identity_key,
            signed_prekey_id=message.signed_prekey_id,
            signed_prekey_private=keys.signed_prekey_private,
            pq_prekey_id=message.pq_prekey_id,
            pq_last_resort=message.pq_last_resort,
            pq_seed=keys.pq_seed,
            one_time_prekey_id=message.one_time_prekey_id,
            one_time_prekey_private=keys.one_time_prekey_private,
            ephemeral_key=message.ephemeral_key,
            kem_ciphertext=message.kem_ciphertext,
        )
    except TetherlessError as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, f"handshake: {exc.detail or exc.code.value}") from exc
    if not hmac.compare_digest(result.session_id, sealed.session_id):
        raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "session id does not match the handshake")
    state = ratchet.init_bob(
        shared_key=result.shared_key,
        associated_data=result.associated_data,
        session_id=result.session_id,
        ratchet_private_key=keys.signed_prekey_private,
    )
    session = SessionState(
        session_id=result.session_id,
        transcript_hash=result.transcript_hash,
        own_address=str(own),
        peer_address=str(sender),
        peer_identity_key=sender_identity_key,
        ratchet=state,
        created_at_ms=now_ms,
    )
    return decrypt(session, sealed, entropy=entropy, now_ms=now_ms, skipped_ttl_ms=skipped_ttl_ms)
