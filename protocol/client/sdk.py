"""The reference client SDK: register a device, authenticate, send, receive.

Usage::

    async with RelayClient.connect(keys.relay_url, keys=keys) as client:
        await client.send(address, "hello")
        batch = await client.fetch()
        async with client.stream(after=batch.next_cursor) as inbox:
            async for item in inbox:
                ...
                await client.ack(up_to=item.cursor)

Everything on the wire is MessagePack; relay errors are raised as
:class:`~protocol.errors.RemoteError` (switch on ``.code``), a broken
connection as :class:`~protocol.client.http.TransportError`. The SDK keeps one
HTTP/2 connection, reconnects when it breaks, and renews its session token by
itself (before it expires, and once more on a 401 ``token_expired`` /
``invalid_token``).

Randomness (keys, idempotency keys, ephemeral keys) comes from the OS CSPRNG
and time from the wall clock; both can be injected for tests. Payload crypto
goes through :class:`~protocol.payload.PayloadCipher` only.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

import msgspec
import nacl.public
import nacl.signing
import trio

from .. import auth, codec, device_list, recovery
from .. import session as sealed_v2
from ..errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError, error_from_problem
from ..handshake import MLKEM_SEED_BYTES, mlkem_public
from ..ids import Address, account_id_for, device_id_for
from ..messages import (
    Accepted,
    AccountCreated,
    AckRequest,
    AckResponse,
    Challenge,
    ChallengeRequest,
    ClaimPrekeysRequest,
    ClaimPrekeysResponse,
    CreateAccountRequest,
    DeviceEntry,
    DeviceList,
    DeviceListChain,
    DeviceListChanged,
    Heartbeat,
    InboxEnvelope,
    InboxPage,
    OutboundEnvelope,
    PrekeyCounts,
    SendRequest,
    SendResponse,
    Session,
    SessionRequest,
    StreamItem,
    WellKnown,
)
from ..payload import InvalidPayloadError, Opened, PayloadCipher, SealedBoxCipher, open_plaintext
from . import outbox
from .chains import DeviceListRejectedError, DeviceRevokedError, load_mark, save_mark
from .http import (
    ConnectError,
    HTTP2Connection,
    Response,
    StreamingResponse,
    TransportError,
    collapse_single_group,
    start_connection,
)
from .keystore import AlreadyInitialisedError, DeviceKeys, Keystore
from .localdb import LocalDB
from .sessions import KeyValueStore, MemoryStore, PrekeysUnavailableError, SessionManager

log = logging.getLogger(__name__)

T = TypeVar("T")

TEXT_CONTENT_TYPE: Final = "text/plain; charset=utf-8"
BINARY_CONTENT_TYPE: Final = "application/octet-stream"
IDEMPOTENCY_KEY_BYTES: Final = 16
DEFAULT_BATCH_ENVELOPES: Final = 100
DEVICE_LIST_CACHE_SECONDS: Final = 30.0
STREAM_IDLE_TIMEOUT_SECONDS: Final = 90.0
WELL_KNOWN_PATH: Final = "/.well-known/tetherless"
PREKEYS_PATH: Final = "/v1/prekeys"
_REAUTH_CODES: Final = frozenset({ErrorCode.TOKEN_EXPIRED, ErrorCode.INVALID_TOKEN})
_RETRY_LATER_CODES: Final = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED})
_HEADERS: Final = (("content-type", codec.MSGPACK), ("accept", codec.MSGPACK))


# -- results -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A decrypted, verified message from the inbox.

    ``sent_at_ms`` is the sender's signed clock; ``relay_sent_at_ms`` is when
    the relay accepted the envelope. ``message_id`` is the sender's
    idempotency key (use it to drop redeliveries).
    """

    cursor: int
    id: bytes
    sender: str
    content_type: str
    body: bytes
    sent_at_ms: int
    relay_sent_at_ms: int
    message_id: bytes

    @property
    def text(self) -> str | None:
        """The body as text for ``text/*`` content (undecodable bytes replaced), else None."""
        if not self.content_type.lower().startswith("text/"):
            return None
        return self.body.decode("utf-8", errors="replace")


@dataclass(frozen=True, slots=True)
class RejectedMessage:
    """An envelope that did not decrypt or verify. Acknowledge it so it does not block the inbox.

    ``warning``: the stable client warning code ``sync`` reports it under (account-log.md §18.1):
    ``payload_downgrade`` for a version-1 payload from a format-2+ sender, else ``message_refused``."""

    cursor: int
    id: bytes
    code: ErrorCode
    detail: str
    warning: str = "message_refused"


class PayloadDowngradeError(InvalidPayloadError):
    """A version-1 payload (no forward secrecy) from a sender whose account uses sessions (crypto.md §14)."""

    warning = "payload_downgrade"


InboxItem = ReceivedMessage | RejectedMessage


@dataclass(frozen=True, slots=True)
class InboxBatch:
    """One page of the inbox. Pass ``next_cursor`` as ``after`` next; ``more``: another page is ready."""

    items: list[InboxItem]
    next_cursor: int
    more: bool


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for :meth:`RelayClient.send_many`. ``str`` bodies are sent as UTF-8 text."""

    recipient: str
    body: str | bytes
    content_type: str | None = None
    ttl_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class Sent:
    """The relay's receipt for one envelope (``duplicate``: a retry the relay had already stored)."""

    recipient: str
    id: bytes
    sent_at_ms: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class ProbeAnswer:
    """What :meth:`RelayClient.probe` read: the relay's document, its ``Date`` header (None when it sent none) and
    this device's clock in seconds at the middle of the request (``Date`` minus it is the clock skew)."""

    well_known: WellKnown
    date: str | None
    local_seconds: float


# -- device-list checks ----------------------------------------------------------------------


verify_chain = device_list.verify_chain  # re-exported: clients check chains before trusting keys


