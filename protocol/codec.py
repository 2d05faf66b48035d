"""The only place protocol messages become bytes and bytes become messages.

Two encodings of the same schemas:

- ``application/vnd.msgpack`` (MessagePack) — the binary wire format;
- ``application/json`` (bytes as base64) — for humans and browsers.

Streams (``GET /v1/inbox/stream``) are sequences of items. In MessagePack each
item is written as two concatenated MessagePack objects: a uint32 (always the
5-byte ``0xce`` form) giving the byte length of the item, then the item. Any
streaming MessagePack decoder reads this as plain concatenated objects; a
decoder that needs frames can read 5 bytes, then that many. In JSON a stream
is JSON Lines (one object per ``\\n``-terminated line).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, Final, TypeVar

import msgspec

from .errors import ErrorCode, TetherlessError

MSGPACK: Final = "application/vnd.msgpack"
JSON: Final = "application/json"
JSON_LINES: Final = "application/jsonl"
MEDIA_TYPES: Final = (MSGPACK, JSON)

T = TypeVar("T")

_msgpack_encoder = msgspec.msgpack.Encoder()
_json_encoder = msgspec.json.Encoder()
_decoders: dict[tuple[str, Any], Any] = {}

FRAME_HEADER_BYTES: Final = 5
_FRAME_HEADER = struct.Struct(">BI")


def _decoder(media_type: str, typ: Any) -> Any:
    key = (media_type, typ)
    dec = _decoders.get(key)
    if dec is None:
        dec = msgspec.msgpack.Decoder(typ) if media_type == MSGPACK else msgspec.json.Decoder(typ)
        _decoders[key] = dec
    return dec


def encode(message: Any, media_type: str = MSGPACK) -> bytes:
    """Encode ``message`` in ``media_type`` (one of :data:`MEDIA_TYPES`)."""
    if media_type == MSGPACK:
        return _msgpack_encoder.encode(message)
    if media_type == JSON:
        return _json_encoder.encode(message)
    raise ValueError(f"unsupported media type {media_type!r}")


def decode(body: bytes, typ: type[T], media_type: str = MSGPACK) -> T:
    """Decode and validate ``body`` as ``typ``.

    Raises :class:`TetherlessError` ``malformed_body`` when the bytes are not
    valid MessagePack/JSON, ``invalid_field`` when they are but do not match
    the schema (the detail names the offending field path).
    """
    if media_type not in MEDIA_TYPES:
        raise TetherlessError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"use {MSGPACK} or {JSON}")
    try:
        result: T = _decoder(media_type, typ).decode(body)
    except msgspec.ValidationError as exc:
        raise TetherlessError(ErrorCode.INVALID_FIELD, str(exc)) from exc
    except msgspec.DecodeError as exc:
        raise TetherlessError(ErrorCode.MALFORMED_BODY, str(exc)) from exc
    return result


def encode_stream_item(message: Any, media_type: str = MSGPACK) -> bytes:
    """One item of a stream, framed for ``media_type`` (see the module doc)."""
    if media_type == MSGPACK:
        item = _msgpack_encoder.encode(message)
        return _FRAME_HEADER.pack(0xCE, len(item)) + item
    return _json_encoder.encode(message) + b"\n"


class StreamDecoder:
    """Incremental decoder for a stream of items of type ``typ``.

    Feed it bytes as they arrive with :meth:`feed`; it yields every complete
    item. Raises ``malformed_body`` on a bad frame (the stream is then
    unusable: reconnect from the last cursor).
    """

    def __init__(self, typ: Any, media_type: str = MSGPACK, *, max_item_bytes: int = 16 * 1024 * 1024) -> None:
        self._typ = typ
        self._media_type = media_type
        self._buffer = bytearray()
        self._max_item_bytes = max_item_bytes

    def feed(self, data: bytes) -> Iterator[Any]:
        self._buffer += data
        if self._media_type == MSGPACK:
            yield from self._msgpack_items()
        else:
            yield from self._json_items()

    def _msgpack_items(self) -> Iterator[Any]:
        buf = self._buffer
        while len(buf) >= FRAME_HEADER_BYTES:
            marker, length = _FRAME_HEADER.unpack_from(buf)
            if marker != 0xCE or length > self._max_item_bytes:
                raise TetherlessError(ErrorCode.MALFORMED_BODY, "bad stream frame header")
            end = FRAME_HEADER_BYTES + length
            if len(buf) < end:
                return
            item = bytes(buf[FRAME_HEADER_BYTES:end])
            del buf[:end]
            yield decode(item, self._typ, MSGPACK)

    def _json_items(self) -> Iterator[Any]:
        buf = self._buffer
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > self._max_item_bytes:
                    raise TetherlessError(ErrorCode.MALFORMED_BODY, "stream line too long")
                return
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.strip():
                yield decode(line, self._typ, JSON)


def media_type_of(content_type: str | None) -> str:
    """The media type named by a Content-Type header value (parameters dropped).

    Raises ``unsupported_media_type`` for anything but msgpack or JSON. An absent
    header means MessagePack (the native format).
    """
    if not content_type:
        return MSGPACK
    base = content_type.split(";", 1)[0].strip().lower()
    if base in ("application/msgpack", "application/x-msgpack"):
        return MSGPACK
    if base in MEDIA_TYPES:
        return base
    raise TetherlessError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"use {MSGPACK} or {JSON}")


def negotiate(accept: str | None, default: str) -> str:
    """Pick the response media type from an Accept header (RFC 9110 §12.5.1, simplified).

    ``default`` is used for an absent header or ``*/*``. Quality values are
    honoured; raises ``not_acceptable`` when neither format is accepted.
    """
    if not accept:
        return default
    best: tuple[float, int, str] | None = None
    for index, part in enumerate(accept.split(",")):
        pieces = [p.strip() for p in part.split(";")]
        name = pieces[0].lower()
        q = 1.0
        for param in pieces[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        if name in ("*/*", "application/*"):
            candidate = default
        elif name in ("application/msgpack", "application/x-msgpack", MSGPACK):
            candidate = MSGPACK
        elif name in (JSON, "application/problem+json", JSON_LINES, "application/x-ndjson"):
            candidate = JSON
        else:
            continue
        rank = (q, -index, candidate)
        if best is None or rank[:2] > best[:2]:
            best = rank
    if best is None:
        raise TetherlessError(ErrorCode.NOT_ACCEPTABLE, f"this relay speaks {MSGPACK} and {JSON}")
    return best[2]
