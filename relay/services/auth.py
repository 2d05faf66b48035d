"""Device authentication: challenges, session tokens, revocation.

Tokens are 32 random bytes (URL-safe base64, prefixed ``tls1_``). Only their
SHA-256 is stored, so a stolen database does not yield usable tokens.

Looked-up sessions are cached in memory for a few seconds
(``session_cache_seconds``, default :data:`SESSION_CACHE_MS`): a durable
single send then costs one SHA-256 and a dict lookup, not a SELECT and a
thread hop. The cache never outlives a revocation
(docs/decisions/0013-revocation-across-replicas.md):

- a revocation through this process clears its cache at once;
- every revocation, through any replica sharing the database, reaches every
  replica as a notice on commit (:meth:`AuthService.revocation_noticed`,
  fed by ``Store.watch_session_revocations``), which drops the device's
  cached sessions;
- a lookup that was reading the session row while a revocation committed
  (here or elsewhere) does not put its answer in the cache;
- the cache answers only while the revocation watch is listening
  (:meth:`AuthService.revocation_listener`): before it first listens, and
  from the moment its connection is lost until it listens again, the cache
  is empty and every request reads its session row.

What remains is a listening connection that dies silently (no TCP reset):
until keepalive notices it, a cached entry at most ``session_cache_seconds``
old may still be served.
"""

from __future__ import annotations

import base64
import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import trio

from protocol.auth import verify_challenge_signature
from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import Challenge, ChallengeRequest, Session, SessionRequest
from relay import metrics
from relay.store import ChallengeOutcome, Store

from .context import ServiceContext

