"""The printed recovery key (docs/crypto.md §3.4).

``r`` is 20 random bytes; the user sees ``"tlr-"`` and the lowercase base32 of
``r ‖ c`` (36 characters in nine groups of four), where
``c = digest("recovery-check", r)[0:2]`` catches typos before any network use.
From ``r`` and the account id come:

- ``seed_sign = HKDF(0^32, r, info("recovery-sign", account_id), 32)``: the
  Ed25519 recovery key whose public half is ``DeviceList.recovery_key``;
- ``seed_backup = HKDF(0^32, r, info("recovery-backup", account_id), 96)``:
  the ML-KEM-768 seed (64 bytes) and X25519 private key (32) of the recovery
  HPKE key that encrypts the account-key backup (§12).

Pure: the 20 random bytes are passed in.
"""

from __future__ import annotations

import base64
import hmac
from typing import Final

import msgspec
import nacl.signing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import handshake, hybrid, signing

SECRET_BYTES: Final = 20
CHECK_BYTES: Final = 2
PREFIX: Final = "tlr-"
TEXT_CHARS: Final = 36  # base32 of 22 bytes, without padding
_SALT: Final = b"\x00" * 32
BACKUP_KEY_HASH_DOMAIN: Final = "recovery-backup-key"


def _check(r: bytes) -> bytes:
    return signing.digest("recovery-check", r)[:CHECK_BYTES]


def new_recovery_secret(entropy20: bytes) -> str:
    """The text to print for the 20-byte secret ``entropy20``: ``tlr-xxxx-xxxx-…`` (nine groups of four)."""
    if len(entropy20) != SECRET_BYTES:
        raise ValueError(f"a recovery secret is {SECRET_BYTES} random bytes")
    text = base64.b32encode(entropy20 + _check(entropy20)).decode("ascii").rstrip("=").lower()
    return PREFIX + "-".join(text[i : i + 4] for i in range(0, TEXT_CHARS, 4))


def parse_recovery_secret(text: str) -> bytes:
    """The 20-byte secret in ``text``; case, spaces, dashes and the ``tlr-`` prefix are optional.

    Raises ``ValueError`` with a message fit for the user when the text has
    the wrong length, a character outside base32, or a wrong check (a typo).
    """
    compact = "".join(ch for ch in text.strip().lower() if ch not in " -\t\n")
    if len(compact) == TEXT_CHARS + len(PREFIX) - 1 and compact.startswith(PREFIX[:-1]):
        compact = compact[len(PREFIX) - 1 :]
    if len(compact) != TEXT_CHARS:
        raise ValueError(f"a recovery key has {TEXT_CHARS} characters after 'tlr-'; this one has {len(compact)}")
    try:
        raw = base64.b32decode(compact.upper() + "====", casefold=False)
    except ValueError as exc:
        raise ValueError("a recovery key uses only the letters a-z and the digits 2-7") from exc
    if base64.b32encode(raw).decode("ascii").rstrip("=").lower() != compact:
        raise ValueError("this recovery key has a typo (its last character is not possible)")
    secret, check = raw[:SECRET_BYTES], raw[SECRET_BYTES:]
    if not hmac.compare_digest(check, _check(secret)):
        raise ValueError("this recovery key has a typo (its check characters do not match)")
    return secret


def _hkdf(r: bytes, domain: str, account_id: str, length: int) -> bytes:
    info = signing.layout(domain, account_id)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=info).derive(r)


class RecoveryKeys(msgspec.Struct, frozen=True):
    """The keys derived from a recovery secret for one account. Never stored by a device."""

    signing_key: nacl.signing.SigningKey
    public_key: bytes
    backup_seed: bytes  # 96 bytes: ML-KEM-768 seed (64) ‖ X25519 private key (32)

    @property
    def mlkem_seed(self) -> bytes:
        return self.backup_seed[:64]

    @property
    def x25519_private(self) -> bytes:
        return self.backup_seed[64:]


def recovery_keys(r: bytes, account_id: str) -> RecoveryKeys:
    """Derive the recovery signing key and backup seed of ``account_id`` from the secret ``r``."""
    if len(r) != SECRET_BYTES:
        raise ValueError(f"a recovery secret is {SECRET_BYTES} bytes")
    signing_key = nacl.signing.SigningKey(_hkdf(r, "recovery-sign", account_id, 32))
    return RecoveryKeys(
        signing_key=signing_key,
        public_key=bytes(signing_key.verify_key),
        backup_seed=_hkdf(r, "recovery-backup", account_id, 96),
    )


def backup_recipient(keys: RecoveryKeys) -> hybrid.HybridRecipient:
    """The public half of the recovery backup key: the hybrid recipient (crypto.md §12.1) that account-key
    backups are wrapped to. Pure and deterministic (ML-KEM-768 key generation from the 64-byte seed)."""
    return hybrid.HybridRecipient(
        x25519_public=handshake.x25519_public(keys.x25519_private),
        kem_public=mlkem.MLKEM768PrivateKey.from_seed_bytes(keys.mlkem_seed).public_key().public_bytes_raw(),
    )


def backup_key_hash(recipient: hybrid.HybridRecipient) -> bytes:
    """``DeviceList.recovery_backup_key_hash``: ``digest("recovery-backup-key", x25519_public, kem_public)``,
    the list's signed commitment to the recovery backup key (so the relay cannot substitute its own)."""
    return signing.digest(BACKUP_KEY_HASH_DOMAIN, recipient.x25519_public, recipient.kem_public)
