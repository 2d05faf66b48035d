"""A post-quantum hybrid wrap: X25519 + ML-KEM-768 to a pair of public keys (docs/crypto.md §12.1).

Pure: the X25519 ephemeral private key and the ML-KEM encapsulation result
``(CT, SS)`` are passed in (``cryptography``'s ``encapsulate`` draws its own
randomness, so the SDK calls :func:`protocol.handshake.encapsulate` and hands
the result here, as for the session handshake). Used for account-key grants
in the log (account-log.md §5.1) and, later, the recovery-key backup, so the
recipient is a pair of public keys, not a device entry::

    ss_x   = X25519(esk, pk_x)                      (all-zero output refused)
    ss_m   = ML-KEM-768.Decaps(sk_m, ct_m)          (sender: Encaps(pk_m))
    k      = HKDF-SHA-256(salt = layout("hybrid-wrap-salt"),
                          ikm  = layout("hybrid-wrap-ikm", ss_m, ss_x),
                          info = layout("hybrid-wrap", context, epk, ct_m, pk_x, SHA-256(pk_m)), 32)
    wrap   = epk(32) ‖ ct_m(1088) ‖ ChaCha20-Poly1305(k, nonce = 0^12, payload, ad = context)

Both shared secrets enter the IKM, so the key stays secret while either
X25519 or ML-KEM-768 holds (a KEM combiner in the style of X-Wing and the
HPKE hybrid KEMs). Binding both ciphertexts and both recipient keys makes the
combiner robust even without relying on ML-KEM's ciphertext binding: a relay
that swaps or zeroes the ML-KEM share, or re-targets the wrap to other keys,
changes ``k`` and the AEAD fails. ``context`` binds the use (account, epoch,
device id, …), so a wrap cannot be moved to another recipient slot. ``k`` is
used for exactly one message, so the fixed nonce is safe.
"""

from __future__ import annotations

import hashlib
from typing import Final

import msgspec
import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives.asymmetric import mlkem

from . import handshake, signing
from .errors import ErrorCode, TetherlessError

X25519_BYTES: Final = 32
MLKEM_CIPHERTEXT_BYTES: Final = handshake.MLKEM_CIPHERTEXT_BYTES  # 1088
MLKEM_PUBLIC_KEY_BYTES: Final = handshake.MLKEM_PUBLIC_KEY_BYTES  # 1184
TAG_BYTES: Final = nacl.bindings.crypto_aead_chacha20poly1305_ietf_ABYTES  # 16
OVERHEAD_BYTES: Final = X25519_BYTES + MLKEM_CIPHERTEXT_BYTES + TAG_BYTES  # 1136
_NONCE: Final = bytes(nacl.bindings.crypto_aead_chacha20poly1305_ietf_NPUBBYTES)
SALT_DOMAIN: Final = "hybrid-wrap-salt"
IKM_DOMAIN: Final = "hybrid-wrap-ikm"
INFO_DOMAIN: Final = "hybrid-wrap"


class HybridWrapError(TetherlessError):
    """A wrap that does not open (``malformed_body``): wrong keys, tampered share, context or payload."""


class HybridRecipient(msgspec.Struct, frozen=True):
    """The two public keys a wrap is addressed to: X25519 (32 bytes) and ML-KEM-768 (1184 bytes)."""

    x25519_public: bytes
    kem_public: bytes


def derive_key(
    *,
    context: bytes,
    x25519_shared: bytes,
    kem_shared: bytes,
    ephemeral_public: bytes,
    kem_ciphertext: bytes,
    recipient: HybridRecipient,
) -> bytes:
    """The combiner: the 32-byte wrap key from both shared secrets, both ciphertexts and both recipient keys."""
    if len(x25519_shared) != 32 or len(kem_shared) != handshake.MLKEM_SHARED_SECRET_BYTES:
        raise ValueError("both shared secrets are 32 bytes")
    info = signing.layout(
        INFO_DOMAIN,
        context,
        ephemeral_public,
        kem_ciphertext,
        recipient.x25519_public,
        hashlib.sha256(recipient.kem_public).digest(),
    )
    return handshake.hkdf(signing.layout(SALT_DOMAIN), signing.layout(IKM_DOMAIN, kem_shared, x25519_shared), info, 32)


