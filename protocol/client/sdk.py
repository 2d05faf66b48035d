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

from .. import auth, codec, device_list
from ..errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError, error_from_problem
from ..ids import Address, account_id_for, device_id_for
from ..messages import (
    Accepted,
    AccountCreated,
    AckRequest,
    AckResponse,
    Challenge,
    ChallengeRequest,
    CreateAccountRequest,
    DeviceEntry,
    DeviceListChain,
    Heartbeat,
    InboxEnvelope,
    InboxPage,
    OutboundEnvelope,
    SendRequest,
    SendResponse,
    Session,
    SessionRequest,
    StreamItem,
    WellKnown,
)
from ..payload import InvalidPayloadError, PayloadCipher, SealedBoxCipher
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

log = logging.getLogger(__name__)

T = TypeVar("T")

TEXT_CONTENT_TYPE: Final = "text/plain; charset=utf-8"
BINARY_CONTENT_TYPE: Final = "application/octet-stream"
IDEMPOTENCY_KEY_BYTES: Final = 16
DEFAULT_BATCH_ENVELOPES: Final = 100
DEVICE_LIST_CACHE_SECONDS: Final = 30.0
STREAM_IDLE_TIMEOUT_SECONDS: Final = 90.0
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
    """An envelope that did not decrypt or verify. Acknowledge it so it does not block the inbox."""

    cursor: int
    id: bytes
    code: ErrorCode
    detail: str


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
        """One API call with retries.

        ``retry``: the request is safe to repeat (idempotent); otherwise it is
        only repeated when the relay certainly did not process it.
        """
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
                return codec.decode(response.body, response_type, _media_type(response))
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
            self._well_known = await self._call("GET", "/.well-known/tetherless", None, WellKnown, authenticated=False)
        return self._well_known

    async def register(self, name: str, *, keystore: Keystore | None = None) -> DeviceKeys:
        """Create a new account with this client's first device, and return its keys.

        Generates fresh keys with the OS CSPRNG, posts the genesis device
        list to ``POST /v1/accounts`` and, when ``keystore`` is given, stores
        the keys there (checked *before* registering, so an initialised home is
        never overwritten: raises ``AlreadyInitialisedError``). Raises
        ``RemoteError`` (``account_exists``, ``invalid_device_list`` …).
        Not retried after the request may have reached the relay.
        """
        if keystore is not None and keystore.exists():
            raise AlreadyInitialisedError(f"a device already exists in {keystore.home}")
        signing_key = nacl.signing.SigningKey(self._random_bytes(32))
        box_private_key = self._random_bytes(32)
        box_public_key = bytes(nacl.public.PrivateKey(box_private_key).public_key)
        genesis = device_list.genesis(signing_key, box_public_key, name=name, now_ms=self._now_ms())
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
        )
        if keystore is not None:
            keystore.create(keys)
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
        neither relay can swap keys undetected.
        """
        own_relay = Address.parse(self.keys.address).relay if self.keys else None
        remote = relay is not None and relay.lower() != own_relay
        key = f"{account_id}@{relay.lower()}" if remote and relay else account_id
        cached = self._device_lists.get(key)
        if cached is not None and not fresh and trio.current_time() - cached[0] < DEVICE_LIST_CACHE_SECONDS:
            return cached[1]
        if remote and relay:
            chain = await self._call(
                "GET", f"/v1/relays/{relay.lower()}/accounts/{account_id}/devices", None, DeviceListChain
            )
        else:
            chain = await self._call(
                "GET", f"/v1/accounts/{account_id}/devices", None, DeviceListChain, authenticated=False
            )
        entries = device_list.verify_chain(chain, account_id)
        self._device_lists[key] = (trio.current_time(), entries)
        return entries

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
        device is not in its account's latest device list, and relay errors.
        """
        return await self.send_many([Outgoing(address, message, content_type, ttl_seconds)])

    async def send_many(self, messages: Iterable[Outgoing]) -> list[Sent]:
        """Send several messages in as few ``POST /v1/messages`` as the relay's batch limit allows.

        Each batch is committed atomically by the relay; results are in input
        order (expanded per recipient device). If a later batch fails, earlier
        ones are already stored.
        """
        cipher = self._cipher
        if cipher is None:
            raise RuntimeError("this client has no device keys; register() first")
        envelopes: list[OutboundEnvelope] = []
        for outgoing in messages:
            if isinstance(outgoing.body, str):
                body, default_type = outgoing.body.encode("utf-8"), TEXT_CONTENT_TYPE
            else:
                body, default_type = outgoing.body, BINARY_CONTENT_TYPE
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
        if not envelopes:
            return []
        batch_size = DEFAULT_BATCH_ENVELOPES
        if len(envelopes) > 1:
            batch_size = (await self.well_known()).limits.max_batch_envelopes
        sent: list[Sent] = []
        for start in range(0, len(envelopes), max(1, batch_size)):
            batch = envelopes[start : start + batch_size]
            response = await self._call("POST", "/v1/messages", SendRequest(envelopes=batch), SendResponse)
            if len(response.accepted) != len(batch):
                raise TetherlessError(ErrorCode.INVALID_FIELD, "the relay answered a different number of receipts")
            sent += [_sent(env, acc) for env, acc in zip(batch, response.accepted, strict=True)]
        return sent

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
            opened = cipher.open(envelope.ciphertext)
            if self._verify_senders:
                await self._check_sender(opened.sender, opened.sender_sign_key)
        except InvalidPayloadError as exc:
            return RejectedMessage(cursor=envelope.cursor, id=envelope.id, code=exc.code, detail=exc.detail)
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
        except TetherlessError as exc:  # the chain itself does not verify
            raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, f"the sender's device list: {exc.detail}") from exc
        if not any(e.device_id == address.device and e.sign_key == sign_key for e in entries):
            # Maybe the device was added a moment ago: look once more, uncached.
            entries = await self.devices(address.account, relay=address.relay, fresh=True)
            if not any(e.device_id == address.device and e.sign_key == sign_key for e in entries):
                raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "the sender is not a current device of its account")


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
                elif not isinstance(item, Heartbeat):  # pragma: no cover - StreamItem is closed
                    raise TypeError(type(item).__name__)
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
    "ReceivedMessage",
    "RejectedMessage",
    "RelayClient",
    "Sent",
    "verify_chain",
]
