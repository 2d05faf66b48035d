"""Prekeys: upload, counts and claims (docs/crypto.md §7.1-§7.2).

Rules decided here (the store applies them atomically):

- every uploaded prekey is verified against the uploading device's
  ``sign_key`` (``protocol.prekeys.verify_prekey``), with the kind its slot
  requires; a relay never stores a key its device did not sign;
- key ids only increase per (device, kind); at most
  :data:`~protocol.messages.MAX_ONE_TIME_PREKEYS` one-time keys per kind;
- a claim serves, per device, the signed prekey, a PQ one-time key if one is
  left else the last-resort key, and an X25519 one-time key if one is left —
  at most ``one_time_per_pair`` keys of each one-time kind per (claiming
  account, device) per window, so one sender cannot drain a device; claims
  are rate-limited per claiming device;
- the per-pair limit trusts the claiming account a peer relay names, so two
  more budgets (token buckets in memory, per process) bound one-time claims
  whatever the names: per origin relay (all its claimers together) and per
  target device (all claimers, local and remote, together). A claim past
  either is still answered, with the signed prekey and the last-resort key
  only (docs/security.md, "Federation: internal addresses and prekey
  draining") — a drainer gets nothing more, and a sender is never blocked;
- devices of other relays are claimed from their home relay with one signed
  federation request per relay (``POST /federation/v1/prekeys/claim``, which
  counts the per-pair limit under (claiming account, origin relay)); an
  unreachable or refusing relay makes its devices ``missing``, never an error;
- unknown, revoked and wrong-account devices and devices without a signed
  prekey are ``missing``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import Address
from protocol.messages import (
    MAX_ONE_TIME_PREKEYS,
    ClaimPrekeysRequest,
    ClaimPrekeysResponse,
    FederatedClaimRequest,
    PrekeyBundle,
    PrekeyCounts,
    PrekeyUpload,
    SignedPrekey,
)
from protocol.prekeys import MLKEM_LAST_RESORT, MLKEM_ONE_TIME, X25519_ONE_TIME, X25519_SIGNED, verify_prekey
from relay import metrics
from relay.config import Config
from relay.ratelimit import KeyedLimiter
from relay.store import Store
from relay.store.base import ClaimedBundle, PrekeyState, StoredPrekey

from .abuse import check_limit
from .auth import Principal
from .context import ServiceContext

T = TypeVar("T")
CLAIM_PATH = "/prekeys/claim"  # under the federation prefix


class PeerCalls(Protocol):
    """What remote claims need from federation (implemented by ``FederationService.call_peer``)."""

    async def call_peer(self, relay: str, path: str, message: object, response_type: type[T], kind: str) -> T: ...


@dataclass(frozen=True, slots=True)
class PrekeySettings:
    """Limits of prekey claims and enrolment offers (config ``rate_prekey_claims_*``, ``enrolment_*``)."""

    claims_per_second: float = 5.0
    claims_burst: float = 100.0
    one_time_per_pair: int = 3
    one_time_window_seconds: int = 3600
    one_time_per_origin: int = 1000  # per one_time_window_seconds; 0: no limit
    one_time_per_device: int = 100  # per one_time_window_seconds; 0: no limit
    enrolment_ttl_seconds: int = 600
    enrolment_lookups_per_minute: float = 10.0

    @classmethod
    def from_config(cls, config: Config) -> PrekeySettings:
        return cls(
            claims_per_second=config.rate_prekey_claims_per_second,
            claims_burst=config.rate_prekey_claims_burst,
            one_time_per_pair=config.prekey_one_time_per_pair_per_hour,
            one_time_per_origin=config.prekey_one_time_per_origin_per_hour,
            one_time_per_device=config.prekey_one_time_per_device_per_hour,
            enrolment_ttl_seconds=config.enrolment_ttl_seconds,
            enrolment_lookups_per_minute=config.rate_enrolment_lookups_per_minute,
        )


def _stored(key: SignedPrekey) -> StoredPrekey:
    return StoredPrekey(key.kind, key.key_id, key.public_key, key.created_at_ms, key.signature)


def _wire(key: StoredPrekey) -> SignedPrekey:
    return SignedPrekey(
        kind=key.kind,  # type: ignore[arg-type]  # the store holds only kinds the decoder accepted
        key_id=key.key_id,
        public_key=key.public_key,
        created_at_ms=key.created_at_ms,
        signature=key.signature,
    )


def _counts(state: PrekeyState) -> PrekeyCounts:
    return PrekeyCounts(
        x25519_one_time=state.x25519_one_time,
        mlkem_one_time=state.mlkem_one_time,
        signed_prekey_id=state.signed_prekey_id,
        last_resort_id=state.last_resort_id,
    )


class PrekeyService:
    def __init__(
        self, store: Store, ctx: ServiceContext, settings: PrekeySettings, federation: PeerCalls | None = None
    ) -> None:
        self._store = store
        self._ctx = ctx
        self.settings = settings
        self._federation = federation
        self._claims = KeyedLimiter(settings.claims_per_second, settings.claims_burst)
        window = settings.one_time_window_seconds
        self._origin_one_time = KeyedLimiter(settings.one_time_per_origin / window, settings.one_time_per_origin)
        self._device_one_time = KeyedLimiter(settings.one_time_per_device / window, settings.one_time_per_device)

    async def _sign_key(self, principal: Principal) -> bytes:
        device = await self._store.get_device(principal.device_id)
        if device is None:
            raise TetherlessError(ErrorCode.UNKNOWN_DEVICE, "no such device on this relay")
        if device.revoked_at_ms is not None:
            raise TetherlessError(ErrorCode.DEVICE_REVOKED, "this device was removed from its account")
        return device.sign_key

    async def upload(self, principal: Principal, upload: PrekeyUpload) -> PrekeyCounts:
        """``PUT /v1/prekeys``: verify and store the caller's prekeys; answer what it now holds.

        Raises ``prekey_invalid`` (a bad signature, a wrong length or kind for
        its slot, an ML-KEM key ``from_public_bytes`` rejects, a key id not
        above every id stored before for its kind — unless it is the very same
        key, so a retried upload is answered like the first) and
        ``invalid_field`` (more than 200 stored one-time keys of a kind).
        Either everything is stored or nothing. Durable before it returns.
        """
        sign_key = await self._sign_key(principal)
        slots: list[tuple[SignedPrekey, str | None]] = []
        if upload.signed_prekey is not None:
            slots.append((upload.signed_prekey, X25519_SIGNED))
        if upload.last_resort is not None:
            slots.append((upload.last_resort, MLKEM_LAST_RESORT))
        for key in upload.one_time:
            if key.kind not in (X25519_ONE_TIME, MLKEM_ONE_TIME):
                raise TetherlessError(ErrorCode.PREKEY_INVALID, f"one_time holds a {key.kind} key")
            slots.append((key, None))
        for key, kind in slots:
            verify_prekey(sign_key, principal.device_id, key, kind=kind)
        state = await self._store.put_prekeys(
            principal.device_id, [_stored(key) for key, _ in slots], MAX_ONE_TIME_PREKEYS
        )
        for key, _ in slots:
            metrics.prekeys_uploaded_total.labels(key.kind).inc()
        return _counts(state)

    async def counts(self, principal: Principal) -> PrekeyCounts:
        """``GET /v1/prekeys``: the caller's one-time keys left and current signed/last-resort ids."""
        return _counts(await self._store.get_prekey_state(principal.device_id))

    async def claim(self, principal: Principal, request: ClaimPrekeysRequest) -> ClaimPrekeysResponse:
        """``POST /v1/prekeys/claim``: one bundle per named device; the rest ``missing``.

        Local bundles come first in request order, then those of other relays
        (match them by ``address``); past a target device's one-time budget
        its bundle has the last-resort key only. Raises ``rate_limited`` (per
        claiming device) and ``invalid_field`` (a name that is not a device
        address).
        Not idempotent: served one-time keys are gone (deleted in the claim's
        transaction); on cancellation they may or may not have been served.
        """
        check_limit(self._claims, "prekey_claims", principal.device_id)
        addresses = _device_addresses(request.devices)
        local = [a for a in addresses if a.relay == self._ctx.relay_name]
        bundles, missing = await self._claim_local(principal.account_id, local)
        remote: dict[str, list[Address]] = {}
        for address in addresses:
            if address.relay != self._ctx.relay_name:
                remote.setdefault(address.relay, []).append(address)
        if remote:
            async with trio.open_nursery() as nursery:
                for relay, wanted in remote.items():
                    nursery.start_soon(self._claim_remote, principal.account_id, relay, wanted, bundles, missing)
        metrics.prekey_claims_missing_total.inc(len(missing))
        return ClaimPrekeysResponse(bundles=bundles, missing=missing)

    async def claim_for_peer(self, origin: str, request: FederatedClaimRequest) -> ClaimPrekeysResponse:
        """``POST /federation/v1/prekeys/claim``: bundles of this relay's devices for a user of ``origin``.

        The per-pair limit counts under (``claimer_account``, ``origin``), so
        a relay can only spend allowances in its own name; the per-origin
        and per-device budgets hold however it names its claimers. Addresses
        of other relays are ``missing``. Raises ``invalid_field``. Not
        idempotent, like :meth:`claim`.
        """
        addresses = _device_addresses(request.devices)
        local = [a for a in addresses if a.relay == self._ctx.relay_name]
        bundles, missing = await self._claim_local(f"{request.claimer_account}@{origin}", local, origin)
        missing += [str(a) for a in addresses if a.relay != self._ctx.relay_name]
        metrics.prekey_claims_missing_total.inc(len(missing))
        return ClaimPrekeysResponse(bundles=bundles, missing=missing)

    def _one_time_allowed(self, device_id: str, origin: str | None) -> bool:
        """Spend one claim of ``origin``'s (if a peer asks) and ``device_id``'s budgets; False when one is empty.

        A claim spends whether or not a one-time key is left to serve: the
        budgets bound what could be taken, which is what draining is about.
        """
        if origin is not None and self._origin_one_time.take(origin) > 0:
            metrics.prekey_one_time_withheld_total.labels("origin").inc()
            return False
        if self._device_one_time.take(device_id) > 0:
            metrics.prekey_one_time_withheld_total.labels("device").inc()
            return False
        return True

    async def _claim_local(
        self, claimer: str, local: list[Address], origin: str | None = None
    ) -> tuple[list[PrekeyBundle], list[str]]:
        if not local:
            return [], []
        allowed = [self._one_time_allowed(a.device, origin) for a in local]
        claimed: list[ClaimedBundle | None] = [None] * len(local)
        # Past a budget the store is asked with a per-pair limit of 0: signed and last-resort keys only.
        for may, limit in ((True, self.settings.one_time_per_pair), (False, 0)):
            indexes = [i for i, a in enumerate(allowed) if a is may]
            if not indexes:
                continue
            answer = await self._store.claim_prekeys(
                claimer,
                [(local[i].account, local[i].device) for i in indexes],
                self._ctx.clock_ms(),
                limit,
                self.settings.one_time_window_seconds * 1000,
            )
            for index, bundle in zip(indexes, answer, strict=True):
                claimed[index] = bundle
        bundles: list[PrekeyBundle] = []
        missing: list[str] = []
        for address, bundle in zip(local, claimed, strict=True):
            if bundle is None:
                missing.append(str(address))
                continue
            bundles.append(
                PrekeyBundle(
                    address=str(address),
                    identity_key=bundle.box_key,
                    signed_prekey=_wire(bundle.signed_prekey),
                    pq_prekey=_wire(bundle.pq_prekey),
                    one_time_prekey=_wire(bundle.one_time_prekey) if bundle.one_time_prekey else None,
                )
            )
            metrics.prekeys_claimed_total.labels(bundle.pq_prekey.kind).inc()
            if bundle.pq_prekey.kind == MLKEM_LAST_RESORT:
                metrics.prekeys_exhausted_total.labels(MLKEM_ONE_TIME).inc()
            if bundle.one_time_prekey is not None:
                metrics.prekeys_claimed_total.labels(X25519_ONE_TIME).inc()
            else:
                metrics.prekeys_exhausted_total.labels(X25519_ONE_TIME).inc()
        return bundles, missing

    async def _claim_remote(
        self, claimer: str, relay: str, wanted: list[Address], bundles: list[PrekeyBundle], missing: list[str]
    ) -> None:
        """Claim ``wanted`` from their home relay; whatever it does not answer for is ``missing``."""
        names = Counter(str(a) for a in wanted)
        if self._federation is not None:
            request = FederatedClaimRequest(claimer_account=claimer, devices=[str(a) for a in wanted])
            try:
                answer = await self._federation.call_peer(
                    relay, CLAIM_PATH, request, ClaimPrekeysResponse, "prekey_claim"
                )
            except TetherlessError:  # federation off, policy, unreachable, garbage: the devices are missing
                answer = ClaimPrekeysResponse(bundles=[], missing=[])
            for bundle in answer.bundles:
                if names[bundle.address] > 0:  # only what was asked for (the sender verifies the bundle anyway)
                    names[bundle.address] -= 1
                    bundles.append(bundle)
        missing.extend(names.elements())


def _device_addresses(devices: list[str]) -> list[Address]:
    """Parsed device addresses; raises ``invalid_field`` naming the first bad one."""
    addresses = [Address.parse(text) for text in devices]
    for index, address in enumerate(addresses):
        if not address.device:
            raise TetherlessError(ErrorCode.INVALID_FIELD, f"devices[{index}]: not a device address")
    return addresses
