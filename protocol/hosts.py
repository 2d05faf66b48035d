"""Where a relay name may point: the pure rules for names that come from someone else (docs/federation.md §1.1).

A relay name (``host[:port]``, :data:`protocol.ids.RELAY_PATTERN`) reaches us inside messages another party wrote:
a sender's ``BlobRef.relay`` (docs/decisions/0014-media-blobs.md D5), a peer's address. Connecting wherever such a
name points would let that party aim us at loopback, the LAN or a cloud metadata address (server-side request
forgery from a relay; from a client, a probe of the user's own network). These functions decide, without I/O,
whether a name is an address in any spelling and whether an address is public; the caller resolves names (its
own I/O) and refuses non-public answers. No clock, no randomness, no sockets.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from .errors import ErrorCode, TetherlessError
from .ids import RELAY_PATTERN

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_RELAY_NAME: Final = re.compile(RELAY_PATTERN)
_NUMERIC_LABEL: Final = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")


def split_relay_name(name: str) -> tuple[str, int | None]:
    """``host[:port]`` → (lower-case host without IPv6 brackets, port or None). Raises ``TetherlessError``
    ``invalid_field`` for anything else (a path, a user, a scheme, a port outside 1 to 65535). Pure."""
    if not _RELAY_NAME.match(name):
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"not a relay name: {name[:100]!r}")
    host, port = name, None
    if ":" in name and not name.endswith("]"):
        host, _, digits = name.rpartition(":")
        port = int(digits)
        if not 0 < port < 65536:
            raise TetherlessError(ErrorCode.INVALID_FIELD, f"not a relay name: {name[:100]!r}")
    return host.strip("[]").lower(), port


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells in standard form, or None. Pure."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def numeric_host(host: str) -> bool:
    """Whether ``host`` is an address in any spelling: standard, or one whose last label is numeric (``127.1``,
    ``2130706433``, ``0x7f.1``), which resolvers read as IPv4 — no DNS top-level label is. Pure."""
    return ip_literal(host) is not None or bool(_NUMERIC_LABEL.match(host.rstrip(".").rpartition(".")[2]))


def public_address(address: IPAddress) -> bool:
    """False for loopback, private, shared, link-local, multicast, unspecified, reserved and documentation
    addresses — also when an IPv6 address embeds one (IPv4-mapped, 6to4, Teredo, NAT64 64:ff9b::/96). Pure."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not public_address(embedded):
            return False
    return address.is_global and not address.is_multicast


def public_address_text(text: str) -> bool:
    """:func:`public_address` of a resolver's answer; False for text that is not an address (a scoped IPv6
    address such as ``fe80::1%eth0`` is link-local anyway). Pure."""
    literal = ip_literal(text)
    return literal is not None and public_address(literal)


__all__ = ["IPAddress", "ip_literal", "numeric_host", "public_address", "public_address_text", "split_relay_name"]
