"""Signal's Double Ratchet without header encryption (docs/crypto.md §8.2-§8.4).

Pure functions over immutable state, ``(state, input, entropy) -> (state', output)``::

    KDF_RK(rk, dh_out) = HKDF(salt=rk, ikm=dh_out, info("dr-root"), 64)       -> rk' || ck
    KDF_CK(ck)         = (HMAC(ck, 0x02), HMAC(ck, 0x01))                    -> ck', mk
    key || nonce       = HKDF(0^32, mk, info("dr-message"), 44)
    ciphertext         = ChaCha20-Poly1305(key, nonce, plaintext,
                             aad = layout("dr-message", AD, session_id, ratchet_key, pn, n))

:class:`RatchetState` is a msgspec Struct: ``protocol.codec.encode`` stores it,
``codec.decode(raw, RatchetState)`` loads it. :func:`decrypt` works on a copy,
so a failure (``InvalidPayloadError``) leaves the caller's state as it was.
Skipped message keys are bounded: at most :data:`MAX_SKIP` per step and
:data:`MAX_SKIPPED_PER_SESSION` per session (oldest evicted), each expiring
at ``now_ms + skipped_ttl_ms``; a used key is deleted.
"""

from __future__ import annotations

import hmac
from typing import Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from . import signing
from .errors import ErrorCode
from .handshake import dh, hkdf, x25519_public
from .messages import RatchetMessage
from .payload import InvalidPayloadError

MAX_SKIP: Final = 1_000
MAX_SKIPPED_PER_SESSION: Final = 2_000
MAX_CHAIN_LENGTH: Final = 2**32 - 1
KEY_BYTES: Final = 32
NONCE_BYTES: Final = 12


class SkippedKey(msgspec.Struct, frozen=True, kw_only=True):
    """A message key kept for a message that has not arrived yet (``ratchet_key``, ``n``)."""

    ratchet_key: bytes
    n: int
    message_key: bytes
    expires_at_ms: int


class RatchetState(msgspec.Struct, frozen=True, kw_only=True):
    """One session's ratchet (Signal's names in comments). Secret: store it only sealed (crypto.md §13)."""

    session_id: bytes
    associated_data: bytes  # AD from the handshake
    root_key: bytes  # RK
    sending_private_key: bytes  # DHs (private)
    sending_public_key: bytes  # DHs (public)
    receiving_key: bytes | None = None  # DHr
    sending_chain_key: bytes | None = None  # CKs
    receiving_chain_key: bytes | None = None  # CKr
    sent: int = 0  # Ns
    received: int = 0  # Nr
    previous_sent: int = 0  # PN
    skipped: list[SkippedKey] = msgspec.field(default_factory=list)


# -- KDFs -------------------------------------------------------------------------------------


