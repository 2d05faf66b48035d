"""The typed request layer: one ``async`` method per relay route the client uses, and the only module of the SDK
that writes a relay path (a test keeps it so: ``tests/protocol/client/test_api_paths.py``).

Every method encodes its request struct, sends it on the client's HTTP/2 connection, decodes the 2xx answer as the
route's response struct and returns it. What happens around that is decided here, once:

- **Authentication.** Authenticated routes carry ``Authorization: Bearer <token>``. :meth:`RelayApi.token` hands
  out the session token: the one in memory, else the one kept in the home (:class:`SealedTokenStore`: a sealed
  row in ``state.db``, reused across commands until shortly before it expires), else a new one
  (:meth:`RelayApi.authenticate`: ``POST /v1/auth/challenge``, then ``POST /v1/auth/session`` with the device's
  signature). A 401 ``token_expired`` / ``invalid_token`` / ``token_revoked`` drops the token (from the home too)
  and the request is sent once more with a new one; a second refusal is raised.
- **Retries** (:class:`RetryPolicy`): a request that certainly did not reach the relay (``ConnectError`` after the
  first attempt, GOAWAY "not processed") is repeated; one that may have reached it only when it is idempotent
  (``retry=True`` below, every GET and PUT and the idempotent POSTs); ``unavailable`` / ``rate_limited`` wait for
  the problem's ``retry_after_seconds`` (else the ``Retry-After`` header, else full-jitter backoff) and repeat.
  Nothing else is repeated: a 4xx is raised at once. ``ConnectError`` on the first attempt is raised at once
  (nothing listening: say so rather than after a minute).
- **Decoding.** A 2xx whose media type is neither MessagePack nor JSON, or whose body is not the route's struct,
  raises :class:`~protocol.errors.TetherlessError` (``unsupported_media_type`` / ``malformed_body`` /
  ``invalid_field``) naming the route: a malicious or broken relay (or proxy) gets a clear error, never a crash.

Errors, for every method: :class:`~protocol.errors.RemoteError` for a problem answered by the relay (switch on
``.code``), :class:`~protocol.errors.UnknownRemoteError` for an error that is not a problem document,
:class:`~protocol.client.http.TransportError` (``ConnectError``, ``TLSSetupError`` …) once retries are exhausted,
and ``TetherlessError`` for an answer that does not decode. Cancellation resets the request's stream: a
non-idempotent request (``send_envelopes``, ``log_append`` …) may or may not have been processed then.

Use it through a client (``client.api.inbox_page(after=0)``); the SDK's higher methods (``RelayClient.fetch``,
``send_many`` …) add decryption and verification on top. For tests, construct it on a fake transport::

    api = RelayApi(connect=lambda: fake, keys=lambda: keys, rng=random.Random(1), sleep=fake_sleep)

``connect`` returns anything with :class:`Transport`'s two methods (``HTTP2Connection`` is one).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Final, Protocol, TypeVar
from urllib.parse import quote, urlsplit

import msgspec
import nacl.signing
import trio

from .. import auth, codec
from ..errors import ErrorCode, RemoteError, TetherlessError, error_from_problem
from ..ids import Address
from ..messages import (
    AccountCreated,
    AckRequest,
    AckResponse,
    AppendRequest,
    AppendResponse,
    Challenge,
    ChallengeRequest,
    ClaimPrekeysRequest,
    ClaimPrekeysResponse,
    CreateAccountRequest,
    DeviceListAccepted,
    DeviceListChain,
    EnrolmentOffer,
    EnrolmentOfferAccepted,
    EnrolmentProposal,
    EnrolmentProposalAccepted,
    InboxPage,
    LogPage,
    LogRecordIn,
    LogRetention,
    OutboundEnvelope,
    PostDeviceListRequest,
    PrekeyCounts,
    PrekeyUpload,
    RevokeSessionsRequest,
    SendRequest,
    SendResponse,
    Session,
    SessionRequest,
    SessionsRevoked,
    SignedDeviceList,
    SnapshotRef,
    WebAuthnCredential,
    WebAuthnRegistration,
    WebAuthnRegistrationOptions,
    WellKnown,
)
from .http import ConnectError, Headers, Response, StreamingResponse, TransportError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Problem codes after which a new session token may succeed where the old one was refused.
REAUTH_CODES: Final = frozenset({ErrorCode.TOKEN_EXPIRED, ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_REVOKED})
#: Problem codes that say "later": the request is repeated after the relay's Retry-After (or a backoff).
RETRY_LATER_CODES: Final = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED})
REQUEST_HEADERS: Final[tuple[tuple[str, str], ...]] = (("content-type", codec.MSGPACK), ("accept", codec.MSGPACK))
WELL_KNOWN_PATH: Final = "/.well-known/tetherless"
MAX_ERROR_BODY_BYTES: Final = 1024 * 1024
TOKEN_TABLE: Final = "client_session_token"


# -- what the layer needs ------------------------------------------------------------------------------------


class Transport(Protocol):
    """One connection to the relay, as :class:`~protocol.client.http.HTTP2Connection` offers it."""

    async def request(
        self, method: str, path: str, body: bytes | None = None, headers: Headers = (), *, timeout: float | None = ...
    ) -> Response: ...

    def stream(
        self,
        method: str,
        path: str,
        headers: Headers = (),
        body: bytes | None = None,
        *,
        timeout: float | None = ...,
        chunk_timeout: float | None = ...,
    ) -> AbstractAsyncContextManager[StreamingResponse]: ...


class DeviceIdentity(Protocol):
    """What authentication needs of a device's keys (:class:`~protocol.client.keystore.DeviceKeys` has it)."""

    @property
    def device_id(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def signing_key(self) -> nacl.signing.SigningKey: ...


class TokenStore(Protocol):
    """Where a session token outlives the process. It is a bearer credential: keep it sealed, never in plain text."""

    def load(self, relay_url: str, device_id: str) -> StoredToken | None: ...

    def save(self, relay_url: str, token: StoredToken) -> None: ...

    def forget(self, relay_url: str, device_id: str, token: str) -> None: ...


class StoredToken(msgspec.Struct, frozen=True, kw_only=True):
    """A session token with the times that decide its reuse (ms since the epoch, the client's clock)."""

    device_id: str
    token: str
    expires_at_ms: int
    renew_at_ms: int  # from then on a new token is fetched instead (a request never leaves with a dying one)

    def __repr__(self) -> str:
        return f"StoredToken(device_id={self.device_id!r}, expires_at_ms={self.expires_at_ms})"  # never the token


class _KeyValue(Protocol):
    def put(self, table: str, key: str, value: bytes) -> None: ...

    def get(self, table: str, key: str) -> bytes | None: ...

    def delete(self, table: str, key: str) -> bool: ...


class SealedTokenStore:
    """:class:`TokenStore` on a home's ``state.db`` (:class:`~protocol.client.localdb.LocalDB`): one sealed row per
    relay URL and device (table ``client_session_token``), so ``send``, ``sync`` and the other commands of one
    home share a token instead of authenticating every time. A row that does not decode is treated as absent."""

    def __init__(self, db: _KeyValue) -> None:
        self._db = db

    @staticmethod
    def _key(relay_url: str, device_id: str) -> str:
        return f"{relay_url.rstrip('/').lower()} {device_id}"

    def load(self, relay_url: str, device_id: str) -> StoredToken | None:
        """The stored token of ``device_id`` at ``relay_url``, or None. Raises what the database raises for a row
        that does not open (``TamperedRowError``); idempotent."""
        raw = self._db.get(TOKEN_TABLE, self._key(relay_url, device_id))
        if raw is None:
            return None
        try:
            return msgspec.msgpack.decode(raw, type=StoredToken)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    def save(self, relay_url: str, token: StoredToken) -> None:
        """Keep ``token`` (replacing the previous one). Idempotent."""
        self._db.put(TOKEN_TABLE, self._key(relay_url, token.device_id), msgspec.msgpack.encode(token))

    def forget(self, relay_url: str, device_id: str, token: str) -> None:
        """Delete the stored token if it is still ``token`` (another process may have stored a newer one)."""
        stored = self.load(relay_url, device_id)
        if stored is not None and stored.token == token:
            self._db.delete(TOKEN_TABLE, self._key(relay_url, device_id))


class RetryPolicy(msgspec.Struct, frozen=True):
    """How many attempts a request gets and how long to wait between them (the client's one backoff formula for
    requests; the sync engine's reconnect backoff is its own, over whole drain steps)."""

    max_attempts: int = 5
    base_seconds: float = 0.2
    max_backoff_seconds: float = 10.0
    max_retry_after_seconds: float = 60.0

    def delay(self, attempt: int, rng: random.Random, retry_after_seconds: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1``: the relay's ``retry_after_seconds`` (capped), else full
        jitter ``uniform(0, min(max_backoff, base · 2^attempt))`` — it spreads the reconnects of many clients after
        a relay restart. Pure given ``rng``."""
        if retry_after_seconds is not None:
            return max(0.0, min(float(retry_after_seconds), self.max_retry_after_seconds))
        return rng.uniform(0, min(self.max_backoff_seconds, self.base_seconds * 2 ** min(attempt, 30)))


def media_type_of(response: Response | StreamingResponse, route: str) -> str:
    """``codec.MSGPACK`` or ``codec.JSON`` for a 2xx answer's Content-Type (absent: MessagePack, the relay's
    default); raises ``TetherlessError`` ``unsupported_media_type`` naming ``route`` for any other type."""
    content_type = (response.header("content-type") or codec.MSGPACK).split(";")[0].strip().lower()
    if content_type in (codec.JSON, "application/problem+json"):
        return codec.JSON
    if content_type == codec.MSGPACK:
        return codec.MSGPACK
    raise TetherlessError(
        ErrorCode.UNSUPPORTED_MEDIA_TYPE, f"the relay answered {route} with {content_type[:80]!r}, not MessagePack"
    )


def decode_answer(response: Response, response_type: type[T], route: str) -> T:
    """The body of a 2xx answer to ``route`` as ``response_type``; raises ``TetherlessError``
    (``unsupported_media_type``, ``malformed_body``, ``invalid_field``) whose detail names the route."""
    media_type = media_type_of(response, route)
    try:
        return codec.decode(response.body, response_type, media_type)
    except TetherlessError as exc:
        raise TetherlessError(
            exc.code, f"the relay's answer to {route} is not a {response_type.__name__}: {exc.detail}"
        ) from exc


def _segment(value: str) -> str:
    """One path segment, percent-encoded: an id or relay name never changes the route it is put into."""
    return quote(value, safe="")


def _retry_after_header(response: Response) -> float | None:
    value = response.header("retry-after")
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


BLOB_UPLOADS_PATH: Final = "/v1/blobs/uploads"
BLOBS_PATH: Final = "/v1/blobs"
TUS_HEADERS: Final[tuple[tuple[str, str], ...]] = (("tus-resumable", "1.0.0"),)
TUS_CONTENT_TYPE: Final = "application/offset+octet-stream"
CAPABILITY_HEADER: Final = "tetherless-capability"
BLOB_ID_HEADER: Final = "tetherless-blob-id"
_BLOB_ID = re.compile(r"^[0-9a-f]{32}$")


class BlobUpload(msgspec.Struct, frozen=True):
    """What the relay says about one tus upload: its id, the bytes it holds (``offset``) of ``length``, and the
    blob id once it is complete (``Tetherless-Blob-Id``)."""

    upload_id: str
    offset: int
    length: int
    blob_id: str | None = None


def _upload_id_of(location: str | None) -> str:
    """The upload id at the end of a creation's ``Location`` (absolute or relative); raises ``TetherlessError``
    ``invalid_field`` for anything but ``…/v1/blobs/uploads/<32 hex>``: an id never becomes another path."""
    path = urlsplit(location or "").path
    prefix, _, upload_id = path.rpartition("/")
    if not prefix.endswith(BLOB_UPLOADS_PATH) or not _BLOB_ID.match(upload_id):
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"the relay's upload Location is not an upload: {location!r}")
    return upload_id


def _blob_upload(response: Response, upload_id: str, length: int, route: str) -> BlobUpload:
    """The tus answer's ``Upload-Offset`` (within ``[0, length]``) and blob id (32 hex); raises ``TetherlessError``
    ``invalid_field`` naming ``route`` for a missing or impossible value."""
    text = (response.header("upload-offset") or "").strip()
    if not text.isdigit() or int(text) > length:
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"the relay answered {route} with Upload-Offset {text!r}")
    blob_id = response.header(BLOB_ID_HEADER)
    if blob_id is not None and not _BLOB_ID.match(blob_id):
        raise TetherlessError(ErrorCode.INVALID_FIELD, f"the relay answered {route} with blob id {blob_id[:80]!r}")
    return BlobUpload(upload_id=upload_id, offset=int(text), length=length, blob_id=blob_id)


# -- the layer ---------------------------------------------------------------------------------------------------


class RelayApi:
    """The relay's routes as typed methods (see the module doc for authentication, retries and errors).

    ``connect`` returns the connection to use (the client reconnects behind it); ``keys`` returns this device's
    keys (None before it has any: authenticated routes then raise ``RuntimeError``); ``tokens`` keeps the
    session token across processes (None: memory only); ``wall_clock``, ``rng`` and ``sleep`` are injectable.
    Methods may be called concurrently from several tasks.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Transport]],
        *,
        relay_url: str,
        keys: Callable[[], DeviceIdentity | None],
        tokens: TokenStore | None = None,
        timeout_seconds: float = 30.0,
        policy: RetryPolicy | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    ) -> None:
        self._connect = connect
        self.relay_url = relay_url
        self._keys = keys
        self.tokens = tokens
        self.timeout_seconds = timeout_seconds
        self.policy = policy or RetryPolicy()
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._auth_lock = trio.Lock()
        self._token: StoredToken | None = None
        #: Requests sent (every attempt, the authentication ones included): what bench/cli_startup.py reports.
        self.requests_sent = 0

    # -- the one place for retries, re-authentication and backoff -----------------------------------------------

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    async def backoff(self, attempt: int, retry_after_seconds: float | None = None) -> None:
        """Sleep :meth:`RetryPolicy.delay` (also used by the inbox stream's reconnects). Cancellation ends it."""
        await self._sleep(self.policy.delay(attempt, self._rng, retry_after_seconds))

    async def _request(
        self,
        method: str,
        path: str,
        body: msgspec.Struct | None,
        *,
        authenticated: bool = True,
        retry: bool = True,
        max_attempts: int | None = None,
        ok_statuses: Sequence[int] = (),
        content: bytes | None = None,
        extra_headers: Headers = (),
        timeout_seconds: float | None = None,
    ) -> Response:
        """Send one request with the module doc's retries; returns the 2xx (or ``ok_statuses``) response as is.

        ``retry``: repeating it is safe (idempotent); otherwise it is repeated only when the relay certainly did
        not process it. ``content`` replaces the encoded ``body`` with raw bytes (the tus routes); a header of
        ``extra_headers`` replaces the default one of the same name (e.g. ``content-type``; an empty value
        leaves it out); ``timeout_seconds`` replaces :attr:`timeout_seconds` for this request.
        """
        encoded = content if content is not None else codec.encode(body) if body is not None else None
        replaced = {name for name, _ in extra_headers}
        base_headers = [
            *((n, v) for n, v in REQUEST_HEADERS if n not in replaced),
            *((n, v) for n, v in extra_headers if v),
        ]
        timeout = self.timeout_seconds if timeout_seconds is None else timeout_seconds
        attempts = max(1, max_attempts if max_attempts is not None else self.policy.max_attempts)
        refused_token: str | None = None
        attempt = 0
        while True:
            attempt += 1
            token: str | None = None
            try:
                conn = await self._connect()
                headers = list(base_headers)
                if authenticated:
                    token = await self.token()
                    headers.append(("authorization", f"Bearer {token}"))
                self.requests_sent += 1
                response = await conn.request(method, path, encoded, headers, timeout=timeout)
            except ConnectError:
                if attempt == 1 or attempt >= attempts:
                    raise
                await self.backoff(attempt)
                continue
            except TransportError as exc:
                if attempt >= attempts or (exc.maybe_processed and not retry):
                    raise
                log.info("retrying %s %s after a transport error: %s", method, path.split("?")[0], exc)
                await self.backoff(attempt)
                continue
            if 200 <= response.status < 300 or response.status in ok_statuses:
                return response
            error = error_from_problem(response.status, response.body)
            if isinstance(error, RemoteError):
                if token is not None and error.code in REAUTH_CODES and refused_token is None:
                    refused_token = token
                    self.forget_token(token)
                    attempt -= 1  # a new token is not a retry of the same request
                    continue
                if error.code in RETRY_LATER_CODES and attempt < attempts:
                    retry_after = error.retry_after_seconds
                    await self.backoff(
                        attempt, retry_after if retry_after is not None else _retry_after_header(response)
                    )
                    continue
            raise error

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
        """:meth:`_request`, its answer decoded as ``response_type`` (:func:`decode_answer`)."""
        response = await self._request(method, path, body, authenticated=authenticated, retry=retry)
        return decode_answer(response, response_type, f"{method} {path.split('?')[0]}")

    @asynccontextmanager
    async def _stream(self, path: str, *, chunk_timeout: float | None) -> AsyncIterator[StreamingResponse]:
        """An authenticated, long-lived ``GET``: yields the 200 response to read chunk by chunk. A refused token is
        dropped (the caller's reconnect authenticates anew); raises the answered error otherwise, and
        ``TransportError`` as the connection does. Not retried here: a stream's owner reconnects itself."""
        conn = await self._connect()
        token = await self.token()
        headers = [*REQUEST_HEADERS, ("authorization", f"Bearer {token}")]
        self.requests_sent += 1
        async with conn.stream("GET", path, headers, timeout=self.timeout_seconds, chunk_timeout=chunk_timeout) as r:
            if r.status != 200:
                error = error_from_problem(r.status, await r.read(MAX_ERROR_BODY_BYTES))
                if isinstance(error, RemoteError) and error.code in REAUTH_CODES:
                    self.forget_token(token)
                raise error
            media_type_of(r, f"GET {path.split('?')[0]}")
            yield r

    # -- the session token ---------------------------------------------------------------------------------------

    def _require_keys(self) -> DeviceIdentity:
        keys = self._keys()
        if keys is None:
            raise RuntimeError("this client has no device keys; register() first")
        return keys

    def _usable(self, stored: StoredToken | None, device_id: str) -> bool:
        return stored is not None and stored.device_id == device_id and self._now_ms() < stored.renew_at_ms

    async def token(self) -> str:
        """A session token for the authenticated routes: the one in memory or in :attr:`tokens` while it is not
        due for renewal, else a new one (:meth:`authenticate`). Raises what ``authenticate`` raises; concurrent
        callers share one authentication. Cancellation leaves no half-stored token."""
        device_id = self._require_keys().device_id
        if not self._usable(self._token, device_id):
            async with self._auth_lock:
                if not self._usable(self._token, device_id):
                    stored = self.tokens.load(self.relay_url, device_id) if self.tokens is not None else None
                    if self._usable(stored, device_id):
                        self._token = stored
                    else:
                        await self.authenticate()
        assert self._token is not None
        return self._token.token

    def forget_token(self, token: str | None = None) -> None:
        """Drop the session token (``token``: only if it is still that one), here and in :attr:`tokens`: the next
        authenticated request authenticates anew. Idempotent; never raises for a missing token."""
        current = self._token
        if current is not None and (token is None or current.token == token):
            self._token = None
        keys = self._keys()
        if self.tokens is not None and keys is not None and (token or current):
            self.tokens.forget(self.relay_url, keys.device_id, token or (current.token if current else ""))

    @property
    def session_expires_at_ms(self) -> int | None:
        """When the token in memory expires (None: none held)."""
        return self._token.expires_at_ms if self._token is not None else None

    async def authenticate(self) -> Session:
        """A fresh session token (challenge, then the signed answer), kept in memory and in :attr:`tokens`.

        Raises ``RemoteError`` (``unknown_device``, ``device_revoked``, ``bad_signature`` …) and, locally,
        ``challenge_unknown`` when the relay offers a challenge for another relay or device (never signed). Not
        idempotent (each call makes a new session); the single-use nonce is never sent twice.
        """
        keys = self._require_keys()
        challenge = await self.challenge(keys.device_id)
        own_relay = Address.parse(keys.address).relay
        if challenge.device_id != keys.device_id or challenge.relay.lower() != own_relay:
            raise TetherlessError(ErrorCode.CHALLENGE_UNKNOWN, "the relay sent a challenge for another relay or device")
        signature = auth.sign_challenge(keys.signing_key, challenge)
        session = await self.session(
            SessionRequest(device_id=keys.device_id, nonce=challenge.nonce, signature=signature)
        )
        if session.device_id != keys.device_id:
            raise TetherlessError(ErrorCode.INVALID_FIELD, "the relay answered a session for another device")
        lifetime = max(0, session.expires_at_ms - self._now_ms())
        # Renewed a little early (a fifth of the lifetime, at most a minute): no request leaves with a dying token.
        stored = StoredToken(
            device_id=session.device_id,
            token=session.token,
            expires_at_ms=session.expires_at_ms,
            renew_at_ms=session.expires_at_ms - min(60_000, lifetime // 5),
        )
        self._token = stored
        if self.tokens is not None:
            self.tokens.save(self.relay_url, stored)
        return session

    # -- relay ---------------------------------------------------------------------------------------------------

    async def well_known(self) -> WellKnown:
        """``GET /.well-known/tetherless``: the relay's name, keys and limits. Unauthenticated; idempotent."""
        return await self._call("GET", WELL_KNOWN_PATH, None, WellKnown, authenticated=False)

    async def well_known_with_date(self) -> tuple[WellKnown, str | None]:
        """:meth:`well_known` with the answer's ``Date`` header (None when absent), for clock-skew checks."""
        response = await self._request("GET", WELL_KNOWN_PATH, None, authenticated=False)
        return decode_answer(response, WellKnown, f"GET {WELL_KNOWN_PATH}"), response.header("date")

    # -- accounts, device lists and sessions ---------------------------------------------------------------------

    async def create_account(self, request: CreateAccountRequest) -> AccountCreated:
        """``POST /v1/accounts`` (genesis device list; no token). Not repeated once it may have reached the relay."""
        return await self._call("POST", "/v1/accounts", request, AccountCreated, authenticated=False, retry=False)

    async def device_chain(self, account_id: str) -> DeviceListChain:
        """``GET /v1/accounts/{account_id}/devices``: a local account's device-list chain (no token; unverified —
        :meth:`RelayClient.device_chain` verifies it)."""
        path = f"/v1/accounts/{_segment(account_id)}/devices"
        return await self._call("GET", path, None, DeviceListChain, authenticated=False)

    async def remote_device_chain(self, relay: str, account_id: str) -> DeviceListChain:
        """``GET /v1/relays/{relay}/accounts/{account_id}/devices``: a remote account's chain, fetched by this
        relay from the account's home relay (unverified, like :meth:`device_chain`)."""
        path = f"/v1/relays/{_segment(relay.lower())}/accounts/{_segment(account_id)}/devices"
        return await self._call("GET", path, None, DeviceListChain)

    async def post_device_list(self, signed: SignedDeviceList) -> DeviceListAccepted:
        """``POST /v1/accounts/{account_id}/devices`` (no token: the approvals authorize it). Not repeated."""
        path = f"/v1/accounts/{_segment(signed.device_list.account_id)}/devices"
        request = PostDeviceListRequest(signed=signed)
        return await self._call("POST", path, request, DeviceListAccepted, authenticated=False, retry=False)

    async def challenge(self, device_id: str) -> Challenge:
        """``POST /v1/auth/challenge``: a single-use nonce to sign (no token). Repeating it only makes another."""
        request = ChallengeRequest(device_id=device_id)
        return await self._call("POST", "/v1/auth/challenge", request, Challenge, authenticated=False)

    async def session(self, request: SessionRequest) -> Session:
        """``POST /v1/auth/session``: the signed answer to a challenge, for a token. Never repeated (the nonce is
        single-use: start over with a new challenge instead)."""
        return await self._call("POST", "/v1/auth/session", request, Session, authenticated=False, retry=False)

    async def revoke_sessions(self, *, all_sessions: bool = False) -> SessionsRevoked:
        """``DELETE /v1/auth/session``: revoke this token (``all_sessions``: every token of this device) and drop
        it here. Idempotent in effect."""
        request = RevokeSessionsRequest(all_sessions=all_sessions)
        answer = await self._call("DELETE", "/v1/auth/session", request, SessionsRevoked)
        self.forget_token()
        return answer

    # -- messages ------------------------------------------------------------------------------------------------

    async def send_envelopes(self, envelopes: Sequence[OutboundEnvelope]) -> SendResponse:
        """``POST /v1/messages``: one batch, committed atomically. Repeated on a transport error: idempotent per
        (sender device, idempotency key), so a retry of the same envelopes stores nothing new."""
        return await self._call("POST", "/v1/messages", SendRequest(envelopes=list(envelopes)), SendResponse)

    async def inbox_page(self, after: int = 0, limit: int | None = None) -> InboxPage:
        """``GET /v1/inbox?after=&limit=``: one page of envelopes with cursor > ``after`` (undecrypted)."""
        query = f"after={int(after)}" + (f"&limit={int(limit)}" if limit is not None else "")
        return await self._call("GET", f"/v1/inbox?{query}", None, InboxPage)

    def inbox_stream(
        self, after: int, *, chunk_timeout: float | None
    ) -> AbstractAsyncContextManager[StreamingResponse]:
        """``GET /v1/inbox/stream?after=``: ``async with api.inbox_stream(c, chunk_timeout=90) as response`` yields
        the 200 response (``StreamItem`` frames, :class:`~protocol.codec.StreamDecoder`). See :meth:`_stream`."""
        return self._stream(f"/v1/inbox/stream?after={int(after)}", chunk_timeout=chunk_timeout)

    async def ack(self, up_to: int | None = None, ids: Sequence[bytes] = ()) -> AckResponse:
        """``POST /v1/inbox/ack``: delete envelopes up to cursor ``up_to`` and/or by id. Idempotent."""
        return await self._call("POST", "/v1/inbox/ack", AckRequest(up_to=up_to, ids=list(ids)), AckResponse)

    # -- prekeys -------------------------------------------------------------------------------------------------

    async def prekey_counts(self) -> PrekeyCounts:
        """``GET /v1/prekeys``: what the relay holds for this device. Read-only."""
        return await self._call("GET", "/v1/prekeys", None, PrekeyCounts)

    async def upload_prekeys(self, upload: PrekeyUpload) -> PrekeyCounts:
        """``PUT /v1/prekeys``: publish prekeys (ids are unique, so repeating it is harmless); the new counts."""
        return await self._call("PUT", "/v1/prekeys", upload, PrekeyCounts)

    async def claim_prekeys(self, devices: Sequence[str]) -> ClaimPrekeysResponse:
        """``POST /v1/prekeys/claim``: one bundle per device address (at most 256). Not repeated once it may have
        reached the relay (a claim consumes one-time keys)."""
        request = ClaimPrekeysRequest(devices=list(devices))
        return await self._call("POST", "/v1/prekeys/claim", request, ClaimPrekeysResponse, retry=False)

    # -- account log ---------------------------------------------------------------------------------------------

    async def log_page(self, after: int = 0, limit: int | None = None) -> LogPage:
        """``GET /v1/log?after=&limit=``: records with position > ``after`` (``limit=0``: head, horizon and the
        newest snapshot only)."""
        query = f"after={int(after)}" + (f"&limit={int(limit)}" if limit is not None else "")
        return await self._call("GET", f"/v1/log?{query}", None, LogPage)

    async def log_append(self, records: Sequence[LogRecordIn], *, expected_head: int | None = None) -> AppendResponse:
        """``POST /v1/log``: append atomically (idempotent per record id, so it is repeated on transport errors;
        ``expected_head``: optimistic concurrency, ``log_conflict`` when the head moved)."""
        request = AppendRequest(records=list(records), expected_head=expected_head)
        return await self._call("POST", "/v1/log", request, AppendResponse)

    def log_stream(self, after: int, *, chunk_timeout: float | None) -> AbstractAsyncContextManager[StreamingResponse]:
        """``GET /v1/log/stream?after=``: like :meth:`inbox_stream`, with ``LogRecord | LogHeartbeat`` frames."""
        return self._stream(f"/v1/log/stream?after={int(after)}", chunk_timeout=chunk_timeout)

    async def log_snapshot(self) -> SnapshotRef:
        """``GET /v1/log/snapshot``: the newest complete snapshot (``no_snapshot`` when there is none)."""
        return await self._call("GET", "/v1/log/snapshot", None, SnapshotRef)

    async def snapshot_parts(self, snapshot_id: bytes, after: int = 0, limit: int | None = None) -> LogPage:
        """``GET /v1/log/snapshot/{snapshot_id}?after=&limit=``: a snapshot's parts with full ciphertext."""
        query = f"after={int(after)}" + (f"&limit={int(limit)}" if limit is not None else "")
        return await self._call("GET", f"/v1/log/snapshot/{snapshot_id.hex()}?{query}", None, LogPage)

    async def log_retention(self) -> LogRetention:
        """``GET /v1/log/retention``."""
        return await self._call("GET", "/v1/log/retention", None, LogRetention)

    async def set_log_retention(self, retention: LogRetention) -> LogRetention:
        """``PUT /v1/log/retention`` (idempotent): the retention now in force."""
        return await self._call("PUT", "/v1/log/retention", retention, LogRetention)

    # -- enrolment (link codes) ----------------------------------------------------------------------------------

    async def enrolment_offer(self, offer: EnrolmentOffer) -> EnrolmentOfferAccepted:
        """``POST /v1/enrolments`` (no token: the new device has none yet). Not repeated."""
        return await self._call(
            "POST", "/v1/enrolments", offer, EnrolmentOfferAccepted, authenticated=False, retry=False
        )

    async def enrolment_get_offer(self, lookup_id: str) -> EnrolmentOffer:
        """``GET /v1/enrolments/{lookup_id}``: the offer an approving device checks."""
        return await self._call("GET", f"/v1/enrolments/{_segment(lookup_id)}", None, EnrolmentOffer)

    async def enrolment_propose(self, lookup_id: str, proposal: EnrolmentProposal) -> EnrolmentProposalAccepted:
        """``POST /v1/enrolments/{lookup_id}/proposal``: answer an offer. Not repeated once it may have arrived."""
        path = f"/v1/enrolments/{_segment(lookup_id)}/proposal"
        return await self._call("POST", path, proposal, EnrolmentProposalAccepted, retry=False)

    async def enrolment_proposal(self, lookup_id: str) -> EnrolmentProposal | None:
        """``GET /v1/enrolments/{lookup_id}/proposal`` once (no token, no retry: the caller polls); None while the
        answer is 204 (no proposal yet)."""
        path = f"/v1/enrolments/{_segment(lookup_id)}/proposal"
        response = await self._request("GET", path, None, authenticated=False, max_attempts=1, ok_statuses=(204,))
        if response.status == 204:
            return None
        return decode_answer(response, EnrolmentProposal, "GET /v1/enrolments/{lookup_id}/proposal")

    # -- WebAuthn ------------------------------------------------------------------------------------------------

    async def webauthn_register_begin(self) -> WebAuthnRegistrationOptions:
        """``POST /v1/webauthn/register/begin``: options with a single-use challenge."""
        return await self._call("POST", "/v1/webauthn/register/begin", None, WebAuthnRegistrationOptions)

    async def webauthn_register_complete(self, registration: WebAuthnRegistration) -> WebAuthnCredential:
        """``POST /v1/webauthn/register/complete``. Not repeated (the challenge is single-use)."""
        return await self._call("POST", "/v1/webauthn/register/complete", registration, WebAuthnCredential, retry=False)

    # -- media blobs (tus 1.0 uploads, capability downloads: docs/decisions/0014-media-blobs.md, docs/blobs.md) ----

    async def blob_create_upload(self, length: int, *, sha256: bytes, capability_hash: bytes) -> BlobUpload:
        """``POST /v1/blobs/uploads`` (tus creation): a new upload of ``length`` ciphertext bytes whose SHA-256 is
        ``sha256``, downloadable later with the capability whose SHA-256 is ``capability_hash``. A digest this
        account stores already completes at once (dedup: ``offset == length`` and ``blob_id`` set). Raises
        ``RemoteError`` (``body_too_large`` 413 above the relay's blob limit, ``blob_quota_exceeded`` 507 …) and
        ``TetherlessError`` (``invalid_field``) for an answer without a usable ``Location``. Not repeated once it
        may have reached the relay (each creation is a new upload)."""
        metadata = ",".join(
            f"{key} {base64.b64encode(value).decode('ascii')}"
            for key, value in (("sha256", sha256), ("capability", capability_hash))
        )
        headers = (
            *TUS_HEADERS,
            ("content-type", ""),
            ("upload-length", str(int(length))),
            ("upload-metadata", metadata),
        )
        response = await self._request("POST", BLOB_UPLOADS_PATH, None, retry=False, extra_headers=headers)
        upload_id = _upload_id_of(response.header("location"))
        return _blob_upload(response, upload_id, length, "POST /v1/blobs/uploads")

    async def blob_upload_offset(self, upload_id: str, length: int) -> BlobUpload:
        """``HEAD /v1/blobs/uploads/{upload_id}``: how many bytes the relay holds (and the blob id once complete).
        Read-only; raises ``RemoteError`` (``not_found`` / ``blob_not_found`` for an upload that expired or was
        terminated) and ``TetherlessError`` ``invalid_field`` for an offset outside ``[0, length]``."""
        path = f"{BLOB_UPLOADS_PATH}/{_segment(upload_id)}"
        response = await self._request("HEAD", path, None, extra_headers=(*TUS_HEADERS, ("content-type", "")))
        return _blob_upload(response, upload_id, length, "HEAD /v1/blobs/uploads/{upload_id}")

    async def blob_upload_patch(self, upload_id: str, offset: int, data: bytes, length: int) -> BlobUpload:
        """``PATCH /v1/blobs/uploads/{upload_id}``: append ``data`` at ``offset`` with its SHA-256 in
        ``Upload-Checksum`` (the relay keeps nothing of a piece that does not match). The answer must move the
        offset to exactly ``offset + len(data)``: anything else is ``TetherlessError`` ``invalid_field`` (a relay
        lying about what it stored). Raises ``RemoteError`` ``conflict``-class codes (409: another offset; ask
        :meth:`blob_upload_offset`), ``blob_digest_mismatch`` on the last piece. Not repeated here: after a
        transport error the caller asks for the offset and continues from there (idempotent in that sense).
        The body is held whole: callers send bounded pieces."""
        path = f"{BLOB_UPLOADS_PATH}/{_segment(upload_id)}"
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
        headers = (
            *TUS_HEADERS,
            ("content-type", TUS_CONTENT_TYPE),
            ("upload-offset", str(int(offset))),
            ("upload-checksum", f"sha256 {checksum}"),
        )
        # A piece may take longer than a small request: allow it at least 256 KiB/s on top of the usual timeout.
        timeout = self.timeout_seconds + len(data) / (256 * 1024)
        response = await self._request(
            "PATCH", path, None, retry=False, content=data, extra_headers=headers, timeout_seconds=timeout
        )
        answer = _blob_upload(response, upload_id, length, "PATCH /v1/blobs/uploads/{upload_id}")
        if answer.offset != offset + len(data):
            raise TetherlessError(
                ErrorCode.INVALID_FIELD,
                f"the relay answered a PATCH of {len(data)} bytes at {offset} with offset {answer.offset}",
            )
        return answer

    async def blob_terminate_upload(self, upload_id: str) -> None:
        """``DELETE /v1/blobs/uploads/{upload_id}`` (tus termination): the relay drops what it holds. An upload
        that is gone already counts as done (idempotent); raises other relay errors."""
        path = f"{BLOB_UPLOADS_PATH}/{_segment(upload_id)}"
        await self._request(
            "DELETE", path, None, extra_headers=(*TUS_HEADERS, ("content-type", "")), ok_statuses=(404,)
        )

    async def blob_delete(self, blob_id: str) -> None:
        """``DELETE /v1/blobs/{blob_id}`` with this device's token (the owning account releases the blob).
        Idempotent in effect (a blob already gone is done); raises other relay errors."""
        path = f"{BLOBS_PATH}/{_segment(blob_id)}"
        await self._request("DELETE", path, None, extra_headers=(("content-type", ""),), ok_statuses=(404,))

    @asynccontextmanager
    async def blob_download(
        self, blob_id: str, *, capability: bytes | None, start: int = 0, chunk_timeout: float | None = 60.0
    ) -> AsyncIterator[StreamingResponse]:
        """``GET /v1/blobs/{blob_id}`` from byte ``start`` (``Range: bytes=START-`` when above 0): yields the 200 or
        206 response to read chunk by chunk (the caller checks ``Content-Range`` against what it asked and every
        byte against the blob's digest). Authorised by ``capability`` (``Tetherless-Capability``, any account)
        or, when None, by this device's token (the owning account). Raises ``RemoteError`` (``blob_not_found``
        404 for an unknown blob and a wrong capability alike, 416 past the end) and ``TransportError``; not
        retried here (the caller resumes from what it stored). Leaving the block early resets the stream."""
        conn = await self._connect()
        headers = [("accept", "application/octet-stream")]
        if capability is not None:
            headers.append((CAPABILITY_HEADER, base64.urlsafe_b64encode(capability).decode("ascii").rstrip("=")))
        else:
            headers.append(("authorization", f"Bearer {await self.token()}"))
        if start > 0:
            headers.append(("range", f"bytes={int(start)}-"))
        self.requests_sent += 1
        path = f"{BLOBS_PATH}/{_segment(blob_id)}"
        async with conn.stream("GET", path, headers, timeout=self.timeout_seconds, chunk_timeout=chunk_timeout) as r:
            if r.status not in (200, 206):
                raise error_from_problem(r.status, await r.read(MAX_ERROR_BODY_BYTES))
            yield r


__all__ = [
    "BLOB_ID_HEADER",
    "CAPABILITY_HEADER",
    "REAUTH_CODES",
    "RETRY_LATER_CODES",
    "BlobUpload",
    "RelayApi",
    "RetryPolicy",
    "SealedTokenStore",
    "StoredToken",
    "TokenStore",
    "Transport",
    "decode_answer",
    "media_type_of",
]
