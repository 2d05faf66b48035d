"""Our STREAM (protocol/blobs.py) against age's published test vectors (C2SP/CCTV ``age``; decision 0014 D1).

A Tetherless blob's payload is age's payload: ``stream_key`` is age's HKDF, ``PayloadStream`` its chunk nonces,
``open_payload`` its rules for the final chunk. Two kinds of checks:

1. **Published bytes** (``tests/protocol/vectors/age/``, copied byte for byte; see the README there): whole age
   files with an X25519 identity. The header is parsed here, in the test only (bech32, the X25519 stanza, the
   header MAC, all with ``cryptography``/``hmac``), and the payload is opened by *our* STREAM; the plaintext must
   hash to the file's ``payload`` line. The two ``payload failure`` generators that only edit bytes
   (``stream_bad_tag``: flip bit 5 of the last byte; ``stream_missing_tag``: cut the last 16 bytes) are applied to
   these published files.
2. **The CCTV generators' STREAM cases** (``age/internal/tests/stream_*.go``, testkit at CCTV 7f15def): their
   ``testdata`` outputs are binary and not reachable from here, so each generator's payload is rebuilt from its
   source with a bare ChaCha20-Poly1305 (the testkit's ``PayloadChunk``/``PayloadChunkFinal``), with its file key,
   nonce and chunks, and its ``expect`` and partial ``payload``. :func:`test_the_testkit_port_reproduces_the_
   published_file` shows the port draws the same randomness as the published files came from.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol import blobs
from protocol.errors import ErrorCode, TetherlessError

AGE = Path(__file__).resolve().parent / "vectors" / "age"
PUBLISHED = ("armor", "armor_full_last_line")


# -- a minimal age reader (test only) -------------------------------------------------------------------------


def _bech32_decode(text: str) -> tuple[str, bytes]:
    charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
    text = text.lower()
    hrp, _, data_part = text.rpartition("1")
    values = [charset.index(c) for c in data_part]
    checksum = 1
    for value in [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for i, generator in enumerate((0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)):
            checksum ^= generator if (top >> i) & 1 else 0
    assert checksum == 1, "bad bech32 checksum"
    bits = "".join(f"{v:05b}" for v in values[:-6])
    return hrp, bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits) - 7, 8))


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True)
class AgeVector:
    expect: str
    payload_sha256: str
    file_key: bytes
    identity: bytes
    file: bytes


def _load(name: str) -> AgeVector:
    text = (AGE / name).read_bytes()
    head, _, body = text.partition(b"\n\n")
    fields = dict(line.decode().split(": ", 1) for line in head.splitlines())
    if fields.get("armored") == "yes":
        lines = body.decode().strip().splitlines()
        assert lines[0] == "-----BEGIN AGE ENCRYPTED FILE-----"
        assert lines[-1] == "-----END AGE ENCRYPTED FILE-----"
        body = base64.b64decode("".join(lines[1:-1]), validate=True)
    hrp, identity = _bech32_decode(fields["identity"])
    assert hrp == "age-secret-key-"
    return AgeVector(fields["expect"], fields["payload"], bytes.fromhex(fields["file key"]), identity, body)


def _unwrap(vector: AgeVector) -> tuple[bytes, bytes]:
    """The file key (from the X25519 stanza, the header MAC checked) and the payload (nonce ‖ STREAM)."""
    header_end = vector.file.index(b"\n---") + len(b"\n---")
    mac_line_end = vector.file.index(b"\n", header_end)
    lines = vector.file[:header_end].split(b"\n")
    assert lines[0] == b"age-encryption.org/v1"
    _, kind, share_text = lines[1].split(b" ")
    assert kind == b"X25519"
    share = base64.b64decode(share_text + b"=" * (-len(share_text) % 4))
    wrapped = base64.b64decode(lines[2] + b"=" * (-len(lines[2]) % 4))
    identity = X25519PrivateKey.from_private_bytes(vector.identity)
    recipient = identity.public_key().public_bytes_raw()
    secret = identity.exchange(X25519PublicKey.from_public_bytes(share))
    wrap_key = _hkdf(secret, share + recipient, b"age-encryption.org/v1/X25519")
    file_key = ChaCha20Poly1305(wrap_key).decrypt(bytes(12), wrapped, None)
    mac_text = vector.file[header_end + 1 : mac_line_end]
    mac = base64.b64decode(mac_text + b"=" * (-len(mac_text) % 4))
    expected_mac = hmac.new(_hkdf(file_key, b"", b"header"), vector.file[:header_end], hashlib.sha256).digest()
    assert hmac.compare_digest(mac, expected_mac)
    return file_key, vector.file[mac_line_end + 1 :]


def _open_with_our_stream(file_key: bytes, payload: bytes, piece: int = 1 << 30) -> tuple[bytes, ErrorCode | None]:
    """What our STREAM releases from an age payload before it stops, and the error it stopped with."""
    released = bytearray()
    if len(payload) < blobs.NONCE_BYTES:
        return bytes(released), ErrorCode.BLOB_CORRUPT  # age: a payload without a whole nonce fails
    nonce, stream = payload[: blobs.NONCE_BYTES], payload[blobs.NONCE_BYTES :]
    pieces = [stream[i : i + piece] for i in range(0, len(stream), piece)]
    try:
        for plaintext in blobs.open_payload(blobs.stream_key(file_key, nonce), pieces):
            released += plaintext
    except TetherlessError as error:
        return bytes(released), error.code
    return bytes(released), None


# -- 1. published files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PUBLISHED)
@pytest.mark.parametrize("piece", [1, 7, 1 << 30], ids=["bytewise", "7-byte-pieces", "whole"])
def test_published_age_files_open_with_our_stream(name: str, piece: int) -> None:
    vector = _load(name)
    assert vector.expect == "success"
    file_key, payload = _unwrap(vector)
    assert file_key == vector.file_key
    released, error = _open_with_our_stream(file_key, payload, piece)
    assert error is None
    assert hashlib.sha256(released).hexdigest() == vector.payload_sha256


@pytest.mark.parametrize("name", PUBLISHED)
def test_stream_bad_tag_and_missing_tag_on_the_published_files(name: str) -> None:
    file_key, payload = _unwrap(_load(name))
    bad_tag = payload[:-1] + bytes([payload[-1] ^ 0b0010_0000])
    missing_tag = payload[:-16]
    for tampered in (bad_tag, missing_tag):
        released, error = _open_with_our_stream(file_key, tampered)
        assert (released, error) == (b"", ErrorCode.BLOB_CORRUPT)  # "payload failure", nothing released


# -- 2. the CCTV generators' STREAM cases ------------------------------------------------------------------------

LARGE_FILE_KEY = bytes.fromhex("7aa5bdac0e6afeed3dd0a7eccb42af44")  # testkit.LargeTestFileKey
LARGE_NONCE = bytes.fromhex("c82f71eb82029b77136399e485e879f4")  # testkit.LargeTestNonce
FIRST, SECOND, THIRD = bytes(65536), bytes([1]) * 65536, bytes([2]) * 65536  # LargeTest{First,Second,Third}Chunk
FINAL = object()


def _testkit_payload(*chunks: bytes | tuple[object, bytes]) -> tuple[bytes, bytes]:
    """testkit's ``Nonce(LargeTestNonce)`` then ``PayloadChunk``/``PayloadChunkFinal``: (file payload, plaintext)."""
    aead = ChaCha20Poly1305(_hkdf(LARGE_FILE_KEY, LARGE_NONCE, b"payload"))
    nonce = bytearray(12)
    out, plaintext = bytearray(LARGE_NONCE), bytearray()
    for chunk in chunks:
        if isinstance(chunk, tuple):
            nonce[11] = 1
            chunk = chunk[1]
        plaintext += chunk
        out += aead.encrypt(bytes(nonce), chunk, None)
        nonce[10] += 1
    return bytes(out), bytes(plaintext)


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0b0010_0000])


