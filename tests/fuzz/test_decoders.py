"""Property tests: every decoder in protocol/ fails only with a documented TetherlessError code, never anything else.

Arbitrary bytes (and, for the codec, arbitrary well-formed MessagePack/JSON
values, which reach deeper than random bytes do) go into each decoder.
``TETHERLESS_FUZZ_EXAMPLES`` raises the example count (``make fuzz``).
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import msgspec
import nacl.public
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec, padding, payload
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import Address
from protocol.messages import ALL_MESSAGES

EXAMPLES = int(os.environ.get("TETHERLESS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DECODE_CODES = {ErrorCode.MALFORMED_BODY, ErrorCode.INVALID_FIELD}
MEDIA_TYPES = [codec.MSGPACK, codec.JSON]

# JSON-shaped values: what a decoder sees from a well-formed but hostile body.
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=20), children, max_size=5),
    max_leaves=20,
)


def _field_names(message: type[Any]) -> list[str]:
    return list(getattr(message, "__struct_fields__", ()))


def _expect_documented(call: Any, codes: set[ErrorCode]) -> None:
    """``call`` returns, or raises TetherlessError with one of ``codes``; any other exception fails the test."""
    error: TetherlessError | None = None
    try:
        call()
    except TetherlessError as exc:
        error = exc
    if error is not None:
        assert error.code in codes, f"undocumented code {error.code}: {error}"


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("media_type", MEDIA_TYPES)
@FUZZ
@given(data=st.binary(max_size=300))
def test_codec_decode_arbitrary_bytes(message: type[Any], media_type: str, data: bytes) -> None:
    _expect_documented(lambda: codec.decode(data, message, media_type), DECODE_CODES)


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: m.__name__)
@pytest.mark.parametrize("media_type", MEDIA_TYPES)
@FUZZ
@given(data=st.data())
def test_codec_decode_hostile_structures(message: type[Any], media_type: str, data: st.DataObject) -> None:
    """Objects with the message's own field names and arbitrary values: the validator's hard cases."""
    names = _field_names(message)
    keys = st.sampled_from(names) | st.text(max_size=10) if names else st.text(max_size=10)
    value = data.draw(st.dictionaries(keys, values, max_size=len(names) + 2) | values)
    if media_type == codec.JSON:
        body = msgspec.json.encode(value, enc_hook=lambda b: b.hex() if isinstance(b, bytes) else b)
    else:
        body = msgspec.msgpack.encode(value)
    _expect_documented(lambda: codec.decode(body, message, media_type), DECODE_CODES)


@pytest.mark.parametrize("media_type", MEDIA_TYPES)
@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=8))
def test_stream_decoder_arbitrary_bytes_and_chunking(media_type: str, data: bytes, cuts: list[int]) -> None:
    message = ALL_MESSAGES[0]
    decoder = codec.StreamDecoder(message, media_type, max_item_bytes=1024)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})

    def feed_all() -> None:
        for start, end in itertools.pairwise(points):
            for _ in decoder.feed(data[start:end]):
                pass

    _expect_documented(feed_all, DECODE_CODES)


@pytest.mark.parametrize("media_type", MEDIA_TYPES)
@FUZZ
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10), copies=st.integers(1, 4))
def test_stream_decoder_chunking_does_not_change_the_items(media_type: str, cuts: list[int], copies: int) -> None:
    """Valid items split at arbitrary points decode to the same items as when fed whole."""
    from protocol.messages import Health

    item = Health(status="ok")
    stream = b"".join(codec.encode_stream_item(item, media_type) for _ in range(copies))
    decoder = codec.StreamDecoder(Health, media_type)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    items = [x for start, end in itertools.pairwise(points) for x in decoder.feed(stream[start:end])]
    assert items == [item] * copies


@FUZZ
@given(text=st.text(max_size=200) | st.from_regex(r"[a-z2-7]{0,40}(\.[a-z2-7]{0,40})?@[a-z0-9.:\-\[\]]{0,30}"))
def test_address_parse(text: str) -> None:
    _expect_documented(lambda: Address.parse(text), {ErrorCode.INVALID_FIELD})


@FUZZ
@given(
    data=st.binary(max_size=2048)
    | st.builds(lambda n, tail: bytes(n) + tail, st.integers(0, 600), st.binary(max_size=4))
)
def test_unpad(data: bytes) -> None:
    _expect_documented(lambda: padding.unpad(data), {ErrorCode.MALFORMED_BODY})


BOX_KEY = nacl.public.PrivateKey(bytes(range(32)))
OWN_ADDRESS = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@relay.example"


@FUZZ
@given(data=st.binary(max_size=400))
def test_payload_open_arbitrary_ciphertext(data: bytes) -> None:
    _expect_documented(
        lambda: payload.open(data, box_private_key=bytes(BOX_KEY), own_address=OWN_ADDRESS),
        {ErrorCode.MALFORMED_BODY, ErrorCode.BAD_SIGNATURE},
    )


@FUZZ
@given(plaintext=st.binary(max_size=400))
def test_payload_open_well_sealed_garbage(plaintext: bytes) -> None:
    """A sealed box that opens, holding arbitrary (padded or not) bytes: the layers after decryption."""
    for inner in (plaintext, padding.pad(plaintext)):
        sealed = bytes(nacl.public.SealedBox(BOX_KEY.public_key).encrypt(inner))
        _expect_documented(
            lambda sealed=sealed: payload.open(sealed, box_private_key=bytes(BOX_KEY), own_address=OWN_ADDRESS),
            {ErrorCode.MALFORMED_BODY, ErrorCode.BAD_SIGNATURE},
        )
