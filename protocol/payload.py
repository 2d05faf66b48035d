"""Version-1 payload encryption: signed content in a libsodium sealed box.

What a sender puts in an envelope's ``ciphertext``::

    sealed_box(recipient_box_key, pad(msgpack(SealedContent)))

:class:`SealedContent` carries the sender's address and Ed25519 key and a
signature over :func:`content_layout` (docs/protocol.md §4), so only the
recipient learns who sent the message (sealed sender) and can check it.

The sealed box is libsodium's ``crypto_box_seal`` construction, written out
here so that the ephemeral key is *passed in* instead of drawn from a hidden
random source (this module is pure: deterministic given its inputs)::

    epk    = X25519 public key of the ephemeral private key esk
    nonce  = BLAKE2b-192(epk || recipient_box_key)
    output = epk || crypto_box(m, nonce, recipient_box_key, esk)

which ``nacl.public.SealedBox(...).decrypt`` opens unchanged.

Callers (the SDK) only use :class:`PayloadCipher`, so a later protocol
revision can replace sealed boxes with ratcheted sessions behind it.
"""

from __future__ import annotations

from typing import Annotated, Final, Protocol

import msgspec
import nacl.bindings
import nacl.exceptions
import nacl.signing
from msgspec import Meta

from . import codec, padding, signing
from .errors import ErrorCode, TetherlessError
from .ids import Address, device_id_for
from .messages import AddressText, IdempotencyKey, Message, Millis, PublicKey, Signature

BOX_KEY_BYTES: Final = 32
EPHEMERAL_KEY_BYTES: Final = 32
SEAL_OVERHEAD_BYTES: Final = 48  # ephemeral public key (32) + Poly1305 tag (16)
#: A file message (docs/decisions/0014-media-blobs.md D5): the body is a ``protocol.blobs.BlobRef`` as MessagePack —
#: where the encrypted file is, its key, digest and capability; the file itself never travels in the envelope.
FILE_CONTENT_TYPE: Final = "application/vnd.tetherless.file+msgpack"

ContentType = Annotated[str, Meta(min_length=1, max_length=255)]


class SealedContent(Message, frozen=True):
    """The plaintext of a version-1 envelope (before padding and encryption).

    ``message_id`` equals the envelope's idempotency key: a recipient can use
    it to drop redeliveries, and the sender's signature binds it.
    """

    sender: AddressText
    sender_sign_key: PublicKey
    recipient: AddressText
    sent_at_ms: Millis
    message_id: IdempotencyKey
    content_type: ContentType
    body: bytes
    signature: Signature


class Opened(msgspec.Struct, frozen=True):
    """A decrypted and verified message. ``sender`` is checked against ``sender_sign_key``."""

    sender: str
    sender_sign_key: bytes
    recipient: str
    sent_at_ms: int
    message_id: bytes
    content_type: str
    body: bytes


class InvalidPayloadError(TetherlessError):
    """A ciphertext that must not be trusted.

    ``code`` is ``malformed_body`` (cannot be decrypted, unpadded or decoded)
    or ``bad_signature`` (decrypts, but the signature, the sender's key or the
    recipient does not check out). Never carries plaintext in its detail.
    """


def content_layout(
    sender: str,
    sender_sign_key: bytes,
    recipient: str,
    sent_at_ms: int,
    message_id: bytes,
    content_type: str,
    body: bytes,
) -> bytes:
    """The bytes the sender signs (docs/protocol.md §4, "sealed message")."""
    return signing.layout("message", sender, sender_sign_key, recipient, sent_at_ms, message_id, content_type, body)


def _canonical_address(text: str) -> str:
    # Relay names are case-insensitive; compare addresses in the one form Address.parse gives.
    return str(Address.parse(text))