@dataclass(frozen=True)
class StreamCase:
    payload: bytes
    expect: str
    released: bytes  # success: the whole plaintext; payload failure: ExpectPartialPayload's prefix (or nothing)


def _case(
    chunks: tuple[bytes | tuple[object, bytes], ...],
    expect: str,
    good: int = 0,
    *,
    flip: bool = False,
    garbage: bytes = b"",
) -> StreamCase:
    payload, plaintext = _testkit_payload(*chunks)
    if flip:
        payload = _flip_last(payload)
    return StreamCase(payload + garbage, expect, plaintext if expect == "success" else plaintext[:good])


# name → the generator's chunks, expect and ExpectPartialPayload(n). Rand(n) garbage is any n bytes here.
STREAM_CASES = {
    "stream_last_chunk_full": _case(((FINAL, FIRST),), "success"),
    "stream_three_chunks": _case((FIRST, SECOND, (FINAL, THIRD)), "success"),
    "stream_last_chunk_empty": _case((FIRST, (FINAL, b"")), "payload failure", 65536),
    "stream_no_final_full": _case((FIRST,), "payload failure", 65536),
    "stream_no_final_two_chunks": _case((FIRST, b"age"), "payload failure", 65536),
    "stream_no_final_two_chunks_full": _case((FIRST, SECOND), "payload failure", 2 * 65536),
    "stream_two_final_chunks": _case(((FINAL, FIRST), (FINAL, b"age")), "payload failure", 65536),
    "stream_bad_tag_second_chunk": _case((FIRST, (FINAL, b"age")), "payload failure", 65536, flip=True),
    "stream_bad_tag_second_chunk_full": _case((FIRST, (FINAL, SECOND)), "payload failure", 65536, flip=True),
    "stream_short_second_chunk": _case((FIRST,), "payload failure", 65536, garbage=bytes(range(12))),
    "stream_trailing_garbage_short": _case(((FINAL, FIRST),), "payload failure", 65536, garbage=bytes(range(12))),
    "stream_trailing_garbage_long": _case(((FINAL, FIRST),), "payload failure", 65536, garbage=bytes(range(20))),
    "stream_no_chunks": StreamCase(LARGE_NONCE, "payload failure", b""),
    "stream_short_nonce": StreamCase(LARGE_NONCE[:12], "header failure", b""),
}