# -- the client ----------------------------------------------------------------------------


class RelayClient:
    """A device's connection to its relay. Create with :meth:`connect`.

    Methods may be called concurrently from several tasks (they share one
    HTTP/2 connection). Every method raises :class:`RemoteError` for a
    problem answered by the relay, :class:`UnknownRemoteError` for an error
    that is not a problem document, and :class:`TransportError` (its subclass
    :class:`ConnectError` when the relay cannot be reached) after retries are
    exhausted. Cancellation aborts the request in flight (its stream is
    reset); for :meth:`send` that means the message may or may not have been
    stored — sending it again with a fresh call may duplicate it.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        relay_url: str,
        *,
        keys: DeviceKeys | None = None,
        ca_file: str | None = None,
        verify: bool = True,
        request_timeout_seconds: float = 30.0,
        max_attempts: int = 5,
        verify_senders: bool = True,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
        local_db: LocalDB | None = None,
        sessions: SessionManager | None = None,
    ) -> None:
        self.relay_url = relay_url
        self.keys = keys
        self._nursery = nursery
        self._ca_file = ca_file if ca_file is not None else (keys.ca_file if keys else None)
        self._verify = verify
        self._timeout = request_timeout_seconds
        self._max_attempts = max(1, max_attempts)
        self._verify_senders = verify_senders
        self._wall_clock = wall_clock
        self._random_bytes = random_bytes
        self._connection: HTTP2Connection | None = None
        self._connections: list[HTTP2Connection] = []
        self._connect_lock = trio.Lock()
        self._auth_lock = trio.Lock()
        self._session: Session | None = None
        self._session_renew_at_ms = 0
        self._well_known: WellKnown | None = None
        self._device_lists: dict[str, tuple[float, list[DeviceEntry]]] = {}
        self._cipher: PayloadCipher | None = self._make_cipher(keys) if keys else None
        # Device-list high-water marks live here (crypto.md §3.5); None: verify from genesis every time.
        self.local_db = local_db
        # v2 sessions (crypto.md §7-§9): None sends v1 to everyone; see enable_sessions().
        self.sessions = sessions
        self._list_heads: dict[str, DeviceList] = {}
        # Every version of the last verified chain, per account: version -> its devices (see list_at()).
        self._list_versions: dict[str, dict[int, list[DeviceEntry]]] = {}
        self._list_backup_hashes: dict[str, dict[int, bytes]] = {}  # recovery_backup_key_hash per version

    @classmethod
    @asynccontextmanager
    async def connect(cls, relay_url: str, **options: Any) -> AsyncIterator[RelayClient]:
        """``async with RelayClient.connect(url, keys=...) as client:``; closes its connections on exit.

        The connection is opened lazily by the first request.
        """
        with collapse_single_group():
            async with trio.open_nursery() as nursery:
                client = cls(nursery, relay_url, **options)
                try:
                    yield client
                finally:
                    await client.aclose()

    async def aclose(self) -> None:
        """Close every connection. Idempotent; never raises."""
        for conn in self._connections:
            await conn.aclose()
        self._connections.clear()
        self._connection = None

    @staticmethod
    def _make_cipher(keys: DeviceKeys) -> PayloadCipher:
        return SealedBoxCipher(signing_key=keys.signing_key, box_private_key=keys.box_private_key, address=keys.address)

    def _require_keys(self) -> DeviceKeys:
        if self.keys is None:
            raise RuntimeError("this client has no device keys; register() first")
        return self.keys

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    # -- transport ---------------------------------------------------------------------

    async def _conn(self) -> HTTP2Connection:
        async with self._connect_lock:
            if self._connection is None or not self._connection.is_usable:
                # A connection that got a graceful GOAWAY finishes its open
                # streams and is closed by the relay; we just stop using it.
                self._connections = [c for c in self._connections if c.is_usable]
                conn = await start_connection(self._nursery, self.relay_url, ca_file=self._ca_file, verify=self._verify)
                self._connection = conn
                self._connections.append(conn)
            return self._connection

    async def _backoff(self, attempt: int, retry_after_seconds: int | None = None) -> None:
        if retry_after_seconds is not None:
            await trio.sleep(min(retry_after_seconds, 60))
            return
        # Full jitter: spreads the reconnects of many clients after a relay restart.
        await trio.sleep(random.uniform(0, min(10.0, 0.2 * 2**attempt)))

    async def _call(
        self,
        method: str,
        path: str,
        body: msgspec.Struct | None,
        response_type: type[T],
        *,
        authenticated: bool = True,
        retry: bool = True,
    ) -> T:
        """One API call with retries, its 2xx body decoded as ``response_type``.

        ``retry``: the request is safe to repeat (idempotent); otherwise it is
        only repeated when the relay certainly did not process it.
        """
        response = await self._request(method, path, body, authenticated=authenticated, retry=retry)
        return codec.decode(response.body, response_type, _media_type(response))

    async def _request(
        self, method: str, path: str, body: msgspec.Struct | None, *, authenticated: bool = True, retry: bool = True
    ) -> Response:
        """:meth:`_call`'s retry, re-authentication and backoff (the one place); returns the 2xx response as is."""
        encoded = codec.encode(body) if body is not None else None
        reauthenticated = False
        attempt = 0
        while True:
            attempt += 1
            try:
                conn = await self._conn()
                headers = list(_HEADERS)
                if authenticated:
                    headers.append(("authorization", f"Bearer {await self._token()}"))
                response = await conn.request(method, path, encoded, headers, timeout=self._timeout)
            except ConnectError:
                # Nothing listening at all: say so at once rather than after a
                # minute of retries (a relay that restarts is retried below).
                if attempt == 1 or attempt >= self._max_attempts:
                    raise
                await self._backoff(attempt)
                continue
            except TransportError as exc:
                if attempt >= self._max_attempts or (exc.maybe_processed and not retry):
                    raise
                log.info("retrying %s %s after a transport error: %s", method, path.split("?")[0], exc)
                await self._backoff(attempt)
                continue
            if 200 <= response.status < 300:
                return response
            error = error_from_problem(response.status, response.body)
            if isinstance(error, RemoteError):
                if authenticated and error.code in _REAUTH_CODES and not reauthenticated:
                    reauthenticated = True
                    self._session = None
                    continue
                if error.code in _RETRY_LATER_CODES and attempt < self._max_attempts:
                    await self._backoff(attempt, error.retry_after_seconds)
                    continue
            raise error

    async def _token(self) -> str:
        if self._session is None or self._now_ms() >= self._session_renew_at_ms:
            async with self._auth_lock:
                if self._session is None or self._now_ms() >= self._session_renew_at_ms:
                    await self.authenticate()
        assert self._session is not None
        return self._session.token

    # -- accounts and sessions ------------------------------------------------------------

    async def well_known(self) -> WellKnown:
        """``GET /.well-known/tetherless`` (cached)."""
        if self._well_known is None:
            self._well_known = await self._call("GET", WELL_KNOWN_PATH, None, WellKnown, authenticated=False)
        return self._well_known

    async def probe(self) -> ProbeAnswer:
        """``GET /.well-known/tetherless`` without the cache, with the relay's ``Date`` header and this device's
        clock (``wall_clock``) at the middle of the request: what ``tetherless doctor`` compares clocks with.

        Unauthenticated and read-only; idempotent (it refreshes :meth:`well_known`'s cache). Connects first, so
        the two clock readings bracket the request, not the TCP and TLS set-up. Raises what every method raises
        (``TLSSetupError`` when the relay's TLS and this client's URL or trusted CAs do not match;
        ``msgspec.ValidationError`` for a document that is not a relay's). Cancellation aborts the request."""
        await self._conn()
        before = self._wall_clock()
        response = await self._request("GET", WELL_KNOWN_PATH, None, authenticated=False)
        after = self._wall_clock()
        self._well_known = codec.decode(response.body, WellKnown, _media_type(response))
        return ProbeAnswer(self._well_known, response.header("date"), (before + after) / 2)

    async def register(
        self,
        name: str,
        *,
        keystore: Keystore | None = None,
        list_format: int = device_list.FORMAT_3,
        recovery_secret: bytes | None = None,
    ) -> DeviceKeys:
        """Create a new account with this client's first device, and return its keys.

        Generates fresh keys with the OS CSPRNG, posts the genesis device
        list to ``POST /v1/accounts`` and, when ``keystore`` is given, stores
        the keys there (checked *before* registering, so an initialised home is
        never overwritten: raises ``AlreadyInitialisedError``) and keeps the
        device-list mark in its local database. Raises ``RemoteError``
        (``account_exists``, ``invalid_device_list`` …). Not retried after the
        request may have reached the relay.

        ``list_format`` 3 (the default; crypto.md §3.6: the device also gets a
        long-term ML-KEM-768 key), 2 (crypto.md §3) or 1 (protocol.md §4, with
        ``name`` in the list). ``recovery_secret`` (format 2/3 only): the 20-byte
        secret of :func:`protocol.recovery.new_recovery_secret`, whose derived
        key is set in the genesis list and signs it (crypto.md §3.4).
        """
        if keystore is not None and keystore.exists():
            raise AlreadyInitialisedError(f"a device already exists in {keystore.home}")
        if list_format not in (device_list.FORMAT_1, device_list.FORMAT_2, device_list.FORMAT_3):
            raise ValueError("list_format is 1, 2 or 3")
        if recovery_secret is not None and list_format == device_list.FORMAT_1:
            raise ValueError("a recovery key needs a format-2 or format-3 device list")
        signing_key = nacl.signing.SigningKey(self._random_bytes(32))
        box_private_key = self._random_bytes(32)
        box_public_key = bytes(nacl.public.PrivateKey(box_private_key).public_key)
        kem_seed = self._random_bytes(MLKEM_SEED_BYTES) if list_format == device_list.FORMAT_3 else b""
        if list_format == device_list.FORMAT_1:
            genesis = device_list.genesis(signing_key, box_public_key, name=name, now_ms=self._now_ms())
        else:
            recovery_signing_key = None
            backup_hash = b""
            if recovery_secret is not None:
                account = account_id_for(bytes(signing_key.verify_key))
                recovery_keys = recovery.recovery_keys(recovery_secret, account)
                recovery_signing_key = recovery_keys.signing_key
                # The list commits to the recovery backup key (account-log.md §5.7).
                backup_hash = recovery.backup_key_hash(recovery.backup_recipient(recovery_keys))
            now = self._now_ms()
            if kem_seed:
                kem_key = mlkem_public(kem_seed)
                genesis = device_list.genesis_v3(
                    signing_key,
                    box_public_key,
                    kem_key,
                    now_ms=now,
                    recovery_key=recovery_signing_key,
                    recovery_backup_key_hash=backup_hash,
                )
            else:
                genesis = device_list.genesis_v2(
                    signing_key,
                    box_public_key,
                    now_ms=now,
                    recovery_key=recovery_signing_key,
                    recovery_backup_key_hash=backup_hash,
                )
        created = await self._call(
            "POST",
            "/v1/accounts",
            CreateAccountRequest(signed=genesis),
            AccountCreated,
            authenticated=False,
            retry=False,
        )
        sign_key = bytes(signing_key.verify_key)
        address = Address.parse(created.address)
        if address.device != device_id_for(sign_key) or address.account != account_id_for(sign_key):
            raise TetherlessError(ErrorCode.INVALID_FIELD, "the relay answered an address that is not ours")
        keys = DeviceKeys(
            signing_seed=bytes(signing_key),
            box_private_key=box_private_key,
            relay_url=self.relay_url,
            account_id=address.account,
            device_id=address.device,
            address=str(address),
            device_name=name,
            ca_file=self._ca_file,
            list_format=list_format,
            kem_seed=kem_seed,
        )
        if keystore is not None:
            keystore.create(keys)
            if keystore.is_protected():
                self.local_db = keystore.local_db()
                mark = (1, device_list.list_hash(genesis.device_list))
                save_mark(self.local_db, address.account, address.relay, mark)
        self.keys = keys
        self._cipher = self._make_cipher(keys)
        return keys

    async def authenticate(self) -> Session:
        """Get a fresh session token (challenge, then signed answer). Called automatically when needed.

        Raises ``RemoteError`` (``unknown_device``, ``bad_signature``, …), and
        ``challenge_unknown`` locally if the relay offers a challenge for
        another relay or device (we never sign those).
        """
        keys = self._require_keys()
        challenge = await self._call(
            "POST", "/v1/auth/challenge", ChallengeRequest(device_id=keys.device_id), Challenge, authenticated=False
        )
        own_relay = Address.parse(keys.address).relay
        if challenge.device_id != keys.device_id or challenge.relay.lower() != own_relay:
            raise TetherlessError(ErrorCode.CHALLENGE_UNKNOWN, "the relay sent a challenge for another relay or device")
        request = SessionRequest(
            device_id=keys.device_id, nonce=challenge.nonce, signature=auth.sign_challenge(keys.signing_key, challenge)
        )
        # The nonce is single-use: never repeat this request, start over instead.
        session = await self._call("POST", "/v1/auth/session", request, Session, authenticated=False, retry=False)
        now = self._now_ms()
        lifetime = max(0, session.expires_at_ms - now)
        # Renew a little early (a fifth of the lifetime, at most a minute) so a
        # request never leaves with a token about to expire.
        self._session_renew_at_ms = session.expires_at_ms - min(60_000, lifetime // 5)
        self._session = session
        return session

    async def devices(self, account_id: str, *, relay: str | None = None, fresh: bool = False) -> list[DeviceEntry]:
        """The verified devices of ``account_id``'s latest device list (cached briefly).

        ``relay`` is the account's home relay (None: this client's relay). A
        remote account's chain is fetched through this client's relay
        (``GET /v1/relays/{relay}/accounts/{account_id}/devices``, which asks
        the home relay with a signed request) and verified here exactly like a
        local one, from the genesis list the account id is derived from — so
        neither relay can swap keys undetected. Raises what
        :meth:`device_chain` raises.
        """
        key = self._chain_cache_key(account_id, relay)
        cached = self._device_lists.get(key)
        if cached is not None and not fresh and trio.current_time() - cached[0] < DEVICE_LIST_CACHE_SECONDS:
            return cached[1]
        return (await self.device_chain(account_id, relay=relay)).devices

    def _own_relay(self) -> str | None:
        return Address.parse(self.keys.address).relay if self.keys else None

    def _chain_cache_key(self, account_id: str, relay: str | None) -> str:
        remote = relay is not None and relay.lower() != self._own_relay()
        return f"{account_id}@{relay.lower()}" if remote and relay else account_id

    async def device_chain(self, account_id: str, *, relay: str | None = None) -> device_list.VerifiedChain:
        """Fetch ``account_id``'s device-list chain and verify it (crypto.md §3.5); never cached.

        With a :attr:`local_db`, the chain must contain the stored high-water
        mark and not end below it, and the new head becomes the mark. Raises
        :class:`~protocol.client.chains.DeviceListRejectedError` (the chain does not
        verify: added device, swapped key, fork, rollback …, with the failed
        check's code), :class:`~protocol.client.chains.DeviceRevokedError` when
        this client's own device is not in its account's list, and relay errors.
        """
        own_relay = self._own_relay()
        remote = relay is not None and relay.lower() != own_relay
        if remote and relay:
            chain = await self._call(
                "GET", f"/v1/relays/{relay.lower()}/accounts/{account_id}/devices", None, DeviceListChain
            )
        else:
            chain = await self._call(
                "GET", f"/v1/accounts/{account_id}/devices", None, DeviceListChain, authenticated=False
            )
        relay_name = (relay or own_relay or self.relay_url).lower()
        mark = load_mark(self.local_db, account_id, relay_name)
        try:
            verified = device_list.verify_chain(chain, account_id, mark=mark)
        except TetherlessError as exc:
            raise DeviceListRejectedError(f"{account_id}@{relay_name}", exc) from exc
        save_mark(self.local_db, account_id, relay_name, verified.mark)
        self._device_lists[self._chain_cache_key(account_id, relay)] = (trio.current_time(), verified.devices)
        self._list_heads[self._chain_cache_key(account_id, relay)] = verified.head
        # verify_chain checked every version of this chain, so each version's devices are verified too.
        self._list_versions[self._chain_cache_key(account_id, relay)] = {
            signed.device_list.version: list(signed.device_list.devices) for signed in chain.versions
        }
        self._list_backup_hashes[self._chain_cache_key(account_id, relay)] = {
            signed.device_list.version: signed.device_list.recovery_backup_key_hash for signed in chain.versions
        }
        keys = self.keys
        own = keys is not None and not remote and account_id == keys.account_id
        if own and keys is not None and all(d.device_id != keys.device_id for d in verified.devices):
            raise DeviceRevokedError(keys.device_id, keys.account_address, verified.head.version)
        return verified

    async def list_at(self, account_id: str, version: int, *, relay: str | None = None) -> list[DeviceEntry] | None:
        """The devices of version ``version`` of ``account_id``'s verified device list, or None when the
        verified chain has no such version (fetches and verifies the chain once more if it is not known yet).

        Used to judge records written under an older list, e.g. a key record whose creator was revoked
        later (docs/account-log.md §5.1: "the device list of its ``device_list_version``"). Raises what
        :meth:`device_chain` raises.
        """
        key = self._chain_cache_key(account_id, relay)
        versions = self._list_versions.get(key)
        if versions is None or version not in versions:
            await self.device_chain(account_id, relay=relay)
            versions = self._list_versions.get(key, {})
        return versions.get(version)

    async def recovery_backup_hash_at(self, account_id: str, version: int) -> bytes | None:
        """The ``recovery_backup_key_hash`` of version ``version`` of ``account_id``'s verified list (``b""``:
        none set; None: no such version). Fetches and verifies the chain like :meth:`list_at`, raises what it
        raises (account-log.md §5.7)."""
        key = self._chain_cache_key(account_id, None)
        if version not in self._list_backup_hashes.get(key, {}):
            await self.device_chain(account_id)
        return self._list_backup_hashes.get(key, {}).get(version)

    # -- sending ------------------------------------------------------------------------------

    async def send(
        self, address: str, message: str | bytes, content_type: str | None = None, *, ttl_seconds: int | None = None
    ) -> list[Sent]:
        """Encrypt ``message`` for ``address`` and post it; one :class:`Sent` per recipient device.

        A device address gets one envelope; an account address
        (``account@relay``) gets one per device of the account's latest list.
        Transport failures are retried with the *same* idempotency key and
        ciphertext, so the relay stores each envelope once. Raises
        ``invalid_field`` for a bad address, ``unknown_recipient`` when the
        device is not in its account's latest device list,
        :class:`~protocol.client.outbox.MessageTooLargeError` (naming the
        limit, before anything is sealed) for a body no envelope of the
        relay's ``max_envelope_bytes`` can hold, and relay errors.
        """
        return await self.send_many([Outgoing(address, message, content_type, ttl_seconds)])

    async def send_many(self, messages: Iterable[Outgoing]) -> list[Sent]:
        """Send several messages in as few ``POST /v1/messages`` as the relay's batch limit allows.

        Each batch is committed atomically by the relay; results are in input
        order (expanded per recipient device). If a later batch fails, earlier
        ones are already stored. The envelopes of one message (all its
        recipient devices) always go in the same batch.

        With :attr:`sessions` enabled, a recipient whose account has a format-2
        device list gets v2 session envelopes (crypto.md §9): sessions are
        started from claimed prekey bundles where needed (raises
        :class:`~protocol.client.sessions.PrekeysUnavailableError` — never a v1
        fallback — and ``prekey_invalid`` for a bundle that does not verify), and
        a message to an account address also goes to this account's other
        devices (format 2). Session state advances and is stored before posting.
        """
        cipher = self._cipher
        if cipher is None:
            raise RuntimeError("this client has no device keys; register() first")
        envelopes: list[OutboundEnvelope] = []
        group_ends: list[int] = []
        for outgoing in messages:
            if isinstance(outgoing.body, str):
                body, default_type = outgoing.body.encode("utf-8"), TEXT_CONTENT_TYPE
            else:
                body, default_type = outgoing.body, BINARY_CONTENT_TYPE
            limit = outbox.max_body_bytes(
                self._well_known.limits.max_envelope_bytes if self._well_known else outbox.DEFAULT_MAX_ENVELOPE_BYTES
            )
            if len(body) > limit:  # before anything is sealed: a session's ratchet never advances for it
                raise outbox.MessageTooLargeError(len(body), limit)
            if self.sessions is not None:
                v2 = await self._session_envelopes(outgoing, body, outgoing.content_type or default_type)
                if v2 is not None:
                    envelopes += v2
                    group_ends.append(len(envelopes))
                    continue
            for recipient, box_key in await self._recipient_devices(outgoing.recipient):
                message_id = self._random_bytes(IDEMPOTENCY_KEY_BYTES)
                ciphertext = cipher.seal(
                    recipient=recipient,
                    recipient_box_key=box_key,
                    sent_at_ms=self._now_ms(),
                    message_id=message_id,
                    content_type=outgoing.content_type or default_type,
                    body=body,
                    entropy=self._random_bytes(cipher.entropy_bytes),
                )
                envelopes.append(
                    OutboundEnvelope(
                        recipient=recipient,
                        idempotency_key=message_id,
                        ciphertext=ciphertext,
                        ttl_seconds=outgoing.ttl_seconds,
                    )
                )
            group_ends.append(len(envelopes))
        if not envelopes:
            return []
        batch_size = DEFAULT_BATCH_ENVELOPES
        if len(envelopes) > 1:
            batch_size = (await self.well_known()).limits.max_batch_envelopes
        sent: list[Sent] = []
        for start, end in _batches(group_ends, max(1, batch_size)):
            batch = envelopes[start:end]
            response = await self._call("POST", "/v1/messages", SendRequest(envelopes=batch), SendResponse)
            if len(response.accepted) != len(batch):
                raise TetherlessError(ErrorCode.INVALID_FIELD, "the relay answered a different number of receipts")
            sent += [_sent(env, acc) for env, acc in zip(batch, response.accepted, strict=True)]
        return sent

    # -- v2 sessions (protocol/client/sessions.py, docs/crypto.md §7-§9, §14) ----------------------

    async def enable_sessions(self, store: KeyValueStore | None = None) -> SessionManager:
        """Use v2 sessions from now on, and publish this device's prekeys (``PUT /v1/prekeys``).

        ``store`` keeps the sessions, prekey privates and processed envelopes:
        by default :attr:`local_db` (persistent, sealed rows) or, without one,
        memory (lost on exit: fine for tests, not for a real device). Returns
        the :class:`SessionManager` (also :attr:`sessions`). Idempotent.
        """
        keys = self._require_keys()
        if self.sessions is None:
            if store is None:
                store = self.local_db if self.local_db is not None else MemoryStore()
            self.sessions = SessionManager(keys, store, random_bytes=self._random_bytes, wall_clock=self._wall_clock)
        await self.maintain_prekeys()
        return self.sessions

    async def maintain_prekeys(self) -> PrekeyCounts:
        """``GET /v1/prekeys``, then upload what is missing (first keys, top-up below 25, rotation).

        Called by :meth:`enable_sessions` and by :meth:`fetch` after one-time
        keys were used. Raises ``RuntimeError`` without sessions.
        """
        if self.sessions is None:
            raise RuntimeError("sessions are not enabled")
        counts = await self.prekey_counts()
        upload = self.sessions.prekey_upload(counts)
        if upload is not None:
            counts = await self._call("PUT", PREKEYS_PATH, upload, PrekeyCounts)
        return counts

    async def prekey_counts(self) -> PrekeyCounts:
        """``GET /v1/prekeys``: the prekeys the relay holds for this device, read without uploading any (what
        :meth:`maintain_prekeys` tops up). Authenticated (``RemoteError`` ``device_revoked`` for a removed device);
        needs no sessions. Read-only and idempotent; cancellation aborts the request."""
        return await self._call("GET", PREKEYS_PATH, None, PrekeyCounts)

    async def _verified_head(
        self, account_id: str, relay: str | None, *, fresh: bool = False
    ) -> tuple[DeviceList, list[DeviceEntry]]:
        entries = await self.devices(account_id, relay=relay, fresh=fresh)
        head = self._list_heads.get(self._chain_cache_key(account_id, relay))
        if head is None:
            verified = await self.device_chain(account_id, relay=relay)
            return verified.head, verified.devices
        return head, entries

    async def _session_envelopes(
        self, outgoing: Outgoing, body: bytes, content_type: str
    ) -> list[OutboundEnvelope] | None:
        """The v2 envelopes of one message, or None when the recipient's account is format 1 (v1 then)."""
        sessions, keys = self.sessions, self._require_keys()
        assert sessions is not None
        address = Address.parse(outgoing.recipient)
        head, entries = await self._verified_head(address.account, address.relay)
        if head.format < device_list.FORMAT_2:
            return None
        own_relay = Address.parse(keys.address).relay

        def device_address(account: str, relay: str, device: str) -> str:
            return str(Address(account=account, relay=relay, device=device))

        targets = [
            (device_address(address.account, address.relay, e.device_id), e)
            for e in entries
            if (e.device_id == address.device) or (not address.device and e.device_id != keys.device_id)
        ]
        if address.device and not targets:
            raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "the device is not in its account's current device list")
        own_head, own_entries = await self._verified_head(keys.account_id, None)
        if not address.device and address.account != keys.account_id and own_head.format >= device_list.FORMAT_2:
            # Fan-out: this account's other devices get a copy (crypto.md §9), in the same batch.
            targets += [
                (device_address(keys.account_id, own_relay, e.device_id), e)
                for e in own_entries
                if e.device_id != keys.device_id
            ]
        await self._ensure_sessions(targets)
        envelopes = []
        for recipient, _entry in targets:
            message_id = self._random_bytes(IDEMPOTENCY_KEY_BYTES)
            ciphertext = sessions.seal(
                recipient,
                sender_list_version=own_head.version,
                sent_at_ms=self._now_ms(),
                message_id=message_id,
                content_type=content_type,
                body=body,
            )
            envelopes.append(
                OutboundEnvelope(
                    recipient=recipient,
                    idempotency_key=message_id,
                    ciphertext=ciphertext,
                    ttl_seconds=outgoing.ttl_seconds,
                )
            )
        return envelopes

    async def _ensure_sessions(self, targets: list[tuple[str, DeviceEntry]]) -> None:
        """Claim bundles (``POST /v1/prekeys/claim``) and start sessions with the targets that have none."""
        sessions = self.sessions
        assert sessions is not None
        need = {address: entry for address, entry in targets if not sessions.has_session(address)}
        missing: list[str] = []
        names = list(need)
        for start in range(0, len(names), 256):
            request = ClaimPrekeysRequest(devices=names[start : start + 256])
            claimed = await self._call("POST", "/v1/prekeys/claim", request, ClaimPrekeysResponse, retry=False)
            missing += claimed.missing
            for bundle in claimed.bundles:
                entry = need.get(str(Address.parse(bundle.address)))
                if entry is None:
                    raise TetherlessError(ErrorCode.PREKEY_INVALID, "the relay answered a bundle nobody asked for")
                sessions.establish(bundle, entry)
        missing += [a for a in names if not sessions.has_session(a) and a not in missing]
        if missing:
            raise PrekeysUnavailableError(missing)

    async def _sender_entry(self, sender: Address, list_version: int) -> DeviceEntry:
        """The sealed sender's entry in its account's verified list (refreshed once); ``bad_signature`` if absent."""
        try:
            head, entries = await self._verified_head(sender.account, sender.relay)
            if list_version > head.version or all(e.device_id != sender.device for e in entries):
                head, entries = await self._verified_head(sender.account, sender.relay, fresh=True)
        except RemoteError as exc:
            raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, f"cannot verify the sender: {exc.code.value}") from exc
        except DeviceRevokedError:
            raise
        except TetherlessError as exc:
            raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, f"the sender's device list: {exc.detail}") from exc
        for entry in entries:
            if entry.device_id == sender.device:
                return entry
        raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "the sender is not a current device of its account")

    async def _refuse_v1_from_format_2(self, sender: Address) -> None:
        """A device with sessions takes a v1 (sealed box, no forward secrecy) payload only from a format-1
        account: a format-2 sender always uses sessions with a format-2 recipient (crypto.md §14), so a v1
        payload claiming one is a downgrade (its long-term key stolen, or a replay of old traffic).
        Raises :class:`InvalidPayloadError` (``malformed_body``; ``bad_signature`` when the list does not verify).
        """
        await self._sender_entry(sender, 0)  # the sender's chain verifies and names the device
        head, _ = await self._verified_head(sender.account, sender.relay)
        if head.format >= device_list.FORMAT_2:
            raise PayloadDowngradeError(
                ErrorCode.MALFORMED_BODY,
                f"a version-1 payload from a format-{head.format} account (refused: a downgrade from sessions)",
            )

    async def _open_with_sessions(self, envelope: InboxEnvelope) -> Opened:
        """Dispatch on the payload version (crypto.md §14): v1 as before, v2 through the sessions."""
        sessions, keys = self.sessions, self._require_keys()
        assert sessions is not None
        cached = sessions.processed(envelope.id)
        if cached is not None:
            return cached  # a redelivery: its message key is gone, the content was kept (§8.5)
        inner = sealed_v2.open_outer(envelope.ciphertext, keys.box_private_key)
        sealed = sealed_v2.parse_inner(inner)
        if sealed is None:
            opened = open_plaintext(inner, own_address=keys.address)
            await self._refuse_v1_from_format_2(Address.parse(opened.sender))
            return opened
        sender = Address.parse(sealed.sender)
        entry = await self._sender_entry(sender, sealed.sender_list_version)
        return sessions.open(sealed, envelope_id=envelope.id, sender=entry)

    async def _recipient_devices(self, text: str) -> list[tuple[str, bytes]]:
        address = Address.parse(text)
        entries = await self.devices(address.account, relay=address.relay)
        if not address.device:
            own = self.keys.device_id if self.keys else None
            return [
                (str(Address(account=address.account, relay=address.relay, device=e.device_id)), e.box_key)
                for e in entries
                if e.device_id != own
            ]
        for entry in entries:
            if entry.device_id == address.device:
                return [(str(address), entry.box_key)]
        raise TetherlessError(ErrorCode.UNKNOWN_RECIPIENT, "the device is not in its account's current device list")

    # -- receiving ----------------------------------------------------------------------------

    async def fetch(self, after: int = 0, limit: int | None = None) -> InboxBatch:
        """``GET /v1/inbox``: one page of envelopes with cursor > ``after``, decrypted and verified.

        Does not acknowledge anything. Envelopes that fail to decrypt or
        verify come back as :class:`RejectedMessage`. Idempotent.
        """
        if self.sessions is not None and self.sessions.prekeys_dirty:
            await self.maintain_prekeys()  # top up one-time prekeys used since the last sync (crypto.md §7.2)
        query = f"after={int(after)}" + (f"&limit={int(limit)}" if limit is not None else "")
        page = await self._call("GET", f"/v1/inbox?{query}", None, InboxPage)
        items = [await self._open_envelope(env) for env in page.envelopes]
        return InboxBatch(items=items, next_cursor=page.next_cursor, more=page.more)

    def stream(self, after: int = 0, *, idle_timeout_seconds: float = STREAM_IDLE_TIMEOUT_SECONDS) -> InboxStream:
        """Follow the inbox (``GET /v1/inbox/stream``): ``async with client.stream(c) as s: async for item in s``.

        Reconnects with exponential backoff and jitter from the last cursor
        received, forever (cancel to stop). ``idle_timeout_seconds``: no bytes
        for that long (the relay sends heartbeats) means a dead connection.
        Nothing is acknowledged automatically; items may be delivered again
        after a reconnect if they were not acknowledged.
        """
        return InboxStream(self, after, idle_timeout_seconds)

    async def ack(self, up_to: int | None = None, ids: Sequence[bytes] = ()) -> int:
        """``POST /v1/inbox/ack``: delete envelopes up to cursor ``up_to`` and/or by id. Idempotent.

        Returns how many envelopes the relay actually deleted.
        """
        response = await self._call("POST", "/v1/inbox/ack", AckRequest(up_to=up_to, ids=list(ids)), AckResponse)
        return response.acknowledged

    async def _open_envelope(self, envelope: InboxEnvelope) -> InboxItem:
        cipher = self._cipher
        if cipher is None:
            raise RuntimeError("this client has no device keys")
        try:
            if self.sessions is not None:
                opened = await self._open_with_sessions(envelope)
            else:
                opened = cipher.open(envelope.ciphertext)
            if self._verify_senders:
                await self._check_sender(opened.sender, opened.sender_sign_key)
        except InvalidPayloadError as exc:
            warning = PayloadDowngradeError.warning if isinstance(exc, PayloadDowngradeError) else "message_refused"
            return RejectedMessage(
                cursor=envelope.cursor, id=envelope.id, code=exc.code, detail=exc.detail, warning=warning
            )
        return ReceivedMessage(
            cursor=envelope.cursor,
            id=envelope.id,
            sender=opened.sender,
            content_type=opened.content_type,
            body=opened.body,
            sent_at_ms=opened.sent_at_ms,
            relay_sent_at_ms=envelope.sent_at_ms,
            message_id=opened.message_id,
        )

    async def _check_sender(self, sender: str, sign_key: bytes) -> None:
        """The sender's device must be in its account's current list: the payload alone proves only the device."""
        address = Address.parse(sender)
        try:
            entries = await self.devices(address.account, relay=address.relay)
        except RemoteError as exc:
            if exc.code is ErrorCode.UNKNOWN_ACCOUNT:
                raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "the sender's account does not exist") from exc
            if exc.code in (ErrorCode.PEER_FORBIDDEN, ErrorCode.REMOTE_RECIPIENT):
                raise InvalidPayloadError(
                    ErrorCode.BAD_SIGNATURE, f"cannot verify a sender on {address.relay}: {exc.code.value}"
                ) from exc
            raise
        except DeviceRevokedError:
            raise  # this device itself is revoked: stop, do not just drop the message
        except TetherlessError as exc:  # the chain itself does not verify
            raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, f"the sender's device list: {exc.detail}") from exc
        if not any(e.device_id == address.device and e.sign_key == sign_key for e in entries):
            # Maybe the device was added a moment ago: look once more, uncached.
            entries = await self.devices(address.account, relay=address.relay, fresh=True)
            if not any(e.device_id == address.device and e.sign_key == sign_key for e in entries):
                raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "the sender is not a current device of its account")


