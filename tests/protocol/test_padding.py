"""Padding to size buckets (protocol/padding.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import ErrorCode, TetherlessError
from protocol.padding import bucket_for, is_bucket, pad, unpad

KIB = 1024


@pytest.mark.parametrize(
    ("n", "bucket"),
    [
        (0, 256),
        (1, 256),
        (256, 256),
        (257, 512),
        (512, 512),
        (513, KIB),
        (33 * KIB, 64 * KIB),
        (64 * KIB, 64 * KIB),
        (64 * KIB + 1, 128 * KIB),
        (128 * KIB + 1, 192 * KIB),
        (1000 * KIB, 1024 * KIB),
    ],
)
def test_bucket_for(n: int, bucket: int) -> None:
    assert bucket_for(n) == bucket


def test_bucket_for_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        bucket_for(-1)


@pytest.mark.parametrize(("n", "size"), [(0, 256), (255, 256), (256, 512), (511, 512), (64 * KIB, 128 * KIB)])
def test_pad_needs_one_byte_for_the_marker(n: int, size: int) -> None:
    padded = pad(b"x" * n)
    assert len(padded) == size
    assert padded[n] == 0x80
    assert padded[n + 1 :] == bytes(size - n - 1)


def test_pad_keeps_trailing_zeros_and_markers_of_the_data() -> None:
    for data in (b"\x00", b"\x80", b"a\x80\x00\x00", b"\x80" * 300):
        assert unpad(pad(data)) == data


@pytest.mark.parametrize(
    "bad",
    [
        b"",  # not a bucket
        bytes(256),  # no marker at all
        b"a" * 255 + b"\x01",  # last non-zero byte is not the marker
        b"a" * 254 + b"\x80\x01",
        b"\x80" + bytes(254),  # 255 bytes: not a bucket size
        b"\x80" + bytes(256),  # 257 bytes
    ],
)
def test_unpad_rejects_bad_padding(bad: bytes) -> None:
    with pytest.raises(TetherlessError) as info:
        unpad(bad)
    assert info.value.code is ErrorCode.MALFORMED_BODY


@given(st.binary(max_size=3000))
def test_round_trip(data: bytes) -> None:
    padded = pad(data)
    assert is_bucket(len(padded))
    assert len(padded) == bucket_for(len(data) + 1)
    assert unpad(padded) == data


@given(st.integers(min_value=0, max_value=50 * 1024 * 1024))
def test_bucket_is_smallest(n: int) -> None:
    bucket = bucket_for(n)
    assert bucket >= n
    assert is_bucket(bucket)
    # No smaller bucket would fit: the previous bucket is below n.
    previous = bucket // 2 if bucket <= 64 * KIB else bucket - 64 * KIB
    assert bucket == 256 or previous < n


@given(st.integers(min_value=1, max_value=4 * 1024 * 1024))
def test_sizes_leak_only_the_bucket(n: int) -> None:
    # Two messages in the same bucket are indistinguishable by length.
    assert len(pad(bytes(n - 1))) == bucket_for(n)
