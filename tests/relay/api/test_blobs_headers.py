"""The blob routes' header parsers (relay/api/blobs.py): Range, Upload-Metadata, Upload-Checksum, capabilities."""

from __future__ import annotations

import base64

import pytest

from protocol.errors import ErrorCode, TetherlessError
from relay.api.blobs import _capability, _checksum, _metadata, _range


@pytest.mark.parametrize(
    ("header", "length", "expected"),
    [
        ("bytes=0-0", 10, (0, 1)),
        ("bytes=0-9", 10, (0, 10)),
        ("bytes=3-", 10, (3, 10)),
        ("bytes=3-100", 10, (3, 10)),  # a last byte beyond the end is the end (RFC 9110 §14.1.2)
        ("bytes=-4", 10, (6, 10)),
        ("bytes=-100", 10, (0, 10)),
        (" bytes=9-9 ", 10, (9, 10)),
    ],
)
def test_one_range_is_served(header: str, length: int, expected: tuple[int, int]) -> None:
    assert _range(header, length) == expected


@pytest.mark.parametrize(
    ("header", "length"),
    [
        ("bytes=10-", 10),  # starts at the end
        ("bytes=5-4", 10),  # last before first
        ("bytes=-0", 10),
        ("bytes=0-", 0),  # nothing to serve of an empty blob
        ("bytes=-1", 0),
        ("bytes=0-1,3-4", 10),  # several ranges
        ("bytes=", 10),
        ("bytes=-", 10),
        ("bytes=a-b", 10),
        ("items=0-1", 10),
        ("bytes=99999999999999999999-", 10),  # more digits than any length
    ],
)
def test_anything_else_is_416(header: str, length: int) -> None:
    with pytest.raises(TetherlessError) as raised:
        _range(header, length)
    assert raised.value.code is ErrorCode.RANGE_NOT_SATISFIABLE


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_metadata_pairs_and_keys_without_values() -> None:
    assert _metadata(None) == {}
    assert _metadata("") == {}
    assert _metadata(f"sha256 {b64(b'x' * 32)}, flag ,name {b64(b'cat')}") == {
        "sha256": b"x" * 32,
        "flag": b"",
        "name": b"cat",
    }


@pytest.mark.parametrize("header", ["a b c", "a !!!", "a AAA", f"a {b64(b'1')},a {b64(b'2')}", ", ,x y"])
def test_malformed_metadata_is_invalid_header(header: str) -> None:
    with pytest.raises(TetherlessError) as raised:
        _metadata(header)
    assert raised.value.code is ErrorCode.INVALID_HEADER


def test_checksums() -> None:
    assert _checksum(None) is None
    parsed = _checksum(f"sha1 {b64(b'd' * 20)}")
    assert parsed is not None
    assert (parsed.algorithm, parsed.digest) == ("sha1", b"d" * 20)
    for header, code in (("md5 AAAA", ErrorCode.BLOB_CHECKSUM_UNSUPPORTED), ("sha256 ***", ErrorCode.INVALID_HEADER)):
        with pytest.raises(TetherlessError) as raised:
            _checksum(header)
        assert raised.value.code is code


def test_capabilities_are_32_bytes_of_base64url_with_or_without_padding() -> None:
    capability = bytes(range(200, 232))  # bytes that base64url and base64 encode differently
    encoded = base64.urlsafe_b64encode(capability).decode()
    assert _capability(encoded) == capability
    assert _capability(encoded.rstrip("=")) == capability
    assert _capability(None) is None
    for bad in (base64.b64encode(capability).decode(), encoded[:-4], "", "é" * 43):
        with pytest.raises(TetherlessError) as raised:
            _capability(bad)
        assert raised.value.code is ErrorCode.INVALID_HEADER
