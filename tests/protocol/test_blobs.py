"""Media blob encryption (protocol/blobs.py; docs/crypto.md "Media blobs"; decision 0014 D1, D2).

The vectors in protocol/vectors/blob-stream.json are rebuilt byte for byte here and recomputed from the
specification with ``hmac``/``hashlib`` and a bare ChaCha20-Poly1305 (:func:`_reference_blob`), so the file does
not merely restate the module. Regenerate (only when the format changes on purpose):
``.venv/bin/python -m tests.protocol.test_blobs``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import math
import random
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from protocol import blobs, codec
from protocol.errors import ErrorCode, TetherlessError

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "blob-stream.json"
SIZES = (0, 1, 540, 541, 65535, 65536, 65537, 200000)
HEX_LIMIT = 1024  # plaintexts and ciphertexts up to this many bytes are written out in full
KIB = 1024


def _plaintext(size: int) -> bytes:
    """Byte ``i`` is ``i mod 251`` (a prime, so chunks differ from each other)."""
    return bytes(i % 251 for i in range(size))


def _file_key(case: int) -> bytes:
    return bytes((case * 37 + i) % 256 for i in range(32))


def _nonce(case: int) -> bytes:
    return bytes((0xA0 + case * 11 + i) % 256 for i in range(16))


def _encrypt(file_key: bytes, nonce: bytes, data: bytes) -> bytes:
    encryptor = blobs.Encryptor(file_key, nonce, len(data))
    return b"".join(encryptor.read_range(0, encryptor.length, lambda offset, n: data[offset : offset + n]))


def _split(ciphertext: bytes) -> list[bytes]:
    payload = ciphertext[blobs.HEADER_BYTES :]
    return [payload[i : i + blobs.CIPHER_CHUNK_BYTES] for i in range(0, len(payload), blobs.CIPHER_CHUNK_BYTES)]


# -- an independent reading of the specification (decision 0014 D1, D2) ---------------------------------------


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()  # L = 32: one block


def _reference_padded_size(n: int) -> int:
    """D2 with floats, as Signal writes it; right away from a bucket's edge (see test_padded_size_*)."""
    return max(541, math.floor(1.05 ** math.ceil(math.log(n + 1) / math.log(1.05))))


def _reference_blob(file_key: bytes, nonce: bytes, data: bytes) -> bytes:
    payload_key = _hkdf_sha256(file_key, nonce, b"payload")
    commitment = _hkdf_sha256(file_key, nonce, b"tetherless-blob/1 commitment")
    padded = data + b"\x80"
    padded += bytes(_reference_padded_size(len(data)) - len(padded))
    pieces = [padded[i : i + 65536] for i in range(0, len(padded), 65536)]
    aead = ChaCha20Poly1305(payload_key)
    out = b"TLBLOB\x00\x01" + nonce + commitment
    for index, piece in enumerate(pieces):
        out += aead.encrypt(index.to_bytes(11, "big") + bytes([index == len(pieces) - 1]), piece, None)
    return out


# -- vectors ------------------------------------------------------------------------------------------------------