def seal(
    recipient: HybridRecipient,
    payload: bytes,
    *,
    context: bytes,
    ephemeral_private_key: bytes,
    kem_ciphertext: bytes,
    kem_shared_secret: bytes,
) -> bytes:
    """Wrap ``payload`` to ``recipient``. ``ephemeral_private_key``: 32 fresh random bytes; ``(kem_ciphertext,
    kem_shared_secret)``: a fresh :func:`protocol.handshake.encapsulate` to ``recipient.kem_public``.

    Deterministic given its inputs. Raises ``ValueError`` for wrong lengths and
    :class:`HybridWrapError` for an X25519 key of low order.
    """
    if len(recipient.x25519_public) != X25519_BYTES or len(recipient.kem_public) != MLKEM_PUBLIC_KEY_BYTES:
        raise ValueError("a hybrid recipient is an X25519 key (32 bytes) and an ML-KEM-768 key (1184 bytes)")
    if len(ephemeral_private_key) != X25519_BYTES or len(kem_ciphertext) != MLKEM_CIPHERTEXT_BYTES:
        raise ValueError("ephemeral key 32 bytes, ML-KEM ciphertext 1088 bytes")
    ephemeral_public = handshake.x25519_public(ephemeral_private_key)
    x25519_shared = _dh(ephemeral_private_key, recipient.x25519_public)
    key = derive_key(
        context=context,
        x25519_shared=x25519_shared,
        kem_shared=kem_shared_secret,
        ephemeral_public=ephemeral_public,
        kem_ciphertext=kem_ciphertext,
        recipient=recipient,
    )
    sealed = nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(payload, context, _NONCE, key)
    return ephemeral_public + kem_ciphertext + bytes(sealed)


def open_wrap(x25519_private_key: bytes, kem_seed: bytes, wrapped: bytes, *, context: bytes) -> bytes:
    """Inverse of :func:`seal` with the recipient's private keys (X25519 key, 64-byte ML-KEM seed).

    Raises :class:`HybridWrapError` (``malformed_body``) when anything was
    changed: either share, the context, the payload, or the wrap was for other keys.
    """
    if len(wrapped) < OVERHEAD_BYTES:
        raise HybridWrapError(ErrorCode.MALFORMED_BODY, "hybrid wrap is truncated")
    ephemeral_public = wrapped[:X25519_BYTES]
    kem_ciphertext = wrapped[X25519_BYTES : X25519_BYTES + MLKEM_CIPHERTEXT_BYTES]
    if len(kem_seed) != handshake.MLKEM_SEED_BYTES:
        raise ValueError("an ML-KEM-768 seed is 64 bytes")
    kem_private = mlkem.MLKEM768PrivateKey.from_seed_bytes(kem_seed)  # once: key generation dominates the cost
    recipient = HybridRecipient(
        x25519_public=handshake.x25519_public(x25519_private_key),
        kem_public=kem_private.public_key().public_bytes_raw(),
    )
    key = derive_key(
        context=context,
        x25519_shared=_dh(x25519_private_key, ephemeral_public),
        kem_shared=kem_private.decapsulate(kem_ciphertext),
        ephemeral_public=ephemeral_public,
        kem_ciphertext=kem_ciphertext,
        recipient=recipient,
    )
    try:
        return bytes(
            nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
                wrapped[X25519_BYTES + MLKEM_CIPHERTEXT_BYTES :], context, _NONCE, key
            )
        )
    except nacl.exceptions.CryptoError:
        raise HybridWrapError(ErrorCode.MALFORMED_BODY, "hybrid wrap does not open") from None


def _dh(private_key: bytes, public_key: bytes) -> bytes:
    try:
        return handshake.dh(private_key, public_key)
    except TetherlessError as exc:
        raise HybridWrapError(ErrorCode.MALFORMED_BODY, "hybrid wrap: unusable X25519 key") from exc


__all__ = ["OVERHEAD_BYTES", "HybridRecipient", "HybridWrapError", "derive_key", "open_wrap", "seal"]
