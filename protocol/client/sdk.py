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
HTTP/2 connection and reconnects when it breaks. Every request goes through
``client.api`` (:class:`~protocol.client.api.RelayApi`: one typed method per
relay route, with the authentication, retries and backoff); it renews the
session token by itself (before it expires, and once more on a 401
``token_expired`` / ``invalid_token`` / ``token_revoked``) and, with a
``local_db``, keeps it sealed there for the next command.

Randomness (keys, idempotency keys, ephemeral keys) comes from the OS CSPRNG
and time from the wall clock; both can be injected for tests. Payload crypto
goes through :class:`~protocol.payload.PayloadCipher` only.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any, Final, TypeVar

import msgspec
import nacl.public
import nacl.signing
import trio

from .. import codec, device_list, recovery
from .. import session as sealed_v2
from ..errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError
from ..handshake import MLKEM_SEED_BYTES, mlkem_public
from ..ids import Address, account_id_for, device_id_for
from ..messages import (
    Accepted,
    CreateAccountRequest,
    DeviceEntry,
    DeviceList,
    DeviceListChanged,
    Heartbeat,
    InboxEnvelope,
    OutboundEnvelope,
    PrekeyCounts,
    Session,
    StreamItem,
    WellKnown,
)
from ..payload import InvalidPayloadError, Opened, PayloadCipher, SealedBoxCipher, open_plaintext
from . import outbox
from .api import REAUTH_CODES, RETRY_LATER_CODES, RelayApi, RetryPolicy, SealedTokenStore
from .chains import DeviceListRejectedError, DeviceRevokedError, load_mark, save_mark
from .http import (
    HTTP2Connection,
    StreamingResponse,
    TransportError,
    collapse_single_group,
    start_connection,
)
from .keystore import AlreadyInitialisedError, DeviceKeys, Keystore
from .localdb import LocalDB
from .sessions import LOW_WATER, T_META, KeyValueStore, MemoryStore, PrekeysUnavailableError, SessionManager

log = logging.getLogger(__name__)

T = TypeVar("T")

TEXT_CONTENT_TYPE: Final = "text/plain; charset=utf-8"
BINARY_CONTENT_TYPE: Final = "application/octet-stream"
IDEMPOTENCY_KEY_BYTES: Final = 16
DEFAULT_BATCH_ENVELOPES: Final = 100
DEVICE_LIST_CACHE_SECONDS: Final = 30.0
STREAM_IDLE_TIMEOUT_SECONDS: Final = 90.0
#: How long the relay's prekey counts from the last check are trusted (see :func:`prekey_check_due`).
PREKEY_CHECK_SECONDS: Final = 3600.0
PREKEY_CHECK_TABLE: Final = "client_prekey_check"
#: How long a home trusts the relay's ``/.well-known/tetherless`` document it read last (see RelayClient.well_known).
WELL_KNOWN_CACHE_SECONDS: Final = 3600.0
WELL_KNOWN_TABLE: Final = "client_well_known"
PREKEY_CHECK_KEY: Final = "last"
PREKEY_META_KEY: Final = "ids"  # the sessions' own row in T_META: the local prekey state the check was made with


# -- results -----------------------------------------------------------------------------


class ReceivedMessage(msgspec.Struct, frozen=True):
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


class RejectedMessage(msgspec.Struct, frozen=True):
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


class InboxBatch(msgspec.Struct, frozen=True):
    """One page of the inbox. Pass ``next_cursor`` as ``after`` next; ``more``: another page is ready."""

    items: list[InboxItem]
    next_cursor: int
    more: bool


class Outgoing(msgspec.Struct, frozen=True):
    """One message for :meth:`RelayClient.send_many`. ``str`` bodies are sent as UTF-8 text."""

    recipient: str
    body: str | bytes
    content_type: str | None = None
    ttl_seconds: int | None = None