def build() -> dict[str, Any]:
    cases = []
    for case, size in enumerate(SIZES):
        file_key, nonce, data = _file_key(case), _nonce(case), _plaintext(size)
        payload_key, commitment = blobs.derive(file_key, nonce)
        ciphertext = _encrypt(file_key, nonce, data)
        chunks = _split(ciphertext)
        entry: dict[str, Any] = {
            "size": size,
            "file_key": file_key.hex(),
            "nonce": nonce.hex(),
            "plaintext_sha256": hashlib.sha256(data).hexdigest(),
            "payload_key": payload_key.hex(),
            "commitment": commitment.hex(),
            "header": blobs.header(nonce, commitment).hex(),
            "padded_size": blobs.padded_size(size),
            "chunks": len(chunks),
            "ciphertext_length": len(ciphertext),
            "ciphertext_sha256": hashlib.sha256(ciphertext).hexdigest(),
            "chunk_sha256": [hashlib.sha256(chunk).hexdigest() for chunk in chunks],
            "first_chunk_head": chunks[0][:48].hex(),
            "last_chunk_tail": chunks[-1][-48:].hex(),
        }
        if size <= HEX_LIMIT:
            entry["plaintext"] = data.hex()
        if len(ciphertext) <= HEX_LIMIT:
            entry["ciphertext"] = ciphertext.hex()
        cases.append(entry)
    # 320,471,486,604 pads to 320,471,486,605 = ⌊(21/20)^k⌋ exactly; floats say ...606 (see the padded_size tests)
    edges = [0, 539, 540, 541, 567, 568, 569, 65535, 65536, 2**20, 2**30, 320_471_486_604, 2**40 - 1, 2**40]
    ref = blobs.BlobRef(
        relay="relay.example.org",
        blob_id="0123456789abcdef0123456789abcdef",
        digest=bytes([1]) * 32,
        key=bytes([2]) * 32,
        length=blobs.blob_length(1_000_000),
        capability=bytes([3]) * 32,
        name="scan 2026-12-07.pdf",
        content_type="application/pdf",
        size=1_000_000,
    ).check()
    return {
        "description": (
            "Tetherless media blobs (docs/crypto.md 'Media blobs', decision 0014 D1/D2): age's STREAM under "
            "payload_key = HKDF-SHA-256(file_key, salt=nonce, info='payload'), header 'TLBLOB\\x00\\x01' || nonce "
            "|| commitment (HKDF info 'tetherless-blob/1 commitment'), plaintext padded with 0x80 then zeros to "
            "padded_size. Plaintext byte i is i mod 251. Chunks are the ciphertext after the 56-byte header, "
            "65552 bytes each, the last shorter."
        ),
        "cases": cases,
        "padded_sizes": [[n, blobs.padded_size(n)] for n in edges],
        # The file message's body (content type application/vnd.tetherless.file+msgpack): a MessagePack map of
        # BlobRef's fields in declaration order, bytes as bin.
        "blob_ref": {
            "fields": {k: v.hex() if isinstance(v, bytes) else v for k, v in msgspec.structs.asdict(ref).items()},
            "msgpack": codec.encode(ref, codec.MSGPACK).hex(),
        },
    }


def _vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


def test_vectors_are_reproducible() -> None:
    assert build() == _vectors()


def test_the_blob_ref_vector_decodes_to_its_fields_and_checks() -> None:
    vector = _vectors()["blob_ref"]
    ref = codec.decode(bytes.fromhex(vector["msgpack"]), blobs.BlobRef, codec.MSGPACK).check()
    fields = {k: v.hex() if isinstance(v, bytes) else v for k, v in msgspec.structs.asdict(ref).items()}
    assert fields == vector["fields"]


@pytest.mark.parametrize("case", range(len(SIZES)))
def test_vectors_follow_the_specification_and_decrypt(case: int) -> None:
    v = _vectors()["cases"][case]
    file_key, nonce, data = bytes.fromhex(v["file_key"]), bytes.fromhex(v["nonce"]), _plaintext(v["size"])
    assert hashlib.sha256(data).hexdigest() == v["plaintext_sha256"]
    assert _hkdf_sha256(file_key, nonce, b"payload").hex() == v["payload_key"]
    assert _hkdf_sha256(file_key, nonce, b"tetherless-blob/1 commitment").hex() == v["commitment"]
    reference = _reference_blob(file_key, nonce, data)
    assert hashlib.sha256(reference).hexdigest() == v["ciphertext_sha256"]
    assert len(reference) == v["ciphertext_length"] == blobs.blob_length(v["size"])
    assert reference[: blobs.HEADER_BYTES].hex() == v["header"]
    assert b"".join(blobs.decrypt(file_key, [reference], v["size"])) == data


@pytest.mark.parametrize(
    ("n", "padded"),
    [(0, 541), (1, 541), (540, 541), (541, 568), (567, 568), (568, 596), (65535, 67789), (65536, 67789)],
)
def test_padded_size_known_values(n: int, padded: int) -> None:
    assert blobs.padded_size(n) == padded


def _buckets() -> list[int]:
    """Every bucket from 541 up to past MAX_FILE_BYTES + 1, exactly: ⌊21^k / 20^k⌋."""
    out, k = [], 0
    while not out or out[-1] <= blobs.MAX_FILE_BYTES + 1:
        bucket = 21**k // 20**k
        if bucket >= blobs.MIN_PADDED_BYTES and (not out or bucket > out[-1]):
            out.append(bucket)
        k += 1
    return out


