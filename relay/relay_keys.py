"""The relay's Ed25519 keys on disk: the current signing key and retired keys still valid for verification.

Layout in the data directory:

- ``relay.key`` — the 32-byte seed of the current key (owner-only; created on
  first start);
- ``relay-keys.json`` — retired public keys with the time until which peers
  may still verify signatures made with them (the rotation overlap):
  ``{"retired": [{"key_id": …, "public_key": <base64>, "valid_until_ms": …}]}``.

:func:`rotate` makes a new current key and retires the old one; a running
relay picks the change up when it restarts (peers re-fetch
``/.well-known/tetherless`` when they see an unknown key id).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nacl.signing

from protocol.federation import relay_key_id
from protocol.messages import RelayKey

RELAY_KEY_FILE: Final = "relay.key"
RETIRED_KEYS_FILE: Final = "relay-keys.json"


@dataclass(frozen=True, slots=True)
class RelayKeyring:
    """The key this relay signs with, and every key it publishes (current first)."""

    signing_key: nacl.signing.SigningKey
    published: tuple[RelayKey, ...]

    @property
    def key_id(self) -> str:
        return relay_key_id(bytes(self.signing_key.verify_key))


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_or_create_signing_key(data_dir: Path) -> nacl.signing.SigningKey:
    """The current relay key, created (owner-only) on first start. Exits for a corrupt key file."""
    path = data_dir / RELAY_KEY_FILE
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise SystemExit(f"{path}: not a relay key (expected 32 bytes)")
        return nacl.signing.SigningKey(seed)
    key = nacl.signing.SigningKey.generate()
    _write_private(path, bytes(key))
    return key


def retired_keys(data_dir: Path) -> list[RelayKey]:
    """Retired keys recorded in ``relay-keys.json`` (all of them, expired or not)."""
    path = data_dir / RETIRED_KEYS_FILE
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return [
            RelayKey(
                key_id=entry["key_id"],
                public_key=base64.b64decode(entry["public_key"]),
                valid_until_ms=int(entry["valid_until_ms"]),
            )
            for entry in doc.get("retired", [])
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{path}: unreadable retired relay keys: {exc}") from None


def load_keyring(data_dir: Path, now_ms: int) -> RelayKeyring:
    """The current key (created if missing) and the retired keys still inside their overlap at ``now_ms``."""
    key = load_or_create_signing_key(data_dir)
    current = RelayKey(key_id=relay_key_id(bytes(key.verify_key)), public_key=bytes(key.verify_key))
    retired = [
        k
        for k in retired_keys(data_dir)
        if k.valid_until_ms is not None and k.valid_until_ms > now_ms and k.key_id != current.key_id
    ]
    return RelayKeyring(signing_key=key, published=(current, *retired))


def rotate(data_dir: Path, *, overlap_ms: int, now_ms: int) -> tuple[RelayKey, RelayKey]:
    """Make a new current key; the old one stays published for verification until ``now_ms + overlap_ms``.

    Returns (retired, new). Not atomic across the two files: the retired key
    is recorded first, so a crash in between leaves the old key current and
    also listed as retired (harmless). Retired keys past their overlap are
    pruned from the file.
    """
    old = load_or_create_signing_key(data_dir)
    old_public = bytes(old.verify_key)
    retired = RelayKey(key_id=relay_key_id(old_public), public_key=old_public, valid_until_ms=now_ms + overlap_ms)
    kept = [k for k in retired_keys(data_dir) if (k.valid_until_ms or 0) > now_ms and k.key_id != retired.key_id]
    doc = {
        "retired": [
            {
                "key_id": k.key_id,
                "public_key": base64.b64encode(k.public_key).decode(),
                "valid_until_ms": k.valid_until_ms,
            }
            for k in [*kept, retired]
        ]
    }
    _write_private(data_dir / RETIRED_KEYS_FILE, json.dumps(doc, indent=2).encode())
    new = nacl.signing.SigningKey.generate()
    _write_private(data_dir / RELAY_KEY_FILE, bytes(new))
    new_public = bytes(new.verify_key)
    return retired, RelayKey(key_id=relay_key_id(new_public), public_key=new_public)