class Recipients(msgspec.Struct, frozen=True):
    """How to seal one message (:meth:`RelayClient.resolve_recipients`): v2 device addresses whose sessions exist,
    with this device's list version to sign them under, or v1 ``(device address, box key)`` pairs."""

    v1: list[tuple[str, bytes]] | None = None
    v2: list[str] | None = None
    sender_list_version: int = 0


class SealedEnvelope(msgspec.Struct, frozen=True):
    """One sealed ciphertext for one recipient device (:meth:`RelayClient.seal_envelopes`)."""

    recipient: str
    message_id: bytes
    ciphertext: bytes


class Sent(msgspec.Struct, frozen=True):
    """The relay's receipt for one envelope (``duplicate``: a retry the relay had already stored)."""

    recipient: str
    id: bytes
    sent_at_ms: int
    duplicate: bool


class ProbeAnswer(msgspec.Struct, frozen=True):
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

    The relay's routes themselves are :attr:`api` (:class:`~protocol.client.api.RelayApi`: one typed method per
    route, with the authentication, retries and backoff); the methods here add keys, verification and sealing.
    With a :attr:`local_db`, the session token is kept sealed in it and reused by the next command.
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
        addresses: Sequence[str] = (),
    ) -> None:
        self.relay_url = relay_url
        # Connect to these rather than resolving the URL's host (a relay named by someone else, checked by the
        # caller: protocol.client.blobs.check_blob_relay); empty: resolve as usual.
        self._addresses = tuple(addresses)
        self._nursery = nursery
        self.ca_file = ca_file if ca_file is not None else (keys.ca_file if keys else None)
        self._verify = verify
        self._verify_senders = verify_senders
        self._wall_clock = wall_clock
        #: The CSPRNG every key, idempotency key and entropy comes from (injectable for tests).
        self.random_bytes = random_bytes
        self._connection: HTTP2Connection | None = None
        self._connections: list[HTTP2Connection] = []
        self._connect_lock = trio.Lock()
        self._well_known: WellKnown | None = None
        self._device_lists: dict[str, tuple[float, list[DeviceEntry]]] = {}
        self._keys: DeviceKeys | None = None
        self.cipher: PayloadCipher | None = None
        self.api = RelayApi(
            self.connection,
            relay_url=relay_url,
            keys=lambda: self._keys,
            timeout_seconds=request_timeout_seconds,
            policy=RetryPolicy(max_attempts=max(1, max_attempts)),
            wall_clock=wall_clock,
        )
        self.keys = keys
        # Device-list high-water marks (crypto.md §3.5) and the session token live here; None: verify from genesis
        # every time, and authenticate once per client.
        self._local_db: LocalDB | None = None
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

    # -- what the SDK's other modules use ---------------------------------------------------------------------

    @property
    def keys(self) -> DeviceKeys | None:
        """This device's keys (None before :meth:`register` or a link). Setting them also sets :attr:`cipher`."""
        return self._keys

    @keys.setter
    def keys(self, keys: DeviceKeys | None) -> None:
        self._keys = keys
        self.cipher = self.make_cipher(keys) if keys is not None else None

    @property
    def local_db(self) -> LocalDB | None:
        """The home's ``state.db`` (marks, sessions, the sealed session token), or None."""
        return self._local_db

    @local_db.setter
    def local_db(self, db: LocalDB | None) -> None:
        self._local_db = db
        self.api.tokens = SealedTokenStore(db) if db is not None else None

    @property
    def timeout(self) -> float:
        """Seconds one request may take (``request_timeout_seconds``)."""
        return self.api.timeout_seconds

    @staticmethod
    def make_cipher(keys: DeviceKeys) -> PayloadCipher:
        """The v1 payload cipher (sealed boxes) of ``keys``."""
        return SealedBoxCipher(signing_key=keys.signing_key, box_private_key=keys.box_private_key, address=keys.address)

    def _require_keys(self) -> DeviceKeys:
        if self.keys is None:
            raise RuntimeError("this client has no device keys; register() first")
        return self.keys

    def now_ms(self) -> int:
        """The injected wall clock, in ms since the epoch."""
        return int(self._wall_clock() * 1000)

    def forget_device_list(self, account_id: str) -> None:
        """Drop ``account_id``'s cached device list (it changed): the next use fetches and verifies it again."""
        self._device_lists.pop(account_id, None)

    async def connection(self) -> HTTP2Connection:
        """The HTTP/2 connection to the relay, opened (or reopened after it broke or got GOAWAY) on demand.
        Raises ``ConnectError``; concurrent callers share one connection attempt."""
        async with self._connect_lock:
            if self._connection is None or not self._connection.is_usable:
                # A connection that got a graceful GOAWAY finishes its open
                # streams and is closed by the relay; we just stop using it.
                self._connections = [c for c in self._connections if c.is_usable]
                conn = await start_connection(
                    self._nursery, self.relay_url, ca_file=self.ca_file, verify=self._verify, addresses=self._addresses
                )
                self._connection = conn
                self._connections.append(conn)
            return self._connection

    # -- accounts and sessions ------------------------------------------------------------

    async def well_known(self) -> WellKnown:
        """``GET /.well-known/tetherless``: the relay's name, keys and limits. Cached for the client's life and,
        with a :attr:`local_db`, for :data:`WELL_KNOWN_CACHE_SECONDS` across commands (a sealed row; a relay that
        changes its limits meanwhile answers the next oversized request with its own error). Idempotent; raises
        what :attr:`api` raises."""
        if self._well_known is None:
            self._well_known = self._cached_well_known()
        if self._well_known is None:
            self._remember_well_known(await self.api.well_known())
        assert self._well_known is not None
        return self._well_known

    def _cached_well_known(self) -> WellKnown | None:
        db = self.local_db
        raw = db.get(WELL_KNOWN_TABLE, self.relay_url) if db is not None else None
        if raw is None:
            return None
        try:
            cached = msgspec.msgpack.decode(raw, type=_CachedWellKnown)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # unreadable: ask the relay again
        age_ms = self.now_ms() - cached.fetched_at_ms
        return cached.document if 0 <= age_ms < WELL_KNOWN_CACHE_SECONDS * 1000 else None

    def _remember_well_known(self, document: WellKnown) -> None:
        self._well_known = document
        if self.local_db is not None:
            cached = _CachedWellKnown(document=document, fetched_at_ms=self.now_ms())
            self.local_db.put(WELL_KNOWN_TABLE, self.relay_url, msgspec.msgpack.encode(cached))

    async def probe(self) -> ProbeAnswer:
        """``GET /.well-known/tetherless`` without the cache, with the relay's ``Date`` header and this device's
        clock (``wall_clock``) at the middle of the request: what ``tetherless doctor`` compares clocks with.

        Unauthenticated and read-only; idempotent (it refreshes :meth:`well_known`'s cache). Connects first, so
        the two clock readings bracket the request, not the TCP and TLS set-up. Raises what every method raises
        (``TLSSetupError`` when the relay's TLS and this client's URL or trusted CAs do not match;
        ``TetherlessError`` for a document that is not a relay's). Cancellation aborts the request."""
        await self.connection()
        before = self._wall_clock()
        document, date = await self.api.well_known_with_date()
        after = self._wall_clock()
        self._remember_well_known(document)
        return ProbeAnswer(document, date, (before + after) / 2)

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
        signing_key = nacl.signing.SigningKey(self.random_bytes(32))
        box_private_key = self.random_bytes(32)
        box_public_key = bytes(nacl.public.PrivateKey(box_private_key).public_key)
        kem_seed = self.random_bytes(MLKEM_SEED_BYTES) if list_format == device_list.FORMAT_3 else b""
        if list_format == device_list.FORMAT_1:
            genesis = device_list.genesis(signing_key, box_public_key, name=name, now_ms=self.now_ms())
        else:
            recovery_signing_key = None
            backup_hash = b""
            if recovery_secret is not None:
                account = account_id_for(bytes(signing_key.verify_key))
                recovery_keys = recovery.recovery_keys(recovery_secret, account)
                recovery_signing_key = recovery_keys.signing_key
                # The list commits to the recovery backup key (account-log.md §5.7).
                backup_hash = recovery.backup_key_hash(recovery.backup_recipient(recovery_keys))
            now = self.now_ms()
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
        created = await self.api.create_account(CreateAccountRequest(signed=genesis))
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
            ca_file=self.ca_file,
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
        return keys

    async def authenticate(self) -> Session:
        """Get a fresh session token (challenge, then signed answer), kept for the next commands with a
        :attr:`local_db`. Not needed before other calls: :attr:`api` authenticates when it has no usable token.

        Raises ``RemoteError`` (``unknown_device``, ``device_revoked``, ``bad_signature``, …), and
        ``challenge_unknown`` locally if the relay offers a challenge for another relay or device (we never sign
        those). Not idempotent (a new session each call); cancellation leaves the previous token in place.
        """
        return await self.api.authenticate()

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
            chain = await self.api.remote_device_chain(relay, account_id)
        else:
            chain = await self.api.device_chain(account_id)
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
        if self.cipher is None:
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
            recipients = await self.resolve_recipients(outgoing.recipient)
            sealed = self.seal_envelopes(
                recipients,
                message_id=lambda _: self.random_bytes(IDEMPOTENCY_KEY_BYTES),  # also the idempotency key
                sent_at_ms=self.now_ms(),
                content_type=outgoing.content_type or default_type,
                body=body,
            )
            envelopes += [
                OutboundEnvelope(
                    recipient=s.recipient,
                    idempotency_key=s.message_id,
                    ciphertext=s.ciphertext,
                    ttl_seconds=outgoing.ttl_seconds,
                )
                for s in sealed
            ]
            group_ends.append(len(envelopes))
        if not envelopes:
            return []
        batch_size = DEFAULT_BATCH_ENVELOPES
        if len(envelopes) > 1:
            batch_size = (await self.well_known()).limits.max_batch_envelopes
        sent: list[Sent] = []
        for start, end in _batches(group_ends, max(1, batch_size)):
            batch = envelopes[start:end]
            response = await self.api.send_envelopes(batch)
            if len(response.accepted) != len(batch):
                raise TetherlessError(ErrorCode.INVALID_FIELD, "the relay answered a different number of receipts")
            sent += [_sent(env, acc) for env, acc in zip(batch, response.accepted, strict=True)]
        return sent

    # -- v2 sessions (protocol/client/sessions.py, docs/crypto.md §7-§9, §14) ----------------------

    async def enable_sessions(self, store: KeyValueStore | None = None) -> SessionManager:
        """Use v2 sessions from now on, and publish this device's prekeys (``PUT /v1/prekeys``) when a check is
        due (:func:`prekey_check_due`: the first time, then at most every :data:`PREKEY_CHECK_SECONDS` unless the
        counts were low or the local prekeys changed) — not on every command.

        ``store`` keeps the sessions, prekey privates, processed envelopes and the last check:
        by default :attr:`local_db` (persistent, sealed rows) or, without one,
        memory (lost on exit: fine for tests, not for a real device). Returns
        the :class:`SessionManager` (also :attr:`sessions`). Raises what :meth:`maintain_prekeys` raises.
        Idempotent; cancellation leaves the last completed check in place.
        """
        keys = self._require_keys()
        sessions = self.sessions
        if sessions is None:
            if store is None:
                store = self.local_db if self.local_db is not None else MemoryStore()
            sessions = SessionManager(keys, store, random_bytes=self.random_bytes, wall_clock=self._wall_clock)
            self.sessions = sessions
        last = _load_prekey_check(sessions.store)
        # Not ``prekeys_dirty``: a new manager starts dirty (it cannot know what was used before this process), and
        # keys used in this process are topped up by fetch() and the engine's drain, which do look at it.
        if prekey_check_due(last, sessions.store.get(T_META, PREKEY_META_KEY), self.now_ms()):
            await self.maintain_prekeys()
        return sessions

    async def maintain_prekeys(self) -> PrekeyCounts:
        """``GET /v1/prekeys``, then upload what is missing (first keys, top-up below 25, rotation), and remember
        the relay's counts and when they were read (:func:`prekey_check_due`).

        Called by :meth:`enable_sessions` when a check is due and by :meth:`fetch` after one-time
        keys were used. Raises ``RuntimeError`` without sessions, ``StateRolledBackError`` when the relay names
        prekey ids this home never made (crypto.md §13.2), and relay errors. Idempotent in effect.
        """
        sessions = self.sessions
        if sessions is None:
            raise RuntimeError("sessions are not enabled")
        counts = await self.prekey_counts()
        upload = sessions.prekey_upload(counts)
        if upload is not None:
            counts = await self.api.upload_prekeys(upload)
        check = PrekeyCheck(
            counts=counts, checked_at_ms=self.now_ms(), meta=sessions.store.get(T_META, PREKEY_META_KEY) or b""
        )
        sessions.store.put(PREKEY_CHECK_TABLE, PREKEY_CHECK_KEY, msgspec.msgpack.encode(check))
        return counts

    async def prekey_counts(self) -> PrekeyCounts:
        """``GET /v1/prekeys``: the prekeys the relay holds for this device, read without uploading any (what
        :meth:`maintain_prekeys` tops up). Authenticated (``RemoteError`` ``device_revoked`` for a removed device);
        needs no sessions. Read-only and idempotent; cancellation aborts the request."""
        return await self.api.prekey_counts()

    async def verified_head(
        self, account_id: str, relay: str | None, *, fresh: bool = False
    ) -> tuple[DeviceList, list[DeviceEntry]]:
        """The head of ``account_id``'s verified device list and its devices (cached like :meth:`devices`;
        ``fresh``: fetched again). ``relay``: the account's home relay (None: this one). Raises what
        :meth:`device_chain` raises; idempotent."""
        entries = await self.devices(account_id, relay=relay, fresh=fresh)
        head = self._list_heads.get(self._chain_cache_key(account_id, relay))
        if head is None:
            verified = await self.device_chain(account_id, relay=relay)
            return verified.head, verified.devices
        return head, entries

    # -- the sealing pipeline (send_many here; the sync engine's outbox seals through the same two steps) ---------

    async def resolve_recipients(self, recipient: str, *, fan_out: bool = True) -> Recipients:
        """Who gets a message to ``recipient`` and how: step 1 of sealing, network only, nothing sealed yet.

        With :attr:`sessions` and a recipient account whose verified list is format 2 or later: v2 (crypto.md §9)
        to the named device, or to every device of the account but this one; with ``fan_out``, a message to
        another account's address also goes to this account's other devices (format 2). Missing sessions are
        started here (:meth:`ensure_sessions`; never a v1 fallback). Otherwise v1 sealed boxes to the verified
        box keys. The result may be empty (an account address whose only device is this one). Raises
        ``invalid_field`` for a bad address, ``unknown_recipient``, :class:`PrekeysUnavailableError`,
        ``prekey_invalid``, what :meth:`devices` raises and relay errors. Idempotent (sessions already started
        are reused); cancellation leaves any session started so far, which is harmless.
        """
        address = Address.parse(recipient)
        if self.sessions is not None:
            keys = self._require_keys()
            head, entries = await self.verified_head(address.account, address.relay)
            if head.format >= device_list.FORMAT_2:
                targets = [
                    (str(Address(account=address.account, relay=address.relay, device=e.device_id)), e)
                    for e in entries
                    if e.device_id == address.device or (not address.device and e.device_id != keys.device_id)
                ]
                if address.device and not targets:
                    raise TetherlessError(
                        ErrorCode.UNKNOWN_RECIPIENT, "the device is not in its account's current device list"
                    )
                own_head, own_entries = await self.verified_head(keys.account_id, None)
                to_other_account = not address.device and address.account != keys.account_id
                if fan_out and to_other_account and own_head.format >= device_list.FORMAT_2:
                    own_relay = Address.parse(keys.address).relay
                    targets += [
                        (str(Address(account=keys.account_id, relay=own_relay, device=e.device_id)), e)
                        for e in own_entries
                        if e.device_id != keys.device_id
                    ]
                await self.ensure_sessions(targets)
                return Recipients(v2=[a for a, _ in targets], sender_list_version=own_head.version)
        return Recipients(v1=await self.recipient_devices(recipient))

    def seal_envelopes(
        self,
        recipients: Recipients,
        *,
        message_id: Callable[[str], bytes],
        sent_at_ms: int,
        content_type: str,
        body: bytes,
    ) -> list[SealedEnvelope]:
        """Step 2 of sealing, local only: one ciphertext per recipient device of :meth:`resolve_recipients`.

        ``message_id(device address)`` is the sealed message id (``send_many``: a fresh random one per envelope,
        also its idempotency key; the engine: the entry's ``message_uid`` for all). v2 advances and stores each
        session's sending chain (call it inside the transaction that stores the result, crypto.md §8.5); v1 seals
        a box with fresh entropy. Raises ``RuntimeError`` without keys (or v2 without sessions) and what the
        session manager raises for a missing session. Not idempotent (each call advances the ratchets).
        """
        cipher = self.cipher
        if cipher is None:
            raise RuntimeError("this client has no device keys; register() first")
        sealed: list[SealedEnvelope] = []
        if recipients.v2 is not None:
            if self.sessions is None:
                raise RuntimeError("sessions are not enabled")
            for address in recipients.v2:
                mid = message_id(address)
                ciphertext = self.sessions.seal(
                    address,
                    sender_list_version=recipients.sender_list_version,
                    sent_at_ms=sent_at_ms,
                    message_id=mid,
                    content_type=content_type,
                    body=body,
                )
                sealed.append(SealedEnvelope(address, mid, ciphertext))
        for address, box_key in recipients.v1 or []:
            mid = message_id(address)
            ciphertext = cipher.seal(
                recipient=address,
                recipient_box_key=box_key,
                sent_at_ms=sent_at_ms,
                message_id=mid,
                content_type=content_type,
                body=body,
                entropy=self.random_bytes(cipher.entropy_bytes),
            )
            sealed.append(SealedEnvelope(address, mid, ciphertext))
        return sealed

    async def ensure_sessions(self, targets: list[tuple[str, DeviceEntry]]) -> None:
        """Claim bundles (``POST /v1/prekeys/claim``) and start sessions with the ``(address, verified entry)``
        targets that have none. Raises :class:`PrekeysUnavailableError` naming the devices without a bundle and
        ``prekey_invalid`` for a bundle nobody asked for or that does not verify; idempotent for targets that
        have sessions already (no request then). Needs sessions enabled."""
        sessions = self.sessions
        assert sessions is not None
        need = {address: entry for address, entry in targets if not sessions.has_session(address)}
        missing: list[str] = []
        names = list(need)
        for start in range(0, len(names), 256):
            claimed = await self.api.claim_prekeys(names[start : start + 256])
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
            head, entries = await self.verified_head(sender.account, sender.relay)
            if list_version > head.version or all(e.device_id != sender.device for e in entries):
                head, entries = await self.verified_head(sender.account, sender.relay, fresh=True)
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
        head, _ = await self.verified_head(sender.account, sender.relay)
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

    async def recipient_devices(self, text: str) -> list[tuple[str, bytes]]:
        """``(device address, box key)`` of every verified device ``text`` names (a device address: that one; an
        account address: all but this device) for v1 sealed boxes. Raises ``invalid_field`` for a bad address,
        ``unknown_recipient`` for a device not in its account's current list, and what :meth:`devices` raises."""
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
        page = await self.api.inbox_page(after, limit)
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
        return (await self.api.ack(up_to, ids)).acknowledged

    async def _open_envelope(self, envelope: InboxEnvelope) -> InboxItem:
        cipher = self.cipher
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