def test_padded_size_is_exact_at_every_bucket_edge_up_to_a_tebibyte() -> None:
    buckets = _buckets()
    assert buckets[0] == blobs.MIN_PADDED_BYTES  # 541 = ⌊1.05^129⌋, Signal's smallest bucket
    for smaller, bucket in itertools.pairwise(buckets):
        if bucket - 1 > blobs.MAX_FILE_BYTES:
            break
        # n + 1 == bucket fits exactly; one byte more needs the next bucket
        assert blobs.padded_size(bucket - 1) == bucket
        assert blobs.padded_size(smaller) == bucket
        if bucket <= blobs.MAX_FILE_BYTES:
            assert blobs.padded_size(bucket) > bucket
    assert blobs.padded_size(blobs.MAX_FILE_BYTES) in buckets


def test_padded_size_is_monotone_and_fits_for_the_first_sizes() -> None:
    previous = blobs.MIN_PADDED_BYTES
    for n in range(70_000):
        padded = blobs.padded_size(n)
        assert previous <= padded
        assert n + 1 <= padded
        previous = padded


def _exact_padded_size(n: int) -> int:
    """D2 in exact rationals: the smallest k with (21/20)^k ≥ n + 1, then ⌊(21/20)^k⌋, at least 541."""
    k = 0
    while Fraction(21, 20) ** k < n + 1:
        k += 1
    return max(541, math.floor(Fraction(21, 20) ** k))


@given(st.integers(min_value=0, max_value=blobs.MAX_FILE_BYTES))
def test_padded_size_is_the_exact_formula_and_costs_at_most_5_percent(n: int) -> None:
    padded = blobs.padded_size(n)
    assert padded == _exact_padded_size(n)
    assert n + 1 <= padded
    assert padded <= max(blobs.MIN_PADDED_BYTES, math.ceil((n + 1) * 1.05))
    # The float formula drifts: 1.05 is not a double, so ⌊1.05^k⌋ in floats can be one byte off from 250 GB on
    # (320,471,486,605 exactly, 320,471,486,606 in floats), and ⌈log(n+1)/log 1.05⌉ rounds either way at an edge.
    # Two implementations that both use floats need not even agree (pow is not correctly rounded everywhere):
    # the exact definition is the one both sides can compute.
    k = math.log(n + 1) / math.log(1.05)
    if abs(k - round(k)) > 1e-9:
        assert abs(padded - _reference_padded_size(n)) <= 1


@given(st.integers(min_value=0, max_value=blobs.MAX_FILE_BYTES), st.integers(min_value=0, max_value=2**20))
def test_padded_size_is_monotone(n: int, more: int) -> None:
    m = min(n + more, blobs.MAX_FILE_BYTES)
    assert blobs.padded_size(n) <= blobs.padded_size(m)


@pytest.mark.parametrize("n", [-1, blobs.MAX_FILE_BYTES + 1])
def test_padded_size_refuses_impossible_sizes(n: int) -> None:
    with pytest.raises(ValueError, match="file size"):
        blobs.padded_size(n)


# -- round trips and random access ------------------------------------------------------------------------------

_SIZES = st.one_of(
    st.integers(min_value=0, max_value=3 * blobs.CHUNK_BYTES + 100),
    st.sampled_from([blobs.CHUNK_BYTES * k + d for k in (1, 2) for d in (-3000, -1, 0, 1)]),
)


def _random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@given(_SIZES, st.integers(min_value=1, max_value=100_000), st.integers())
def test_round_trip_in_pieces_of_any_size(size: int, piece: int, seed: int) -> None:
    data = _random_bytes(size, seed)
    key, nonce = _random_bytes(32, seed + 1), _random_bytes(16, seed + 2)
    ciphertext = _encrypt(key, nonce, data)
    assert len(ciphertext) == blobs.blob_length(size)
    pieces = [ciphertext[i : i + piece] for i in range(0, len(ciphertext), piece)]
    assert b"".join(blobs.decrypt(key, pieces, size)) == data


