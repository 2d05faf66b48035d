"""A relay name that does not exist is ``unknown_relay`` (404), not ``peer_unavailable`` (issue 14 point 3).

The real :class:`~relay.transport.outbound.OutboundClient` runs against trio's custom hostname resolver (the
hook trio has for this), which answers each name with a chosen ``socket.gaierror``. A definite "no such name"
(``EAI_NONAME``, ``EAI_NODATA``) must be told apart from a lookup that failed for now (``EAI_AGAIN``,
``EAI_FAIL``, a timeout) all the way to the code a client gets and the metric of the attempt; a configured
peer (``peers``) keeps ``peer_unavailable`` whatever its URL's lookup says.
"""

from __future__ import annotations

import socket
from typing import Any

import nacl.signing
import pytest
import trio
import trio.testing

from protocol.errors import STATUS, ErrorCode, TetherlessError
from protocol.messages import ClaimPrekeysResponse
from relay import metrics
from relay.services import PeerNameNotFoundError, PeerUnreachableError
from relay.services.federation import FederationService
from relay.transport.outbound import NO_SUCH_NAME, OutboundClient
from tests.relay.services.test_federation_addresses import (
    FakeTransport,
    authenticate,
    run_with_clock,
    service,
    signed_headers,
)

MISSING = "no-such-relay.example"
FLAKY = "dns-down.example"
SLOW = "slow-dns.example"
ACCOUNT = "a" * 32


class StubResolver(trio.abc.HostnameResolver):
    """Names → the ``gaierror`` errno they fail with; ``SLOW`` never answers; any other name has a public
    address. Records what it was asked."""

    def __init__(self, errors: dict[str, int]) -> None:
        self.errors = errors
        self.asked: list[str] = []

    async def getaddrinfo(
        self, host: bytes | None, port: bytes | str | int | None, family: int = 0, type: int = 0, *args: Any
    ) -> list[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[str, int]]]:
        name = (host or b"").decode("ascii")
        self.asked.append(name)
        if name == SLOW:
            await trio.sleep_forever()
        if name in self.errors:
            raise socket.gaierror(self.errors[name], f"stub answer {self.errors[name]}")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", int(port or 0)))]

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int) -> tuple[str, str]:
        # trio's HostnameResolver requires it; the relay's outbound resolver never calls it: fail loudly if it does.
        raise AssertionError("the relay does not reverse-resolve peer addresses")


NO_SUCH_NAME_CODES = [socket.EAI_NONAME, *([socket.EAI_NODATA] if hasattr(socket, "EAI_NODATA") else [])]
FOR_NOW_CODES = [socket.EAI_AGAIN, socket.EAI_FAIL]


def outcome(kind: str, outcome: str) -> float:
    labels = {"peer": "other", "direction": "out", "kind": kind, "outcome": outcome}
    return metrics.REGISTRY.get_sample_value("relay_federation_requests_total", labels) or 0.0


async def code_of(call: Any) -> TetherlessError:
    with pytest.raises(TetherlessError) as caught:
        await call
    return caught.value


def test_the_codes_that_mean_no_such_name() -> None:
    assert set(NO_SUCH_NAME) == set(NO_SUCH_NAME_CODES)
    assert not set(NO_SUCH_NAME) & set(FOR_NOW_CODES)


@pytest.mark.parametrize("errno", NO_SUCH_NAME_CODES)
async def test_resolve_says_the_name_does_not_exist(errno: int) -> None:
    resolver = StubResolver({MISSING: errno})
    trio.socket.set_custom_hostname_resolver(resolver)
    with pytest.raises(PeerNameNotFoundError, match=MISSING):
        await OutboundClient().resolve(MISSING, 443, timeout_seconds=10)
    assert resolver.asked == [MISSING]


@pytest.mark.parametrize("errno", FOR_NOW_CODES)
async def test_resolve_failing_for_now_is_only_unreachable(errno: int) -> None:
    trio.socket.set_custom_hostname_resolver(StubResolver({FLAKY: errno}))
    with pytest.raises(PeerUnreachableError) as caught:
        await OutboundClient().resolve(FLAKY, 443, timeout_seconds=10)
    assert not isinstance(caught.value, PeerNameNotFoundError)


