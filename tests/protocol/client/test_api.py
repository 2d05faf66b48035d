"""RelayApi on a fake transport: authentication, token reuse, retries and decoding, with no process and no network.

The fake answers like a relay (or a malicious one); everything checked here is decided inside
protocol/client/api.py. The same layer against a real relay: tests/e2e/test_client_sdk.py.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import nacl.signing
import pytest

from protocol import codec
from protocol.client.api import RelayApi, RetryPolicy, SealedTokenStore, StoredToken
from protocol.client.http import ConnectError, ConnectionLostError, Response, StreamingResponse
from protocol.client.keystore import DeviceKeys
from protocol.client.localdb import DB_FILE, LocalDB
from protocol.errors import ErrorCode, RemoteError, TetherlessError
from protocol.ids import account_id_for, device_id_for
from protocol.messages import (
    Challenge,
    ChallengeRequest,
    PrekeyCounts,
    Session,
    SessionRequest,
)

RELAY = "relay.test"
URL = "http://relay.test"
NOW_MS = 1_800_000_000_000
Answer = Callable[[str, str, bytes | None, dict[str, str]], Response | Exception | None]


def _keys(name: str = "alice") -> DeviceKeys:
    signing = nacl.signing.SigningKey(hashlib.sha256(b"sign " + name.encode()).digest())
    sign_key = bytes(signing.verify_key)
    device, account = device_id_for(sign_key), account_id_for(sign_key)
    return DeviceKeys(
        signing_seed=bytes(signing),
        box_private_key=hashlib.sha256(b"box " + name.encode()).digest(),
        relay_url=URL,
        account_id=account,
        device_id=device,
        address=f"{device}.{account}@{RELAY}",
        device_name=name,
    )


def _ok(value: msgspec.Struct, status: int = 200, content_type: str = codec.MSGPACK) -> Response:
    return Response(status, [("content-type", content_type)], codec.encode(value))


def _problem(code: ErrorCode, status: int, **extra: object) -> Response:
    body = msgspec.json.encode({"type": "about:blank", "title": code.value, "status": status, "code": code, **extra})
    return Response(status, [("content-type", "application/problem+json")], body)


class FakeRelay:
    """A transport that answers authentication like a relay and every other request with ``answer`` (None: 404)."""

    def __init__(self, keys: DeviceKeys, answer: Answer | None = None) -> None:
        self.keys = keys
        self.answer = answer
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, bearer token
        self.sessions = 0
        self.challenge_relay = RELAY  # a malicious relay changes these two
        self.session_device: str | None = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: object = (),
        *,
        timeout: float | None = None,
    ) -> Response:
        named = dict(headers)  # type: ignore[call-overload]
        bearer = named.get("authorization", "").removeprefix("Bearer ") or None
        self.seen.append((method, path, bearer))
        if path == "/v1/auth/challenge":
            request = codec.decode(body or b"", ChallengeRequest)
            nonce, expires = b"n" * 32, NOW_MS + 1
            return _ok(
                Challenge(relay=self.challenge_relay, device_id=request.device_id, nonce=nonce, expires_at_ms=expires)
            )
        if path == "/v1/auth/session":
            device = self.session_device or codec.decode(body or b"", SessionRequest).device_id
            self.sessions += 1
            token, expires = f"tls1_token{self.sessions}", NOW_MS + 3_600_000
            return _ok(Session(token=token, account_id=self.keys.account_id, device_id=device, expires_at_ms=expires))
        answer = self.answer(method, path, body, named) if self.answer is not None else None
        if isinstance(answer, Exception):
            raise answer
        return answer if answer is not None else _problem(ErrorCode.NOT_FOUND, 404)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        headers: object = (),
        body: bytes | None = None,
        *,
        timeout: float | None = None,
        chunk_timeout: float | None = None,
    ) -> AsyncIterator[StreamingResponse]:
        raise AssertionError("no streams here")
        yield  # pragma: no cover


class Sleeps:
    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def _api(
    relay: FakeRelay, *, tokens: SealedTokenStore | None = None, attempts: int = 5, now_ms: int = NOW_MS
) -> tuple[RelayApi, Sleeps]:
    sleeps = Sleeps()

    async def connect() -> FakeRelay:
        return relay

    api = RelayApi(
        connect,
        relay_url=URL,
        keys=lambda: relay.keys,
        tokens=tokens,
        policy=RetryPolicy(max_attempts=attempts),
        wall_clock=lambda: now_ms / 1000,
        rng=random.Random(7),
        sleep=sleeps,
    )
    return api, sleeps


COUNTS = PrekeyCounts(x25519_one_time=50, mlkem_one_time=50, signed_prekey_id=1, last_resort_id=1)


def _counts_after(*answers: Response | Exception) -> Answer:
    """``GET /v1/prekeys`` answered with ``answers`` in turn (then the counts)."""
    queue = list(answers)

    def answer(method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response | Exception | None:
        if path == "/v1/prekeys":
            return queue.pop(0) if queue else _ok(COUNTS)
        return None

    return answer


def _routes(relay: FakeRelay) -> list[str]:
    return [path for _, path, _ in relay.seen]


# -- authentication -----------------------------------------------------------------------------------------


async def test_first_request_authenticates_once_and_later_ones_reuse_the_token() -> None:
    relay = FakeRelay(_keys(), _counts_after())
    api, _ = _api(relay)
    assert await api.prekey_counts() == COUNTS
    assert await api.prekey_counts() == COUNTS
    assert _routes(relay) == ["/v1/auth/challenge", "/v1/auth/session", "/v1/prekeys", "/v1/prekeys"]
    assert [token for _, _, token in relay.seen] == [None, None, "tls1_token1", "tls1_token1"]


@pytest.mark.parametrize("code", [ErrorCode.TOKEN_EXPIRED, ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_REVOKED])
async def test_a_refused_token_is_replaced_once_and_the_request_repeated(code: ErrorCode) -> None:
    relay = FakeRelay(_keys(), _counts_after(_ok(COUNTS), _problem(code, 401)))
    api, sleeps = _api(relay)
    await api.prekey_counts()
    assert await api.prekey_counts() == COUNTS
    assert relay.seen[-3:] == [
        ("POST", "/v1/auth/challenge", None),
        ("POST", "/v1/auth/session", None),
        ("GET", "/v1/prekeys", "tls1_token2"),
    ]
    assert sleeps.seconds == []  # a new token is not a retry: no backoff


async def test_a_second_refusal_is_raised_not_looped() -> None:
    relay = FakeRelay(_keys(), lambda *_: _problem(ErrorCode.INVALID_TOKEN, 401))
    api, _ = _api(relay)
    with pytest.raises(RemoteError) as info:
        await api.prekey_counts()
    assert info.value.code is ErrorCode.INVALID_TOKEN
    assert relay.sessions == 2  # the first token and exactly one replacement


async def test_device_revoked_is_not_answered_with_a_new_token() -> None:
    relay = FakeRelay(_keys(), lambda *_: _problem(ErrorCode.DEVICE_REVOKED, 401))
    api, _ = _api(relay)
    with pytest.raises(RemoteError) as info:
        await api.prekey_counts()
    assert info.value.code is ErrorCode.DEVICE_REVOKED
    assert relay.sessions == 1


async def test_a_challenge_for_another_relay_is_never_signed() -> None:
    relay = FakeRelay(_keys())
    relay.challenge_relay = "evil.test"
    api, _ = _api(relay)
    with pytest.raises(TetherlessError) as info:
        await api.prekey_counts()
    assert info.value.code is ErrorCode.CHALLENGE_UNKNOWN
    assert "/v1/auth/session" not in _routes(relay)


# -- the token kept in the home -----------------------------------------------------------------------------------


def _stored(keys: DeviceKeys, token: str, *, renew_at_ms: int) -> StoredToken:
    return StoredToken(
        device_id=keys.device_id, token=token, expires_at_ms=renew_at_ms + 60_000, renew_at_ms=renew_at_ms
    )


def _home_db(tmp_path: Path) -> LocalDB:
    return LocalDB.open(tmp_path / "home", b"k" * 32)


async def test_the_stored_token_is_reused_by_the_next_client_and_sealed_on_disk(tmp_path: Path) -> None:
    db = _home_db(tmp_path)
    first = FakeRelay(_keys(), _counts_after())
    api, _ = _api(first, tokens=SealedTokenStore(db))
    await api.prekey_counts()
    assert first.sessions == 1
    # A new process (a new client on the same home): no challenge, the stored token goes out.
    second = FakeRelay(_keys(), _counts_after())
    again, _ = _api(second, tokens=SealedTokenStore(db))
    await again.prekey_counts()
    assert second.seen == [("GET", "/v1/prekeys", "tls1_token1")]
    db.close()
    # A bearer credential: sealed in state.db, nowhere in plain text in the home.
    for path in (tmp_path / "home").iterdir():
        assert b"tls1_token1" not in path.read_bytes(), path.name
    assert (tmp_path / "home" / DB_FILE).exists()


async def test_a_refused_stored_token_is_dropped_and_the_new_one_kept(tmp_path: Path) -> None:
    db = _home_db(tmp_path)
    tokens = SealedTokenStore(db)
    keys = _keys()
    tokens.save(URL, _stored(keys, "tls1_old", renew_at_ms=NOW_MS + 9))
    relay = FakeRelay(keys, _counts_after(_problem(ErrorCode.TOKEN_REVOKED, 401)))
    api, _ = _api(relay, tokens=tokens)
    assert await api.prekey_counts() == COUNTS
    assert [token for _, path, token in relay.seen if path == "/v1/prekeys"] == ["tls1_old", "tls1_token1"]
    stored = tokens.load(URL, keys.device_id)
    assert stored is not None
    assert stored.token == "tls1_token1"
    api.forget_token()
    assert tokens.load(URL, keys.device_id) is None


async def test_a_stored_token_due_for_renewal_or_of_another_device_is_not_used(tmp_path: Path) -> None:
    db = _home_db(tmp_path)
    tokens = SealedTokenStore(db)
    keys = _keys()
    tokens.save(URL, _stored(keys, "tls1_old", renew_at_ms=NOW_MS))
    relay = FakeRelay(keys, _counts_after())
    api, _ = _api(relay, tokens=tokens)
    await api.prekey_counts()
    assert relay.sessions == 1
    assert tokens.load(URL, _keys("bob").device_id) is None
    assert tokens.load("http://other.test", keys.device_id) is None


# -- retries and backoff ------------------------------------------------------------------------------------------


async def test_unavailable_is_retried_after_the_relays_retry_after() -> None:
    relay = FakeRelay(_keys(), _counts_after(_problem(ErrorCode.UNAVAILABLE, 503, retry_after_seconds=7)))
    api, sleeps = _api(relay)
    assert await api.prekey_counts() == COUNTS
    assert sleeps.seconds == [7.0]


async def test_retry_after_header_counts_when_the_problem_has_none_and_is_capped() -> None:
    limited = _problem(ErrorCode.RATE_LIMITED, 429)
    header = Response(limited.status, [*limited.headers, ("retry-after", "3")], limited.body)
    long = _problem(ErrorCode.UNAVAILABLE, 503, retry_after_seconds=86_400)
    relay = FakeRelay(_keys(), _counts_after(header, long))
    api, sleeps = _api(relay)
    assert await api.prekey_counts() == COUNTS
    assert sleeps.seconds == [3.0, 60.0]


async def test_retries_stop_after_max_attempts() -> None:
    relay = FakeRelay(_keys(), lambda *_: _problem(ErrorCode.UNAVAILABLE, 503))
    api, sleeps = _api(relay, attempts=3)
    with pytest.raises(RemoteError) as info:
        await api.prekey_counts()
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert _routes(relay).count("/v1/prekeys") == 3
    assert len(sleeps.seconds) == 2
    assert all(0 <= s <= RetryPolicy().max_backoff_seconds for s in sleeps.seconds)


@pytest.mark.parametrize(
    ("code", "status"), [(ErrorCode.INVALID_FIELD, 422), (ErrorCode.FORBIDDEN, 403), (ErrorCode.INTERNAL, 500)]
)
async def test_an_error_that_is_not_retry_later_is_raised_at_once(code: ErrorCode, status: int) -> None:
    relay = FakeRelay(_keys(), lambda *_: _problem(code, status))
    api, sleeps = _api(relay)
    with pytest.raises(RemoteError) as info:
        await api.inbox_page(0)
    assert info.value.code is code
    assert _routes(relay).count("/v1/inbox?after=0") == 1
    assert sleeps.seconds == []


async def test_a_claim_is_not_repeated_when_it_may_have_reached_the_relay() -> None:
    relay = FakeRelay(_keys(), lambda *_: ConnectionLostError("lost after sending"))
    api, _ = _api(relay)
    with pytest.raises(ConnectionLostError):
        await api.claim_prekeys(["a"])
    assert _routes(relay).count("/v1/prekeys/claim") == 1
    # An idempotent read is repeated after the same error.
    with pytest.raises(ConnectionLostError):
        await api.inbox_page(0)
    assert _routes(relay).count("/v1/inbox?after=0") == 5


async def test_nothing_listening_is_raised_at_once() -> None:
    relay = FakeRelay(_keys(), lambda *_: ConnectError("connection refused by relay.test"))
    api, sleeps = _api(relay)
    with pytest.raises(ConnectError):
        await api.well_known()
    assert len(relay.seen) == 1
    assert sleeps.seconds == []


# -- answers a malicious relay (or proxy) shapes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (Response(200, [("content-type", "text/html")], b"<html>hi</html>"), ErrorCode.UNSUPPORTED_MEDIA_TYPE),
        (_ok(COUNTS), ErrorCode.INVALID_FIELD),  # a body of another route's shape
        (Response(200, [("content-type", codec.MSGPACK)], b"\xc1garbage"), ErrorCode.MALFORMED_BODY),
        (Response(200, [("content-type", codec.JSON)], b'{"envelopes": "no"}'), ErrorCode.INVALID_FIELD),
    ],
)
async def test_a_2xx_of_another_type_or_shape_is_a_clear_error(answer: Response, code: ErrorCode) -> None:
    relay = FakeRelay(_keys(), lambda *_: answer)
    api, _ = _api(relay)
    with pytest.raises(TetherlessError) as info:
        await api.inbox_page(0)
    assert info.value.code is code
    assert "GET /v1/inbox" in info.value.detail
    assert not isinstance(info.value, RemoteError)  # found here, not said by the relay


async def test_a_session_for_another_device_is_refused() -> None:
    relay = FakeRelay(_keys())
    relay.session_device = _keys("bob").device_id
    api, _ = _api(relay)
    with pytest.raises(TetherlessError) as info:
        await api.prekey_counts()
    assert info.value.code is ErrorCode.INVALID_FIELD
    assert "/v1/prekeys" not in _routes(relay)


def test_backoff_is_full_jitter_within_bounds_and_honours_retry_after() -> None:
    policy, rng = RetryPolicy(), random.Random(1)
    delays = [policy.delay(attempt, rng) for attempt in range(1, 40)]
    assert all(0 <= d <= policy.max_backoff_seconds for d in delays)
    assert max(delays[:3]) <= policy.base_seconds * 2**3
    assert policy.delay(1, rng, 2) == 2.0
    assert policy.delay(1, rng, 10_000) == policy.max_retry_after_seconds