@given(_SIZES, st.data())
def test_any_range_equals_the_slice_of_the_whole_ciphertext(size: int, data: st.DataObject) -> None:
    plaintext = _random_bytes(size, size)
    key, nonce = bytes(32), bytes(range(16))
    encryptor = blobs.Encryptor(key, nonce, size)
    whole = _reference_blob(key, nonce, plaintext)
    start = data.draw(st.integers(min_value=0, max_value=encryptor.length))
    end = data.draw(st.integers(min_value=start, max_value=encryptor.length))
    reads: list[int] = []

    def read(offset: int, n: int) -> bytes:
        reads.append(n)
        return plaintext[offset : offset + n]

    pieces = list(encryptor.read_range(start, end, read))
    assert b"".join(pieces) == whole[start:end]
    assert all(n <= blobs.CHUNK_BYTES for n in reads)  # one chunk of the file at a time
    assert all(len(p) <= blobs.CIPHER_CHUNK_BYTES for p in pieces)


def test_random_access_chunks_open_at_their_index() -> None:
    data = _random_bytes(200_000, 7)
    key, nonce = bytes([1]) * 32, bytes([2]) * 16
    encryptor = blobs.Encryptor(key, nonce, len(data))
    decryptor = blobs.Decryptor(key, encryptor.header)
    for index in range(encryptor.chunks):
        start, end = encryptor.file_span(index)
        sealed = encryptor.chunk(index, data[start:end])
        opened = decryptor.open_chunk(index, sealed, last=index == encryptor.chunks - 1)
        assert blobs.strip_padding(index, opened, len(data)) == data[start:end]


def test_encryptor_refuses_a_file_that_changed_and_ranges_outside_the_blob() -> None:
    encryptor = blobs.Encryptor(bytes(32), bytes(16), 100_000)
    with pytest.raises(ValueError, match="holds"):
        list(encryptor.read_range(0, encryptor.length, lambda offset, n: bytes(n - 1)))
    with pytest.raises(ValueError, match="within"):
        list(encryptor.read_range(0, encryptor.length + 1, lambda offset, n: bytes(n)))
    with pytest.raises(ValueError, match="index"):
        encryptor.chunk(encryptor.chunks, b"")


# -- what a decryptor refuses --------------------------------------------------------------------------------------

KEY, NONCE = bytes([0x11]) * 32, bytes([0x22]) * 16
SIZE = 2 * blobs.CHUNK_BYTES + 5000  # three chunks, the padding in the last
DATA = bytes(i % 7 + 1 for i in range(SIZE))  # no 0x80 and no zero, so a wrong size shows in the padding
BLOB = _encrypt(KEY, NONCE, DATA)
CHUNKS = _split(BLOB)
HEADER = BLOB[: blobs.HEADER_BYTES]
PAYLOAD_KEY, _ = blobs.derive(KEY, NONCE)


def _refused(ciphertext: Iterable[bytes], code: ErrorCode = ErrorCode.BLOB_CORRUPT, *, size: int = SIZE) -> str:
    with pytest.raises(TetherlessError) as refused:
        list(blobs.decrypt(KEY, ciphertext, size))
    assert refused.value.code is code
    return refused.value.detail


def test_the_three_chunks_open() -> None:
    assert len(CHUNKS) == 3
    assert b"".join(blobs.decrypt(KEY, [BLOB], SIZE)) == DATA


def test_wrong_key_is_refused_by_the_commitment_before_any_chunk() -> None:
    other = bytes([0x12]) * 32
    with pytest.raises(TetherlessError) as refused:
        blobs.Decryptor(other, HEADER)
    assert refused.value.code is ErrorCode.BLOB_KEY_MISMATCH
    assert "file key" in refused.value.detail


def test_a_header_commitment_for_another_key_is_refused() -> None:
    # A forged header: the right nonce, the commitment of another key. Without the commitment check the chunks
    # would be tried; with it, nothing is decrypted.
    _, forged = blobs.derive(bytes([0x99]) * 32, NONCE)
    with pytest.raises(TetherlessError) as refused:
        blobs.Decryptor(KEY, blobs.header(NONCE, forged))
    assert refused.value.code is ErrorCode.BLOB_KEY_MISMATCH


@pytest.mark.parametrize(
    "header",
    [b"", HEADER[:-1], b"TLBLOB\x00\x02" + HEADER[8:], b"age-encryption.org/v1\n" + HEADER[22:]],
    ids=["empty", "short", "next-version", "age-file"],
)
def test_a_header_of_another_format_is_refused(header: bytes) -> None:
    with pytest.raises(TetherlessError) as refused:
        blobs.Decryptor(KEY, header)
    assert refused.value.code is ErrorCode.BLOB_CORRUPT