def seal(
    *,
    signing_key: nacl.signing.SigningKey,
    sender: str,
    recipient: str,
    recipient_box_key: bytes,
    sent_at_ms: int,
    message_id: bytes,
    content_type: str,
    body: bytes,
    ephemeral_private_key: bytes,
) -> bytes:
    """Sign, pad and encrypt one message to ``recipient_box_key``.

    ``ephemeral_private_key`` must be 32 fresh random bytes, used for this one
    message only (reusing it with the same recipient reuses the nonce).
    Raises ``ValueError`` when ``sender`` is not a device address of
    ``signing_key``, when a key has the wrong length, or when the recipient's
    box key is unusable (a low-order point), and ``invalid_field`` for an
    address that does not parse. Pure and deterministic.
    """
    if len(ephemeral_private_key) != EPHEMERAL_KEY_BYTES or len(recipient_box_key) != BOX_KEY_BYTES:
        raise ValueError("X25519 keys are 32 bytes")
    sender_sign_key = bytes(signing_key.verify_key)
    if Address.parse(sender).device != device_id_for(sender_sign_key):
        raise ValueError("sender address does not belong to this signing key")
    Address.parse(recipient)
    signature = signing.sign(
        signing_key,
        content_layout(sender, sender_sign_key, recipient, sent_at_ms, message_id, content_type, body),
    )
    content = SealedContent(
        sender=sender,
        sender_sign_key=sender_sign_key,
        recipient=recipient,
        sent_at_ms=sent_at_ms,
        message_id=message_id,
        content_type=content_type,
        body=body,
        signature=signature,
    )
    return _seal_box(padding.pad(codec.encode(content)), recipient_box_key, ephemeral_private_key)


def seal_box(plaintext: bytes, recipient_box_key: bytes, ephemeral_private_key: bytes) -> bytes:
    """libsodium ``crypto_box_seal`` of ``plaintext`` with an explicit ephemeral key (the module doc).

    Raises ``ValueError`` for a wrong key length or an unusable (low-order) recipient key.
    """
    if len(ephemeral_private_key) != EPHEMERAL_KEY_BYTES or len(recipient_box_key) != BOX_KEY_BYTES:
        raise ValueError("X25519 keys are 32 bytes")
    return _seal_box(plaintext, recipient_box_key, ephemeral_private_key)


def open_box(ciphertext: bytes, box_private_key: bytes) -> bytes:
    """Open a sealed box made by :func:`seal_box`; raises :class:`InvalidPayloadError` ``malformed_body``."""
    if len(box_private_key) != BOX_KEY_BYTES:
        raise ValueError("an X25519 private key is 32 bytes")
    public_key = nacl.bindings.crypto_scalarmult_base(box_private_key)
    try:
        return bytes(nacl.bindings.crypto_box_seal_open(ciphertext, public_key, box_private_key))
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "ciphertext does not decrypt") from exc


def _seal_box(plaintext: bytes, recipient_box_key: bytes, ephemeral_private_key: bytes) -> bytes:
    ephemeral_public_key = nacl.bindings.crypto_scalarmult_base(ephemeral_private_key)
    nonce = nacl.bindings.crypto_generichash_blake2b_salt_personal(
        ephemeral_public_key + recipient_box_key, digest_size=nacl.bindings.crypto_box_NONCEBYTES
    )
    try:
        boxed = nacl.bindings.crypto_box(plaintext, nonce, recipient_box_key, ephemeral_private_key)
    except nacl.exceptions.CryptoError as exc:  # libsodium refuses low-order public keys
        raise ValueError("recipient box key is not usable") from exc
    return bytes(ephemeral_public_key) + bytes(boxed)


def open(  # the natural name; this module never needs the builtin
    ciphertext: bytes, *, box_private_key: bytes, own_address: str
) -> Opened:
    """Decrypt, unpad, decode and verify a ciphertext made by :func:`seal`.

    Checks, in order: the sealed box opens with ``box_private_key``; the
    padding and the MessagePack are well formed; the sender's address names
    the device id of ``sender_sign_key`` (ids are self-certifying); the
    signature verifies; ``recipient`` is ``own_address`` (so a message signed
    for another device cannot be replayed to this one).

    Raises :class:`InvalidPayloadError` (``malformed_body`` or ``bad_signature``).
    It does **not** check that the sender's device belongs to the account in
    its address: that needs the account's device list (the SDK does it).
    Pure and deterministic.
    """
    return open_plaintext(unpad(open_box(ciphertext, box_private_key)), own_address=own_address)