@pytest.mark.parametrize("name", sorted(STREAM_CASES))
@pytest.mark.parametrize("piece", [10_000, 1 << 30], ids=["10k-pieces", "whole"])
def test_cctv_stream_cases(name: str, piece: int) -> None:
    case = STREAM_CASES[name]
    released, error = _open_with_our_stream(LARGE_FILE_KEY, case.payload, piece)
    assert error is (None if case.expect == "success" else ErrorCode.BLOB_CORRUPT)
    assert released == case.released


def test_the_testkit_port_reproduces_the_published_file() -> None:
    # testkit.NewTestFile: randomness is ChaCha20("TEST RANDOMNESS TEST RANDOMNESS!", nonce 0) keystream; armor.go
    # draws the X25519 ephemeral scalar (32 bytes), then the payload nonce (16 bytes).
    keystream = Cipher(algorithms.ChaCha20(b"TEST RANDOMNESS TEST RANDOMNESS!", bytes(16)), mode=None).encryptor()
    randomness = keystream.update(bytes(48))
    file_key, payload = _unwrap(_load("armor"))
    share = X25519PrivateKey.from_private_bytes(randomness[:32]).public_key().public_bytes_raw()
    assert base64.b64encode(share).rstrip(b"=") in _load("armor").file
    assert payload[:16] == randomness[32:48]
    assert file_key == b"YELLOW SUBMARINE"  # testkit.TestFileKey
