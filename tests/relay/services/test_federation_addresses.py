"""Where federation may connect, and what key discovery may cost (docs/federation.md §1.1, §3).

The service runs against a recording fake transport: every test asserts
what was (not) resolved or requested, so "refused before any connection" is
checked directly. Time is trio's MockClock where caches expire.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nacl.signing
import pytest
import trio
import trio.testing

from protocol import codec, federation
from protocol.errors import ErrorCode, TetherlessError
from protocol.hosts import numeric_host, public_address, split_relay_name
from protocol.messages import WellKnown
from relay.config import Config, ConfigError, load
from relay.relay_keys import RelayKeyring
from relay.services import InboxNotifier, PeerResponse, PeerUnreachableError
from relay.services.accounts import AccountService
from relay.services.context import ServiceContext, limits_from
from relay.services.federation import (
    KEY_FAILURE_CACHE_SECONDS,
    KEY_FETCH_CONCURRENCY,
    FederationService,
    FederationSettings,
)
from relay.store import Store

OWN = "b.example"
NOW = 1_800_000_000


@dataclass
class FakeTransport:
    """Answers from tables; records every lookup and request. ``gate`` holds requests until set."""

    dns: dict[str, list[str]] = field(default_factory=dict)
    documents: dict[str, WellKnown] = field(default_factory=dict)
    resolved: list[str] = field(default_factory=list)
    requests: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    gate: trio.Event | None = None

    async def resolve(self, host: str, port: int, *, timeout_seconds: float) -> list[str]:
        self.resolved.append(host)
        if host not in self.dns:
            raise PeerUnreachableError(f"cannot resolve {host}")
        return self.dns[host]

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
        self.requests.append((base_url, tuple(connect_to)))
        if self.gate is not None:
            await self.gate.wait()
        host = base_url.split("://", 1)[1]
        if host not in self.documents:
            raise PeerUnreachableError("connection refused")
        return PeerResponse(200, [("content-type", codec.MSGPACK)], codec.encode(self.documents[host]))


class NonceStore:
    """The one store call authentication makes (after every check passed)."""

    async def federation_remember_nonce(self, origin: str, nonce: str, forget_at_ms: int) -> bool:
        return True


def document(name: str, key: nacl.signing.SigningKey) -> WellKnown:
    return WellKnown(relay=name, relay_key=bytes(key.verify_key), api_versions=["v1"], limits=limits_from(Config()))


def service(transport: FakeTransport, **settings: Any) -> FederationService:
    ctx = ServiceContext(relay_name=OWN, limits=limits_from(Config()), clock_ms=lambda: NOW * 1000)
    own_key = nacl.signing.SigningKey.generate()
    keyring = RelayKeyring(own_key, ())
    store = cast(Store, NonceStore())
    return FederationService(
        store,
        ctx,
        FederationSettings(mode=settings.pop("mode", "open"), **settings),
        keyring,
        transport,
        InboxNotifier(),
        AccountService(store, ctx),
    )


def signed_headers(origin: str, key: nacl.signing.SigningKey, nonce: int = 0) -> list[tuple[str, str]]:
    return federation.sign_request(
        key,
        method="POST",
        authority=OWN,
        path="/federation/v1/deliver",
        body=b"",
        origin=origin,
        destination=OWN,
        created=NOW,
        nonce=base64.urlsafe_b64encode(nonce.to_bytes(18, "big")).decode(),
    )


async def authenticate(svc: FederationService, headers: list[tuple[str, str]]) -> str:
    return await svc.authenticate(
        method="POST", path="/federation/v1/deliver", authority=OWN, headers=headers, body=b""
    )


async def refused(call: Awaitable[object]) -> str:
    with pytest.raises(TetherlessError) as caught:
        await call
    return caught.value.code.value


# -- pure rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # link-local: cloud metadata
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast (is_global says True)
        ("255.255.255.255", False),
        ("240.0.0.1", False),
        ("192.0.2.1", False),  # documentation
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("ff0e::1", False),  # global-scope multicast
        ("::ffff:127.0.0.1", False),  # IPv4-mapped
        ("::ffff:93.184.216.34", True),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1 (is_global says True)
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
    ],
)
def test_public_address(address: str, public: bool) -> None:
    assert public_address(ipaddress.ip_address(address)) is public


@pytest.mark.parametrize(
    ("host", "numeric"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("127.1", True),
        ("2130706433", True),
        ("0x7f.1", True),
        ("relay.example", False),
        ("localhost", False),
        ("1.example", False),
    ],
)
def test_numeric_host(host: str, numeric: bool) -> None:
    assert numeric_host(host) is numeric


def test_split_relay_name() -> None:
    assert split_relay_name("Relay.Example:8443") == ("relay.example", 8443)
    assert split_relay_name("[::1]:443") == ("::1", 443)
    assert split_relay_name("[::1]") == ("::1", None)
    for bad in ("a b", "relay.example:0", "relay.example:99999", "", "x/y"):
        with pytest.raises(TetherlessError) as caught:
            split_relay_name(bad)
        assert caught.value.code is ErrorCode.INVALID_FIELD


# -- names, before any I/O ------------------------------------------------------------------------------


def test_ip_literal_names_are_refused_in_open_mode_unless_configured() -> None:
    svc = service(FakeTransport(), peers={"10.0.0.7:8080": "http://10.0.0.7:8080"})
    for name in ("127.0.0.1:9", "[::1]:9", "93.184.216.34", "127.1:9", "2130706433"):
        with pytest.raises(TetherlessError) as caught:
            svc.check_peer(name)
        assert caught.value.code is ErrorCode.PEER_ADDRESS_REFUSED, name
    svc.check_peer("10.0.0.7:8080")  # a static peer: the operator chose its URL
    svc.check_peer("relay.example")  # a DNS name: judged when resolved


def test_allowlisted_ip_literals_must_be_public() -> None:
    svc = service(FakeTransport(), mode="allowlist", allow=frozenset({"93.184.216.34", "10.0.0.1"}))
    svc.check_peer("93.184.216.34")
    with pytest.raises(TetherlessError) as caught:
        svc.check_peer("10.0.0.1")
    assert caught.value.code is ErrorCode.PEER_ADDRESS_REFUSED


# -- resolved addresses -------------------------------------------------------------------------------


async def test_names_resolving_to_non_public_addresses_are_refused_before_connecting() -> None:
    transport = FakeTransport(
        dns={
            "loop.example": ["127.0.0.1"],
            "mixed.example": ["93.184.216.34", "10.0.0.1"],  # one private answer is enough
            "metadata.example": ["169.254.169.254"],
            "v6.example": ["::1"],
            "ok.example": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        }
    )
    svc = service(transport)
    for name in ("loop.example", "mixed.example", "metadata.example", "v6.example"):
        assert await refused(svc.endpoint(name)) == "peer_address_refused"
        assert await refused(svc.device_list(name, "a" * 32)) == "peer_address_refused"
    assert transport.requests == []
    assert await svc.endpoint("ok.example") == (
        "https://ok.example",
        ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"),
    )
    # the request goes to the addresses that were checked, not to a second lookup
    assert await refused(svc.device_list("ok.example", "a" * 32)) == "peer_unavailable"
    assert transport.requests == [("https://ok.example", ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"))]


async def test_static_peers_are_not_resolved_or_checked() -> None:
    transport = FakeTransport()
    svc = service(transport, peers={"a.test": "http://127.0.0.1:9"})
    assert await svc.endpoint("a.test") == ("http://127.0.0.1:9", ())
    assert transport.resolved == []


async def test_unsigned_or_forged_requests_naming_internal_origins_cause_no_request() -> None:
    key = nacl.signing.SigningKey.generate()
    transport = FakeTransport(dns={"localhost": ["127.0.0.1", "::1"]})
    svc = service(transport)
    assert await refused(authenticate(svc, [("tetherless-origin", "127.0.0.1:9")])) == "signature_missing"
    assert await refused(authenticate(svc, signed_headers("127.0.0.1:9", key))) == "peer_address_refused"
    assert await refused(authenticate(svc, signed_headers("localhost:9", key))) == "peer_address_refused"
    assert await refused(authenticate(svc, signed_headers("bad origin", key))) == "bad_signature"
    assert transport.requests == []


# -- key discovery: caps, failure cache, pins ---------------------------------------------------------------


def run_with_clock(fn: Callable[[trio.testing.MockClock], Awaitable[None]]) -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(fn, clock, clock=clock)


def test_one_fetch_per_origin_at_a_time_and_failures_are_cached() -> None:
    async def main(clock: trio.testing.MockClock) -> None:
        key = nacl.signing.SigningKey.generate()
        transport = FakeTransport(dns={"down.example": ["93.184.216.34"]}, gate=trio.Event())
        svc = service(transport)
        codes: list[str] = []

        async def one(nonce: int) -> None:
            codes.append(await refused(authenticate(svc, signed_headers("down.example", key, nonce))))

        async with trio.open_nursery() as nursery:
            for nonce in range(5):
                nursery.start_soon(one, nonce)
            await trio.testing.wait_all_tasks_blocked()
            assert len(transport.requests) == 1  # the other four wait for the fetch in flight
            transport.gate.set()
        assert codes == ["peer_unavailable"] * 5
        assert transport.requests == [("https://down.example", ("93.184.216.34",))]  # the checked address
        await refused(authenticate(svc, signed_headers("down.example", key, 9)))
        assert len(transport.requests) == 1, "a failure is answered from memory"
        clock.jump(KEY_FAILURE_CACHE_SECONDS + 1)
        await refused(authenticate(svc, signed_headers("down.example", key, 10)))
        assert len(transport.requests) == 2, "and fetched again once it expired"

    run_with_clock(main)


def test_concurrent_key_fetches_are_capped() -> None:
    async def main(clock: trio.testing.MockClock) -> None:
        key = nacl.signing.SigningKey.generate()
        names = [f"r{i}.example" for i in range(KEY_FETCH_CONCURRENCY + 1)]
        transport = FakeTransport(dns={name: ["93.184.216.34"] for name in names}, gate=trio.Event())
        svc = service(transport)
        async with trio.open_nursery() as nursery:
            for name in names[:-1]:
                nursery.start_soon(refused, authenticate(svc, signed_headers(name, key)))
            await trio.testing.wait_all_tasks_blocked()
            try:
                assert len(transport.requests) == KEY_FETCH_CONCURRENCY
                errors: list[TetherlessError] = []
                with trio.move_on_after(60):  # without the cap this call would wait for the gate
                    try:
                        await authenticate(svc, signed_headers(names[-1], key))
                    except TetherlessError as exc:
                        errors.append(exc)
                assert [(e.code, e.retry_after_seconds) for e in errors] == [(ErrorCode.PEER_UNAVAILABLE, 1)]
                assert len(transport.requests) == KEY_FETCH_CONCURRENCY
            finally:
                transport.gate.set()

    run_with_clock(main)


async def test_pinned_keys() -> None:
    current, other = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    transport = FakeTransport(documents={"127.0.0.1:9": document("a.test", current)})
    pinned = federation.relay_key_id(bytes(current.verify_key))
    svc = service(transport, peers={"a.test": "http://127.0.0.1:9"}, pinned_keys={"a.test": frozenset({pinned})})
    assert await refused(authenticate(svc, signed_headers("a.test", other))) == "unknown_relay_key"
    assert transport.requests == [], "a key that is not pinned is refused before anything is fetched"
    assert await authenticate(svc, signed_headers("a.test", current, 1)) == "a.test"
    assert len(transport.requests) == 1


# -- configuration of pins ----------------------------------------------------------------------------------


def test_peer_keys_setting(tmp_path: Path) -> None:
    ids = "abcdefghijklmnop", "qrstuvwxyz234567"
    env = {"TETHERLESS_PEERS": "a.test=http://127.0.0.1:9", "TETHERLESS_PEER_KEYS": f"a.test={ids[0]} {ids[1]}"}
    settings = FederationSettings.from_config(load(env=env)[0])
    assert settings.pinned_keys == {"a.test": frozenset(ids)}
    toml = tmp_path / "relay.toml"
    toml.write_text(f'[peers]\n"a.test" = "http://127.0.0.1:9"\n[peer_keys]\n"a.test" = ["{ids[0]}"]\n')
    assert FederationSettings.from_config(load(env={}, file=str(toml))[0]).pinned_keys == {"a.test": frozenset(ids[:1])}
    for bad in ("c.test=abcdefghijklmnop", "a.test=", "a.test=short", "a.test=ABCDEFGHIJKLMNOP"):
        with pytest.raises(ConfigError, match="peer_keys"):
            load(env=env | {"TETHERLESS_PEER_KEYS": bad})
