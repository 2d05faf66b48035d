"""The hybrid session handshake: PQXDH with X25519 and ML-KEM-768 (docs/crypto.md §7.3).

Initiator A writes to responder B using B's prekey bundle::

    DH1 = DH(IK_A, SPK_B)  DH2 = DH(EK_A, IK_B)  DH3 = DH(EK_A, SPK_B)  DH4 = DH(EK_A, OPK_B) (if present)
    TH  = digest("pqxdh-transcript", A.device_id, IK_A, B.device_id, IK_B, spk_id, SPK_B,
                 pq_id, pq_kind, H(PQPK_B), opk_id or 0, OPK_B or b"", EK_A, CT)
    SK  = HKDF(0^32, 0xFF^32 || DH1 || DH2 || DH3 [|| DH4] || SS, info("pqxdh", PQXDH_INFO, TH), 32)
    AD  = layout("session-ad", A.device_id, IK_A, B.device_id, IK_B, TH)
    session_id = digest("session-id", TH)[0:16]

``IK`` are the devices' X25519 ``box_key``s. ML-KEM-768 private keys exist
only as 64-byte seeds (``d || z``). The one randomised primitive (ML-KEM
``encapsulate``) is called by the SDK (:func:`encapsulate` is that call), and
its result ``(CT, SS)`` is passed in, so everything here is pure and
deterministic given its inputs. An all-zero X25519 output (a low-order peer
key) is refused with ``prekey_invalid`` — the one error code of this module,
raised for every unusable key, prekey or ciphertext length.
"""

from __future__ import annotations

import hashlib
from typing import Final

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import signing
from .errors import ErrorCode, TetherlessError

PQXDH_INFO: Final = "Tetherless_X25519_SHA-256_ML-KEM-768"
X25519_KEY_BYTES: Final = 32
MLKEM_SEED_BYTES: Final = 64
MLKEM_PUBLIC_KEY_BYTES: Final = 1184
MLKEM_CIPHERTEXT_BYTES: Final = 1088
MLKEM_SHARED_SECRET_BYTES: Final = 32
SESSION_ID_BYTES: Final = 16
PQ_KIND_ONE_TIME: Final = 1
PQ_KIND_LAST_RESORT: Final = 2
_F: Final = b"\xff" * 32


def _invalid(detail: str) -> TetherlessError:
    return TetherlessError(ErrorCode.PREKEY_INVALID, detail)


# -- primitives ------------------------------------------------------------------------------


