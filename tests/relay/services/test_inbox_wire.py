"""Inbox pages and stream items are encoded from the store's records without building ``InboxEnvelope``s
(relay/services/inbox.py ``wire_envelopes``, docs/performance.md P5): the bytes must be exactly those the
``InboxEnvelope`` path produces, in MessagePack and JSON, for any record, and for pages read from both
engines."""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import codec
from protocol.messages import Accepted, InboxEnvelope, InboxPage
from relay.config import Config
from relay.services import ServiceContext, Services, limits_from
from relay.services.inbox import positional_twin, wire_envelopes
from relay.store import InboxRecord, NewEnvelope, Store
from tests.relay.store.postgres_db import fresh_database
from tests.relay.store.test_store_contract import FOREVER, Backend, device, open_store, with_devices

U63 = st.integers(min_value=0, max_value=2**63 - 1)
# Around every MessagePack length boundary (bin8 / bin16 / bin32) and integer width (fixint … uint64).
CIPHERTEXT_SIZES = (0, 1, 31, 32, 255, 256, 65_535, 65_536, 70_000)
INT_EDGES = (0, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**63 - 1)
INTS = st.one_of(U63, st.sampled_from(INT_EDGES))
CIPHERTEXTS = st.one_of(
    st.binary(max_size=600),
    st.sampled_from(CIPHERTEXT_SIZES).map(lambda n: bytes(range(256)) * (n // 256) + b"x" * (n % 256)),
)
RECORDS = st.builds(InboxRecord, INTS, st.binary(min_size=16, max_size=16), INTS, INTS, CIPHERTEXTS)


def struct_path(records: list[InboxRecord]) -> list[InboxEnvelope]:
    """What the relay built before: one validated keyword-argument ``InboxEnvelope`` per record."""
    return [
        InboxEnvelope(
            cursor=r.cursor,
            id=r.envelope_id,
            sent_at_ms=r.sent_at_ms,
            expires_at_ms=r.expires_at_ms,
            ciphertext=r.ciphertext,
        )
        for r in records
    ]


@given(records=st.lists(RECORDS, max_size=40), next_cursor=INTS, more=st.booleans())
def test_a_page_encodes_byte_for_byte_as_the_struct_path(
    records: list[InboxRecord], next_cursor: int, more: bool
) -> None:
    fast = InboxPage(envelopes=wire_envelopes(records), next_cursor=next_cursor, more=more)
    slow = InboxPage(envelopes=struct_path(records), next_cursor=next_cursor, more=more)
    for media_type in codec.MEDIA_TYPES:
        body = codec.encode(fast, media_type)
        assert body == codec.encode(slow, media_type)
        assert codec.decode(body, InboxPage, media_type) == slow


@given(records=st.lists(RECORDS, max_size=10))
def test_stream_items_encode_byte_for_byte_as_the_struct_path(records: list[InboxRecord]) -> None:
    for media_type in codec.MEDIA_TYPES:
        fast = [codec.encode_stream_item(env, media_type) for env in wire_envelopes(records)]
        assert fast == [codec.encode_stream_item(env, media_type) for env in struct_path(records)]


def test_the_twin_has_the_messages_schema_and_the_records_field_order() -> None:
    twin = type(wire_envelopes([InboxRecord(1, b"i" * 16, 2, 3, b"c")])[0])
    assert [(f.name, f.encode_name, f.type) for f in msgspec.structs.fields(twin)] == [
        (f.name, f.encode_name, f.type) for f in msgspec.structs.fields(InboxEnvelope)
    ]
    assert (twin.__struct_config__.tag, twin.__struct_config__.tag_field) == ("envelope", "type")
    # A record's tuple is the twin's arguments: same order, the store's names aside.
    assert [f.name for f in msgspec.structs.fields(InboxRecord)] == [
        "cursor",
        "envelope_id",
        "sent_at_ms",
        "expires_at_ms",
        "ciphertext",
    ]


def test_a_message_with_defaults_has_no_positional_twin() -> None:
    with pytest.raises(TypeError, match="Accepted has fields with defaults"):
        positional_twin(Accepted)


# -- the same, for pages read from each engine -------------------------------------------------


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
async def test_pages_read_from_the_store_encode_as_the_struct_path_of_what_was_sent(
    engine: str, tmp_path: Path
) -> None:
    """Expected bytes are built from what was *sent*, so a column read in the wrong order or as another
    type (memoryview, str) would show, not only a difference between the two encoders."""
    with fresh_database() if engine == "postgres" else nullcontext("") as url:
        async with open_store(Backend(engine, url), tmp_path) as store:
            await page_through_and_compare(store)


async def page_through_and_compare(store: Store) -> None:
    now = 1_765_000_000_000
    receiver = device(1)
    await with_devices(store, receiver)
    sent = [
        NewEnvelope(
            recipient_device=receiver.device_id,
            recipient_account=receiver.account_id,
            idempotency_key=b"key-%04d" % n,
            digest=os.urandom(16),
            envelope_id=os.urandom(16),
            expires_at_ms=now + 1_000 + n * 2**33,  # beyond 32 bits from the second one on
            ciphertext=os.urandom(size),
        )
        for n, size in enumerate([*CIPHERTEXT_SIZES, *range(2, 40)])
    ]
    await store.store_envelopes("sender", sent, now, len(sent), FOREVER)
    services = Services.build(store, ServiceContext("relay.test", limits_from(Config()), clock_ms=lambda: now))
    for limit in (1, 7, 1000):
        after = seen = 0
        while True:
            page = await services.inbox.page(receiver.device_id, after, limit)
            expected = [
                InboxEnvelope(
                    cursor=got.cursor,
                    id=env.envelope_id,
                    sent_at_ms=now,
                    expires_at_ms=env.expires_at_ms,
                    ciphertext=env.ciphertext,
                )
                for got, env in zip(page.envelopes, sent[seen : seen + limit], strict=True)
            ]
            seen += len(expected)
            slow = InboxPage(envelopes=expected, next_cursor=expected[-1].cursor, more=seen < len(sent))
            for media_type in codec.MEDIA_TYPES:
                assert codec.encode(page, media_type) == codec.encode(slow, media_type)
            if not page.more:
                break
            after = page.next_cursor
        assert seen == len(sent)
