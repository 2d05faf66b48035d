"""Padding plaintexts to size buckets, so ciphertext sizes leak only a bucket.

ISO/IEC 7816-4 padding: one ``0x80`` byte, then zero bytes up to the bucket
size. Unlike PKCS#7 it works for any pad length (one byte to many KiB) and is
unambiguous: the last non-zero byte of a padded message is always the marker.

Buckets are 256, 512, 1 KiB, ... powers of two up to 64 KiB, then multiples
of 64 KiB. Powers of two keep the overhead of small messages (the common case)
under 2x while still hiding their exact length; above 64 KiB doubling would
waste too much, and a 64 KiB step still hides the length to that granularity.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from typing import Final

from .errors import ErrorCode, TetherlessError

MIN_BUCKET_BYTES: Final = 256
LINEAR_STEP_BYTES: Final = 64 * 1024
_MARKER: Final = 0x80


def bucket_for(n: int) -> int:
    """The smallest bucket size that is at least ``n`` bytes.

    Raises ``ValueError`` for a negative ``n``. ``bucket_for(0)`` is the
    smallest bucket.
    """
    if n < 0:
        raise ValueError("a length is never negative")
    if n <= MIN_BUCKET_BYTES:
        return MIN_BUCKET_BYTES
    if n <= LINEAR_STEP_BYTES:
        # Next power of two >= n (n > 256 here, so bit_length is at least 9).
        return 1 << (n - 1).bit_length()
    return -(-n // LINEAR_STEP_BYTES) * LINEAR_STEP_BYTES


def is_bucket(n: int) -> bool:
    """Whether ``n`` is exactly one of the bucket sizes."""
    return n > 0 and bucket_for(n) == n


def pad(data: bytes) -> bytes:
    """``data`` + ``0x80`` + zeros, to the smallest bucket of at least ``len(data) + 1`` bytes."""
    size = bucket_for(len(data) + 1)
    return data + b"\x80" + bytes(size - len(data) - 1)


def unpad(data: bytes) -> bytes:
    """Undo :func:`pad`.

    Raises :class:`TetherlessError` ``malformed_body`` when ``data`` is not
    the size of a bucket or does not end in ``0x80`` followed by zeros only.
    Callers only unpad after authenticated decryption, so this check is about
    interoperability bugs, not about timing side channels.
    """
    if not is_bucket(len(data)):
        raise TetherlessError(ErrorCode.MALFORMED_BODY, "padded length is not a bucket size")
    stripped = data.rstrip(b"\x00")
    if not stripped or stripped[-1] != _MARKER:
        raise TetherlessError(ErrorCode.MALFORMED_BODY, "bad padding")
    return stripped[:-1]
