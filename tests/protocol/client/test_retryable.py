"""The client's exception tree and its ``retryable`` flag (docs/cli.md "Errors"), and the one decision the sync
engine makes from it: retry with backoff (``RetryError``) or stop (the error as it is). No processes: the relay
calls are replaced by coroutines that raise."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from protocol.client.api import RelayApi
from protocol.client.engine.base import guarded
from protocol.client.http import (
    ConnectError,
    ConnectionLostError,
    NotTLSError,
    RequestTimeoutError,
    TLSRequiredError,
    TLSTrustError,
    TransportError,
)
from protocol.client.sync import RetryError, RevokedError, SyncEngine, SyncOutcome
from protocol.errors import ErrorCode, RemoteError, TetherlessError, UnknownRemoteError
from tests.support.engines import offline_engine

ACCOUNT = "a" * 32
ClientError = TransportError | TetherlessError | UnknownRemoteError  # the roots of the tree (docs/cli.md "Errors")

TLS_SETUP: list[ClientError] = [
    TLSTrustError("the TLS certificate of r:1 is not trusted", host="r"),
    NotTLSError("r:1 does not speak TLS on that port"),
    TLSRequiredError("r:1 speaks TLS on that port: use https://r:1"),
]
RETRYABLE: list[ClientError] = [
    ConnectError("refused"),
    ConnectionLostError("GOAWAY"),
    RequestTimeoutError("no answer"),
    RemoteError(ErrorCode.UNAVAILABLE, "draining", http_status=503),
    RemoteError(ErrorCode.RATE_LIMITED, "slow down", http_status=429, retry_after_seconds=7),
    RemoteError(ErrorCode.INTERNAL, "", http_status=500),
    RemoteError(ErrorCode.PEER_UNAVAILABLE, "", http_status=502),  # any 5xx
    UnknownRemoteError(502, b"<html>bad gateway</html>"),
    UnknownRemoteError(429, b""),
]
PERMANENT: list[ClientError] = [
    *TLS_SETUP,
    RemoteError(ErrorCode.NOT_FOUND, "no such", http_status=404),
    RemoteError(ErrorCode.INVALID_FIELD, "bad", http_status=422),
    UnknownRemoteError(404, b"not found"),
    TetherlessError(ErrorCode.LOG_REKEY_REQUIRED, "local"),
]


def engine(tmp_path: Path) -> SyncEngine:
    # Run only with RelayApi.token replaced: its relay URL leads nowhere, and no connection is opened.
    return offline_engine(tmp_path, ACCOUNT)


def raising(exc: BaseException) -> Callable[..., Any]:
    async def fail(*_: object, **__: object) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize("exc", RETRYABLE, ids=repr)
def test_retryable_errors_are_retried_by_the_engine(exc: ClientError, tmp_path: Path) -> None:
    assert exc.retryable is True
    with pytest.raises(RetryError) as caught:
        trio.run(guarded, raising(exc)())
    assert caught.value.__cause__ is exc
    if isinstance(exc, RemoteError) and exc.retry_after_seconds is not None:
        assert caught.value.retry_after == exc.retry_after_seconds  # the relay's floor reaches the backoff


@pytest.mark.parametrize("exc", PERMANENT, ids=repr)
def test_permanent_errors_are_not_retried(exc: ClientError, tmp_path: Path) -> None:
    assert exc.retryable is False
    with pytest.raises(type(exc)) as caught:
        trio.run(guarded, raising(exc)())
    assert caught.value is exc


def test_device_revoked_stops_for_good(tmp_path: Path) -> None:
    revoked = RemoteError(ErrorCode.DEVICE_REVOKED, "gone", http_status=401)
    assert not revoked.retryable
    with pytest.raises(RevokedError):
        trio.run(guarded, raising(revoked)())


@pytest.mark.parametrize("exc", TLS_SETUP, ids=repr)
def test_run_raises_a_tls_set_up_error_at_once_instead_of_retrying_until_the_timeout(
    exc: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were it retried, ``run`` would back off (the clock jumps) and return HOME_UNREACHABLE after the timeout."""
    monkeypatch.setattr(RelayApi, "token", raising(exc))
    sync = engine(tmp_path)
    with pytest.raises(type(exc)):
        trio.run(lambda: sync.run(follow=False, timeout=3600), clock=trio.testing.MockClock(autojump_threshold=0))
    assert sync.status.attempt == 0


def test_a_transient_failure_until_the_timeout_is_home_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RelayApi, "token", raising(ConnectError("refused")))
    sync = engine(tmp_path)
    outcome = trio.run(lambda: sync.run(follow=False, timeout=3600), clock=trio.testing.MockClock(autojump_threshold=0))
    assert outcome is SyncOutcome.HOME_UNREACHABLE
    assert sync.status.attempt > 1
    assert sync.last_failure == "refused"