def unpad(padded: bytes) -> bytes:
    """:func:`protocol.padding.unpad` raising :class:`InvalidPayloadError` ``malformed_body``."""
    try:
        return padding.unpad(padded)
    except TetherlessError as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, f"sealed content: {exc.detail or exc.code.value}") from exc


def open_plaintext(plaintext: bytes, *, own_address: str) -> Opened:
    """The checks of :func:`open` on an already decrypted and unpadded v1 plaintext (used by the v2 dispatch)."""
    try:
        content = codec.decode(plaintext, SealedContent)
    except TetherlessError as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, f"sealed content: {exc.detail or exc.code.value}") from exc
    try:
        sender = Address.parse(content.sender)
        recipient = _canonical_address(content.recipient)
    except TetherlessError as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "sealed content has a bad address") from exc
    if not sender.device or sender.device != device_id_for(content.sender_sign_key):
        raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "sender address does not match the sender's key")
    layout = content_layout(
        content.sender,
        content.sender_sign_key,
        content.recipient,
        content.sent_at_ms,
        content.message_id,
        content.content_type,
        content.body,
    )
    try:
        signing.verify(content.sender_sign_key, layout, content.signature)
    except TetherlessError as exc:
        raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "message signature does not verify") from exc
    if recipient != _canonical_address(own_address):
        raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "message was signed for another recipient")
    return Opened(
        sender=str(sender),
        sender_sign_key=content.sender_sign_key,
        recipient=content.recipient,
        sent_at_ms=content.sent_at_ms,
        message_id=content.message_id,
        content_type=content.content_type,
        body=content.body,
    )


class PayloadCipher(Protocol):
    """How a device turns message content into envelope ciphertext and back.

    The one seam between the SDK and payload cryptography: version 1 is
    :class:`SealedBoxCipher`; ratcheted sessions will be another implementation.
    """

    #: How many fresh random bytes :meth:`seal` needs per message.
    entropy_bytes: int

    def seal(
        self,
        *,
        recipient: str,
        recipient_box_key: bytes,
        sent_at_ms: int,
        message_id: bytes,
        content_type: str,
        body: bytes,
        entropy: bytes,
    ) -> bytes:
        """Encrypt one message to one recipient device; ``entropy`` is fresh CSPRNG output."""
        ...

    def open(self, ciphertext: bytes) -> Opened:
        """Decrypt and verify; raises :class:`InvalidPayloadError`."""
        ...


class SealedBoxCipher:
    """:class:`PayloadCipher` for protocol v1: one sealed box per message, no session state."""

    entropy_bytes: int = EPHEMERAL_KEY_BYTES

    def __init__(self, *, signing_key: nacl.signing.SigningKey, box_private_key: bytes, address: str) -> None:
        if len(box_private_key) != BOX_KEY_BYTES:
            raise ValueError("an X25519 private key is 32 bytes")
        self._signing_key = signing_key
        self._box_private_key = box_private_key
        self._address = address

    def seal(
        self,
        *,
        recipient: str,
        recipient_box_key: bytes,
        sent_at_ms: int,
        message_id: bytes,
        content_type: str,
        body: bytes,
        entropy: bytes,
    ) -> bytes:
        """See :func:`seal`; ``entropy`` is the ephemeral X25519 private key."""
        return seal(
            signing_key=self._signing_key,
            sender=self._address,
            recipient=recipient,
            recipient_box_key=recipient_box_key,
            sent_at_ms=sent_at_ms,
            message_id=message_id,
            content_type=content_type,
            body=body,
            ephemeral_private_key=entropy,
        )

    def open(self, ciphertext: bytes) -> Opened:
        """See :func:`open`."""
        return open(ciphertext, box_private_key=self._box_private_key, own_address=self._address)