def test_truncation_is_refused() -> None:
    assert "shorter" in _refused([HEADER, *CHUNKS[:2]])  # the last chunk is missing
    assert "shorter" in _refused([BLOB[:-1]])
    assert "shorter" in _refused([HEADER])


def test_trailing_bytes_are_refused() -> None:
    assert "longer" in _refused([BLOB, b"\x00"])
    assert "longer" in _refused([BLOB, bytes(blobs.CIPHER_CHUNK_BYTES)])


def test_reordered_chunks_are_refused() -> None:
    assert "authenticate" in _refused([HEADER, CHUNKS[1], CHUNKS[0], CHUNKS[2]])


def test_chunks_swapped_between_files_are_refused() -> None:
    other = _encrypt(bytes([0x33]) * 32, NONCE, DATA)  # same size and content, another file key
    assert "authenticate" in _refused([HEADER, CHUNKS[0], _split(other)[1], CHUNKS[2]])
    same_key = _encrypt(KEY, bytes([0x44]) * 16, DATA)  # same key, another nonce
    assert "authenticate" in _refused([HEADER, _split(same_key)[0], CHUNKS[1], CHUNKS[2]])


def test_a_last_flag_on_a_non_last_chunk_is_refused() -> None:
    stream = blobs.PayloadStream(PAYLOAD_KEY)
    early_end = stream.seal(0, DATA[: blobs.CHUNK_BYTES], last=True)
    assert "authenticate" in _refused([HEADER, early_end, CHUNKS[1], CHUNKS[2]])
    decryptor = blobs.Decryptor(KEY, HEADER)
    with pytest.raises(TetherlessError) as refused:
        decryptor.open_chunk(0, CHUNKS[0], last=True)  # random access: a non-last chunk read as the last
    assert refused.value.code is ErrorCode.BLOB_CORRUPT
    with pytest.raises(TetherlessError):
        decryptor.open_chunk(2, CHUNKS[2], last=False)  # and the last one read as if more followed


def test_an_empty_last_chunk_after_other_chunks_is_refused() -> None:
    # What a malicious sender (it holds the key) could build: the real chunks, then an empty final chunk.
    stream = blobs.PayloadStream(PAYLOAD_KEY)
    empty_end = stream.seal(2, b"", last=True)
    assert "shorter" in _refused([HEADER, CHUNKS[0], CHUNKS[1], empty_end])
    with pytest.raises(TetherlessError, match="empty final chunk"):
        list(blobs.open_payload(PAYLOAD_KEY, [CHUNKS[0], CHUNKS[1], empty_end]))


def test_a_flipped_bit_is_refused_and_nothing_after_it_is_released() -> None:
    tampered = bytearray(BLOB)
    tampered[blobs.HEADER_BYTES + blobs.CIPHER_CHUNK_BYTES + 100] ^= 1  # inside chunk 1
    released: list[bytes] = []
    with pytest.raises(TetherlessError) as refused:
        released.extend(blobs.decrypt(KEY, [bytes(tampered)], SIZE))
    assert refused.value.code is ErrorCode.BLOB_CORRUPT
    assert b"".join(released) == DATA[: blobs.CHUNK_BYTES]  # only what authenticated, in order


def test_a_wrong_size_is_refused() -> None:
    assert "padding" in _refused([BLOB], size=SIZE - 1)  # same bucket: the padding does not start there
    assert "padding" in _refused([BLOB], size=SIZE + 1)
    _refused([BLOB], size=10)  # another bucket: the lengths disagree


@pytest.mark.parametrize(
    "padding",
    [b"\x00" * 10, b"\x80" + b"\x00" * 8 + b"\x01", b"\x81" + b"\x00" * 9],
    ids=["no-marker", "junk", "bad-marker"],
)
def test_a_sender_that_breaks_the_padding_is_refused(padding: bytes) -> None:
    size = blobs.padded_size(1000) - len(padding)
    assert blobs.padded_size(size) == size + len(padding)
    stream = blobs.PayloadStream(PAYLOAD_KEY)
    blob = HEADER + stream.seal(0, bytes(size) + padding, last=True)
    with pytest.raises(TetherlessError, match="padding"):
        list(blobs.decrypt(KEY, [blob], size))


