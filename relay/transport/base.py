"""Pieces both protocol handlers share: statistics, header helpers, writes.

Header bytes are decoded and encoded as ISO-8859-1 (latin-1) in both
protocols: it maps every byte to one character, so decoding never fails and
a value survives a round trip unchanged (RFC 9110 §5.5 treats non-ASCII
field bytes as opaque).
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from relay.api.http import Response

logger = logging.getLogger("relay.transport")

SERVER_HEADER: Final = b"tetherless"
HTTP11: Final = "http/1.1"
HTTP2: Final = "h2"

# Headers that describe one hop's framing. The transport owns framing, so it
# drops these from application responses (and HTTP/2 forbids them outright).
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"content-length"}
)

# Bodies are written in pieces of this size so the stall timeout measures
# progress, not the time to push one large body through a slow link.
WRITE_PIECE_BYTES: Final = 256 * 1024

# How long a closing connection may spend pushing its last bytes (GOAWAY, a
# final error response) before it is closed regardless.
CLOSE_FLUSH_SECONDS: Final = 1.0

# When a streamed request body is cut short by the connection ending (the peer
# left, or a write failed) its handler gets BodyIncompleteError and this long
# to commit what arrived (tus keeps it) before it is cancelled. A drain
# reserves up to this much of drain_timeout_seconds for the same purpose.
BODY_COMMIT_SECONDS: Final = 5.0

# (method, path) -> does the route read its request body as a stream?
StreamsBody = Callable[[str, str], bool]


def never_streams_body(method: str, path: str) -> bool:
    """The default :data:`StreamsBody`: every request body is buffered."""
    return False


_TOKEN_CHARS: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_BAD_VALUE_BYTES: Final = frozenset(b"\r\n\x00")


@dataclass(frozen=True, slots=True)
class TransportStatistics:
    """A snapshot of :class:`~relay.transport.Server` state (see ``Server.statistics``)."""

    connections_open: int  # accepted and not yet closed, including ones still in TLS/detection
    connections_http1: int
    connections_http2: int
    streams_open: int  # requests being received, handled or answered
    buffered_bytes: int  # outbound bytes queued in the transport over all connections
    max_connection_buffered_bytes: int  # the largest single connection's outbound queue
    connections_rejected: int  # refused by a cap since the server started
    draining: bool
    body_buffered_bytes: int = 0  # request body bytes held in the transport now, over all connections
    # The most request body bytes one connection has held at once since the server started (a high-water
    # mark, so a test can check a bound once instead of sampling).
    peak_connection_body_bytes: int = 0


class Connection(Protocol):
    """What the server needs from a protocol handler (HTTP/1.1 or HTTP/2)."""

    protocol: str

    @property
    def open_streams(self) -> int: ...

    @property
    def buffered_bytes(self) -> int: ...

    @property
    def body_buffered_bytes(self) -> int:
        """Request body bytes held now: buffered bodies and streamed bytes not yet read by the handler."""
        ...

    @property
    def peak_body_buffered_bytes(self) -> int:
        """The most ``body_buffered_bytes`` ever was on this connection."""
        ...

    def start_drain(self) -> None:
        """Begin a graceful close; returns at once. Idempotent."""
        ...

    def cut_request_bodies(self, reason: str) -> None:
        """End every streamed request body still arriving with ``BodyIncompleteError(reason)``. Idempotent."""
        ...

    async def run(self) -> None:
        """Serve the connection until it closes. Does not close the underlying stream."""
        ...


class WriteStalledError(Exception):
    """The peer accepted no bytes for the stall timeout: it stopped reading."""


class InvalidResponseError(ValueError):
    """The application produced a response the transport cannot send (bad header name/value, bad status)."""


_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The current time as an IMF-fixdate, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


def decode_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Received header pairs as text.

    Names are already lower case: h11 lower-cases them and h2 (with
    ``validate_inbound_headers``) refuses upper-case names, so they are not
    checked again here.
    """
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def _encode_headers(headers: list[tuple[str, str]]) -> tuple[tuple[tuple[bytes, bytes], ...], bool, bool]:
    """Validate and encode application headers: (encoded pairs, has date, has server).

    Raises :class:`InvalidResponseError` for a header that is not a token
    name / single-line latin-1 value.
    """
    encoded: list[tuple[bytes, bytes]] = []
    have_date = have_server = False
    for name, value in headers:
        try:
            raw_name = name.lower().encode("latin-1")
            raw_value = value.strip().encode("latin-1")
        except UnicodeEncodeError:
            raise InvalidResponseError(f"header {name!r} is not latin-1") from None
        if not raw_name or not _TOKEN_CHARS.issuperset(raw_name) or _BAD_VALUE_BYTES.intersection(raw_value):
            raise InvalidResponseError(f"invalid header {name!r}")
        if raw_name in HOP_BY_HOP:
            continue
        have_date = have_date or raw_name == b"date"
        have_server = have_server or raw_name == b"server"
        encoded.append((raw_name, raw_value))
    return tuple(encoded), have_date, have_server


