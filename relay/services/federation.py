"""Federation: relays deliver envelopes to each other, signed, durable and deduplicated (docs/federation.md).

Decided here (no HTTP, no SQL):

- **policy** — open federation, an allow list, or off; a deny list always
  applies (:meth:`FederationService.check_peer`);
- **inbound authentication** — RFC 9421 signature checks in a fixed order
  (size, signature present, freshness, destination, digest, policy, key,
  signature, rate, replay) so a rejected request never writes to the store;
  key discovery is capped (concurrency, one fetch per origin at a time,
  failures cached) and honours operator key pins;
- **peer addresses** — outside the static peer table, a relay never connects
  to an IP-literal name (open mode) or to a loopback, private, link-local,
  multicast or reserved address; names are resolved once and the connection
  goes to the address that was checked (:meth:`FederationService.endpoint`);
- **receiving** — per-envelope outcomes, deduplicated by (origin, envelope id);
- **sending** — a worker drains each peer's durable outbox in batches, with
  exponential backoff and jitter per peer after failures that may pass; a
  destination whose name does not exist, or a refusal that will not change,
  ends those rows as failed instead (:data:`PERMANENT_REFUSALS`);
- **remote device lists** — fetched for local clients with a signed request;
  clients verify the chain themselves, so the remote relay cannot swap keys.

The network is behind :class:`PeerTransport` (implemented by
``relay.transport.outbound``), so this module imports no HTTP library.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

import trio

from protocol import codec, federation
from protocol.errors import ErrorCode, RemoteError, TetherlessError, error_from_problem
from protocol.hosts import ip_literal, numeric_host, public_address, split_relay_name
from protocol.ids import RELAY_PATTERN, Address
from protocol.messages import (
    DeliverRequest,
    DeliverResponse,
    DeliveryResult,
    DeviceListChain,
    FederatedEnvelope,
    RelayKey,
    WellKnown,
)
from relay import metrics
from relay.config import Config
from relay.ratelimit import KeyedLimiter
from relay.relay_keys import RelayKeyring
from relay.store import OutboxRecord, ReceivedEnvelope, ReceivedOutcome, Store

from .accounts import AccountService
from .context import ServiceContext
from .inbox import InboxNotifier

log = logging.getLogger("relay.services.federation")

PREFIX: Final = "/federation/v1"
DELIVER_PATH: Final = PREFIX + "/deliver"
KEY_CACHE_SECONDS: Final = 300.0
KEY_REFETCH_SECONDS: Final = 10.0  # at most one re-fetch per origin this often (unknown key ids)
KEY_FAILURE_CACHE_SECONDS: Final = 30.0  # a failed key fetch is answered from memory this long
KEY_FETCH_CONCURRENCY: Final = 16  # key fetches in flight at once, all origins together
MAX_KEY_CACHE_ORIGINS: Final = 10_000  # origins remembered (keys or failures); least recently used dropped
DEFERRED_RETRY_SECONDS: Final = 30.0
MAX_ERROR_CHARS: Final = 300
T = TypeVar("T")


# -- the network, as the services see it ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in reversed(self.headers) if k == name), None)


class PeerUnreachableError(Exception):
    """The peer could not be reached, timed out, broke the protocol, or answered too much."""


class PeerNameNotFoundError(PeerUnreachableError):
    """The peer's name does not exist: its lookup answered "no such name" (or no address), not "try again".

    A subclass, so every caller that retries unreachable peers still does; the callers that answer a client
    tell it apart (``unknown_relay``: asking again gets the same answer until the name's DNS changes).
    """


class PeerTransport(Protocol):
    async def resolve(self, host: str, port: int, *, timeout_seconds: float) -> list[str]:
        """Every address ``host`` resolves to (IP strings, no duplicates), within ``timeout_seconds``.

        Raises :class:`PeerNameNotFoundError` when the resolver answers that
        the name does not exist or has no address, and
        :class:`PeerUnreachableError` when the lookup fails otherwise (a
        temporary resolver failure, a timeout). Cancellation abandons the
        lookup.
        """

    async def request(
        self,
        base_url: str,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        *,
        timeout_seconds: float,
        max_response_bytes: int,
        connect_to: Sequence[str] = (),
    ) -> PeerResponse:
        """One HTTP request to ``base_url`` + ``path``; the whole exchange within ``timeout_seconds``.

        ``connect_to``, when not empty, are the only addresses a new
        connection may go to (in order; the caller checked them), instead of
        resolving the URL's host again — so DNS cannot change between the
        check and the connection. Host header, TLS server name and
        certificate checks still use the URL's host. Raises
        :class:`PeerUnreachableError` on any failure to get a complete
        response of at most ``max_response_bytes``. Cancellation abandons
        the request (the connection is closed).
        """


# -- settings and resolver ---------------------------------------------------------------------


def _names(text: str) -> frozenset[str]:
    return frozenset(n.strip().lower() for n in text.split(",") if n.strip())


def parse_peers(text: str) -> dict[str, str]:
    """``"NAME=URL,NAME=URL"`` → {name: base url without trailing slash}."""
    peers = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, _, url = entry.partition("=")
        peers[name.strip().lower()] = url.strip().rstrip("/")
    return peers


def parse_peer_keys(text: str) -> dict[str, frozenset[str]]:
    """``"NAME=KEYID KEYID,NAME=KEYID"`` (config ``peer_keys``) → {name: pinned relay key ids}."""
    pins: dict[str, frozenset[str]] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, _, ids = entry.partition("=")
        pins[name.strip().lower()] = pins.get(name.strip().lower(), frozenset()) | frozenset(ids.split())
    return pins


# -- peer addresses: where a relay may connect (docs/federation.md §1.1) ----------------------------
# The pure rules live in protocol.hosts (the client applies the same ones to a blob's relay); re-exported here
# for the callers and tests that name them through this module.

_RELAY_NAME = re.compile(RELAY_PATTERN)


@dataclass(frozen=True, slots=True)
class FederationSettings:
    mode: str = "off"  # "open", "allowlist", "off"
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()
    peers: Mapping[str, str] = field(default_factory=dict)
    window_seconds: int = 300
    timeout_seconds: float = 10.0
    max_body_bytes: int = 4 * 1024 * 1024
    batch_envelopes: int = 200
    retry_min_seconds: float = 1.0
    retry_max_seconds: float = 600.0
    poll_seconds: float = 2.0
    lease_seconds: float = 30.0
    peer_requests_per_second: float = 0.0
    peer_requests_burst: float = 0.0
    pinned_keys: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config) -> FederationSettings:
        return cls(
            mode=config.federation,
            allow=_names(config.federation_allow),
            deny=_names(config.federation_deny),
            peers=parse_peers(config.peers),
            window_seconds=config.federation_window_seconds,
            timeout_seconds=config.federation_timeout_seconds,
            max_body_bytes=config.federation_max_body_bytes,
            batch_envelopes=max(1, config.federation_batch_envelopes),
            retry_min_seconds=config.federation_retry_min_seconds,
            retry_max_seconds=max(config.federation_retry_min_seconds, config.federation_retry_max_seconds),
            poll_seconds=config.federation_poll_seconds,
            lease_seconds=config.federation_lease_seconds,
            peer_requests_per_second=config.rate_peer_requests_per_second,
            peer_requests_burst=config.rate_peer_requests_burst,
            pinned_keys=parse_peer_keys(config.peer_keys),
        )


class Resolver:
    """Relay name → base URL: the static table first, else ``https://<name>`` (DNS)."""

    def __init__(self, static: Mapping[str, str]) -> None:
        self._static = {name.lower(): url.rstrip("/") for name, url in static.items()}

    def url_for(self, relay: str) -> str:
        return self._static.get(relay.lower()) or f"https://{relay.lower()}"

    def is_static(self, relay: str) -> bool:
        """Whether the operator configured ``relay``'s URL (then no address rule applies to it)."""
        return relay.lower() in self._static

    @property
    def configured(self) -> frozenset[str]:
        return frozenset(self._static)


def backoff_seconds(failures: int, minimum: float, maximum: float, unit_random: float) -> float:
    """Exponential backoff with "equal jitter": half the step fixed, half random (``unit_random`` in [0, 1))."""
    step = min(maximum, minimum * math.pow(2, min(max(failures - 1, 0), 40)))
    return step / 2 + step / 2 * unit_random


@dataclass(slots=True)
class _OriginKeys:
    keys: list[RelayKey]
    fetched_at: float


@dataclass(frozen=True, slots=True)
class _KeyFailure:
    code: ErrorCode
    message: str
    until: float


#: What a peer answers to a delivery that will be refused again, whatever the retry: it does not federate with
#: this relay (or not at all), the name leads to another relay, or there is no Tetherless federation endpoint.
#: Everything else (5xx, 429, signature freshness or key discovery, a body too large for its limits, garbage)
#: may pass and is retried with backoff.
PERMANENT_REFUSALS: Final = frozenset(
    {ErrorCode.PEER_FORBIDDEN, ErrorCode.WRONG_DESTINATION, ErrorCode.NOT_FOUND, ErrorCode.METHOD_NOT_ALLOWED}
)
#: The same for an answer without a problem document: not a Tetherless relay at that name.
PERMANENT_STATUSES: Final = frozenset({404, 405, 410})


class _DeliveryFailedError(Exception):
    """A delivery that got no per-envelope answer; ``permanent``: asking again gets the same answer."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


# -- the service ---------------------------------------------------------------------------------


class FederationService:
    """Federation for one relay process. Without a transport (tests, ``federation = "off"``) nothing goes out."""

    def __init__(
        self,
        store: Store,
        ctx: ServiceContext,
        settings: FederationSettings,
        keyring: RelayKeyring | None,
        transport: PeerTransport | None,
        notifier: InboxNotifier,
        accounts: AccountService,
    ) -> None:
        self._store = store
        self._ctx = ctx
        self.settings = settings
        self._keyring = keyring
        self._transport = transport
        self._notifier = notifier
        self._accounts = accounts
        self.resolver = Resolver(settings.peers)
        self._labelled = self.resolver.configured | settings.allow
        self._keys: OrderedDict[str, _OriginKeys] = OrderedDict()
        self._key_failures: OrderedDict[str, _KeyFailure] = OrderedDict()
        self._key_fetches = trio.CapacityLimiter(KEY_FETCH_CONCURRENCY)
        self._key_fetching: dict[str, trio.Event] = {}
        self._peer_limiter = KeyedLimiter(settings.peer_requests_per_second, settings.peer_requests_burst)
        self._wake = trio.Event()
        self._active: set[str] = set()
        self._failures: dict[str, int] = {}
        # This process's name on federation leases: replicas of one relay send disjoint peers' outboxes.
        self._lease_holder = self._ctx.random_bytes(12).hex()

    # -- policy ---------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.settings.mode != "off" and self._keyring is not None

    def check_peer(self, relay: str) -> None:
        """Whether this relay federates with ``relay``, judged from its name alone (no I/O).

        Raises ``remote_recipient`` when federation is off, ``peer_forbidden``
        when policy refuses ``relay``, ``invalid_field`` for a name that is
        not ``host[:port]``, and ``peer_address_refused`` for an address
        rule that needs no DNS (:meth:`check_peer_name`). Idempotent.
        """
        if not self.enabled:
            raise TetherlessError(ErrorCode.REMOTE_RECIPIENT, f"{relay} is not this relay; federation is off")
        name = relay.lower()
        if name == self._ctx.relay_name:
            return
        if name in self.settings.deny or (self.settings.mode == "allowlist" and name not in self.settings.allow):
            raise TetherlessError(ErrorCode.PEER_FORBIDDEN, f"this relay does not federate with {relay}")
        self.check_peer_name(name)

    def check_peer_name(self, relay: str) -> None:
        """The address rules that need no DNS; static peers (``peers``) are exempt from all of them.

        Raises ``invalid_field`` (not ``host[:port]``) and
        ``peer_address_refused``: in ``open`` mode for any IP-literal name
        (an unauthenticated request could otherwise aim this relay at any
        address), in ``allowlist`` mode for an allow-listed literal that is
        not a public address.
        """
        if self.resolver.is_static(relay):
            return
        host, _ = split_relay_name(relay)
        if not numeric_host(host):
            return
        literal = ip_literal(host)
        if self.settings.mode == "open" or literal is None or not public_address(literal):
            raise TetherlessError(
                ErrorCode.PEER_ADDRESS_REFUSED,
                f"{relay} is an IP address; this relay federates with it only as a configured peer",
            )

    async def endpoint(self, relay: str) -> tuple[str, tuple[str, ...]]:
        """Where to reach ``relay``: its base URL and the addresses a new connection may use.

        A static peer's URL is the operator's: the addresses are empty (the
        transport resolves it). Any other name is resolved here, once, and
        refused if any address is not public (:func:`public_address`); the
        caller passes the checked addresses to the transport, so a DNS answer
        that changes in between (rebinding) cannot redirect the connection.
        Raises ``invalid_field`` / ``peer_address_refused``,
        :class:`PeerNameNotFoundError` (the name does not exist) and
        :class:`PeerUnreachableError` (no transport, the lookup failed for
        now). Cancellation abandons the lookup.
        """
        base_url = self.resolver.url_for(relay)
        if self.resolver.is_static(relay):
            return base_url, ()
        if self._transport is None:
            raise PeerUnreachableError("this relay has no outbound transport")
        self.check_peer_name(relay)
        host, port = split_relay_name(relay)
        literal = ip_literal(host)
        if literal is not None:
            return base_url, (str(literal),)
        addresses = await self._transport.resolve(host, port or 443, timeout_seconds=self.settings.timeout_seconds)
        for text in addresses:
            try:
                public = public_address(ipaddress.ip_address(text))
            except ValueError:  # a scoped IPv6 address (fe80::1%eth0) is link-local anyway
                public = False
            if not public:
                log.info("not connecting to %s: it resolves to the non-public address %s", relay, text)
                raise TetherlessError(
                    ErrorCode.PEER_ADDRESS_REFUSED,
                    f"{relay} resolves to a loopback, private, link-local, multicast or reserved address",
                )
        if not addresses:
            raise PeerNameNotFoundError(f"{host} has no address")
        return base_url, tuple(addresses)

    def peer_label(self, relay: str) -> str:
        """The metrics label for ``relay``: its name if configured, else "other" (bounded label set)."""
        return relay if relay in self._labelled else "other"

    def outbox_committed(self) -> None:
        """Envelopes for other relays were just committed: wake the delivery worker."""
        self._wake.set()

    # -- signing ----------------------------------------------------------------------------

    def _now_seconds(self) -> int:
        return self._ctx.clock_ms() // 1000

    def _signed_headers(
        self, base_url: str, method: str, path: str, body: bytes, destination: str
    ) -> list[tuple[str, str]]:
        assert self._keyring is not None
        authority = base_url.split("://", 1)[1].split("/", 1)[0]
        nonce = base64.urlsafe_b64encode(self._ctx.random_bytes(18)).decode("ascii")
        return federation.sign_request(
            self._keyring.signing_key,
            method=method,
            authority=authority,
            path=path,
            body=body,
            origin=self._ctx.relay_name,
            destination=destination,
            created=self._now_seconds(),
            nonce=nonce,
            validity_seconds=min(federation.DEFAULT_VALIDITY_SECONDS, self.settings.window_seconds),
        )

    async def _signed_request(self, peer: str, method: str, path: str, body: bytes, kind: str) -> PeerResponse:
        """A signed request to ``peer``; raises ``PeerUnreachableError`` and ``peer_address_refused``
        (:meth:`endpoint`: nothing is sent). Counts metrics."""
        label = self.peer_label(peer)
        try:
            base_url, addresses = await self.endpoint(peer)
        except TetherlessError:
            metrics.federation_requests_total.labels(label, "out", kind, "refused").inc()
            raise
        except PeerUnreachableError as exc:
            metrics.federation_requests_total.labels(label, "out", kind, _unreachable_outcome(exc)).inc()
            raise
        assert self._transport is not None  # endpoint() raised otherwise
        headers = self._signed_headers(base_url, method, path, body, peer)
        headers += [("content-type", codec.MSGPACK), ("accept", codec.MSGPACK)]
        started = time.perf_counter()
        try:
            response = await self._transport.request(
                base_url,
                method,
                path,
                headers,
                body,
                timeout_seconds=self.settings.timeout_seconds,
                max_response_bytes=self.settings.max_body_bytes,
                connect_to=addresses,
            )
        except PeerUnreachableError:
            metrics.federation_requests_total.labels(label, "out", kind, "unreachable").inc()
            raise
        finally:
            metrics.federation_request_duration_seconds.labels(label, kind).observe(time.perf_counter() - started)
        metrics.federation_requests_total.labels(label, "out", kind, str(response.status)).inc()
        return response

    # -- inbound: authentication ------------------------------------------------------------

    async def authenticate(
        self, *, method: str, path: str, authority: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> str:
        """Check a federation request's signature; returns the origin relay's name.

        Raises, in this order: ``body_too_large``, ``signature_missing``,
        ``bad_signature`` (malformed, or an origin that is not a relay name),
        ``signature_expired``, ``wrong_destination``, ``digest_mismatch``,
        ``remote_recipient`` / ``peer_forbidden`` / ``peer_address_refused``
        (policy and address rules, before any connection),
        ``unknown_relay_key`` / ``peer_address_refused`` / ``peer_unavailable``
        (key lookup: pins, resolved addresses, fetch), ``bad_signature``,
        ``rate_limited``, ``signature_replayed``. Only a request that passes
        every check writes anything (its nonce). Cancellation may abandon a
        key fetch; nothing is written then.
        """
        try:
            origin = await self._authenticate(method, path, authority, headers, body)
        except TetherlessError as exc:
            metrics.federation_rejected_total.labels(exc.code.value).inc()
            raise
        return origin

    async def _authenticate(
        self, method: str, path: str, authority: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> str:
        if len(body) > self.settings.max_body_bytes:
            raise TetherlessError(
                ErrorCode.BODY_TOO_LARGE, f"federation bodies are at most {self.settings.max_body_bytes} bytes"
            )
        signed = federation.parse_signed_request(headers)
        content_digest = next((v for k, v in headers if k == "content-digest"), None)
        federation.check_signed_request(
            signed,
            body=body,
            content_digest_header=content_digest,
            own_name=self._ctx.relay_name,
            now=self._now_seconds(),
            window=self.settings.window_seconds,
        )
        if not self.enabled:
            raise TetherlessError(ErrorCode.PEER_FORBIDDEN, "federation is off on this relay")
        if not _RELAY_NAME.match(signed.origin):
            raise TetherlessError(ErrorCode.BAD_SIGNATURE, "Tetherless-Origin is not a relay name")
        self.check_peer(signed.origin)
        if signed.origin == self._ctx.relay_name:
            raise TetherlessError(ErrorCode.PEER_FORBIDDEN, "a relay does not federate with itself")
        public_key = await self._origin_key(signed.origin, signed.key_id)
        federation.verify_signature(signed, public_key, method=method, authority=authority, path=path, headers=headers)
        wait = self._peer_limiter.take(signed.origin)
        if wait > 0:
            retry = max(1, math.ceil(wait)) if math.isfinite(wait) else 3600
            metrics.rate_limited_total.labels("peer").inc()
            raise TetherlessError(ErrorCode.RATE_LIMITED, "too many federation requests", retry_after_seconds=retry)
        forget_at = (signed.expires + self.settings.window_seconds) * 1000
        if not await self._store.federation_remember_nonce(signed.origin, signed.nonce, forget_at):
            raise TetherlessError(ErrorCode.SIGNATURE_REPLAYED, "this signature was already used")
        return signed.origin

    async def _origin_key(self, origin: str, key_id: str) -> bytes:
        """``origin``'s public key ``key_id``, from the cache or its discovery document.

        Pinned origins (``peer_keys``) are refused any other key id before
        anything is fetched. Fetches are capped: one per origin at a time
        (concurrent requests wait for it), :data:`KEY_FETCH_CONCURRENCY` in
        all (beyond: ``peer_unavailable`` at once), at most one re-fetch per
        :data:`KEY_REFETCH_SECONDS` for unknown key ids, and a failure is
        answered from memory for :data:`KEY_FAILURE_CACHE_SECONDS` — so
        requests naming unreachable or refused origins cost no connections.
        """
        pins = self.settings.pinned_keys.get(origin)
        if pins is not None and key_id not in pins:
            raise TetherlessError(ErrorCode.UNKNOWN_RELAY_KEY, f"relay key {key_id} is not pinned for {origin}")
        while True:
            now = trio.current_time()
            failure = self._key_failures.get(origin)
            if failure is not None and now < failure.until:
                raise TetherlessError(failure.code, failure.message)
            cached = self._keys.get(origin)
            if cached is not None and now - cached.fetched_at < KEY_CACHE_SECONDS:
                try:
                    return federation.select_relay_key(cached.keys, key_id, self._ctx.clock_ms())
                except TetherlessError:
                    if now - cached.fetched_at < KEY_REFETCH_SECONDS:
                        raise
            pending = self._key_fetching.get(origin)
            if pending is None:
                break
            await pending.wait()  # the fetch in flight decides (keys, or a remembered failure)
        borrower = object()  # the limiter refuses a borrower twice; a fresh one per fetch
        try:
            self._key_fetches.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            raise TetherlessError(
                ErrorCode.PEER_UNAVAILABLE, "too many relay key fetches in progress", retry_after_seconds=1
            ) from None
        done = self._key_fetching[origin] = trio.Event()
        try:
            keys = await self._fetch_keys(origin)
        except TetherlessError as exc:
            _remember(self._key_failures, origin, _KeyFailure(exc.code, exc.detail, now + KEY_FAILURE_CACHE_SECONDS))
            raise
        finally:
            self._key_fetches.release_on_behalf_of(borrower)
            del self._key_fetching[origin]
            done.set()
        if pins is not None:
            keys = [key for key in keys if key.key_id in pins]
        self._key_failures.pop(origin, None)
        _remember(self._keys, origin, _OriginKeys(keys, now))
        return federation.select_relay_key(keys, key_id, self._ctx.clock_ms())

    async def _fetch_keys(self, origin: str) -> list[RelayKey]:
        """``origin``'s published keys. Raises ``peer_address_refused``, ``peer_unavailable`` and
        ``unknown_relay_key`` (the document names another relay)."""
        label = self.peer_label(origin)
        try:
            base_url, addresses = await self.endpoint(origin)
            assert self._transport is not None  # endpoint() raised otherwise
            response = await self._transport.request(
                base_url,
                "GET",
                "/.well-known/tetherless",
                [("accept", codec.MSGPACK)],
                b"",
                timeout_seconds=self.settings.timeout_seconds,
                max_response_bytes=256 * 1024,
                connect_to=addresses,
            )
            if response.status != 200:
                raise PeerUnreachableError(f"HTTP {response.status}")
            doc = codec.decode(response.body, WellKnown, _media_type(response))
        except TetherlessError as exc:
            if exc.code is ErrorCode.PEER_ADDRESS_REFUSED:
                metrics.federation_requests_total.labels(label, "out", "keys", "refused").inc()
                raise
            metrics.federation_requests_total.labels(label, "out", "keys", "failed").inc()
            raise TetherlessError(ErrorCode.PEER_UNAVAILABLE, f"cannot fetch the keys of {origin}") from exc
        except PeerUnreachableError as exc:
            # An origin whose name does not resolve is still peer_unavailable to the relay that claims it.
            outcome = "unresolved" if isinstance(exc, PeerNameNotFoundError) else "failed"
            metrics.federation_requests_total.labels(label, "out", "keys", outcome).inc()
            raise TetherlessError(ErrorCode.PEER_UNAVAILABLE, f"cannot fetch the keys of {origin}") from exc
        metrics.federation_requests_total.labels(label, "out", "keys", "200").inc()
        if doc.relay.lower() != origin:
            raise TetherlessError(ErrorCode.UNKNOWN_RELAY_KEY, f"{origin}'s discovery document names {doc.relay}")
        return list(doc.relay_keys) or [
            RelayKey(key_id=federation.relay_key_id(doc.relay_key), public_key=doc.relay_key)
        ]

    # -- inbound: delivery and device lists --------------------------------------------------------

    async def receive(self, origin: str, request: DeliverRequest) -> DeliverResponse:
        """Store envelopes ``origin`` delivers; one result per envelope, in order. Idempotent per (origin, id).

        Raises ``batch_too_large``; everything else is a per-envelope outcome.
        """
        limits = self._ctx.limits
        label = self.peer_label(origin)
        if len(request.envelopes) > limits.max_batch_envelopes:
            raise TetherlessError(ErrorCode.BATCH_TOO_LARGE, f"at most {limits.max_batch_envelopes} envelopes")
        now = self._ctx.clock_ms()
        results: list[DeliveryResult | None] = []
        items: list[ReceivedEnvelope] = []
        for env in request.envelopes:
            code = self._check_incoming(env, now)
            if code:
                results.append(DeliveryResult(id=env.id, outcome="rejected", code=code))
                continue
            address = Address.parse(env.recipient)
            results.append(None)
            items.append(
                ReceivedEnvelope(
                    origin_envelope_id=env.id,
                    recipient_device=address.device,
                    recipient_account=address.account,
                    envelope_id=self._ctx.random_bytes(16),
                    expires_at_ms=min(env.expires_at_ms, now + limits.max_ttl_seconds * 1000),
                    ciphertext=env.ciphertext,
                )
            )
        stored = await self._store.federation_store_received(
            origin, items, now, limits.max_inbox_envelopes, now + limits.max_ttl_seconds * 1000
        )
        outcomes = iter(zip(items, stored, strict=True))
        final: list[DeliveryResult] = []
        for result in results:
            if result is None:
                item, (outcome, device) = next(outcomes)
                result = _result_for(item.origin_envelope_id, outcome)
                if outcome is ReceivedOutcome.STORED:
                    self._notifier.notify(device)
            metrics.federation_envelopes_total.labels(label, "in", result.outcome).inc()
            final.append(result)
        return DeliverResponse(results=final)

    def _check_incoming(self, env: FederatedEnvelope, now_ms: int) -> str:
        """The rejection code for an envelope that can never be stored here, or ""."""
        try:
            address = Address.parse(env.recipient)
        except TetherlessError:
            return ErrorCode.INVALID_FIELD.value
        if address.relay != self._ctx.relay_name:
            return ErrorCode.WRONG_DESTINATION.value
        if not address.device:
            return ErrorCode.UNKNOWN_RECIPIENT.value
        if len(env.ciphertext) > self._ctx.limits.max_envelope_bytes:
            return ErrorCode.ENVELOPE_TOO_LARGE.value
        if env.expires_at_ms <= now_ms:
            return "expired"
        return ""

    async def local_device_list(self, account_id: str) -> DeviceListChain:
        """A local account's device-list chain, for a peer. Raises ``unknown_account``."""
        return await self._accounts.device_list_chain(account_id)

    async def device_list(self, relay: str, account_id: str) -> DeviceListChain:
        """``account_id``'s chain from its home relay ``relay`` (this one, or a peer with a signed request).

        The chain is not trusted here: clients verify it from the genesis list
        (the account id is derived from the genesis key). Raises
        ``unknown_account``, ``remote_recipient`` / ``peer_forbidden`` (policy),
        ``invalid_field`` / ``peer_address_refused`` (address rules: nothing
        is sent), ``unknown_relay`` (the name does not exist) and
        ``peer_unavailable``. Idempotent (a read).
        """
        relay = relay.lower()
        if relay == self._ctx.relay_name:
            return await self._accounts.device_list_chain(account_id)
        self.check_peer(relay)
        try:
            response = await self._signed_request(
                relay, "GET", f"{PREFIX}/accounts/{account_id}/devices", b"", "device_list"
            )
        except PeerUnreachableError as exc:
            raise _unreachable_error(relay, exc) from exc
        if response.status == 200:
            try:
                chain = codec.decode(response.body, DeviceListChain, _media_type(response))
            except TetherlessError as exc:
                raise TetherlessError(ErrorCode.PEER_UNAVAILABLE, f"{relay} answered garbage") from exc
            if chain.account_id != account_id:
                raise TetherlessError(ErrorCode.PEER_UNAVAILABLE, f"{relay} answered for another account")
            return chain
        error = error_from_problem(response.status, response.body)
        if isinstance(error, RemoteError) and error.code is ErrorCode.UNKNOWN_ACCOUNT:
            raise TetherlessError(ErrorCode.UNKNOWN_ACCOUNT, f"no such account on {relay}")
        raise TetherlessError(ErrorCode.PEER_UNAVAILABLE, f"{relay} answered HTTP {response.status}")

    async def call_peer(self, relay: str, path: str, message: object, response_type: type[T], kind: str) -> T:
        """POST ``message`` to ``relay``'s federation API (``PREFIX + path``), signed; decode its 200 answer.

        For request/response calls of other services (prekey claims). Raises
        ``remote_recipient`` / ``peer_forbidden`` (policy),
        ``invalid_field`` / ``peer_address_refused`` (address rules: nothing
        is sent), ``unknown_relay`` (the name does not exist) and
        ``peer_unavailable`` (unreachable, any other status, or garbage).
        Not retried; nothing is stored.
        """
        relay = relay.lower()
        self.check_peer(relay)
        try:
            response = await self._signed_request(relay, "POST", PREFIX + path, codec.encode(message), kind)
        except PeerUnreachableError as exc:
            raise _unreachable_error(relay, exc) from exc
        if response.status != 200:
            raise TetherlessError(ErrorCode.PEER_UNAVAILABLE, f"{relay} answered HTTP {response.status}")
        try:
            return codec.decode(response.body, response_type, _media_type(response))
        except TetherlessError as exc:
            raise TetherlessError(ErrorCode.PEER_UNAVAILABLE, f"{relay} answered garbage") from exc

    # -- outbound: the delivery worker -----------------------------------------------------------------

    async def run_delivery(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver every peer's outbox, forever (cancel to stop).

        Wakes when a send commits envelopes for another relay, and every
        ``poll_seconds`` (to pick up retries, other replicas' sends, and
        ``admin federation retry``). Each peer is drained by its own task, so a
        slow or dead peer delays nobody else. A peer is drained only while this
        replica holds its lease (renewed before every batch), so replicas of
        one relay never send the same rows. Cancellation may interrupt a
        delivery: its envelopes stay in the outbox and are sent again (the
        receiver deduplicates); the leases are released on the way out.
        """
        for state in await self._store.federation_peer_states():
            self._failures[state.peer] = state.failures
        log.info("federation delivery: lease holder %s", self._lease_holder)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    wake = self._wake = trio.Event()
                    await self._schedule(nursery)
                    with trio.move_on_after(self.settings.poll_seconds):
                        await wake.wait()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.settings.timeout_seconds):
                try:  # another replica takes over at once instead of after the lease expires
                    await self._store.federation_release_leases(self._lease_holder)
                except Exception:
                    log.warning("cannot release federation leases; they expire by themselves", exc_info=True)

    async def _schedule(self, nursery: trio.Nursery) -> None:
        now = self._ctx.clock_ms()
        try:
            peers = await self._store.federation_due_peers(now)
        except Exception:
            log.exception("cannot read the federation outbox; will retry")
            return
        depth: dict[str, int] = {self.peer_label(p): 0 for p in self._labelled}
        for state in peers:
            label = self.peer_label(state.peer)
            depth[label] = depth.get(label, 0) + state.queued
            if state.peer in self._active or state.next_attempt_at_ms > now:
                continue
            self._active.add(state.peer)
            nursery.start_soon(self._drain_peer, state.peer)
        depth.setdefault("other", 0)
        for label, count in depth.items():
            metrics.federation_outbox_depth.labels(label).set(count)

    async def _drain_peer(self, peer: str) -> None:
        failed_through = -1  # the highest seq this pass failed: batches come in seq order, never it again
        settled = False  # this pass delivered something: the scheduler refreshes the depth gauge when it ends
        try:
            while True:
                now = self._ctx.clock_ms()
                # The lease outlives this batch's delivery (lease_seconds > timeout_seconds, checked by config).
                lease_ms = int(self.settings.lease_seconds * 1000)
                if not await self._store.federation_take_lease(peer, self._lease_holder, now, lease_ms):
                    return  # another replica sends to this peer; polled again, taken over when it expires
                batch = await self._store.federation_outbox_batch(peer, now, self.settings.batch_envelopes)
                batch = _fit(batch, self.settings.max_body_bytes // 2)
                if not batch or batch[0].seq <= failed_through:
                    return
                try:
                    results = await self._deliver(peer, batch)
                except _DeliveryFailedError as exc:
                    if not exc.permanent:
                        await self._peer_failed(peer, str(exc))
                        return
                    await self._outbox_failed(peer, [r.seq for r in batch], str(exc), "failed")
                    failed_through = batch[-1].seq
                    continue  # the peer's next rows get the same answer now, not after a backoff
                self._failures[peer] = 0
                metrics.federation_peer_failures.labels(self.peer_label(peer)).set(0)
                done: list[int] = []
                deferred: list[int] = []
                rejected: dict[str, list[int]] = {}
                for record in batch:
                    result = results.get(record.envelope_id)
                    outcome = "deferred" if result is None else result.outcome
                    if outcome == "rejected":
                        assert result is not None
                        rejected.setdefault(_printable(result.code, 64) or "rejected", []).append(record.seq)
                        continue
                    (deferred if outcome == "deferred" else done).append(record.seq)
                    metrics.federation_envelopes_total.labels(self.peer_label(peer), "out", outcome).inc()
                hold = min(DEFERRED_RETRY_SECONDS, self.settings.retry_max_seconds) * 1000
                await self._store.federation_outbox_settle(peer, done, deferred, now + int(hold), self._ctx.clock_ms())
                settled = True
                for code, seqs in rejected.items():
                    await self._outbox_failed(peer, seqs, f"rejected by {peer}: {code}", "rejected")
        except Exception:
            log.exception("delivery to %s failed unexpectedly; will retry", peer)
            await self._peer_failed(peer, "internal error")
        finally:
            self._active.discard(peer)
            if settled:
                # Not after an empty pass: a peer whose rows are all deferred would otherwise be rescheduled at once.
                self._wake.set()

    async def _outbox_failed(self, peer: str, seqs: list[int], reason: str, outcome: str) -> None:
        """End rows ``seqs`` of ``peer``'s outbox as failed for good (shown by ``admin federation`` until they
        expire or are retried); counted under the metric ``outcome`` ("failed": the whole request was refused
        or could not be addressed; "rejected": the peer refused those envelopes one by one)."""
        self._failures[peer] = 0
        await self._store.federation_outbox_fail(peer, seqs, reason[:MAX_ERROR_CHARS], self._ctx.clock_ms())
        # Counted once written: the metric never runs ahead of what `admin federation` shows.
        metrics.federation_peer_failures.labels(self.peer_label(peer)).set(0)
        metrics.federation_envelopes_total.labels(self.peer_label(peer), "out", outcome).inc(len(seqs))
        log.warning("delivery of %d envelope(s) to %s failed for good: %s", len(seqs), peer, reason)

    async def _peer_failed(self, peer: str, error: str) -> None:
        failures = self._failures.get(peer, 0) + 1
        self._failures[peer] = failures
        unit = int.from_bytes(self._ctx.random_bytes(4), "big") / 2**32
        delay = backoff_seconds(failures, self.settings.retry_min_seconds, self.settings.retry_max_seconds, unit)
        now = self._ctx.clock_ms()
        log.info("delivery to %s failed (%s); attempt %d, next in %.1fs", peer, error, failures, delay)
        metrics.federation_peer_failures.labels(self.peer_label(peer)).set(failures)
        try:
            await self._store.federation_peer_failed(
                peer, error[:MAX_ERROR_CHARS], failures, now + int(delay * 1000), now
            )
        except Exception:
            log.exception("cannot record the failure of %s", peer)

    async def _deliver(self, peer: str, batch: Sequence[OutboxRecord]) -> dict[bytes, DeliveryResult]:
        """POST one batch; the result per envelope id. Raises ``_DeliveryFailedError`` when nothing is known,
        ``permanent`` for a name that does not exist and for :data:`PERMANENT_REFUSALS`."""
        request = DeliverRequest(
            envelopes=[
                FederatedEnvelope(
                    id=r.envelope_id,
                    recipient=r.recipient,
                    sent_at_ms=r.sent_at_ms,
                    expires_at_ms=r.expires_at_ms,
                    ciphertext=r.ciphertext,
                )
                for r in batch
            ]
        )
        try:
            response = await self._signed_request(peer, "POST", DELIVER_PATH, codec.encode(request), "deliver")
        except PeerNameNotFoundError as exc:  # a mistyped or vanished name: `admin federation retry` once it exists
            raise _DeliveryFailedError(f"{ErrorCode.UNKNOWN_RELAY.value}: {exc}", permanent=True) from exc
        except PeerUnreachableError as exc:
            raise _DeliveryFailedError(f"unreachable: {exc}") from exc
        except TetherlessError as exc:  # an address rule: nothing was sent; DNS may change, so retried later
            raise _DeliveryFailedError(f"{exc.code.value}: {exc.detail}") from exc
        if response.status != 200:
            error = error_from_problem(response.status, response.body)
            if isinstance(error, RemoteError):
                permanent = error.code in PERMANENT_REFUSALS
                shown = _printable(error.detail, 200)
                detail = f": {shown}" if permanent and shown else ""
                raise _DeliveryFailedError(f"HTTP {response.status} ({error.code.value}{detail})", permanent=permanent)
            raise _DeliveryFailedError(
                f"HTTP {response.status} (no problem document)", permanent=response.status in PERMANENT_STATUSES
            )
        try:
            answer = codec.decode(response.body, DeliverResponse, _media_type(response))
        except TetherlessError as exc:
            raise _DeliveryFailedError(f"garbage answer: {exc.code.value}") from exc
        return {r.id: r for r in answer.results}


V = TypeVar("V")


def _remember(cache: OrderedDict[str, V], key: str, value: V) -> None:
    """Store ``value`` as the most recent entry; drop the least recent beyond :data:`MAX_KEY_CACHE_ORIGINS`."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > MAX_KEY_CACHE_ORIGINS:
        cache.popitem(last=False)


def _fit(batch: list[OutboxRecord], max_bytes: int) -> list[OutboxRecord]:
    """The longest prefix of ``batch`` whose ciphertexts fit ``max_bytes`` (always at least one)."""
    total = 0
    for index, record in enumerate(batch):
        total += len(record.ciphertext) + 200
        if total > max_bytes and index > 0:
            return batch[:index]
    return batch


def _printable(text: str, limit: int) -> str:
    """A peer's words for the operator (the admin table, the log): at most ``limit`` characters, printable."""
    return "".join(ch if ch.isprintable() else " " for ch in text[:limit])


def _result_for(envelope_id: bytes, outcome: ReceivedOutcome) -> DeliveryResult:
    if outcome is ReceivedOutcome.STORED:
        return DeliveryResult(id=envelope_id, outcome="stored")
    if outcome is ReceivedOutcome.DUPLICATE:
        return DeliveryResult(id=envelope_id, outcome="duplicate")
    if outcome is ReceivedOutcome.INBOX_FULL:
        return DeliveryResult(id=envelope_id, outcome="deferred", code=ErrorCode.INBOX_FULL.value)
    if outcome is ReceivedOutcome.RECIPIENT_REVOKED:
        return DeliveryResult(id=envelope_id, outcome="rejected", code=ErrorCode.RECIPIENT_REVOKED.value)
    return DeliveryResult(id=envelope_id, outcome="rejected", code=ErrorCode.UNKNOWN_RECIPIENT.value)


def _unreachable_outcome(exc: PeerUnreachableError) -> str:
    """The ``outcome`` label of an outbound request that got no answer."""
    return "unresolved" if isinstance(exc, PeerNameNotFoundError) else "unreachable"


def _unreachable_error(relay: str, exc: PeerUnreachableError) -> TetherlessError:
    """What a client is told when ``relay`` gave no answer: ``unknown_relay`` when its name does not exist
    (asking again gets the same answer), else ``peer_unavailable`` (it may answer later)."""
    if isinstance(exc, PeerNameNotFoundError):
        return TetherlessError(ErrorCode.UNKNOWN_RELAY, f"{relay} does not exist: its name does not resolve")
    return TetherlessError(ErrorCode.PEER_UNAVAILABLE, f"{relay} cannot be reached")


def _media_type(response: PeerResponse) -> str:
    content_type = (response.header("content-type") or codec.MSGPACK).split(";")[0].strip().lower()
    return codec.JSON if content_type in (codec.JSON, "application/problem+json") else codec.MSGPACK
