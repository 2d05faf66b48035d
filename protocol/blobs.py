"""Encrypted media blobs: age's STREAM behind a key-committing header (docs/crypto.md "Media blobs",
docs/decisions/0014-media-blobs.md D1, D2).

Byte layout (vectors: ``protocol/vectors/blob-stream.json``)::

    payload_key = HKDF-SHA-256(ikm=file_key, salt=nonce, info="payload", L=32)        # age's derivation
    commitment  = HKDF-SHA-256(ikm=file_key, salt=nonce, info="tetherless-blob/1 commitment", L=32)
    header      = MAGIC (8) ‖ nonce (16) ‖ commitment (32)                            # HEADER_BYTES
    padded      = file ‖ 0x80 ‖ 0x00 … up to padded_size(len(file))
    chunk i     = ChaCha20-Poly1305(payload_key, i as 11-byte big-endian ‖ last, padded[i·64 KiB …], ad="")
    ciphertext  = header ‖ chunk 0 ‖ chunk 1 ‖ …

The STREAM layer (:func:`stream_key`, :class:`PayloadStream`, :func:`open_payload`) is exactly age's
(C2SP age.md "Payload"), so ``tests/protocol/test_blobs_age.py`` checks it against age's published vectors;
:class:`Encryptor` and :class:`Decryptor` add the header, the commitment and the padding.

Pure: no I/O, no clock; the file key and nonce are parameters (the caller draws them from ``os.urandom``).
"""

from __future__ import annotations

import hmac
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Final

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from msgspec import Meta

from .errors import ErrorCode, TetherlessError
from .ids import RELAY_PATTERN

MAGIC: Final = b"TLBLOB\x00\x01"
FILE_KEY_BYTES: Final = 32
NONCE_BYTES: Final = 16
COMMITMENT_BYTES: Final = 32
HEADER_BYTES: Final = len(MAGIC) + NONCE_BYTES + COMMITMENT_BYTES  # 56
CHUNK_BYTES: Final = 65536
TAG: Final = 16
CIPHER_CHUNK_BYTES: Final = CHUNK_BYTES + TAG
#: The smallest padded size (Signal's smallest attachment bucket): tiny files all look alike.
MIN_PADDED_BYTES: Final = 541
#: The largest file this format describes (1 TiB): far above any relay's ``blob_max_bytes``, and the bound up to
#: which ``tests/protocol/test_blobs.py`` checks the buckets' boundaries.
MAX_FILE_BYTES: Final = 2**40
#: STREAM's counter is 11 bytes.
_MAX_CHUNKS: Final = 2**88
_MARKER: Final = 0x80
_PAYLOAD_INFO: Final = b"payload"
_COMMITMENT_INFO: Final = b"tetherless-blob/1 commitment"


# -- sizes (D2) ---------------------------------------------------------------------------------------------------


def padded_size(n: int) -> int:
    """The padded plaintext size of an ``n``-byte file: ``max(541, ⌊1.05^k⌋)`` for the smallest ``k`` with
    ``1.05^k ≥ n + 1`` (the ``+ 1`` is the ``0x80`` marker), i.e. D2's ``⌊1.05^⌈log(n+1)/log 1.05⌉⌋``.

    Computed in integers (``1.05^k = 21^k / 20^k``), so it is exact where the floating-point formula would round
    the wrong way at a bucket's edge; monotone in ``n``, and always at least ``n + 1``. Raises ``ValueError`` for
    ``n`` outside ``0 … MAX_FILE_BYTES``.
    """
    if not 0 <= n <= MAX_FILE_BYTES:
        raise ValueError(f"a file size is between 0 and {MAX_FILE_BYTES} bytes")
    need = n + 1
    if need <= MIN_PADDED_BYTES:
        return MIN_PADDED_BYTES
    # 1.05^k ≥ need  ⇔  21^k ≥ need · 20^k. Start from the float estimate and correct it both ways: the estimate
    # is off by at most one near an edge, the loops make the answer exact whatever it is.
    k = max(0, math.ceil(math.log(need) / math.log(1.05)))
    while 21**k < need * 20**k:
        k += 1
    while k > 0 and 21 ** (k - 1) >= need * 20 ** (k - 1):
        k -= 1
    bucket: int = 21**k // 20**k  # (int ** int is typed Any: a negative exponent would give a float)
    return bucket


