"""Federation outbox rows that can never be delivered end as failed, with their reason (issue 14 point 3).

A destination whose name does not exist (``EAI_NONAME`` / ``EAI_NODATA``) or a peer that refuses for good
(``peer_forbidden``, ``wrong_destination``, no federation endpoint, one envelope ``rejected``) fails those rows:
not sent again, not counted as queued, shown with the reason where ``admin federation`` reads the outbox
state, counted under ``relay_federation_envelopes_total{outcome="failed"|"rejected"}``. A lookup that failed
for now (``EAI_AGAIN``), a refused connection or a 503 stay a peer failure, retried with backoff.
``admin federation retry`` makes failed rows queued again. The delivery worker runs its real code against a real
store (SQLite and PostgreSQL) and the real outbound client with trio's hostname-resolver hook answering each name
(the stub of tests/relay/services/test_unknown_relay.py), or a scripted peer for the answers.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import msgspec
import nacl.signing
import pytest
import trio

from protocol import codec
from protocol.errors import STATUS, ErrorCode, Problem
from protocol.messages import DeliverRequest, DeliverResponse, DeliveryResult
from relay import metrics
from relay.config import Config
from relay.relay_keys import RelayKeyring
from relay.services import PeerResponse
from relay.services.accounts import AccountService
from relay.services.context import ServiceContext, limits_from
from relay.services.federation import FederationService, FederationSettings, PeerTransport
from relay.services.inbox import InboxNotifier
from relay.store import PeerState, Store
from relay.transport.outbound import OutboundClient
from tests.relay.services.test_unknown_relay import FLAKY, MISSING, NO_SUCH_NAME_CODES, StubResolver
from tests.relay.store import test_store_contract as contract
from tests.relay.store.test_store_contract import FOREVER, MAX_INBOX, Backend, device, envelope, open_store

backend = contract.backend  # every test runs on SQLite and PostgreSQL

OWN = "b.example"
NOW_MS = 1_800_000_000_000
PEER = "peer.example"


def failed_count(outcome: str = "failed") -> float:
    labels = {"peer": "other", "direction": "out", "outcome": outcome}
    return metrics.REGISTRY.get_sample_value("relay_federation_envelopes_total", labels) or 0.0


def federation(store: Store, transport: PeerTransport, **settings: object) -> FederationService:
    ctx = ServiceContext(relay_name=OWN, limits=limits_from(Config()), clock_ms=lambda: NOW_MS)
    return FederationService(
        store,
        ctx,
        FederationSettings(mode="open", **settings),  # type: ignore[arg-type]
        RelayKeyring(nacl.signing.SigningKey.generate(), ()),
        transport,
        InboxNotifier(),
        AccountService(store, ctx),
    )


async def queue(store: Store, relay: str, count: int) -> None:
    """``count`` envelopes for a device on ``relay``, in its federation outbox (as a local send writes them)."""
    target = device(9, "r" * 32)
    items = [msgspec.structs.replace(envelope(target, os.urandom(8)), remote_relay=relay) for _ in range(count)]
    await store.store_envelopes("sender", items, NOW_MS, MAX_INBOX, FOREVER)


async def state_of(store: Store, relay: str) -> PeerState:
    (state,) = [s for s in await store.federation_peer_states() if s.peer == relay]
    return state


@pytest.mark.parametrize("errno", NO_SUCH_NAME_CODES)
async def test_a_name_that_does_not_exist_fails_its_rows_for_good(backend: Backend, tmp_path: Path, errno: int) -> None:
    resolver = StubResolver({MISSING: errno, FLAKY: socket.EAI_AGAIN})
    trio.socket.set_custom_hostname_resolver(resolver)
    async with open_store(backend, tmp_path) as store:
        svc = federation(store, OutboundClient(), batch_envelopes=2)  # three rows: two batches
        await queue(store, MISSING, 3)
        before = failed_count()
        await svc._drain_peer(MISSING)
        state = await state_of(store, MISSING)
        assert (state.queued, state.failed, state.failures, state.next_attempt_at_ms) == (0, 3, 0, 0)
        assert state.last_error.startswith(f"unknown_relay: {MISSING} does not resolve")
        assert failed_count() == before + 3
        assert resolver.asked == [MISSING, MISSING]  # one lookup per batch, then nothing is left to send
        assert await store.federation_outbox_batch(MISSING, NOW_MS, 10) == []
        assert all(s.peer != MISSING for s in await store.federation_due_peers(NOW_MS))  # never scheduled again

        # the operator fixes the name (or not): retry makes the rows queued again, and they are tried once more
        assert await store.federation_retry_now(MISSING) == 1
        assert (await state_of(store, MISSING)).queued == 3
        await svc._drain_peer(MISSING)
        assert ((await state_of(store, MISSING)).failed, failed_count()) == (3, before + 6)
        assert (await store.expire(FOREVER + 1)).federation >= 3  # failed rows still expire with their TTL


async def test_a_lookup_that_failed_for_now_is_retried_with_backoff(backend: Backend, tmp_path: Path) -> None:
    trio.socket.set_custom_hostname_resolver(StubResolver({FLAKY: socket.EAI_AGAIN}))
    async with open_store(backend, tmp_path) as store:
        svc = federation(store, OutboundClient())
        await queue(store, FLAKY, 2)
        await svc._drain_peer(FLAKY)
        state = await state_of(store, FLAKY)
        assert (state.queued, state.failed, state.failures) == (2, 0, 1)
        assert state.next_attempt_at_ms > NOW_MS  # backoff
        assert len(await store.federation_outbox_batch(FLAKY, NOW_MS, 10)) == 2  # still there to send


async def test_a_refused_connection_is_retried_with_backoff(backend: Backend, tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nobody listens on (bound, never listening: connections are refused)
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        async with open_store(backend, tmp_path) as store:
            svc = federation(store, OutboundClient(), peers={PEER: url})
            await queue(store, PEER, 1)
            await svc._drain_peer(PEER)
            state = await state_of(store, PEER)
            assert (state.queued, state.failed, state.failures) == (1, 0, 1)
            assert state.last_error.startswith("unreachable: ")


@dataclasses.dataclass
class ScriptedPeer:
    """A peer at a public address that answers every delivery with ``answer(request)``."""

    answer: object
    delivered: list[DeliverRequest] = dataclasses.field(default_factory=list)

    async def resolve(self, host: str, port: int, *, timeout_seconds: float) -> list[str]:
        return ["93.184.216.34"]

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
        request = codec.decode(body, DeliverRequest, codec.MSGPACK)
        self.delivered.append(request)
        assert callable(self.answer)
        response: PeerResponse = self.answer(request)
        return response


def problem(code: ErrorCode, detail: str) -> PeerResponse:
    body = Problem(type="about:blank", title=code.value, status=STATUS[code], code=code.value, detail=detail)
    return PeerResponse(STATUS[code], [("content-type", "application/problem+json")], codec.encode(body, codec.JSON))


@pytest.mark.parametrize(
    ("answer", "permanent", "reason"),
    [
        (problem(ErrorCode.PEER_FORBIDDEN, "not\nfederating"), True, "HTTP 403 (peer_forbidden: not federating)"),
        (problem(ErrorCode.WRONG_DESTINATION, "I am c.example"), True, "HTTP 421 (wrong_destination: I am c.example)"),
        (PeerResponse(404, [("content-type", "text/html")], b"<h1>Not Found</h1>"), True, "HTTP 404 (no problem"),
        (problem(ErrorCode.UNAVAILABLE, "draining"), False, "HTTP 503 (unavailable)"),
        (problem(ErrorCode.SIGNATURE_EXPIRED, "clock"), False, "HTTP 401 (signature_expired)"),
        (PeerResponse(502, [], b"bad gateway"), False, "HTTP 502 (no problem document)"),
    ],
)
async def test_only_a_refusal_that_will_not_change_fails_the_rows(
    backend: Backend, tmp_path: Path, answer: PeerResponse, permanent: bool, reason: str
) -> None:
    async with open_store(backend, tmp_path) as store:
        peer = ScriptedPeer(lambda request: answer)
        svc = federation(store, peer)
        await queue(store, PEER, 2)
        before = failed_count()
        await svc._drain_peer(PEER)
        state = await state_of(store, PEER)
        assert state.last_error.startswith(reason), state.last_error
        assert "\n" not in state.last_error  # the peer's words, printable
        if permanent:
            assert (state.queued, state.failed, state.failures, failed_count()) == (0, 2, 0, before + 2)
            assert len(peer.delivered) == 1  # one request refused; nothing left to send
        else:
            assert (state.queued, state.failed, state.failures, failed_count()) == (2, 0, 1, before)


async def test_a_rejected_envelope_fails_alone_and_the_others_are_delivered(backend: Backend, tmp_path: Path) -> None:
    def answer(request: DeliverRequest) -> PeerResponse:
        first, second = request.envelopes
        results = [
            DeliveryResult(id=first.id, outcome="rejected", code="recipient_revoked"),
            DeliveryResult(id=second.id, outcome="stored"),
        ]
        return PeerResponse(200, [("content-type", codec.MSGPACK)], codec.encode(DeliverResponse(results=results)))

    async with open_store(backend, tmp_path) as store:
        svc = federation(store, ScriptedPeer(answer))
        await queue(store, PEER, 2)
        before = failed_count("rejected")
        await svc._drain_peer(PEER)
        state = await state_of(store, PEER)
        assert (state.queued, state.failed, state.delivered, state.failures) == (0, 1, 1, 0)
        assert state.last_error == f"rejected by {PEER}: recipient_revoked"
        assert failed_count("rejected") == before + 1