def test_open_payload_refuses_an_empty_payload_and_a_missing_final_chunk() -> None:
    with pytest.raises(TetherlessError, match="no final chunk"):
        list(blobs.open_payload(PAYLOAD_KEY, []))
    released = []
    with pytest.raises(TetherlessError, match="no final chunk"):
        released.extend(blobs.open_payload(PAYLOAD_KEY, CHUNKS[:2]))  # cut after a full chunk
    assert b"".join(released) == DATA[: 2 * blobs.CHUNK_BYTES]


# -- the reference inside the end-to-end message ------------------------------------------------------------------


def _ref(**changes: Any) -> blobs.BlobRef:
    fields: dict[str, Any] = {
        "relay": "relay.example.org",
        "blob_id": "0123456789abcdef0123456789abcdef",
        "digest": hashlib.sha256(BLOB).digest(),
        "key": KEY,
        "length": len(BLOB),
        "capability": bytes([5]) * 32,
        "name": "scan 2026-12-07.pdf",
        "content_type": "application/pdf",
        "size": SIZE,
    }
    fields.update(changes)
    return blobs.BlobRef(**fields)


def test_blob_ref_round_trips_and_checks() -> None:
    ref = _ref()
    assert ref.check() is ref
    assert codec.decode(codec.encode(ref), blobs.BlobRef) == ref
    assert codec.decode(codec.encode(ref, codec.JSON), blobs.BlobRef, codec.JSON) == ref


@pytest.mark.parametrize(
    "changes",
    [
        {"length": len(BLOB) + 1},
        {"size": SIZE + 70_000},
        {"blob_id": "0123456789ABCDEF0123456789ABCDEF"},
        {"blob_id": "00"},
        {"key": bytes(16)},
        {"digest": bytes(33)},
        {"capability": b""},
        {"relay": "relay.example.org/evil"},
        {"relay": "relay.example.org\n"},  # msgspec's pattern "$" would let a final newline through
        {"blob_id": "0" * 32 + "\n"},
        {"name": "../../.ssh/authorized_keys"},
        {"name": "a/b"},
        {"name": "a\\b"},
        {"name": ".."},
        {"name": "."},
        {"name": "report\x00.pdf"},
        {"name": "line\nbreak"},
        {"name": "\u202etxt.exe"},
        {"name": ""},
        {"content_type": "text/plain\r\nX-Injected: 1"},
        {"size": -1},
    ],
    ids=str,
)
def test_blob_ref_check_refuses(changes: dict[str, Any]) -> None:
    with pytest.raises(TetherlessError) as refused:
        _ref(**changes).check()
    assert refused.value.code is ErrorCode.INVALID_FIELD


def test_blob_ref_with_a_bad_field_does_not_decode() -> None:
    raw = msgspec.structs.asdict(_ref())
    raw["key"] = bytes(31)
    with pytest.raises(TetherlessError) as refused:
        codec.decode(msgspec.msgpack.encode(raw), blobs.BlobRef)
    assert refused.value.code in {ErrorCode.INVALID_FIELD, ErrorCode.MALFORMED_BODY}


@given(st.text(max_size=400))
def test_safe_name_never_leaves_the_directory(name: str) -> None:
    safe = blobs.safe_name(name)
    assert safe
    assert blobs.safe_name(safe) == safe
    assert len(safe.encode()) <= 255
    assert safe not in {".", ".."}
    assert not safe.startswith(".")
    assert not any(c in safe for c in '/\\:*?"<>|')
    assert all(c.isprintable() or c == " " for c in safe)
    for path in (PurePosixPath("/downloads") / safe, PureWindowsPath("C:/downloads") / safe):
        assert path.parent.name == "downloads"
        assert path.name == safe


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "_.._etc_passwd"),
        ("C:\\Windows\\win.ini", "C__Windows_win.ini"),
        ("CON.txt", "_CON.txt"),
        (".bashrc", "bashrc"),
        ("photo.jpg ", "photo.jpg"),
        ("\u202egpj.exe", "gpj.exe"),
        ("\x00\x01", "file"),
        ("x" * 300 + ".tar.gz", "x" * 252 + ".gz"),
    ],
)
def test_safe_name_examples(name: str, safe: str) -> None:
    assert blobs.safe_name(name) == safe


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {VECTORS}")
