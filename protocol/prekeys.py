"""Signed prekeys: their layout, signing and the checks relay and sender both run (docs/crypto.md §7.1).

Every public prekey a device publishes is signed by the device's Ed25519 key::

    signature = Sig(sign_key, layout("prekey", device_id, kind, key_id, public_key, created_at_ms))

The ``kind`` string keeps X25519 and ML-KEM-768 encodings disjoint. The relay
runs :func:`verify_prekey` on upload; a sender runs :func:`verify_bundle` on a
claimed bundle against the *verified* device list entry, so a relay can
neither substitute a key nor pass one kind off as another. Pure: no I/O, no
clock, no randomness.
"""

from __future__ import annotations

from typing import Final

import nacl.signing
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey

from . import signing
from .errors import ErrorCode, TetherlessError
from .messages import DeviceEntry, PrekeyBundle, PrekeyKind, SignedPrekey

X25519_SIGNED: Final = "x25519-signed"
MLKEM_LAST_RESORT: Final = "mlkem768-last-resort"
X25519_ONE_TIME: Final = "x25519-one-time"
MLKEM_ONE_TIME: Final = "mlkem768-one-time"

X25519_KEY_BYTES: Final = 32
MLKEM768_KEY_BYTES: Final = 1184

#: The exact public-key length of each kind.
KEY_BYTES: Final[dict[str, int]] = {
    X25519_SIGNED: X25519_KEY_BYTES,
    X25519_ONE_TIME: X25519_KEY_BYTES,
    MLKEM_LAST_RESORT: MLKEM768_KEY_BYTES,
    MLKEM_ONE_TIME: MLKEM768_KEY_BYTES,
}


def prekey_layout(device_id: str, kind: str, key_id: int, public_key: bytes, created_at_ms: int) -> bytes:
    """The bytes a prekey signature covers."""
    return signing.layout("prekey", device_id, kind, key_id, public_key, created_at_ms)


def sign_prekey(
    signing_key: nacl.signing.SigningKey,
    device_id: str,
    kind: PrekeyKind,
    key_id: int,
    public_key: bytes,
    created_at_ms: int,
) -> SignedPrekey:
    """Sign one public prekey of ``device_id`` (the id of ``signing_key``'s public key)."""
    signature = signing.sign(signing_key, prekey_layout(device_id, kind, key_id, public_key, created_at_ms))
    return SignedPrekey(
        kind=kind, key_id=key_id, public_key=public_key, created_at_ms=created_at_ms, signature=signature
    )


def verify_prekey(sign_key: bytes, device_id: str, prekey: SignedPrekey, *, kind: str | None = None) -> None:
    """Check one prekey of ``device_id`` whose Ed25519 key is ``sign_key``.

    Raises ``prekey_invalid`` when ``kind`` is given and differs from the
    prekey's, when the public key has the wrong length for its kind, when an
    ML-KEM-768 key is not accepted by ``MLKEM768PublicKey.from_public_bytes``,
    or when the signature does not verify. Pure; idempotent.
    """
    if kind is not None and prekey.kind != kind:
        raise TetherlessError(ErrorCode.PREKEY_INVALID, f"expected a {kind} prekey, got {prekey.kind}")
    expected = KEY_BYTES.get(prekey.kind)
    if expected is None:  # pragma: no cover - the message's Literal type rejects other kinds on decode
        raise TetherlessError(ErrorCode.PREKEY_INVALID, f"unknown prekey kind {prekey.kind!r}")
    if len(prekey.public_key) != expected:
        raise TetherlessError(
            ErrorCode.PREKEY_INVALID,
            f"a {prekey.kind} public key is {expected} bytes, not {len(prekey.public_key)}",
        )
    if expected == MLKEM768_KEY_BYTES:
        try:
            MLKEM768PublicKey.from_public_bytes(prekey.public_key)
        except ValueError as exc:
            raise TetherlessError(ErrorCode.PREKEY_INVALID, "not a valid ML-KEM-768 encapsulation key") from exc
    layout = prekey_layout(device_id, prekey.kind, prekey.key_id, prekey.public_key, prekey.created_at_ms)
    try:
        signing.verify(sign_key, layout, prekey.signature)
    except TetherlessError as exc:
        raise TetherlessError(
            ErrorCode.PREKEY_INVALID, f"{prekey.kind} prekey {prekey.key_id}: signature does not verify"
        ) from exc


def verify_bundle(bundle: PrekeyBundle, device: DeviceEntry) -> None:
    """Check a claimed bundle against ``device``, an entry of the target's *verified* device list.

    The bundle's ``identity_key`` must be the device's ``box_key``; the signed
    prekey must be ``x25519-signed``, the PQ prekey ``mlkem768-one-time`` or
    ``mlkem768-last-resort``, the optional one-time prekey ``x25519-one-time``;
    every signature must be by the device's ``sign_key``. The bundle's address
    must name the device. Raises ``prekey_invalid``. Pure; idempotent.
    """
    device_part = bundle.address.split(".", 1)[0]
    if device_part != device.device_id:
        raise TetherlessError(ErrorCode.PREKEY_INVALID, "the bundle is for another device")
    if bundle.identity_key != device.box_key:
        raise TetherlessError(ErrorCode.PREKEY_INVALID, "identity_key is not the device's box_key")
    verify_prekey(device.sign_key, device.device_id, bundle.signed_prekey, kind=X25519_SIGNED)
    if bundle.pq_prekey.kind not in (MLKEM_ONE_TIME, MLKEM_LAST_RESORT):
        raise TetherlessError(ErrorCode.PREKEY_INVALID, f"pq_prekey has kind {bundle.pq_prekey.kind}")
    verify_prekey(device.sign_key, device.device_id, bundle.pq_prekey)
    if bundle.one_time_prekey is not None:
        verify_prekey(device.sign_key, device.device_id, bundle.one_time_prekey, kind=X25519_ONE_TIME)