def x25519_public(private_key: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (RFC 7748 clamping applies)."""
    if len(private_key) != X25519_KEY_BYTES:
        raise ValueError("an X25519 private key is 32 bytes")
    return x25519.X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def dh(private_key: bytes, public_key: bytes) -> bytes:
    """X25519(private, public); raises ``prekey_invalid`` for a bad length or an all-zero output."""
    if len(private_key) != X25519_KEY_BYTES or len(public_key) != X25519_KEY_BYTES:
        raise _invalid("X25519 keys are 32 bytes")
    try:
        out = x25519.X25519PrivateKey.from_private_bytes(private_key).exchange(
            x25519.X25519PublicKey.from_public_bytes(public_key)
        )
    except ValueError as exc:  # OpenSSL refuses the all-zero shared secret itself
        raise _invalid("X25519 output is all zero (low-order key)") from exc
    if out == bytes(X25519_KEY_BYTES):  # pragma: no cover - OpenSSL already refuses it
        raise _invalid("X25519 output is all zero (low-order key)")
    return out


def mlkem_public(seed: bytes) -> bytes:
    """The ML-KEM-768 encapsulation key (1,184 bytes) of a 64-byte seed ``d || z`` (FIPS 203 KeyGen_internal)."""
    if len(seed) != MLKEM_SEED_BYTES:
        raise ValueError("an ML-KEM-768 seed is 64 bytes")
    return mlkem.MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()


def mlkem_check_public(public_key: bytes) -> None:
    """Raise ``prekey_invalid`` unless ``public_key`` is an encapsulation key ``cryptography`` accepts."""
    if len(public_key) != MLKEM_PUBLIC_KEY_BYTES:
        raise _invalid("an ML-KEM-768 public key is 1184 bytes")
    try:
        mlkem.MLKEM768PublicKey.from_public_bytes(public_key)
    except ValueError as exc:
        raise _invalid("ML-KEM-768 public key is not valid") from exc


def mlkem_decapsulate(seed: bytes, ciphertext: bytes) -> bytes:
    """ML-KEM-768 decapsulation with the key of ``seed``; deterministic (implicit rejection on a bad ``ct``)."""
    if len(seed) != MLKEM_SEED_BYTES:
        raise ValueError("an ML-KEM-768 seed is 64 bytes")
    if len(ciphertext) != MLKEM_CIPHERTEXT_BYTES:
        raise _invalid("an ML-KEM-768 ciphertext is 1088 bytes")
    return mlkem.MLKEM768PrivateKey.from_seed_bytes(seed).decapsulate(ciphertext)


def encapsulate(public_key: bytes) -> tuple[bytes, bytes]:
    """``(CT, SS) = Encaps(public_key)`` — draws its own randomness: SDK use only, never in a pure path."""
    mlkem_check_public(public_key)
    shared_secret, ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(public_key).encapsulate()
    return ciphertext, shared_secret


def hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA-256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


# -- the handshake -----------------------------------------------------------------------------


class PeerPrekeys(msgspec.Struct, frozen=True):
    """The responder's prekeys as the initiator took them from a *verified* bundle (§7.3 step 1)."""

    signed_prekey_id: int
    signed_prekey: bytes
    pq_prekey_id: int
    pq_last_resort: bool
    pq_prekey: bytes
    one_time_prekey_id: int | None = None
    one_time_prekey: bytes | None = None


class HandshakeResult(msgspec.Struct, frozen=True):
    """What both sides derive. ``ephemeral_key`` is ``EK_A`` (public), sent in the PrekeyMessage."""

    transcript_hash: bytes
    shared_key: bytes
    associated_data: bytes
    session_id: bytes
    ephemeral_key: bytes


def _derive(
    *,
    initiator_device_id: str,
    initiator_identity_key: bytes,
    responder_device_id: str,
    responder_identity_key: bytes,
    prekeys: PeerPrekeys,
    ephemeral_key: bytes,
    kem_ciphertext: bytes,
    dh_outputs: list[bytes],
    kem_shared_secret: bytes,
) -> HandshakeResult:
    if len(kem_shared_secret) != MLKEM_SHARED_SECRET_BYTES:
        raise ValueError("an ML-KEM-768 shared secret is 32 bytes")
    th = signing.digest(
        "pqxdh-transcript",
        initiator_device_id,
        initiator_identity_key,
        responder_device_id,
        responder_identity_key,
        prekeys.signed_prekey_id,
        prekeys.signed_prekey,
        prekeys.pq_prekey_id,
        PQ_KIND_LAST_RESORT if prekeys.pq_last_resort else PQ_KIND_ONE_TIME,
        hashlib.sha256(prekeys.pq_prekey).digest(),
        prekeys.one_time_prekey_id if prekeys.one_time_prekey_id is not None else 0,
        prekeys.one_time_prekey or b"",
        ephemeral_key,
        kem_ciphertext,
    )
    sk = hkdf(bytes(32), _F + b"".join(dh_outputs) + kem_shared_secret, signing.layout("pqxdh", PQXDH_INFO, th), 32)
    ad = signing.layout(
        "session-ad", initiator_device_id, initiator_identity_key, responder_device_id, responder_identity_key, th
    )
    return HandshakeResult(
        transcript_hash=th,
        shared_key=sk,
        associated_data=ad,
        session_id=signing.digest("session-id", th)[:SESSION_ID_BYTES],
        ephemeral_key=ephemeral_key,
    )


def _check_prekeys(prekeys: PeerPrekeys) -> None:
    if len(prekeys.signed_prekey) != X25519_KEY_BYTES:
        raise _invalid("a signed prekey is 32 bytes")
    if (prekeys.one_time_prekey is None) != (prekeys.one_time_prekey_id is None):
        raise _invalid("a one-time prekey needs its id and vice versa")
    if prekeys.one_time_prekey is not None and len(prekeys.one_time_prekey) != X25519_KEY_BYTES:
        raise _invalid("a one-time prekey is 32 bytes")
    if len(prekeys.pq_prekey) != MLKEM_PUBLIC_KEY_BYTES:
        raise _invalid("an ML-KEM-768 public key is 1184 bytes")


def initiate(
    *,
    own_device_id: str,
    identity_private_key: bytes,
    peer_device_id: str,
    peer_identity_key: bytes,
    prekeys: PeerPrekeys,
    ephemeral_private_key: bytes,
    kem_ciphertext: bytes,
    kem_shared_secret: bytes,
) -> HandshakeResult:
    """A's side (§7.3 steps 2-3): ``(CT, SS)`` come from :func:`encapsulate` of ``prekeys.pq_prekey``.

    The caller has verified the bundle's signatures and that ``peer_identity_key``
    is the peer's ``box_key`` in its verified list. Raises ``prekey_invalid`` for
    a bad key length, a low-order key or a ciphertext of the wrong size.
    """
    _check_prekeys(prekeys)
    if len(kem_ciphertext) != MLKEM_CIPHERTEXT_BYTES:
        raise _invalid("an ML-KEM-768 ciphertext is 1088 bytes")
    dhs = [
        dh(identity_private_key, prekeys.signed_prekey),
        dh(ephemeral_private_key, peer_identity_key),
        dh(ephemeral_private_key, prekeys.signed_prekey),
    ]
    if prekeys.one_time_prekey is not None:
        dhs.append(dh(ephemeral_private_key, prekeys.one_time_prekey))
    return _derive(
        initiator_device_id=own_device_id,
        initiator_identity_key=x25519_public(identity_private_key),
        responder_device_id=peer_device_id,
        responder_identity_key=peer_identity_key,
        prekeys=prekeys,
        ephemeral_key=x25519_public(ephemeral_private_key),
        kem_ciphertext=kem_ciphertext,
        dh_outputs=dhs,
        kem_shared_secret=kem_shared_secret,
    )


def respond(
    *,
    own_device_id: str,
    identity_private_key: bytes,
    peer_device_id: str,
    peer_identity_key: bytes,
    signed_prekey_id: int,
    signed_prekey_private: bytes,
    pq_prekey_id: int,
    pq_last_resort: bool,
    pq_seed: bytes,
    one_time_prekey_id: int | None,
    one_time_prekey_private: bytes | None,
    ephemeral_key: bytes,
    kem_ciphertext: bytes,
) -> HandshakeResult:
    """B's side (§7.3 step 5), fully deterministic: decapsulates ``kem_ciphertext`` with ``pq_seed``.

    ``peer_identity_key`` is A's ``box_key`` from A's verified list. Raises
    ``prekey_invalid`` for a bad length or low-order key. A wrong ciphertext
    does not raise here (ML-KEM rejects implicitly): the first ratchet message
    then fails to decrypt.
    """
    if (one_time_prekey_id is None) != (one_time_prekey_private is None):
        raise _invalid("a one-time prekey needs its id and vice versa")
    ss = mlkem_decapsulate(pq_seed, kem_ciphertext)
    dhs = [
        dh(signed_prekey_private, peer_identity_key),
        dh(identity_private_key, ephemeral_key),
        dh(signed_prekey_private, ephemeral_key),
    ]
    opk_public: bytes | None = None
    if one_time_prekey_private is not None:
        dhs.append(dh(one_time_prekey_private, ephemeral_key))
        opk_public = x25519_public(one_time_prekey_private)
    prekeys = PeerPrekeys(
        signed_prekey_id=signed_prekey_id,
        signed_prekey=x25519_public(signed_prekey_private),
        pq_prekey_id=pq_prekey_id,
        pq_last_resort=pq_last_resort,
        pq_prekey=mlkem_public(pq_seed),
        one_time_prekey_id=one_time_prekey_id,
        one_time_prekey=opk_public,
    )
    return _derive(
        initiator_device_id=peer_device_id,
        initiator_identity_key=peer_identity_key,
        responder_device_id=own_device_id,
        responder_identity_key=x25519_public(identity_private_key),
        prekeys=prekeys,
        ephemeral_key=ephemeral_key,
        kem_ciphertext=kem_ciphertext,
        dh_outputs=dhs,
        kem_shared_secret=ss,
    )
