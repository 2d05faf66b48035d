"""A revoked token is refused by every replica at once, not after the session cache expires.

Two real relay processes on one PostgreSQL database, each with a 120 s session cache
(``TETHERLESS_SESSION_CACHE_SECONDS``) so that only the revocation notice can make a replica refuse a
token it has cached within the 30 s the tests wait (docs/decisions/0013-revocation-across-replicas.md):

- a token cached by both replicas and revoked through A (logout of the token, of all the device's
  tokens, or a device-list version removing the device) is refused by B;
- a replica whose revocation listener is cut off (its backend terminated, reconnection refused) drops
  its cache and reads every session from the database until the listener is back, then caches again.

Sessions revoked straight in the database send no notice: they show whether a replica answers from its
cache (it accepts such a token) or from the database (it refuses it).
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.e2e.http11 import Http11, login, register
from tests.e2e.offline_client import NO_RATE_LIMITS, wait_until
from tests.e2e.test_device_lists import Account, Device, add, remove
from tests.relay.store.postgres_db import fresh_database, server_url
from tests.relay_process import RelayProcess

RELAY_NAME = "revocation.test"
CACHE_SECONDS = 120  # far beyond WAIT_SECONDS: a refusal within the wait cannot be the entry expiring
WAIT_SECONDS = 30.0  # a timeout for a slow machine, not a threshold
LISTENER = "tetherless tetherless_revocations"  # the listener's application_name (relay/store/postgres.py)


@dataclass
class Pair:
    a: RelayProcess
    b: RelayProcess
    database: str


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    """Two replicas of one relay (same name and key) on a fresh database, with 120 s session caches."""
    with fresh_database("tl_e2e") as url:
        env = {"TETHERLESS_SESSION_CACHE_SECONDS": str(CACHE_SECONDS), **NO_RATE_LIMITS}
        args = ["--database", url, "--name", RELAY_NAME]
        a = RelayProcess(tmp_path / "replica-a", extra_args=args, env=env)
        b = RelayProcess(tmp_path / "replica-b", extra_args=args, env=env)
        try:
            a.start()
            (tmp_path / "replica-b").mkdir(mode=0o700)
            shutil.copy2(a.data_dir / "relay.key", b.data_dir / "relay.key")
            b.start()
            yield Pair(a, b, url)
        finally:
            assert b.stop() == 0
            assert a.stop() == 0


def status(http: Http11, token: str) -> tuple[int, str]:
    """(status, problem code or "") of an authenticated request."""
    answer = http.get("/v1/inbox", token=token)
    return answer.status, answer.code if answer.status != 200 else ""


def refusal(http: Http11, token: str) -> tuple[int, str]:
    """The first refusal of ``token`` (polled); fails after WAIT_SECONDS of acceptance."""
    answer = (200, "")

    def refused() -> bool:
        nonlocal answer
        answer = status(http, token)
        return answer != (200, "")

    wait_until(refused, WAIT_SECONDS, "a refusal", interval=0.05)
    return answer


def revoke_in_database(url: str, token: str) -> None:
    """Revoke a session behind the relays' backs: no notice is sent."""
    with psycopg.connect(url, autocommit=True) as conn:
        revoke_on(conn, token)


def revoke_on(conn: psycopg.Connection[tuple[object, ...]], token: str) -> None:
    digest = hashlib.sha256(token.encode()).digest()
    assert conn.execute("UPDATE sessions SET revoked_at_ms = 1 WHERE token_hash = %s", (digest,)).rowcount == 1


def listener_up(http: Http11) -> float:
    text = http.get("/metrics").body.decode()
    match = re.search(r"^relay_revocation_listener_up (\S+)$", text, re.MULTILINE)
    assert match, "relay_revocation_listener_up missing from /metrics"
    return float(match.group(1))


def wait_for_listener(http: Http11, up: float) -> None:
    wait_until(lambda: listener_up(http) == up, WAIT_SECONDS, f"relay_revocation_listener_up {up}", interval=0.05)


@pytest.mark.parametrize("how", ["logout", "logout-all", "device-removed"])
def test_a_token_revoked_through_one_replica_is_refused_by_the_other(pair: Pair, how: str) -> None:
    a, b = Http11(pair.a.url), Http11(pair.b.url)
    account = Account(a, RELAY_NAME)
    lost = Device()
    account.accept(add(account, lost, account.first))
    thief, keeper = lost.peer(account.id, RELAY_NAME), account.first.peer(account.id, RELAY_NAME)
    login(a, thief)
    login(a, keeper)
    for http in (a, b):  # both replicas cache both tokens
        for peer in (thief, keeper):
            assert status(http, peer.token) == (200, "")

    if how == "device-removed":
        account.accept(remove(account, lost, account.first))
        want = (401, "device_revoked")
    else:
        answer = a.msgpack("DELETE", "/v1/auth/session", {"all_sessions": how == "logout-all"}, thief.token)
        assert answer.status == 200, answer.body
        want = (401, "token_revoked")
    assert status(a, thief.token) == want
    assert refusal(b, thief.token) == want

    # B still answers from its cache (a session revoked without a notice is accepted): the refusal above
    # came from the notice, not from a cache that was off or had expired.
    revoke_in_database(pair.database, keeper.token)
    assert status(b, keeper.token) == (200, "")


def test_a_replica_that_lost_its_listener_reads_every_session(pair: Pair) -> None:
    a, b = Http11(pair.a.url), Http11(pair.b.url)
    peer = register(a, "listener")
    first, second = login(a, peer), login(a, peer)
    for token in (first, second):
        assert status(b, token) == (200, "")
    assert listener_up(b) == 1.0
    revoke_in_database(pair.database, first)
    assert status(b, first) == (200, "")  # cached, and no notice: B cannot know yet

    # Connected before the database refuses new connections: one to revoke sessions, one (to the server's
    # own database) to refuse them and cut the listeners off.
    with (
        psycopg.connect(pair.database, autocommit=True) as db,
        psycopg.connect(server_url(), autocommit=True) as server,
    ):
        name = pair.database.rsplit("/", 1)[1]
        server.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')  # the listeners cannot come back
        try:
            killed = server.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                (name, LISTENER),
            ).fetchall()
            assert len(killed) == 2  # A's and B's
            wait_for_listener(b, 0.0)
            # Not listening: the cache was dropped, so the revocation B never heard of is refused at once ...
            assert status(b, first) == (401, "token_revoked")
            # ... and nothing is cached: a session revoked now is refused at its next request.
            assert status(b, second) == (200, "")
            revoke_on(db, second)
            assert status(b, second) == (401, "token_revoked")
        finally:
            server.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

    wait_for_listener(b, 1.0)
    third = login(a, peer)
    assert status(b, third) == (200, "")
    revoke_in_database(pair.database, third)
    assert status(b, third) == (200, "")  # listening again: B answers from its cache again