def _batches(group_ends: list[int], batch_size: int) -> list[tuple[int, int]]:
    """``(start, end)`` slices of at most ``batch_size`` envelopes that never split a group.

    A group larger than ``batch_size`` gets a batch of its own (the relay answers ``invalid_field``).
    """
    batches: list[tuple[int, int]] = []
    start = previous = 0
    for end in group_ends:
        if end - start > batch_size and previous > start:
            batches.append((start, previous))
            start = previous
        previous = end
    if previous > start:
        batches.append((start, previous))
    return batches


def _sent(envelope: OutboundEnvelope, accepted: Accepted) -> Sent:
    return Sent(
        recipient=envelope.recipient, id=accepted.id, sent_at_ms=accepted.sent_at_ms, duplicate=accepted.duplicate
    )


def _media_type(response: Response) -> str:
    content_type = (response.header("content-type") or codec.MSGPACK).split(";")[0].strip().lower()
    return codec.JSON if content_type in (codec.JSON, "application/problem+json") else codec.MSGPACK


class InboxStream:
    """The live inbox: an async iterator of :class:`InboxItem`, reconnecting by itself.

    Use as ``async with client.stream(after) as inbox: async for item in inbox``.
    ``cursor`` is the cursor of the last envelope received (the resume point).
    Iteration raises ``RemoteError`` for errors a reconnect cannot fix
    (e.g. ``unknown_device``) and never ends on its own.
    """

    def __init__(self, client: RelayClient, after: int, idle_timeout_seconds: float) -> None:
        self._client = client
        self.cursor = after
        self._idle_timeout = idle_timeout_seconds
        self._pending: deque[InboxItem] = deque()
        self._stack: AsyncExitStack | None = None
        self._response: StreamingResponse | None = None
        self._decoder = codec.StreamDecoder(StreamItem, codec.MSGPACK)
        self._failures = 0

    async def __aenter__(self) -> InboxStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._disconnect()

    def __aiter__(self) -> InboxStream:
        return self

    async def __anext__(self) -> InboxItem:
        while not self._pending:
            if self._response is None:
                await self._connect()
                continue
            try:
                chunk = await self._response.__anext__()
                items = list(self._decoder.feed(chunk))
            except StopAsyncIteration:
                await self._reconnect_later("the relay ended the stream")
                continue
            except TransportError as exc:
                await self._reconnect_later(str(exc))
                continue
            except TetherlessError as exc:  # a bad frame: the stream is unusable
                await self._reconnect_later(exc.code.value)
                continue
            if items:
                self._failures = 0  # the stream is healthy again
            for item in items:
                if isinstance(item, InboxEnvelope):
                    if item.cursor <= self.cursor:
                        continue  # already seen (resume overlap)
                    self._pending.append(await self._client._open_envelope(item))
                    self.cursor = item.cursor
                elif isinstance(item, DeviceListChanged):
                    self._client._device_lists.pop(item.account_id, None)  # refetched and verified on next use
                elif not isinstance(item, Heartbeat):  # pragma: no cover - StreamItem is closed
                    raise TypeError(type(item).__name__)
        sessions = self._client.sessions
        if sessions is not None and sessions.prekeys_dirty:
            try:  # one-time prekeys were used: top up now (crypto.md §7.2); a failure is retried later
                await self._client.maintain_prekeys()
            except (TransportError, RemoteError) as exc:
                log.info("prekey top-up failed, retrying later: %s", exc)
        return self._pending.popleft()

    async def _disconnect(self) -> None:
        stack, self._stack, self._response = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def _reconnect_later(self, why: str) -> None:
        log.info("inbox stream interrupted (%s); reconnecting from cursor %d", why, self.cursor)
        await self._disconnect()
        self._failures += 1
        await self._client._backoff(min(self._failures, 8))

    async def _connect(self) -> None:
        client = self._client
        stack = AsyncExitStack()
        try:
            conn = await client._conn()
            token = await client._token()
            response = await stack.enter_async_context(
                conn.stream(
                    "GET",
                    f"/v1/inbox/stream?after={self.cursor}",
                    [*_HEADERS, ("authorization", f"Bearer {token}")],
                    timeout=client._timeout,
                    chunk_timeout=self._idle_timeout,
                )
            )
            if response.status != 200:
                body = await response.read(1024 * 1024)
                await stack.aclose()
                error = error_from_problem(response.status, body)
                if isinstance(error, RemoteError) and error.code in _REAUTH_CODES:
                    client._session = None
                elif isinstance(error, RemoteError) and error.code in _RETRY_LATER_CODES:
                    self._failures += 1
                    await client._backoff(self._failures, error.retry_after_seconds)
                elif isinstance(error, RemoteError | UnknownRemoteError) and response.status < 500:
                    raise error
                else:
                    await self._reconnect_later(f"HTTP {response.status}")
                return
        except TransportError as exc:
            await stack.aclose()
            await self._reconnect_later(str(exc))
            return
        except BaseException:
            await stack.aclose()
            raise
        self._decoder = codec.StreamDecoder(StreamItem, codec.MSGPACK)
        self._stack, self._response = stack, response


__all__ = [
    "BINARY_CONTENT_TYPE",
    "TEXT_CONTENT_TYPE",
    "InboxBatch",
    "InboxItem",
    "InboxStream",
    "Outgoing",
    "PrekeysUnavailableError",
    "ProbeAnswer",
    "ReceivedMessage",
    "RejectedMessage",
    "RelayClient",
    "Sent",
    "verify_chain",
]