TOKEN_PREFIX = "tls1_"
SESSION_CACHE_MS = 5_000  # the default of session_cache_seconds (relay/config.py)
SESSION_CACHE_SIZE = 10_000
# A valid Ed25519 public key nobody's device holds (RFC 8032 §7.1, test 1):
# an unknown device's signature is checked against it so that the failure
# costs what a wrong signature for a known device costs.
_NOBODYS_KEY = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of a request."""

    device_id: str
    account_id: str
    token_hash: bytes


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class _SessionCache:
    """Looked-up sessions by token hash, oldest first, at most SESSION_CACHE_SIZE, indexed by device.

    The index makes dropping a device's sessions (a revocation notice, on every replica, for every logout
    anywhere) cost its own sessions, not a pass over the whole cache (6 ms at 10,000 entries, measured).
    """

    def __init__(self) -> None:
        # token hash -> (principal, session expiry, cached until)
        self.entries: OrderedDict[bytes, tuple[Principal, int, int]] = OrderedDict()
        self._by_device: dict[str, set[bytes]] = {}

    def put(self, principal: Principal, expires_at_ms: int, until_ms: int) -> None:
        self.entries[principal.token_hash] = (principal, expires_at_ms, until_ms)
        self._by_device.setdefault(principal.device_id, set()).add(principal.token_hash)
        if len(self.entries) > SESSION_CACHE_SIZE:
            self.drop(next(iter(self.entries)))

    def drop(self, token_hash: bytes) -> None:
        entry = self.entries.pop(token_hash, None)
        if entry is not None:
            hashes = self._by_device[entry[0].device_id]
            hashes.discard(token_hash)
            if not hashes:
                del self._by_device[entry[0].device_id]

    def drop_device(self, device_id: str) -> None:
        for token_hash in self._by_device.pop(device_id, ()):
            del self.entries[token_hash]

    def clear(self) -> None:
        self.entries.clear()
        self._by_device.clear()


class AuthService:
    def __init__(self, store: Store, ctx: ServiceContext, *, cache_ms: int = SESSION_CACHE_MS) -> None:
        """``cache_ms``: how long a looked-up session may answer from memory (0: never; see the module doc)."""
        self._store = store
        self._ctx = ctx
        self._cache_ms = cache_ms
        self._cache = _SessionCache()
        # Bumped by every revocation this process makes or hears of, and whenever the revocation watch starts
        # or stops listening: a lookup that began before may hold the row as it was and must not cache it.
        self._revocations = 0
        # Whether every revocation committed from now on reaches this process (revocation_listener): only then
        # may the cache answer. Off until the store's revocation watch says it listens.
        self._listening = False

    async def issue_challenge(self, request: ChallengeRequest) -> Challenge:
        """A fresh single-use challenge for a registered, unrevoked device.

        Raises ``unknown_device``, or ``device_revoked`` for a device removed
        from its account's device list (that is public: the list is).
        """
        device = await self._store.get_device(request.device_id)
        if device is None:
            raise TetherlessError(ErrorCode.UNKNOWN_DEVICE, "no such device on this relay")
        if device.revoked_at_ms is not None:
            raise TetherlessError(ErrorCode.DEVICE_REVOKED, "this device was removed from its account")
        nonce = self._ctx.random_bytes(32)
        expires = self._ctx.clock_ms() + self._ctx.limits.challenge_ttl_seconds * 1000
        await self._store.put_challenge(nonce, device.device_id, expires)
        return Challenge(relay=self._ctx.relay_name, device_id=device.device_id, nonce=nonce, expires_at_ms=expires)

    async def open_session(self, request: SessionRequest) -> Session:
        """Exchange a signed challenge for a bearer token.

        The nonce is burned by this call whatever the outcome. Raises
        ``unknown_device``, ``device_revoked``, ``challenge_unknown``,
        ``challenge_used``, ``challenge_expired`` or ``bad_signature``.
        """
        try:
            return await self._open_session(request)
        except TetherlessError as exc:
            metrics.auth_failures_total.labels(exc.code.value).inc()
            raise

    async def _open_session(self, request: SessionRequest) -> Session:
        device = await self._store.get_device(request.device_id)
        if device is None:
            await self._work_like_a_wrong_signature(request)
            raise TetherlessError(ErrorCode.UNKNOWN_DEVICE, "no such device on this relay")
        if device.revoked_at_ms is not None:
            raise TetherlessError(ErrorCode.DEVICE_REVOKED, "this device was removed from its account")
        now = self._ctx.clock_ms()
        consumed = await self._store.consume_challenge(request.nonce, request.device_id, now)
        if consumed.outcome is ChallengeOutcome.UNKNOWN:
            raise TetherlessError(ErrorCode.CHALLENGE_UNKNOWN, "this relay did not issue that challenge to you")
        if consumed.outcome is ChallengeOutcome.USED:
            raise TetherlessError(ErrorCode.CHALLENGE_USED, "challenge already used; request a new one")
        if consumed.outcome is ChallengeOutcome.EXPIRED:
            raise TetherlessError(ErrorCode.CHALLENGE_EXPIRED, "challenge expired; request a new one")
        verify_challenge_signature(
            device.sign_key,
            self._ctx.relay_name,
            device.device_id,
            request.nonce,
            consumed.expires_at_ms,
            request.signature,
        )
        token = TOKEN_PREFIX + base64.urlsafe_b64encode(self._ctx.random_bytes(32)).decode("ascii").rstrip("=")
        expires = now + self._ctx.limits.session_ttl_seconds * 1000
        await self._store.create_session(hash_token(token), device.device_id, device.account_id, now, expires)
        metrics.sessions_issued_total.inc()
        return Session(token=token, account_id=device.account_id, device_id=device.device_id, expires_at_ms=expires)

    async def _work_like_a_wrong_signature(self, request: SessionRequest) -> None:
        """Cost what a wrong signature for a known device costs, so timing cannot tell the two apart.

        A known device's failed attempt burns its nonce (one durable write)
        and checks a signature. Here the write is an already-expired
        throwaway challenge (the expiry job deletes it) and the signature is
        checked against a key nobody holds. Tested by
        tests/e2e/test_auth_timing.py (medians within 5 %).
        """
        now = self._ctx.clock_ms()
        await self._store.put_challenge(self._ctx.random_bytes(32), request.device_id, now)
        try:
            verify_challenge_signature(
                _NOBODYS_KEY, self._ctx.relay_name, request.device_id, request.nonce, now, request.signature
            )
        except TetherlessError:
            pass

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal behind an ``Authorization`` header value.

        Raises ``missing_token``, ``invalid_token``, ``token_expired``,
        ``token_revoked`` or ``device_revoked`` (the token's device was removed
        from its account: its sessions were revoked in that commit). A
        revocation through another replica is refused once its notice arrived
        (module doc). Reads only; cancellation abandons the lookup, which then
        caches nothing.
        """
        try:
            return await self._authenticate(authorization)
        except TetherlessError as exc:
            metrics.auth_failures_total.labels(exc.code.value).inc()
            raise

    async def _authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise TetherlessError(ErrorCode.MISSING_TOKEN, "send Authorization: Bearer <token>")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise TetherlessError(ErrorCode.INVALID_TOKEN, "not a Tetherless bearer token")
        token_hash = hash_token(token)
        now = self._ctx.clock_ms()
        cached = self._cache.entries.get(token_hash)  # empty while not listening (revocation_listener)
        if cached is not None and cached[2] > now:
            principal, expires, _ = cached
            if expires <= now:
                raise TetherlessError(ErrorCode.TOKEN_EXPIRED, "session expired; authenticate again")
            return principal
        revocations = self._revocations
        session = await self._store.get_session(token_hash)
        if session is None:
            raise TetherlessError(ErrorCode.INVALID_TOKEN, "unknown token")
        if session.revoked_at_ms is not None:
            device = await self._store.get_device(session.device_id)
            if device is not None and device.revoked_at_ms is not None:
                raise TetherlessError(ErrorCode.DEVICE_REVOKED, "this device was removed from its account")
            raise TetherlessError(ErrorCode.TOKEN_REVOKED, "this token was revoked")
        if session.expires_at_ms <= now:
            raise TetherlessError(ErrorCode.TOKEN_EXPIRED, "session expired; authenticate again")
        principal = Principal(session.device_id, session.account_id, token_hash)
        if revocations == self._revocations and self._listening and self._cache_ms:
            self._cache.put(principal, session.expires_at_ms, now + self._cache_ms)
        return principal

    def forget_devices(self, device_ids: Iterable[str]) -> None:
        """Drop cached sessions of devices just revoked (their rows are revoked in the store already).

        Idempotent; a lookup in flight does not cache its answer."""
        gone = set(device_ids)
        if gone:
            self._revocations += 1
            for device_id in gone:
                self._cache.drop_device(device_id)

    def revocation_noticed(self, device_id: str) -> None:
        """A commit by some process (this one too) revoked sessions of ``device_id``: drop them from the cache.

        The ``notify`` of ``Store.watch_session_revocations``; runs in the trio thread. The notice names the
        device, not the session, so a logout of one token drops the device's other cached sessions as well
        (each is read again at its next request). Idempotent.
        """
        metrics.revocation_notices_total.inc()
        self.forget_devices((device_id,))

    def revocation_listener(self, listening: bool) -> None:
        """Whether every revocation committed from now on will be noticed; the cache answers only then.

        The ``listening`` of ``Store.watch_session_revocations``; runs in the trio thread. Either way the
        cache is emptied: on ``False`` notices may be lost from now on (and were maybe lost already), on
        ``True`` those sent while not listening were lost. Lookups in flight cache nothing. Idempotent.
        """
        self._listening = listening
        self._revocations += 1
        self._cache.clear()
        metrics.revocation_listener_up.set(1 if listening else 0)

    async def revoke(self, principal: Principal, *, all_sessions: bool) -> int:
        """Revoke the caller's token, or every token of its device; returns how many were revoked.

        Idempotent. Refused by this process from the return on, by every other replica once the notice
        sent with the commit reaches it. Raises ``StoreUnavailableError``. Shielded from cancellation: a
        revocation handed to the store may commit anyway, and then this cache must not keep the token.
        """
        with trio.CancelScope(shield=True):
            count = await self._store.revoke_sessions(
                principal.device_id, None if all_sessions else principal.token_hash, self._ctx.clock_ms()
            )
        self._revocations += 1
        if all_sessions:
            self._cache.drop_device(principal.device_id)
        else:
            self._cache.drop(principal.token_hash)
        return count