def kdf_rk(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """``KDF_RK``: (new root key, new chain key)."""
    out = hkdf(root_key, dh_out, signing.layout("dr-root"), 64)
    return out[:32], out[32:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """``KDF_CK``: (next chain key, message key)."""
    return (
        hmac.digest(chain_key, b"\x02", "sha256"),
        hmac.digest(chain_key, b"\x01", "sha256"),
    )


def message_key_material(message_key: bytes) -> tuple[bytes, bytes]:
    """The AEAD (key, nonce) of a message key."""
    out = hkdf(bytes(32), message_key, signing.layout("dr-message"), KEY_BYTES + NONCE_BYTES)
    return out[:KEY_BYTES], out[KEY_BYTES:]


def message_aad(state: RatchetState, ratchet_key: bytes, previous_chain_length: int, n: int) -> bytes:
    return signing.layout("dr-message", state.associated_data, state.session_id, ratchet_key, previous_chain_length, n)


# -- initialisation -----------------------------------------------------------------------------


def init_alice(
    *, shared_key: bytes, associated_data: bytes, session_id: bytes, peer_ratchet_key: bytes, entropy: bytes
) -> RatchetState:
    """``RatchetInitAlice(SK, SPK_B)``: ``entropy`` (32 bytes) is A's first ratchet private key."""
    if len(entropy) != 32:
        raise ValueError("a ratchet key needs 32 bytes of entropy")
    root_key, chain_key = kdf_rk(shared_key, dh(entropy, peer_ratchet_key))
    return RatchetState(
        session_id=session_id,
        associated_data=associated_data,
        root_key=root_key,
        sending_private_key=entropy,
        sending_public_key=x25519_public(entropy),
        receiving_key=peer_ratchet_key,
        sending_chain_key=chain_key,
    )


def init_bob(
    *, shared_key: bytes, associated_data: bytes, session_id: bytes, ratchet_private_key: bytes
) -> RatchetState:
    """``RatchetInitBob(SK, SPK_B key pair)``."""
    return RatchetState(
        session_id=session_id,
        associated_data=associated_data,
        root_key=shared_key,
        sending_private_key=ratchet_private_key,
        sending_public_key=x25519_public(ratchet_private_key),
    )


# -- encrypt / decrypt --------------------------------------------------------------------------


def encrypt(state: RatchetState, plaintext: bytes) -> tuple[RatchetState, RatchetMessage]:
    """``RatchetEncrypt``. Raises ``ValueError`` when the session cannot send (Bob before any message, or
    a sending chain at 2^32 - 1: start a new session)."""
    if state.sending_chain_key is None:
        raise ValueError("this session cannot send before it has received a message")
    if state.sent >= MAX_CHAIN_LENGTH:
        raise ValueError("sending chain exhausted: start a new session")
    chain_key, message_key = kdf_ck(state.sending_chain_key)
    key, nonce = message_key_material(message_key)
    aad = message_aad(state, state.sending_public_key, state.previous_sent, state.sent)
    message = RatchetMessage(
        ratchet_key=state.sending_public_key,
        previous_chain_length=state.previous_sent,
        n=state.sent,
        ciphertext=ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad),
    )
    return msgspec.structs.replace(state, sending_chain_key=chain_key, sent=state.sent + 1), message


class _Work(msgspec.Struct):
    """A mutable copy of the state used while decrypting (the spec's pseudocode mutates)."""

    state: RatchetState
    root_key: bytes
    sending_private_key: bytes
    sending_public_key: bytes
    receiving_key: bytes | None
    sending_chain_key: bytes | None
    receiving_chain_key: bytes | None
    sent: int
    received: int
    previous_sent: int
    skipped: list[SkippedKey] = msgspec.field(default_factory=list)

    @classmethod
    def of(cls, s: RatchetState, now_ms: int) -> _Work:
        return cls(
            state=s,
            root_key=s.root_key,
            sending_private_key=s.sending_private_key,
            sending_public_key=s.sending_public_key,
            receiving_key=s.receiving_key,
            sending_chain_key=s.sending_chain_key,
            receiving_chain_key=s.receiving_chain_key,
            sent=s.sent,
            received=s.received,
            previous_sent=s.previous_sent,
            skipped=[k for k in s.skipped if k.expires_at_ms > now_ms],
        )

    def result(self) -> RatchetState:
        return msgspec.structs.replace(
            self.state,
            root_key=self.root_key,
            sending_private_key=self.sending_private_key,
            sending_public_key=self.sending_public_key,
            receiving_key=self.receiving_key,
            sending_chain_key=self.sending_chain_key,
            receiving_chain_key=self.receiving_chain_key,
            sent=self.sent,
            received=self.received,
            previous_sent=self.previous_sent,
            skipped=self.skipped,
        )

    def skip_until(self, until: int, expires_at_ms: int) -> None:
        if until - self.received > MAX_SKIP:
            raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "message is too far ahead in its chain")
        if self.receiving_chain_key is None or self.receiving_key is None:
            return
        while self.received < until:
            self.receiving_chain_key, message_key = kdf_ck(self.receiving_chain_key)
            self.skipped.append(
                SkippedKey(
                    ratchet_key=self.receiving_key,
                    n=self.received,
                    message_key=message_key,
                    expires_at_ms=expires_at_ms,
                )
            )
            self.received += 1
        if len(self.skipped) > MAX_SKIPPED_PER_SESSION:
            del self.skipped[: len(self.skipped) - MAX_SKIPPED_PER_SESSION]

    def dh_ratchet(self, ratchet_key: bytes, entropy: bytes) -> None:
        self.previous_sent = self.sent
        self.sent = 0
        self.received = 0
        self.receiving_key = ratchet_key
        self.root_key, self.receiving_chain_key = kdf_rk(self.root_key, dh(self.sending_private_key, ratchet_key))
        self.sending_private_key = entropy
        self.sending_public_key = x25519_public(entropy)
        self.root_key, self.sending_chain_key = kdf_rk(self.root_key, dh(self.sending_private_key, ratchet_key))


def _open(state: RatchetState, message_key: bytes, message: RatchetMessage) -> bytes:
    key, nonce = message_key_material(message_key)
    aad = message_aad(state, message.ratchet_key, message.previous_chain_length, message.n)
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, message.ciphertext, aad)
    except InvalidTag as exc:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "ratchet message does not decrypt") from exc


def decrypt(
    state: RatchetState,
    message: RatchetMessage,
    *,
    entropy: bytes,
    now_ms: int,
    skipped_ttl_ms: int,
) -> tuple[RatchetState, bytes]:
    """``RatchetDecrypt`` on a copy of ``state``; returns (new state, plaintext).

    ``entropy`` (32 bytes) becomes the next sending ratchet key if this
    message starts a DH ratchet step (otherwise it is unused). Expired skipped
    keys are dropped. Raises :class:`InvalidPayloadError` ``malformed_body``
    (does not decrypt, a replay of a used key, too far ahead, low-order
    ratchet key); the input state is never changed.
    """
    if len(entropy) != 32:
        raise ValueError("a ratchet key needs 32 bytes of entropy")
    work = _Work.of(state, now_ms)
    for index, skipped in enumerate(work.skipped):
        if skipped.n == message.n and hmac.compare_digest(skipped.ratchet_key, message.ratchet_key):
            plaintext = _open(state, skipped.message_key, message)
            del work.skipped[index]
            return work.result(), plaintext
    expires_at_ms = now_ms + skipped_ttl_ms
    try:
        if work.receiving_key is None or not hmac.compare_digest(message.ratchet_key, work.receiving_key):
            work.skip_until(message.previous_chain_length, expires_at_ms)
            work.dh_ratchet(message.ratchet_key, entropy)
        work.skip_until(message.n, expires_at_ms)
    except InvalidPayloadError:
        raise
    except Exception as exc:  # a low-order ratchet key (prekey_invalid from dh)
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "bad ratchet key") from exc
    if message.n < work.received or work.receiving_chain_key is None:
        raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "message key already used or unknown")
    work.receiving_chain_key, message_key = kdf_ck(work.receiving_chain_key)
    work.received += 1
    plaintext = _open(state, message_key, message)
    return work.result(), plaintext