class _CachedWellKnown(msgspec.Struct, frozen=True, kw_only=True):
    document: WellKnown
    fetched_at_ms: int


class PrekeyCheck(msgspec.Struct, frozen=True, kw_only=True):
    """The last ``GET /v1/prekeys`` answer (after any upload) kept in the sessions' store, so a command need not ask
    again: when it was read (ms, this device's clock) and the local prekey state (``session_meta``) at that time."""

    counts: PrekeyCounts
    checked_at_ms: int
    meta: bytes


def _load_prekey_check(store: KeyValueStore) -> PrekeyCheck | None:
    raw = store.get(PREKEY_CHECK_TABLE, PREKEY_CHECK_KEY)
    if raw is None:
        return None
    try:
        return msgspec.msgpack.decode(raw, type=PrekeyCheck)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # unreadable: ask the relay again


def prekey_check_due(last: PrekeyCheck | None, meta: bytes | None, now_ms: int) -> bool:
    """Whether :meth:`RelayClient.enable_sessions` must ask the relay for this device's prekey counts (pure).

    Due without a record, when the record is older than :data:`PREKEY_CHECK_SECONDS` (or from the future: the
    clock moved back), when its counts were low (fewer than ``LOW_WATER`` one-time keys of a kind, or no signed or
    last-resort key), and when the local prekey state changed since (new keys, a forced rotation after a rollback
    recovery). Otherwise the relay is trusted to hold what it held at the last check: one-time keys that other
    devices claim meanwhile are noticed at the next due check, and a device that receives a session start tops up
    at once (``prekeys_dirty``). Rotation (weekly) is at most :data:`PREKEY_CHECK_SECONDS` late.
    """
    if last is None or meta is None or last.meta != meta:
        return True
    age_ms = now_ms - last.checked_at_ms
    if age_ms < 0 or age_ms >= PREKEY_CHECK_SECONDS * 1000:
        return True
    counts = last.counts
    low = min(counts.x25519_one_time, counts.mlkem_one_time) < LOW_WATER
    return low or counts.signed_prekey_id is None or counts.last_resort_id is None


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
                    self._client.forget_device_list(item.account_id)  # refetched and verified on next use
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
        await self._client.api.backoff(min(self._failures, 8))

    async def _connect(self) -> None:
        stack = AsyncExitStack()
        try:
            response = await stack.enter_async_context(
                self._client.api.inbox_stream(self.cursor, chunk_timeout=self._idle_timeout)
            )
        except RemoteError as error:
            await stack.aclose()
            if error.code in REAUTH_CODES:
                return  # the layer dropped the refused token: reconnect at once with a new one
            if error.code in RETRY_LATER_CODES:
                self._failures += 1
                await self._client.api.backoff(self._failures, error.retry_after_seconds)
            elif error.http_status < 500:
                raise
            else:
                await self._reconnect_later(f"HTTP {error.http_status}")
            return
        except UnknownRemoteError as error:
            await stack.aclose()
            if error.http_status < 500:
                raise
            await self._reconnect_later(f"HTTP {error.http_status}")
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
    "Recipients",
    "RejectedMessage",
    "RelayClient",
    "SealedEnvelope",
    "Sent",
    "verify_chain",
]
