"""The send path's fast pieces (relay/services/inbox.py, docs/performance.md P2) answer exactly as the code
they replaced: a batch's response is byte-identical to the one built from keyword ``Accepted`` values with one
random draw per envelope, on both engines, for fresh envelopes, retries and a mix; the recipient parse cache
refuses a bad address every time."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import codec
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import Address
from protocol.messages import Accepted, OutboundEnvelope, SendRequest, SendResponse
from relay.config import Config
from relay.services import ServiceContext, Services, limits_from
from relay.services.abuse import AbuseLimits, RateSettings
from relay.services.auth import Principal
from relay.services.inbox import InboxNotifier, InboxService, parse_recipient, send_response
from relay.store import NewEnvelope, Store, StoredEnvelope
from relay.store.base import envelope_digest
from tests.relay.store.postgres_db import fresh_database
from tests.relay.store.test_store_contract import Backend, device, open_store, with_devices

NOW = 1_765_000_000_000
U63 = st.integers(min_value=0, max_value=2**63 - 1)
STORED = st.builds(StoredEnvelope, st.binary(min_size=16, max_size=16), U63, st.booleans(), st.just("d" * 32))


@given(stored=st.lists(STORED, max_size=30))
def test_the_response_encodes_byte_for_byte_as_keyword_accepted_values(stored: list[StoredEnvelope]) -> None:
    slow = SendResponse(
        accepted=[Accepted(id=r.envelope_id, sent_at_ms=r.sent_at_ms, duplicate=r.duplicate) for r in stored]
    )
    for media_type in codec.MEDIA_TYPES:
        body = codec.encode(send_response(stored), media_type)
        assert body == codec.encode(slow, media_type)
        assert codec.decode(body, SendResponse, media_type) == slow


def test_a_bad_recipient_is_refused_every_time_and_a_good_one_parses_as_address_parse() -> None:
    for _ in range(2):
        with pytest.raises(TetherlessError) as refused:
            parse_recipient("not an address")
        assert refused.value.code is ErrorCode.INVALID_FIELD
    text = f"{'d' * 32}.{'a' * 32}@Relay.Example"
    assert parse_recipient(text) == Address.parse(text) == parse_recipient(text)


def draws(seed: bytes) -> Callable[[int], bytes]:
    """A deterministic random source: every call takes the next ``n`` bytes of one SHA-256 counter stream,
    so one draw of 1,600 bytes and 100 draws of 16 give the same ids."""
    buffer = bytearray()
    counter = 0

    def take(n: int) -> bytes:
        nonlocal counter
        while len(buffer) < n:
            buffer.extend(hashlib.sha256(seed + counter.to_bytes(8, "big")).digest())
            counter += 1
        out = bytes(buffer[:n])
        del buffer[:n]
        return out

    return take


async def keyword_path(store: Store, ctx: ServiceContext, sender: str, request: SendRequest) -> SendResponse:
    """What the relay did before (local recipients): one draw and one keyword ``NewEnvelope`` per envelope,
    then one keyword ``Accepted`` per result."""
    limits = ctx.limits
    items = []
    for env in request.envelopes:
        address = Address.parse(env.recipient)
        ttl = min(env.ttl_seconds or limits.default_ttl_seconds, limits.max_ttl_seconds)
        items.append(
            NewEnvelope(
                recipient_device=address.device,
                recipient_account=address.account,
                idempotency_key=env.idempotency_key,
                digest=envelope_digest(env.recipient, env.ciphertext),
                envelope_id=ctx.random_bytes(16),
                expires_at_ms=NOW + ttl * 1000,
                ciphertext=env.ciphertext,
            )
        )
    forget_at = NOW + limits.max_ttl_seconds * 1000
    stored = await store.store_envelopes(sender, items, NOW, limits.max_inbox_envelopes, forget_at)
    return SendResponse(
        accepted=[Accepted(id=r.envelope_id, sent_at_ms=r.sent_at_ms, duplicate=r.duplicate) for r in stored]
    )


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
async def test_a_batchs_response_is_byte_identical_to_the_keyword_path(engine: str, tmp_path: Path) -> None:
    sender = device(200, "b" * 32)
    targets = [device(n, f"{n:b}".rjust(32, "e").replace("0", "f").replace("1", "g")) for n in range(1, 13)]

    addresses = [f"{t.device_id}.{t.account_id}@relay.test" for t in targets]

    def batch(keys: range) -> SendRequest:
        return SendRequest(
            envelopes=[
                OutboundEnvelope(
                    recipient=addresses[k % len(addresses)],
                    idempotency_key=b"key-%04d" % k,
                    ciphertext=hashlib.sha256(b"%d" % k).digest() * (1 + k % 9),  # the same on a retry
                    ttl_seconds=None if k % 3 else 60 + k,
                )
                for k in keys
            ]
        )

    # Fresh keys; the same batch again (all duplicates); half retried, half fresh.
    requests = [batch(range(100)), batch(range(100)), batch(range(50, 150))]
    principal = Principal(sender.device_id, sender.account_id, b"t" * 32)
    with fresh_database() if engine == "postgres" else nullcontext("") as url:
        fast_ctx = ServiceContext("relay.test", limits_from(Config()), clock_ms=lambda: NOW, random_bytes=draws(b"s"))
        slow_ctx = ServiceContext("relay.test", limits_from(Config()), clock_ms=lambda: NOW, random_bytes=draws(b"s"))
        fast_dir, slow_dir = tmp_path / "fast", tmp_path / "slow"
        fast_dir.mkdir()
        slow_dir.mkdir()
        # Two stores: on PostgreSQL two schemas are not at hand, so the keyword path's batches go to the same
        # database under another sender (its own keys), the fast path's under ``sender``.
        slow_sender = sender.device_id if engine == "sqlite" else device(201, "c" * 32).device_id
        async with open_store(Backend(engine, url), fast_dir) as fast_store:
            await with_devices(fast_store, sender, *targets)
            fast = Services.build(fast_store, fast_ctx)
            async with (
                open_store(Backend(engine, url), slow_dir)
                if engine == "sqlite"
                else nullcontext(fast_store) as slow_store
            ):
                if engine == "sqlite":
                    await with_devices(slow_store, sender, *targets)
                # Building the services draws from the context (a federation lease id): the same on both sides.
                Services.build(slow_store, slow_ctx)
                for request in requests:
                    got = await fast.inbox.send(principal, request)
                    want = await keyword_path(slow_store, slow_ctx, slow_sender, request)
                    for media_type in codec.MEDIA_TYPES:
                        assert codec.encode(got, media_type) == codec.encode(want, media_type)
                    assert [a.duplicate for a in got.accepted] == [a.duplicate for a in want.accepted]
    assert [a.duplicate for a in want.accepted] == [True] * 50 + [False] * 50


class _Peers:
    """Federation as the send path sees it: ``bad.example`` is refused by policy, any other relay allowed."""

    def check_peer(self, relay: str) -> None:
        if relay == "bad.example":
            raise TetherlessError(ErrorCode.PEER_FORBIDDEN, "refused by policy")

    def outbox_committed(self) -> None:
        pass


_DEVICE, _ACCOUNT = "d" * 32, "a" * 32
RECIPIENTS = [
    f"{_DEVICE}.{_ACCOUNT}@relay.test",
    f"{'e' * 32}.{_ACCOUNT}@Relay.Test",  # this relay, spelt otherwise: the digest keeps the spelling
    f"{_ACCOUNT}@relay.test",  # an account, not a device
    "not an address",
    f"{_DEVICE}.{_ACCOUNT}@other.example",
    f"{_DEVICE}.{_ACCOUNT}@bad.example",
]
OUTBOUND = st.builds(
    OutboundEnvelope,
    recipient=st.sampled_from(RECIPIENTS) | st.sampled_from(RECIPIENTS[:2]),  # plain batches often enough
    idempotency_key=st.sampled_from([b"key-0001", b"key-0002", b"key-0003"]) | st.binary(min_size=8, max_size=9),
    ciphertext=st.binary(min_size=1, max_size=8) | st.binary(min_size=31, max_size=33),  # the limit is 32
    ttl_seconds=st.none() | st.integers(min_value=1, max_value=10**6),
)


@given(envelopes=st.lists(OUTBOUND, min_size=1, max_size=8), federation=st.booleans())
def test_the_batch_checked_in_c_is_the_batch_checked_envelope_by_envelope(
    envelopes: list[OutboundEnvelope], federation: bool
) -> None:
    """``InboxService._local_items`` (checks and builds by ``map``) gives exactly what ``_checked_items`` (the
    loop) gives, or None; it gives None whenever the loop raises, so a bad batch gets the loop's error (the
    first envelope's, in the loop's order of checks). Batches that are plain (all local, all valid, keys
    distinct) take it."""
    config = Config(max_envelope_bytes=32, default_ttl_seconds=3_600, max_ttl_seconds=86_400)
    ctx = ServiceContext("relay.test", limits_from(config), clock_ms=lambda: NOW)
    service = InboxService(None, ctx, InboxNotifier(), AbuseLimits(RateSettings()), _Peers() if federation else None)  # type: ignore[arg-type]
    ids = bytes(range(16)) * len(envelopes)
    fast = service._local_items(envelopes, ids, NOW)
    try:
        checked = service._checked_items(envelopes, ids, NOW)
    except TetherlessError:
        assert fast is None
        return
    plain = all(parse_recipient(env.recipient).relay == "relay.test" for env in envelopes)
    assert fast == (checked if plain else None)
    if fast is not None:
        assert [item.idempotency_digest() for item in fast] == [
            envelope_digest(env.recipient, env.ciphertext) for env in envelopes
        ]
