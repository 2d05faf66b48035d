"""Per-device inboxes: send, page, stream, acknowledge, expire.

Rules decided here (the store only enforces them atomically):

- a batch is accepted whole or not at all, and answered only once durable;
- idempotency per (authenticated sender device, key), conflicts detected by a
  digest of recipient and ciphertext;
- recipients are devices of this relay, or of another relay when federation
  allows it: those envelopes go to the durable federation outbox in the same
  transaction (relay/services/federation.py delivers them);
- TTL defaults and caps; per-device quota.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat, starmap
from operator import attrgetter
from typing import Protocol, cast

import msgspec
import trio

from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import Address
from protocol.messages import (
    Accepted,
    AckRequest,
    AckResponse,
    DeviceListChanged,
    Heartbeat,
    InboxEnvelope,
    InboxPage,
    OutboundEnvelope,
    SendRequest,
    SendResponse,
)
from relay import metrics
from relay.store import InboxRecord, NewEnvelope, Store, StoredEnvelope

from .abuse import AbuseLimits
from .auth import Principal
from .context import ServiceContext

log = logging.getLogger("relay.services.inbox")


class InboxNotifier:
    """Wakes streams when their device's inbox grows.

    Each device has a version counter; a waiter remembers the version before
    it reads and sleeps only if nothing was committed since, so no wake-up
    is ever lost between a read and the wait. Everything here is in-memory
    and may be lost at any time: streams also re-read on every heartbeat.
    """

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._events: dict[str, trio.Event] = {}

    def version(self, device_id: str) -> int:
        return self._versions.get(device_id, 0)

    def notify(self, device_id: str) -> None:
        self.notify_all((device_id,))

    def notify_all(self, device_ids: Iterable[str]) -> None:
        """:meth:`notify` each device (a send wakes up to a batch's worth at once)."""
        versions, events = self._versions, self._events
        for device_id in device_ids:
            versions[device_id] = versions.get(device_id, 0) + 1
            event = events.pop(device_id, None)
            if event is not None:
                event.set()

    async def wait(self, device_id: str, seen_version: int, timeout_seconds: float) -> bool:
        """Sleep until ``device_id``'s version moves past ``seen_version`` or the timeout ends.

        Returns True when woken by new data. Cancellation just ends the wait.
        """
        if self.version(device_id) != seen_version:
            return True
        event = self._events.get(device_id)
        if event is None:
            event = self._events[device_id] = trio.Event()
        # The event stays in the dict after a timeout: other streams of the same
        # device may still wait on it. notify() removes it.
        with trio.move_on_after(timeout_seconds):
            await event.wait()
            return True
        return False


class OutboundFederation(Protocol):
    """What sending needs from federation (implemented by ``FederationService``)."""

    def check_peer(self, relay: str) -> None:
        """Raises ``remote_recipient`` (federation off) or ``peer_forbidden`` (policy)."""

    def outbox_committed(self) -> None:
        """Envelopes for other relays were just committed."""


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """What a stream yields: envelopes to send, a heartbeat when idle, or a device-list change."""

    envelopes: list[InboxEnvelope]
    heartbeat: Heartbeat | None = None
    device_list: DeviceListChanged | None = None


def positional_twin(message: type[msgspec.Struct], *, keep_defaults: bool = False) -> type[msgspec.Struct]:
    """A struct type that encodes exactly as ``message`` does, but whose fields can be given positionally.

    Same field names and order, wire names, tag, ``omit_defaults`` and ``array_like``, so MessagePack and JSON bytes are
    the same; it is built without keyword arguments (``starmap`` over tuples, in C) and is not tracked by the
    garbage collector. Only for messages whose fields hold no containers (nothing can form a cycle); raises
    ``TypeError`` for a message with a default unless ``keep_defaults``: the twin then keeps the defaults (so
    ``omit_defaults`` leaves out the same values) and its callers must still give every field, in order. It
    does not validate: use it for values the relay produced itself, never to decode.
    """
    config = message.__struct_config__
    fields = msgspec.structs.fields(message)
    if not keep_defaults and not all(f.required for f in fields):
        raise TypeError(f"{message.__name__} has fields with defaults: its twin would need keyword arguments")
    return msgspec.defstruct(
        f"Positional{message.__name__}",
        [(f.name, f.type) if f.required else (f.name, f.type, f.default) for f in fields],
        rename={f.name: f.encode_name for f in fields},
        tag=config.tag,
        tag_field=config.tag_field,
        omit_defaults=config.omit_defaults,
        array_like=config.array_like,
        frozen=True,
        gc=False,
    )


# InboxEnvelope as the page and the stream encode it. The record's fields are in InboxEnvelope's order
# (cursor, id, sent_at_ms, expires_at_ms, ciphertext), so a record's tuple is the twin's arguments.
_WireEnvelope = positional_twin(InboxEnvelope)


def wire_envelopes(records: Sequence[InboxRecord]) -> list[InboxEnvelope]:
    """``records`` as ``InboxEnvelope`` values for the codec: same attributes, byte-identical encoding.

    The values are instances of a positional twin of ``InboxEnvelope`` (:func:`positional_twin`), not of
    ``InboxEnvelope`` itself (hence the cast): building 1,000 keyword-argument structs per page from Python
    cost more than reading the rows (docs/performance.md, P5). ``tests/relay/services/test_inbox_wire.py``
    checks the bytes against ``InboxEnvelope`` for random records, in both media types.
    """
    return cast(list[InboxEnvelope], list(starmap(_WireEnvelope, map(msgspec.structs.astuple, records))))


# Accepted as a send's response encodes it; a StoredEnvelope's first three fields are its arguments.
_WireAccepted = positional_twin(Accepted, keep_defaults=True)
_accepted_fields = attrgetter("envelope_id", "sent_at_ms", "duplicate")


def send_response(stored: Sequence[StoredEnvelope]) -> SendResponse:
    """The response to a send whose store results are ``stored``: byte-identical to keyword-built ``Accepted``
    values (``tests/relay/services/test_send_path.py``), built positionally in C (docs/performance.md, P2)."""
    return SendResponse(accepted=cast(list[Accepted], list(starmap(_WireAccepted, map(_accepted_fields, stored)))))


# Fields of the send request's envelopes and of parsed addresses, read in C by map() on the fast path.
_ciphertext = attrgetter("ciphertext")
_idempotency_key = attrgetter("idempotency_key")
_recipient = attrgetter("recipient")
_ttl_seconds = attrgetter("ttl_seconds")
_device = attrgetter("device")
_account = attrgetter("account")
_relay = attrgetter("relay")
_duplicate = attrgetter("duplicate")
_recipient_device = attrgetter("recipient_device")


# A sender writes to the same few recipients again and again: their addresses are parsed once per process.
# Bounded, so a sender naming a new address in every envelope costs a parse each, as without the cache;
# an address that does not parse raises every time (lru_cache keeps results, not exceptions).
parse_recipient = functools.lru_cache(maxsize=4096)(Address.parse)


class InboxService:
    def __init__(
        self,
        store: Store,
        ctx: ServiceContext,
        notifier: InboxNotifier,
        abuse: AbuseLimits,
        federation: OutboundFederation | None = None,
    ) -> None:
        self._federation = federation
        self._store = store
        self._ctx = ctx
        self._notifier = notifier
        self._abuse = abuse

    @property
    def notifier(self) -> InboxNotifier:
        """This process's wake-up hub: the composition root also feeds it commits made by other replicas."""
        return self._notifier

    async def send(self, sender: Principal, request: SendRequest) -> SendResponse:
        """Store a batch of envelopes for local devices; durable before it returns.

        Raises ``batch_too_large``, ``envelope_too_large``, ``invalid_field``
        (bad address or TTL), ``rate_limited``, ``remote_recipient``,
        ``unknown_recipient``, ``idempotency_conflict``, ``inbox_full``.
        Idempotent per envelope key.
        On cancellation the batch may or may not be committed: retry it.
        """
        limits = self._ctx.limits
        if len(request.envelopes) > limits.max_batch_envelopes:
            raise TetherlessError(
                ErrorCode.BATCH_TOO_LARGE, f"at most {limits.max_batch_envelopes} envelopes per request"
            )
        self._abuse.envelopes(sender.device_id, sender.account_id, len(request.envelopes))
        now = self._ctx.clock_ms()
        # One draw for the batch's ids: 16 bytes each, as uniform as 100 draws, for one call instead of 100.
        ids = self._ctx.random_bytes(16 * len(request.envelopes))
        items = self._local_items(request.envelopes, ids, now)
        local = items is not None
        if items is None:
            items = self._checked_items(request.envelopes, ids, now)
        stored = await self._store.store_envelopes(
            sender.device_id, items, now, limits.max_inbox_envelopes, now + limits.max_ttl_seconds * 1000
        )
        duplicates = sum(map(_duplicate, stored))
        outbox = False
        if local and not duplicates:
            woken: Iterable[str] = set(map(_recipient_device, stored))
        else:
            woken = set()
            for item, result in zip(items, stored, strict=True):
                if not result.duplicate:
                    if item.remote_relay:
                        outbox = True
                    else:
                        woken.add(result.recipient_device)
        self._notifier.notify_all(woken)
        if outbox and self._federation is not None:
            self._federation.outbox_committed()
        metrics.envelopes_accepted_total.inc(len(stored) - duplicates)
        metrics.envelopes_duplicate_total.inc(duplicates)
        return send_response(stored)

    def _local_items(self, envelopes: Sequence[OutboundEnvelope], ids: bytes, now: int) -> list[NewEnvelope] | None:
        """The batch to store when :meth:`_checked_items` would accept it with every recipient a device of this
        relay, checked and built by ``map`` in C rather than by a Python loop per envelope (docs/performance.md,
        P2 third round); None for any other batch (a bad envelope, a repeated key, a remote recipient): that
        one :meth:`_checked_items` decides, so a bad batch gets the same error, in the same order, as before."""
        limits = self._ctx.limits
        if not envelopes:
            return []
        if max(map(len, map(_ciphertext, envelopes))) > limits.max_envelope_bytes:
            return None
        keys = list(map(_idempotency_key, envelopes))
        if len(set(keys)) != len(keys):
            return None
        recipients = list(map(_recipient, envelopes))
        try:
            addresses = list(map(parse_recipient, recipients))
        except TetherlessError:
            return None
        if not all(map(_device, addresses)) or set(map(_relay, addresses)) != {self._ctx.relay_name}:
            return None
        default_ttl, max_ttl = limits.default_ttl_seconds, limits.max_ttl_seconds
        ttls = set(map(_ttl_seconds, envelopes))
        expiries: Iterable[int] = (
            repeat(now + min(default_ttl, max_ttl) * 1000)
            if ttls == {None}
            else [
                now + min(default_ttl if ttl is None else ttl, max_ttl) * 1000 for ttl in map(_ttl_seconds, envelopes)
            ]
        )
        size = len(ids)
        return list(
            map(
                NewEnvelope,
                map(_device, addresses),
                map(_account, addresses),
                keys,
                map(ids.__getitem__, map(slice, range(0, size, 16), range(16, size + 16, 16))),
                expiries,
                map(_ciphertext, envelopes),
                repeat(""),
                recipients,
            )
        )

    def _checked_items(self, envelopes: Sequence[OutboundEnvelope], ids: bytes, now: int) -> list[NewEnvelope]:
        """The batch to store, envelope by envelope in order: raises the first envelope's error
        (``envelope_too_large``, ``invalid_field``, ``remote_recipient``, ``peer_forbidden``)."""
        limits = self._ctx.limits
        max_bytes, relay_name = limits.max_envelope_bytes, self._ctx.relay_name
        default_ttl, max_ttl = limits.default_ttl_seconds, limits.max_ttl_seconds
        items: list[NewEnvelope] = []
        seen_keys: set[bytes] = set()
        for index, env in enumerate(envelopes):
            if len(env.ciphertext) > max_bytes:
                raise TetherlessError(
                    ErrorCode.ENVELOPE_TOO_LARGE, f"envelopes[{index}]: ciphertext above {max_bytes} bytes"
                )
            if env.idempotency_key in seen_keys:
                raise TetherlessError(ErrorCode.INVALID_FIELD, f"envelopes[{index}]: idempotency_key repeated in batch")
            seen_keys.add(env.idempotency_key)
            address = parse_recipient(env.recipient)
            if not address.device:
                raise TetherlessError(ErrorCode.INVALID_FIELD, f"envelopes[{index}]: recipient must name a device")
            remote_relay = ""
            if address.relay != relay_name:
                if self._federation is None:
                    raise TetherlessError(
                        ErrorCode.REMOTE_RECIPIENT, f"envelopes[{index}]: {address.relay} is not this relay"
                    )
                self._federation.check_peer(address.relay)
                remote_relay = address.relay
            ttl = env.ttl_seconds if env.ttl_seconds is not None else default_ttl
            items.append(
                NewEnvelope(
                    address.device,
                    address.account,
                    env.idempotency_key,
                    ids[16 * index : 16 * index + 16],
                    now + min(ttl, max_ttl) * 1000,
                    env.ciphertext,
                    remote_relay,
                    env.recipient,
                )
            )
        return items

    def check_owner(self, principal: Principal, device_id: str) -> None:
        """Raises ``forbidden`` unless ``device_id`` is the caller's own device."""
        if device_id != principal.device_id:
            raise TetherlessError(ErrorCode.FORBIDDEN, "a device can only read and acknowledge its own inbox")

    async def page(self, device_id: str, after: int, limit: int | None) -> InboxPage:
        """Up to ``limit`` envelopes after cursor ``after``. Raises ``invalid_query`` for a bad limit."""
        max_page = self._ctx.limits.max_page_envelopes
        if limit is None:
            limit = max_page
        if not 1 <= limit <= max_page:
            raise TetherlessError(ErrorCode.INVALID_QUERY, f"limit must be between 1 and {max_page}")
        records = await self._store.read_inbox(device_id, after, limit + 1, self._ctx.clock_ms())
        more = len(records) > limit
        envelopes = wire_envelopes(records[:limit])
        next_cursor = envelopes[-1].cursor if envelopes else after
        metrics.envelopes_delivered_total.labels("page").inc(len(envelopes))
        return InboxPage(envelopes=envelopes, next_cursor=next_cursor, more=more)

    async def stream(self, device_id: str, after: int, heartbeat_seconds: float) -> AsyncIterator[StreamChunk]:
        """Yield committed envelopes after ``after`` as they arrive, until the device is revoked.

        Pages through any backlog first, then waits for wake-ups; yields a
        heartbeat after ``heartbeat_seconds`` without news (and re-reads then,
        so a lost wake-up delays delivery by one heartbeat at most). After a
        wake-up or heartbeat with nothing to read it re-checks the device: a
        new device-list version of its account yields a ``DeviceListChanged``
        item, and a revoked device's stream ends after that item.
        Cancellation ends the stream; nothing is acknowledged by streaming.
        """
        cursor = after
        page = self._ctx.limits.max_page_envelopes
        state = await self._store.device_stream_state(device_id)
        list_version = state.list_version if state is not None else 0
        check = False
        metrics.streams_open.inc()
        try:
            while True:
                version = self._notifier.version(device_id)
                records = await self._store.read_inbox(device_id, cursor, page, self._ctx.clock_ms())
                if records:
                    cursor = records[-1].cursor
                    metrics.envelopes_delivered_total.labels("stream").inc(len(records))
                    yield StreamChunk(wire_envelopes(records))
                    continue
                if check:
                    check = False
                    state = await self._store.device_stream_state(device_id)
                    if state is not None and state.list_version > list_version:
                        list_version = state.list_version
                        changed = DeviceListChanged(account_id=state.account_id, version=list_version)
                        yield StreamChunk([], device_list=changed)
                    if state is None or state.revoked:
                        return
                woken = await self._notifier.wait(device_id, version, heartbeat_seconds)
                check = True
                if not woken:
                    yield StreamChunk([], Heartbeat(cursor=cursor, at_ms=self._ctx.clock_ms()))
        finally:
            metrics.streams_open.dec()

    async def acknowledge(self, device_id: str, request: AckRequest) -> AckResponse:
        """Delete acknowledged envelopes of ``device_id``'s inbox. Idempotent."""
        if request.up_to is None and not request.ids:
            raise TetherlessError(ErrorCode.INVALID_FIELD, "give up_to, ids, or both")
        count = await self._store.acknowledge(device_id, request.up_to, request.ids)
        metrics.envelopes_acknowledged_total.inc(count)
        return AckResponse(acknowledged=count)

    async def run_expiry(self, interval_seconds: float) -> None:
        """Delete expired envelopes, challenges, sessions and idempotency keys every interval. Runs forever."""
        while True:
            try:
                report = await self._store.expire(self._ctx.clock_ms())
            except Exception:
                log.exception("expiry sweep failed; will retry")
            else:
                if report.envelopes:
                    metrics.envelopes_expired_total.inc(report.envelopes)
                    log.info("expired %d envelopes", report.envelopes)
                if report.enrolments:
                    metrics.enrolments_expired_total.inc(report.enrolments)
            await trio.sleep(interval_seconds)