def chunk_count(padded: int) -> int:
    """How many STREAM chunks a padded plaintext of ``padded`` bytes (> 0) takes; the last holds 1 … 64 KiB."""
    if padded <= 0:
        raise ValueError("a padded size is positive")
    return -(-padded // CHUNK_BYTES)


def ciphertext_length(padded: int) -> int:
    """The blob's length for a padded plaintext of ``padded`` bytes: the header and one tag per chunk."""
    return HEADER_BYTES + padded + TAG * chunk_count(padded)


def blob_length(size: int) -> int:
    """The ciphertext length of an encrypted ``size``-byte file (what the relay stores and sees)."""
    return ciphertext_length(padded_size(size))


# -- keys and header (D1) ---------------------------------------------------------------------------------------


def _hkdf(file_key: bytes, nonce: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=nonce, info=info).derive(file_key)


def stream_key(file_key: bytes, nonce: bytes) -> bytes:
    """age's payload key: HKDF-SHA-256(ikm=file_key, salt=nonce, info="payload"). Any file key length (age's are
    16 bytes, ours 32); use :func:`derive` for a Tetherless blob."""
    return _hkdf(file_key, nonce, _PAYLOAD_INFO)


def derive(file_key: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """``(payload_key, commitment)`` of a blob. Raises ``ValueError`` when the key is not 32 bytes or the nonce
    not 16."""
    if len(file_key) != FILE_KEY_BYTES or len(nonce) != NONCE_BYTES:
        raise ValueError(f"a blob's file key is {FILE_KEY_BYTES} bytes and its nonce {NONCE_BYTES}")
    return stream_key(file_key, nonce), _hkdf(file_key, nonce, _COMMITMENT_INFO)


def header(nonce: bytes, commitment: bytes) -> bytes:
    """The 56-byte header: MAGIC ‖ nonce ‖ commitment."""
    if len(nonce) != NONCE_BYTES or len(commitment) != COMMITMENT_BYTES:
        raise ValueError("a blob header holds a 16-byte nonce and a 32-byte commitment")
    return MAGIC + nonce + commitment


def parse_header(data: bytes) -> tuple[bytes, bytes]:
    """``(nonce, commitment)`` from the first :data:`HEADER_BYTES` of ``data``.

    Raises :class:`TetherlessError` ``blob_corrupt`` when ``data`` is shorter than a header or does not start with
    :data:`MAGIC` (not a blob of this format version).
    """
    if len(data) < HEADER_BYTES or data[: len(MAGIC)] != MAGIC:
        raise TetherlessError(ErrorCode.BLOB_CORRUPT, "not a Tetherless blob (bad or unsupported header)")
    return data[len(MAGIC) : len(MAGIC) + NONCE_BYTES], data[len(MAGIC) + NONCE_BYTES : HEADER_BYTES]


# -- STREAM (age's payload encryption) ---------------------------------------------------------------------------


def _chunk_nonce(index: int, last: bool) -> bytes:
    if not 0 <= index < _MAX_CHUNKS:
        raise ValueError("a STREAM chunk index is between 0 and 2**88 - 1")
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class PayloadStream:
    """age's STREAM under one payload key: chunk ``i`` is sealed with the nonce ``i ‖ last``, so a chunk opens
    only at its own position and only with its own last-flag (reordering, truncation and extension fail)."""

    __slots__ = ("_aead",)

    def __init__(self, payload_key: bytes) -> None:
        self._aead = ChaCha20Poly1305(payload_key)

    def seal(self, index: int, plaintext: bytes, *, last: bool) -> bytes:
        """Encrypt chunk ``index`` (at most 64 KiB). Deterministic: the same inputs give the same bytes, which is
        what lets an upload resume at any offset. Raises ``ValueError`` for an oversized chunk or index."""
        if len(plaintext) > CHUNK_BYTES:
            raise ValueError("a STREAM chunk holds at most 64 KiB")
        return self._aead.encrypt(_chunk_nonce(index, last), plaintext, None)

    def open(self, index: int, ciphertext: bytes, *, last: bool) -> bytes:
        """Decrypt chunk ``index``. Raises :class:`TetherlessError` ``blob_corrupt`` when the chunk is too short or
        too long, or does not authenticate at this index with this last-flag under this key."""
        if not TAG <= len(ciphertext) <= CIPHER_CHUNK_BYTES:
            raise TetherlessError(ErrorCode.BLOB_CORRUPT, f"chunk {index} has an impossible length")
        try:
            return self._aead.decrypt(_chunk_nonce(index, last), ciphertext, None)
        except InvalidTag:
            raise TetherlessError(ErrorCode.BLOB_CORRUPT, f"chunk {index} does not authenticate") from None


def _cipher_chunks(pieces: Iterable[bytes]) -> Iterator[tuple[bytes, bool]]:
    """Cut a byte stream into STREAM ciphertext chunks, each with whether it ends the stream.

    A chunk is only handed out once a byte after it has arrived (or the stream ended), because whether it is the
    last one is part of its nonce. Holds at most one chunk plus one piece.
    """
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        while len(buffer) > CIPHER_CHUNK_BYTES:
            yield bytes(buffer[:CIPHER_CHUNK_BYTES]), False
            del buffer[:CIPHER_CHUNK_BYTES]
    yield bytes(buffer), True


def open_payload(payload_key: bytes, pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Decrypt a STREAM payload whose length is not known in advance (age's rules), yielding each chunk's
    plaintext once it authenticated.

    Raises :class:`TetherlessError` ``blob_corrupt`` (after yielding the chunks that did authenticate, as age
    does) for a chunk that does not open, a payload without a final chunk (truncated), bytes after the final
    chunk, an empty payload and an empty final chunk other than the only one. Reads ``pieces`` lazily; stopping
    the iteration early leaves nothing behind.
    """
    stream = PayloadStream(payload_key)
    for index, (chunk, at_end) in enumerate(_cipher_chunks(pieces)):
        if at_end and not chunk:
            raise TetherlessError(ErrorCode.BLOB_CORRUPT, "the payload has no final chunk")
        final = at_end
        if len(chunk) == CIPHER_CHUNK_BYTES:
            # A full chunk may be the final one whether or not bytes follow it (age): which nonce opens it says
            # which it is, and the position is checked after its plaintext, which did authenticate, is released.
            try:
                plaintext = stream.open(index, chunk, last=final)
            except TetherlessError:
                final = not final
                plaintext = stream.open(index, chunk, last=final)
        else:
            plaintext = stream.open(index, chunk, last=final)
        if final and index > 0 and not plaintext:
            raise TetherlessError(ErrorCode.BLOB_CORRUPT, "an empty final chunk after other chunks")
        yield plaintext
        if final and not at_end:
            raise TetherlessError(ErrorCode.BLOB_CORRUPT, "bytes after the final chunk")
        if at_end and not final:
            raise TetherlessError(ErrorCode.BLOB_CORRUPT, "the payload has no final chunk")


# -- Tetherless blobs: padding, header, random access ---------------------------------------------------------


def _padding_bytes(start: int, end: int, size: int) -> bytes:
    """The bytes at ``[start, end)`` of a file's padding (``0x80`` at ``size``, zeros after), with
    ``size ≤ start``; empty when ``end ≤ start``."""
    if end <= start:
        return b""
    if start == size:
        return b"\x80" + bytes(end - start - 1)
    return bytes(end - start)


class Encryptor:
    """Encrypts one file as a blob, a chunk at a time and at any offset.

    ``file_key`` (32 bytes) and ``nonce`` (16 bytes) are fresh random bytes per file (never reused, never derived
    from the content: D1); ``size`` is the file's true length. Everything is deterministic in these three, so a
    resumed upload re-encrypts exactly the bytes it sent before.
    """

    __slots__ = ("_stream", "chunks", "header", "length", "padded", "size")

    def __init__(self, file_key: bytes, nonce: bytes, size: int) -> None:
        payload_key, commitment = derive(file_key, nonce)
        self._stream = PayloadStream(payload_key)
        self.size = size
        self.padded = padded_size(size)
        self.chunks = chunk_count(self.padded)
        self.length = ciphertext_length(self.padded)
        self.header = header(nonce, commitment)

    def file_span(self, index: int) -> tuple[int, int]:
        """The ``[start, end)`` range of the *file* that chunk ``index`` covers (empty when it holds padding only)."""
        self._check_index(index)
        start = index * CHUNK_BYTES
        return min(start, self.size), min(start + CHUNK_BYTES, self.size)

    def chunk(self, index: int, data: bytes) -> bytes:
        """Ciphertext chunk ``index``, given the file's bytes in :meth:`file_span` (the padding is added here).

        Raises ``ValueError`` when ``data`` is not exactly that span of the file or ``index`` is out of range.
        Idempotent.
        """
        start, end = self.file_span(index)
        if len(data) != end - start:
            raise ValueError(f"chunk {index} holds {end - start} bytes of the file, not {len(data)}")
        chunk_start = index * CHUNK_BYTES
        chunk_end = min(chunk_start + CHUNK_BYTES, self.padded)
        plaintext = data + _padding_bytes(max(chunk_start, self.size), chunk_end, self.size)
        return self._stream.seal(index, plaintext, last=index == self.chunks - 1)

    def read_range(self, start: int, end: int, read: Callable[[int, int], bytes]) -> Iterator[bytes]:
        """The ciphertext bytes ``[start, end)``, in pieces of at most one chunk.

        ``read(offset, length)`` returns ``length`` bytes of the file at ``offset`` (never past ``size``); it is
        called once per chunk the range touches, so memory stays at one chunk whatever the range. Raises
        ``ValueError`` for a range outside ``0 … length`` and when ``read`` returns a different number of bytes
        (the file changed since its size was taken). Stopping the iteration early is safe.
        """
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"a ciphertext range lies within 0 … {self.length}")
        if start < HEADER_BYTES:
            yield self.header[start : min(end, HEADER_BYTES)]
        position = max(start, HEADER_BYTES)
        while position < end:
            index = (position - HEADER_BYTES) // CIPHER_CHUNK_BYTES
            chunk_offset = HEADER_BYTES + index * CIPHER_CHUNK_BYTES
            file_start, file_end = self.file_span(index)
            ciphertext = self.chunk(index, read(file_start, file_end - file_start))
            piece = ciphertext[position - chunk_offset : end - chunk_offset]
            yield piece
            position += len(piece)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.chunks:
            raise ValueError(f"a chunk index of this blob is between 0 and {self.chunks - 1}")


class Decryptor:
    """Opens one blob's chunks, after checking its header against the file key from the end-to-end message.

    Raises (constructor) :class:`TetherlessError` ``blob_corrupt`` for a header that is not this format's and
    ``blob_key_mismatch`` when the header's commitment is not the file key's: the blob was made under another key
    (a mix-up or a forgery), and nothing is decrypted. The commitment is checked before any chunk is opened, so
    a Range read is safe before the whole blob has been hashed; ChaCha20-Poly1305 alone is not key-committing.
    """

    __slots__ = ("_stream", "nonce")

    def __init__(self, file_key: bytes, header_bytes: bytes) -> None:
        nonce, commitment = parse_header(header_bytes)
        if len(file_key) != FILE_KEY_BYTES:
            raise TetherlessError(ErrorCode.BLOB_KEY_MISMATCH, f"a blob's file key is {FILE_KEY_BYTES} bytes")
        payload_key, expected = derive(file_key, nonce)
        if not hmac.compare_digest(commitment, expected):
            raise TetherlessError(ErrorCode.BLOB_KEY_MISMATCH, "the blob was not encrypted under this file key")
        self.nonce = nonce
        self._stream = PayloadStream(payload_key)

    def open_chunk(self, index: int, ciphertext_chunk: bytes, last: bool) -> bytes:
        """The padded plaintext of chunk ``index`` (random access; pass it to :func:`strip_padding` with the true
        size). Raises :class:`TetherlessError` ``blob_corrupt`` when it does not authenticate at this index with
        this last-flag (a chunk moved, swapped from another blob, or cut)."""
        return self._stream.open(index, ciphertext_chunk, last=last)

    def plaintext(self, payload: Iterable[bytes], size: int) -> Iterator[bytes]:
        """The file's bytes from the blob's ciphertext *after the header*, given in pieces of any size in order.

        ``size`` is the true size from the end-to-end message: it fixes the chunk count, so a missing last chunk,
        an extra or empty chunk and trailing bytes are refused by position before any tag is tried; the padding is
        checked (``0x80`` then zeros) and cut. Raises :class:`TetherlessError` ``blob_corrupt`` (after yielding
        the chunks that authenticated: a caller publishes the file only once the iteration ends) and
        ``ValueError`` for a size outside 0 … :data:`MAX_FILE_BYTES`. Lazy; stopping early is safe.
        """
        padded = padded_size(size)
        chunks = chunk_count(padded)
        last_length = padded - (chunks - 1) * CHUNK_BYTES + TAG
        for index, (chunk, last) in enumerate(_cipher_chunks(payload)):
            expected_last = index == chunks - 1
            if index >= chunks or last != expected_last:
                problem = "is longer than" if index >= chunks or expected_last else "is shorter than"
                raise TetherlessError(ErrorCode.BLOB_CORRUPT, f"the blob {problem} its file's size says")
            if last and len(chunk) != last_length:
                problem = "is longer than" if len(chunk) > last_length else "is shorter than"
                raise TetherlessError(ErrorCode.BLOB_CORRUPT, f"the blob {problem} its file's size says")
            yield strip_padding(index, self.open_chunk(index, chunk, last), size)


def decrypt(file_key: bytes, ciphertext: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The file's bytes from a whole blob (header included) given in pieces of any size: :class:`Decryptor` on
    its first :data:`HEADER_BYTES`, then :meth:`Decryptor.plaintext`. Raises what those raise; ``blob_corrupt``
    also for a blob shorter than its header. Lazy."""
    pieces = iter(ciphertext)
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        if len(buffer) >= HEADER_BYTES:
            break
    decryptor = Decryptor(file_key, bytes(buffer[:HEADER_BYTES]))
    rest = bytes(buffer[HEADER_BYTES:])

    def payload() -> Iterator[bytes]:
        yield rest
        yield from pieces

    yield from decryptor.plaintext(payload(), size)


def strip_padding(index: int, plaintext: bytes, size: int) -> bytes:
    """The file's bytes in chunk ``index``'s padded plaintext, checking that what lies past ``size`` is the
    padding (``0x80`` at ``size``, then zeros). Raises :class:`TetherlessError` ``blob_corrupt`` otherwise. The
    chunk authenticated already, so a bad padding means a sender that broke the format, not a forgery; the
    comparison need not be constant time."""
    chunk_start = index * CHUNK_BYTES
    keep = max(0, min(len(plaintext), size - chunk_start))
    if plaintext[keep:] != _padding_bytes(chunk_start + keep, chunk_start + len(plaintext), size):
        raise TetherlessError(ErrorCode.BLOB_CORRUPT, f"chunk {index} has bad padding")
    return plaintext[:keep]


# -- the reference inside the end-to-end message (D5) ----------------------------------------------------------

_NAME_MAX_BYTES: Final = 255
_FALLBACK_NAME: Final = "file"
_UNSAFE_NAME_CHARACTERS: Final = re.compile(r'[/\\:*?"<>|]')
# control, format (bidi overrides: "\u202egpj.exe" shows as "exe.jpg"), surrogate, private, unassigned, line breaks
_DROPPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_WINDOWS_RESERVED: Final = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)

HexBlobId = Annotated[str, Meta(pattern="^[0-9a-f]{32}$")]
Bytes32 = Annotated[bytes, Meta(min_length=32, max_length=32)]


class BlobRef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """Where a file's blob lives and how to open it; travels only inside the end-to-end encrypted message.

    ``length`` is the ciphertext length and ``size`` the file's true size; :meth:`check` ties them together
    (``length == blob_length(size)``), so a receiver knows the length to download and to expect before it asks.
    """

    relay: Annotated[str, Meta(pattern=RELAY_PATTERN)]
    blob_id: HexBlobId
    digest: Bytes32  # SHA-256 of the whole ciphertext
    key: Bytes32  # the file key
    length: Annotated[int, Meta(ge=0)]
    capability: Bytes32
    name: Annotated[str, Meta(min_length=1, max_length=_NAME_MAX_BYTES)]
    content_type: Annotated[str, Meta(min_length=1, max_length=255)]
    size: Annotated[int, Meta(ge=0, le=MAX_FILE_BYTES)]

    def check(self) -> BlobRef:
        """Returns ``self`` when its fields agree; raises :class:`TetherlessError` ``invalid_field`` otherwise: a
        ``length`` that is not the blob length of ``size``, a ``name`` that is not a plain file name (a path
        separator, a control character, ``.`` or ``..``: a receiver must never be steered outside the directory
        it chose) or a ``content_type`` that is not printable ASCII. The msgspec constraints (lengths, patterns)
        hold already for a decoded value; a constructed one is checked for them here too."""
        try:
            msgspec.convert(msgspec.structs.asdict(self), type=BlobRef)
        except msgspec.ValidationError as error:
            raise TetherlessError(ErrorCode.INVALID_FIELD, f"blob reference: {error}") from None
        if self.relay.endswith("\n") or self.blob_id.endswith("\n"):  # a msgspec pattern's "$" allows one
            raise TetherlessError(ErrorCode.INVALID_FIELD, "blob reference: relay or blob id ends in a newline")
        if self.length != blob_length(self.size):
            raise TetherlessError(ErrorCode.INVALID_FIELD, "blob reference: length does not match size")
        if safe_name(self.name) != self.name or len(self.name.encode()) > _NAME_MAX_BYTES:
            raise TetherlessError(ErrorCode.INVALID_FIELD, "blob reference: name is not a plain file name")
        if not all(" " <= c <= "~" for c in self.content_type):
            raise TetherlessError(ErrorCode.INVALID_FIELD, "blob reference: content type is not printable ASCII")
        return self

    def safe_name(self) -> str:
        """:func:`safe_name` of :attr:`name`."""
        return safe_name(self.name)


def safe_name(name: str) -> str:
    """A file name to write ``name`` under inside a directory the user chose, never outside it nor onto a device
    or hidden file: path separators and characters Windows refuses become ``_``; control, format and unassigned
    characters are dropped; other white space becomes a space; leading dots and trailing dots/spaces are cut;
    Windows device names get a ``_`` prefix; the result is at most 255 UTF-8 bytes (the extension kept when it
    can be). An empty result is ``file``. Never raises; idempotent (``safe_name(safe_name(x)) == safe_name(x)``).
    """
    text = "".join(" " if c.isspace() else c for c in name if unicodedata.category(c) not in _DROPPED_CATEGORIES)
    text = _UNSAFE_NAME_CHARACTERS.sub("_", text).lstrip(". ").rstrip(". ")
    if _WINDOWS_RESERVED.match(text):
        text = "_" + text
    if len(text.encode()) > _NAME_MAX_BYTES:
        stem, dot, extension = text.rpartition(".")
        extension = dot + extension if dot and 0 < len(extension.encode()) <= 16 else ""
        stem = text[: len(text) - len(extension)]
        budget = _NAME_MAX_BYTES - len(extension.encode())
        stem = stem.encode()[:budget].decode(errors="ignore")
        text = (stem + extension).rstrip(". ")
    return text or _FALLBACK_NAME
