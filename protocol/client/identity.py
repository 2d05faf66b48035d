"""A home's public identity: ``<home>/identity.json``, readable without the passphrase.

``keystore.tlk`` seals everything, the device's address too; ``tetherless whoami`` only needs the address, so
the keystore keeps a public copy beside it (docs/decisions/0010-cli-package.md, "whoami")::

    {"format": 1, "address": "<device>.<account>@<relay>", "relay_url": "<url>"}

UTF-8 JSON, mode 0600, written atomically by :class:`~protocol.client.keystore.Keystore` when it creates or
unlocks a home (so homes made before the copy existed gain it on their next unlock). It holds nothing secret and
is not authoritative: the sealed keys are. A reader gets ``None`` — and falls back to unlocking the keystore —
when the file is missing, unreadable, malformed, of another format, or when it or the home is not private to
this user (the same rule the keystore applies, so a copy others could have written is never shown).

Standard library only: importing it costs no cryptography (the point of the file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

IDENTITY_FILE: Final = "identity.json"
IDENTITY_FORMAT: Final = 1


@dataclass(frozen=True)
class PublicIdentity:
    address: str  # device.account@relay
    relay_url: str

    @property
    def account_address(self) -> str:
        """``account@relay``: the address that reaches every device of the account."""
        return self.address.split(".", 1)[1]


def encode_identity(address: str, relay_url: str) -> bytes:
    """The file's bytes (pure; deterministic)."""
    record = {"format": IDENTITY_FORMAT, "address": address, "relay_url": relay_url}
    return json.dumps(record, sort_keys=True).encode("utf-8") + b"\n"


def _private(path: Path) -> bool:
    info = path.stat()
    return not info.st_mode & 0o077 and (not hasattr(os, "geteuid") or info.st_uid == os.geteuid())


def read_identity(home: Path) -> PublicIdentity | None:
    """The public copy of ``home``'s identity, or None when it cannot be trusted or read (see the module doc).
    Never raises for a bad file; idempotent; no writes."""
    path = home / IDENTITY_FILE
    try:
        if not (_private(home) and _private(path)):
            return None
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != IDENTITY_FORMAT:
        return None
    address, relay_url = record.get("address"), record.get("relay_url")
    if not isinstance(address, str) or not isinstance(relay_url, str) or "." not in address.split("@", 1)[0]:
        return None
    return PublicIdentity(address=address, relay_url=relay_url)


__all__ = ["IDENTITY_FILE", "IDENTITY_FORMAT", "PublicIdentity", "encode_identity", "read_identity"]
