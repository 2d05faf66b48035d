"""Enrolment offers and proposals: the relay's part of docs/crypto.md §5.2.

The relay is a mailbox keyed by the link code's 80-bit lookup id. It cannot
check ``offer_mac`` or ``approval_tag`` (it never learns the link secret);
the devices do. What it decides:

- an offer names this relay, carries prekeys signed by its ``sign_key``, and
  lives ``enrolment_ttl_seconds`` (default 10 minutes); one offer per lookup
  id, ever (a second one is ``enrolment_used``);
- only a device of the proposal's account may post a proposal, the proposed
  list must contain the offering device with the offered keys, and there is
  one proposal per offer (a second, different one is ``enrolment_used``; the
  same one again is an idempotent retry);
- once a proposal is posted the offer is *used*: fetching the offer answers
  ``enrolment_used``, while the new device can fetch the proposal (repeatedly,
  so a lost answer is harmless) until the offer expires. After expiry every
  call answers ``enrolment_expired``; the row is forgotten one TTL later
  (then ``enrolment_unknown``);
- a lookup id in a path that is not 16 base32 characters is answered like an
  unknown one, ``enrolment_unknown`` (a mistyped code finds nothing);
- fetching offers and posting proposals is limited per device
  (``rate_enrolment_lookups_per_minute``), posting offers and fetching
  proposals per source IP (the generic unauthenticated limit).
"""

from __future__ import annotations

from protocol import codec
from protocol.enrolment import parse_lookup_id, verify_offer_prekeys
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import device_id_for
from protocol.messages import EnrolmentOffer, EnrolmentOfferAccepted, EnrolmentProposal, EnrolmentProposalAccepted
from relay import metrics
from relay.ratelimit import KeyedLimiter
from relay.store import Store
from relay.store.base import EnrolmentRecord

from .abuse import check_limit
from .auth import Principal
from .context import ServiceContext
from .prekeys import PrekeySettings


def _lookup(text: str) -> bytes:
    raw = parse_lookup_id(text)
    if raw is None:
        raise TetherlessError(ErrorCode.ENROLMENT_UNKNOWN, "not a lookup id (16 base32 characters)")
    return raw


class EnrolmentService:
    def __init__(self, store: Store, ctx: ServiceContext, settings: PrekeySettings) -> None:
        self._store = store
        self._ctx = ctx
        self._ttl_ms = settings.enrolment_ttl_seconds * 1000
        per_minute = settings.enrolment_lookups_per_minute
        self._lookups = KeyedLimiter(per_minute / 60.0, per_minute)

    async def _existing(self, lookup_id: bytes) -> EnrolmentRecord:
        """The stored, unexpired record; raises ``enrolment_unknown`` / ``enrolment_expired``."""
        record = await self._store.get_enrolment(lookup_id)
        if record is None:
            raise TetherlessError(ErrorCode.ENROLMENT_UNKNOWN, "no enrolment offer under this link code")
        if record.expires_at_ms <= self._ctx.clock_ms():
            raise TetherlessError(ErrorCode.ENROLMENT_EXPIRED, "the enrolment offer expired; show a new code")
        return record

    async def offer(self, offer: EnrolmentOffer) -> EnrolmentOfferAccepted:
        """``POST /v1/enrolments``: store a new device's offer under its lookup id.

        Raises ``invalid_field`` (``relay`` is not this relay), ``prekey_invalid``
        (the bundle's kinds, lengths or signatures by ``sign_key``) and
        ``enrolment_used`` (an offer with this lookup id exists, even expired).
        Durable before it returns; not idempotent (a retry is ``enrolment_used``:
        the device then polls for the proposal as usual).
        """
        if offer.relay.lower() != self._ctx.relay_name:
            raise TetherlessError(ErrorCode.INVALID_FIELD, f"relay: this relay is {self._ctx.relay_name}")
        verify_offer_prekeys(offer)
        now = self._ctx.clock_ms()
        expires = now + self._ttl_ms
        await self._store.create_enrolment(offer.lookup_id, codec.encode(offer), now, expires, expires + self._ttl_ms)
        metrics.enrolments_created_total.inc()
        return EnrolmentOfferAccepted(expires_at_ms=expires)

    async def get_offer(self, principal: Principal, lookup_text: str) -> EnrolmentOffer:
        """``GET /v1/enrolments/{lookup_id}``: the offer, for an approving device.

        Raises ``rate_limited`` (per device), ``enrolment_unknown``,
        ``enrolment_expired`` and ``enrolment_used`` (a proposal was posted).
        """
        check_limit(self._lookups, "enrolment_lookups", principal.device_id)
        record = await self._existing(_lookup(lookup_text))
        if record.proposal is not None:
            raise TetherlessError(ErrorCode.ENROLMENT_USED, "this link code was already answered")
        return codec.decode(record.offer, EnrolmentOffer)

    async def propose(
        self, principal: Principal, lookup_text: str, proposal: EnrolmentProposal
    ) -> EnrolmentProposalAccepted:
        """``POST /v1/enrolments/{lookup_id}/proposal``: hand the new device a version that adds it.

        Raises ``rate_limited``, ``enrolment_unknown``, ``enrolment_expired``,
        ``forbidden`` (the caller is not a device of the proposal's account),
        ``invalid_field`` (the list lacks the offering device with its offered
        keys) and ``enrolment_used`` (another proposal is stored). The same
        proposal from the same device again is answered like the first.
        """
        check_limit(self._lookups, "enrolment_lookups", principal.device_id)
        lookup_id = _lookup(lookup_text)
        record = await self._existing(lookup_id)
        device_list = proposal.signed.device_list
        if device_list.account_id != principal.account_id:
            raise TetherlessError(ErrorCode.FORBIDDEN, "only a device of the account can propose adding a device")
        offer = codec.decode(record.offer, EnrolmentOffer)
        new_id = device_id_for(offer.sign_key)
        if not any(
            d.device_id == new_id and d.sign_key == offer.sign_key and d.box_key == offer.box_key
            for d in device_list.devices
        ):
            raise TetherlessError(ErrorCode.INVALID_FIELD, "signed: the list does not add the offering device")
        fresh = record.proposal is None
        stored = await self._store.put_enrolment_proposal(
            lookup_id, codec.encode(proposal), principal.device_id, self._ctx.clock_ms()
        )
        if fresh:
            metrics.enrolments_used_total.inc()
        return EnrolmentProposalAccepted(expires_at_ms=stored.expires_at_ms)

    async def get_proposal(self, lookup_text: str) -> EnrolmentProposal | None:
        """``GET /v1/enrolments/{lookup_id}/proposal``: the proposal, or None while there is none (204).

        Raises ``enrolment_unknown`` and ``enrolment_expired``. Idempotent.
        """
        record = await self._existing(_lookup(lookup_text))
        return codec.decode(record.proposal, EnrolmentProposal) if record.proposal is not None else None