def test_a_lookup_that_does_not_answer_in_time_is_only_unreachable() -> None:
    async def main(clock: trio.testing.MockClock) -> None:
        trio.socket.set_custom_hostname_resolver(StubResolver({}))
        with pytest.raises(PeerUnreachableError, match="within 10") as caught:
            await OutboundClient().resolve(SLOW, 443, timeout_seconds=10)
        assert not isinstance(caught.value, PeerNameNotFoundError)

    run_with_clock(main)


def federation(errno_missing: int = socket.EAI_NONAME, **settings: Any) -> tuple[FederationService, StubResolver]:
    resolver = StubResolver({MISSING: errno_missing, FLAKY: socket.EAI_AGAIN})
    trio.socket.set_custom_hostname_resolver(resolver)
    return service(OutboundClient(), **settings), resolver  # type: ignore[arg-type]


async def test_a_client_is_told_unknown_relay_for_a_name_that_does_not_exist() -> None:
    svc, resolver = federation()
    before = outcome("device_list", "unresolved"), outcome("prekey_claim", "unresolved")
    error = await code_of(svc.device_list(MISSING, ACCOUNT))
    assert (error.code, error.status, STATUS[ErrorCode.UNKNOWN_RELAY]) == (ErrorCode.UNKNOWN_RELAY, 404, 404)
    assert MISSING in error.detail
    error = await code_of(svc.call_peer(MISSING, "/prekeys/claim", {}, ClaimPrekeysResponse, "prekey_claim"))
    assert error.code is ErrorCode.UNKNOWN_RELAY
    assert (outcome("device_list", "unresolved"), outcome("prekey_claim", "unresolved")) == (
        before[0] + 1,
        before[1] + 1,
    )
    assert resolver.asked == [MISSING, MISSING]  # looked up each time: DNS may change


async def test_a_lookup_that_failed_for_now_stays_peer_unavailable() -> None:
    svc, _ = federation()
    before = outcome("device_list", "unreachable")
    error = await code_of(svc.device_list(FLAKY, ACCOUNT))
    assert (error.code, error.status) == (ErrorCode.PEER_UNAVAILABLE, 502)
    assert outcome("device_list", "unreachable") == before + 1
    error = await code_of(svc.call_peer(FLAKY, "/prekeys/claim", {}, ClaimPrekeysResponse, "prekey_claim"))
    assert error.code is ErrorCode.PEER_UNAVAILABLE


async def test_a_configured_peer_whose_url_does_not_resolve_stays_peer_unavailable() -> None:
    """The operator chose the URL of a static peer: a miss there is the operator's to fix, not a wrong name."""
    svc, resolver = federation(mode="allowlist", allow=frozenset({"a.test"}), peers={"a.test": f"http://{MISSING}:9"})
    error = await code_of(svc.device_list("a.test", ACCOUNT))
    assert error.code is ErrorCode.PEER_UNAVAILABLE
    assert resolver.asked == [MISSING]  # the transport's own lookup of the URL's host
    # in allowlist mode a name that is not allowed is refused before any lookup
    assert (await code_of(svc.device_list(MISSING, ACCOUNT))).code is ErrorCode.PEER_FORBIDDEN
    assert resolver.asked == [MISSING]


async def test_key_discovery_for_an_origin_that_does_not_exist_stays_peer_unavailable() -> None:
    """A relay signing as an origin whose name does not resolve gets peer_unavailable (as before); the
    metric says why."""
    svc, resolver = federation()
    before = outcome("keys", "unresolved")
    key = nacl.signing.SigningKey.generate()
    error = await code_of(authenticate(svc, signed_headers(MISSING, key)))
    assert error.code is ErrorCode.PEER_UNAVAILABLE
    assert outcome("keys", "unresolved") == before + 1
    assert resolver.asked == [MISSING]


async def test_a_name_with_no_address_is_unknown_relay() -> None:
    """A resolver that answers with no address at all (getaddrinfo does not; another transport might)."""
    svc = service(FakeTransport(dns={"empty.example": []}))
    assert (await code_of(svc.device_list("empty.example", ACCOUNT))).code is ErrorCode.UNKNOWN_RELAY
