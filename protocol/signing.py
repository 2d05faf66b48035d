"""Explicit, domain-separated byte layouts for everything that is signed.

Signatures are never computed over an encoded (MessagePack/JSON) body: two
encoders may disagree on bytes, and a signature must mean one thing only.
Each signed object instead builds its bytes with :func:`layout`:

    b"tetherless/v1/" + domain + b"\\x00" + field*

where every field is a one-byte type tag followed by its value:

- ``b"i"`` + 8-byte big-endian unsigned integer,
- ``b"b"`` + 4-byte big-endian length + raw bytes,
- ``b"s"`` + 4-byte big-endian length + UTF-8 bytes.

The domain string stops a signature made for one purpose from being replayed
for another (an auth challenge can never pass as a device list).
"""

from __future__ import annotations

import hashlib
import struct

import nacl.exceptions
import nacl.signing

from .errors import ErrorCode, TetherlessError

PREFIX = b"tetherless/v1/"

Field = bytes | str | int


def layout(domain: str, *fields: Field) -> bytes:
    """Return the canonical bytes for ``fields`` under ``domain``."""
    parts = [PREFIX, domain.encode("ascii"), b"\x00"]
    for value in fields:
        # bool is an int subclass; refuse it so True never silently means 1.
        if isinstance(value, bool):
            raise TypeError("booleans have no layout; use an int")
        if isinstance(value, int):
            if not 0 <= value < 2**64:
                raise ValueError(f"integer field out of range: {value}")
            parts.append(b"i" + struct.pack(">Q", value))
        elif isinstance(value, bytes):
            parts.append(b"b" + struct.pack(">I", len(value)) + value)
        elif isinstance(value, str):
            raw = value.encode("utf-8")
            parts.append(b"s" + struct.pack(">I", len(raw)) + raw)
        else:  # pragma: no cover - guarded by the type annotation
            raise TypeError(f"unsupported field type {type(value).__name__}")
    return b"".join(parts)


def digest(domain: str, *fields: Field) -> bytes:
    """SHA-256 of :func:`layout` (used for hash chains and ids)."""
    return hashlib.sha256(layout(domain, *fields)).digest()


def sign(signing_key: nacl.signing.SigningKey, message: bytes) -> bytes:
    """Detached Ed25519 signature (64 bytes)."""
    return bytes(signing_key.sign(message).signature)


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Check a detached Ed25519 signature.

    Raises :class:`TetherlessError` ``bad_signature`` for a wrong signature,
    a signature of the wrong length, or a malformed public key. (PyNaCl raises
    ``ValueError`` rather than ``BadSignatureError`` for wrong lengths; both
    mean the same thing to a caller.)
    """
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError, nacl.exceptions.CryptoError) as exc:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "signature does not verify") from exc
