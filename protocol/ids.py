"""Self-certifying identifiers and addresses.

- A **device id** is derived from the device's Ed25519 signing key, so a relay
  cannot pair an id with a key of its choosing.
- An **account id** is derived from the signing key of the account's genesis
  device: whoever holds that key created the account, and the id proves it.
- An **address** names a device together with its account and home relay:
  ``<device-id>.<account-id>@<relay>``. The relay part routes federation.

Ids are the first 20 bytes of a domain-separated SHA-256, in lowercase
RFC 4648 base32 without padding: exactly 32 characters of ``[a-z2-7]``.
"""

from __future__ import annotations

import base64
import re
from typing import Final

import msgspec

from .errors import ErrorCode, TetherlessError
from .signing import digest

ID_BYTES: Final = 20
ID_CHARS: Final = 32
ID_PATTERN: Final = "^[a-z2-7]{32}$"
# host or host:port; letters, digits, dots, dashes, and an IPv6 literal in brackets.
RELAY_PATTERN: Final = r"^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$"

_ID_RE = re.compile(ID_PATTERN)
_RELAY_RE = re.compile(RELAY_PATTERN)


def _encode_id(raw: bytes) -> str:
    return base64.b32encode(raw[:ID_BYTES]).decode("ascii").lower()


def device_id_for(sign_key: bytes) -> str:
    """The device id of an Ed25519 public signing key (32 bytes)."""
    if len(sign_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return _encode_id(digest("device-id", sign_key))


def account_id_for(genesis_sign_key: bytes) -> str:
    """The account id of the account whose genesis device holds this key."""
    if len(genesis_sign_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return _encode_id(digest("account-id", genesis_sign_key))


def is_id(value: str) -> bool:
    return bool(_ID_RE.match(value))


class Address(msgspec.Struct, frozen=True):
    """``<device>.<account>@<relay>``; ``device`` is empty for an account address."""

    account: str
    relay: str
    device: str = ""

    def __str__(self) -> str:
        local = f"{self.device}.{self.account}" if self.device else self.account
        return f"{local}@{self.relay}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse an address; raises ``invalid_field`` when it is not one."""
        local, sep, relay = text.rpartition("@")
        if not sep or not _RELAY_RE.match(relay):
            raise TetherlessError(ErrorCode.INVALID_FIELD, f"not an address: {text[:100]!r}")
        device, dot, account = local.rpartition(".")
        if not dot:
            device, account = "", local
        if not is_id(account) or (device and not is_id(device)):
            raise TetherlessError(ErrorCode.INVALID_FIELD, f"not an address: {text[:100]!r}")
        return cls(account=account, relay=relay.lower(), device=device)