# Most responses carry one of a handful of header lists (content type, cache
# control): each is validated and encoded once, then reused. Bounded by
# clearing, so header values that vary per response (Location, Retry-After)
# cost one encode each and can never grow the cache without limit.
_ENCODED_HEADERS_MAX: Final = 256
_encoded_headers: dict[tuple[tuple[str, str], ...], tuple[tuple[tuple[bytes, bytes], ...], bool, bool]] = {}


def response_headers(response: Response) -> list[tuple[bytes, bytes]]:
    """The application's headers, validated and encoded, with hop-by-hop headers removed.

    Adds ``date`` and ``server`` unless the application set them. Raises
    :class:`InvalidResponseError` for a status outside 200..599 or a header
    that is not a token name / single-line value, so a bad response becomes a
    500 before any byte of it is written. This is the only validation of
    outbound headers (``HTTP2Connection`` switches h2's off), and an invalid
    list is never cached, so it is refused every time.
    """
    if not 200 <= response.status <= 599:
        raise InvalidResponseError(f"status {response.status} out of range")
    if response.length is not None and response.length < 0:
        raise InvalidResponseError(f"negative length {response.length}")
    key = tuple(response.headers)
    entry = _encoded_headers.get(key)
    if entry is None:
        entry = _encode_headers(response.headers)
        if len(_encoded_headers) >= _ENCODED_HEADERS_MAX:
            _encoded_headers.clear()
        _encoded_headers[key] = entry
    pairs, have_date, have_server = entry
    encoded = list(pairs)
    if not have_date:
        encoded.append((b"date", http_date()))
    if not have_server:
        encoded.append((b"server", SERVER_HEADER))
    return encoded


def body_has_no_content(method: str, status: int) -> bool:
    """True when the response must carry no body bytes (HEAD, 204, 304)."""
    return method == "HEAD" or status in (204, 304)


def split_target(target: str) -> tuple[str, str]:
    """``/a/b?x=1`` → (``/a/b``, ``x=1``)."""
    path, _, query = target.partition("?")
    return path, query


def content_lengths(headers: Sequence[tuple[str, str]]) -> set[str]:
    """Every distinct content-length value (comma lists split), for conflict checks."""
    values: set[str] = set()
    for name, value in headers:
        if name == "content-length":
            values.update(part.strip() for part in value.split(","))
    return values


async def send_with_stall_timeout(stream: trio.abc.SendStream, data: bytes, stall_seconds: float) -> None:
    """Write ``data``, failing if any piece makes no progress within ``stall_seconds``.

    Raises :class:`WriteStalledError` on a stall, and whatever ``send_all``
    raises (``trio.BrokenResourceError``, ``trio.ClosedResourceError``). If
    cancelled, an unknown prefix of ``data`` has been written and the stream
    should be closed.
    """
    view = memoryview(data)
    for start in range(0, len(view), WRITE_PIECE_BYTES):
        with trio.move_on_after(stall_seconds) as scope:
            await stream.send_all(view[start : start + WRITE_PIECE_BYTES])
        if scope.cancelled_caught:
            raise WriteStalledError(f"peer read nothing for {stall_seconds} s")


async def aclose_iterator(iterator: AsyncIterator[bytes]) -> None:
    """Call ``aclose()`` on a response stream if it has one; never raises, never blocks long.

    Shielded from an outer cancellation (the producer must get the chance to
    release its resources) but bounded to one second.
    """
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await aclose()
        except Exception:
            logger.debug("response stream aclose() failed", exc_info=True)


def stream_length_error(length: int | None, sent: int, *, ended: bool) -> str | None:
    """Why a ``Response.stream`` with ``length`` must be aborted after ``sent`` bytes (None: it may go on).

    ``sent`` counts the chunk about to be written; ``ended`` is True once the
    iterator has finished. A response without ``length`` is never aborted.
    """
    if length is None:
        return None
    if sent > length:
        return f"response stream yielded more than its length {length}"
    if ended and sent < length:
        return f"response stream ended after {sent} of its length {length} bytes"
    return None
