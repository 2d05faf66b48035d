"""Device authentication: challenges, session tokens, revocation.

Tokens are 32 random bytes (URL-safe base64, prefixed ``tls1_``). Only their
SHA-256 is stored, so a stolen database does not yield usable tokens. Looked-up
sessions are cached in memory for a few seconds (a durable single send then
costs one SHA-256 and a dict lookup, not a SELECT and a thread hop);
revocation through this process clears its cache at once, including a lookup
that was reading the session row while the revocation committed (it is not
cached). Another replica sharing the database may accept a revoked token for
up to ``SESSION_CACHE_MS``.
"""

from __future__ import annotations

import base64
import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from protocol.auth import verify_challenge_signature
from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import Challenge, ChallengeRequest, Session, SessionRequest
from relay import metrics
from relay.store import ChallengeOutcome, Store

from .context import ServiceContext

TOKEN_PREFIX = "tls1_"
SESSION_CACHE_MS = 5_000
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


class AuthService:
    def __init__(self, store: Store, ctx: ServiceContext) -> None:
        self._store = store
        self._ctx = ctx
        # token hash -> (principal, session expiry, cached until)
        self._cache: OrderedDict[bytes, tuple[Principal, int, int]] = OrderedDict()
        # Bumped by every revocation through this process: a lookup that began before one
        # may hold the row as it was and must not put it in the cache.
        self._revocations = 0

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
        from its account: its sessions were revoked in that commit). Another
        replica's cache may accept such a token for up to SESSION_CACHE_MS.
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
        cached = self._cache.get(token_hash)
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
        if revocations == self._revocations:
            self._cache[token_hash] = (principal, session.expires_at_ms, now + SESSION_CACHE_MS)
            if len(self._cache) > SESSION_CACHE_SIZE:
                self._cache.popitem(last=False)
        return principal

    def forget_devices(self, device_ids: Iterable[str]) -> None:
        """Drop cached sessions of devices just revoked (their rows are revoked in the store already)."""
        gone = set(device_ids)
        if gone:
            self._revocations += 1
            self._cache = OrderedDict((k, v) for k, v in self._cache.items() if v[0].device_id not in gone)

    async def revoke(self, principal: Principal, *, all_sessions: bool) -> int:
        """Revoke the caller's token, or every token of its device. Idempotent."""
        count = await self._store.revoke_sessions(
            principal.device_id, None if all_sessions else principal.token_hash, self._ctx.clock_ms()
        )
        self._revocations += 1
        if all_sessions:
            self._cache = OrderedDict((k, v) for k, v in self._cache.items() if v[0].device_id != principal.device_id)
        else:
            self._cache.pop(principal.token_hash, None)
        return count
