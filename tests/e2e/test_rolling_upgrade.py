"""Rolling upgrades on PostgreSQL (docs/decisions/0008-rolling-upgrades.md).

- a replica of the previous version (the code before the newest migration,
  from git) serves while a replica of this version migrates the shared
  database; both serve, messages sent through one are received through the
  other, nothing is lost or doubled, and a retry through either replica of a
  send the other acknowledged — before or after the recipient acknowledged
  it — answers the original result (migration 0009 is expand-only on
  PostgreSQL and this version writes the rows the previous one reads,
  docs/decisions/0009-compact-idempotency.md);
- a replica starting while another holds the migration lock waits and says why;
- code that a contract migration left behind refuses to start (exit 2, one line).
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from protocol import codec
from protocol.messages import Accepted, InboxPage, SendResponse
from relay.store.postgres import MIGRATION_LOCK_KEY, migrations
from tests.e2e.http11 import Http11, Peer, login, register
from tests.relay.store.postgres_db import fresh_database
from tests.relay_process import RelayProcess

ROOT = Path(__file__).resolve().parents[2]
NAME = "upgrade.test"
QUIET = {"TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0", "TETHERLESS_RATE_IP_PER_SECOND": "0"}


def git(*args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout


def previous_version() -> str:
    """The commit just before the newest migration was added (HEAD while that migration is uncommitted)."""
    newest = max(path.name for path in (ROOT / "relay" / "store" / "migrations" / "postgres").glob("[0-9]*.sql"))
    added = git("log", "-1", "--diff-filter=A", "--format=%H", "--", f"relay/store/migrations/postgres/{newest}")
    return f"{added.decode().strip()}^" if added.strip() else "HEAD"


@pytest.fixture(scope="module")
def old_code(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous version's ``relay``, ``protocol`` (and, once it has one, ``tetherless_cli``) packages,
    extracted from git (read-only git use)."""
    version = previous_version()
    try:
        archive = git("archive", "--format=tar", version, "relay", "protocol", *_cli_package(version))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"cannot read the previous version from git: {exc}")
    target = tmp_path_factory.mktemp("previous-version")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def _cli_package(version: str) -> list[str]:
    """``["tetherless_cli"]`` when ``version`` has the command-line package, else ``[]`` (it ran ``relay.cli``)."""
    probe = subprocess.run(
        ["git", "cat-file", "-e", f"{version}:tetherless_cli"], cwd=ROOT, capture_output=True, check=False
    )
    return ["tetherless_cli"] if probe.returncode == 0 else []


def old_relay(code: Path, data: Path, url: str) -> RelayProcess:
    # PYTHONSAFEPATH keeps the working directory (this checkout) off sys.path: only the old code is imported.
    env = {**QUIET, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(code)}
    module = "tetherless_cli" if (code / "tetherless_cli").is_dir() else "relay.cli"
    return RelayProcess(data, extra_args=["--database", url, "--name", NAME], env=env, module=module)


def new_relay(data: Path, url: str, key_from: Path) -> RelayProcess:
    data.mkdir(mode=0o700, exist_ok=True)
    (data / "relay.key").write_bytes((key_from / "relay.key").read_bytes())  # one Secret for every replica
    (data / "relay.key").chmod(0o600)
    return RelayProcess(data, extra_args=["--database", url, "--name", NAME], env=QUIET)


def send(relay: RelayProcess, sender: Peer, recipient: Peer, text: bytes) -> Accepted:
    """Send ``text`` with the idempotency key ``k-text``; returns the relay's result for it."""
    body = {"envelopes": [{"recipient": recipient.address, "idempotency_key": b"k-" + text, "ciphertext": text}]}
    answer = Http11(relay.url).msgpack("POST", "/v1/messages", body, sender.token)
    assert answer.status == 201, (relay.logs()[-2000:], answer.body)
    (accepted,) = codec.decode(answer.body, SendResponse).accepted
    return accepted


def retry(relay: RelayProcess, sender: Peer, recipient: Peer, text: bytes, first: Accepted) -> None:
    """A retry of an earlier send answers its original result and stores nothing."""
    again = send(relay, sender, recipient, text)
    assert again == Accepted(id=first.id, sent_at_ms=first.sent_at_ms, duplicate=True), (relay.name, first, again)


def acknowledge_all(relay: RelayProcess, peer: Peer) -> None:
    answer = Http11(relay.url).msgpack("POST", "/v1/inbox/ack", {"up_to": 2**62}, peer.token)
    assert answer.status == 200, answer.body


def inbox(relay: RelayProcess, peer: Peer) -> list[bytes]:
    got: list[bytes] = []
    after = 0
    while True:
        answer = Http11(relay.url).get(f"/v1/inbox?after={after}", peer.token, codec.MSGPACK)
        assert answer.status == 200, answer.body
        page = codec.decode(answer.body, InboxPage)
        got += [env.ciphertext for env in page.envelopes]
        after = page.next_cursor
        if not page.more:
            return got


def newest_is_contract() -> bool:
    """Whether the newest migration declares ``-- contract: N`` (docs/decisions/0008-rolling-upgrades.md)."""
    newest = max((ROOT / "relay" / "store" / "migrations" / "postgres").glob("[0-9]*.sql"), key=lambda p: p.name)
    return any(line.startswith("-- contract:") for line in newest.read_text().splitlines()[:5])


def test_previous_and_new_version_serve_one_database_during_the_upgrade(old_code: Path, tmp_path: Path) -> None:
    if newest_is_contract():
        _contract_release_recreate(old_code, tmp_path)
        return
    with fresh_database("tl_e2e") as url:
        old = old_relay(old_code, tmp_path / "old", url)
        new: RelayProcess | None = None
        old.start()
        try:
            alice, bob = register(Http11(old.url), "alice"), register(Http11(old.url), "bob")
            login(Http11(old.url), alice)
            login(Http11(old.url), bob)
            before = send(old, alice, bob, b"before the upgrade")

            new = new_relay(tmp_path / "new", url, key_from=tmp_path / "old")
            new.start()  # migrates the database the old replica is serving from
            assert "applied PostgreSQL migrations" in new.logs()
            through_new = send(new, alice, bob, b"through the new replica")
            through_old = send(old, alice, bob, b"through the old replica after the migration")
            expected = [
                b"before the upgrade",
                b"through the new replica",
                b"through the old replica after the migration",
            ]
            for relay in (old, new):
                got = inbox(relay, bob)
                assert Counter(got) == Counter(expected), (relay.name, got)
            # Retries cross versions both ways and store nothing again.
            retry(new, alice, bob, b"before the upgrade", before)
            retry(old, alice, bob, b"through the new replica", through_new)
            retry(new, alice, bob, b"through the old replica after the migration", through_old)
            assert Counter(inbox(old, bob)) == Counter(expected)
            # The recipient acknowledges through one version; retries through either still answer.
            acknowledge_all(old, bob)
            assert inbox(new, bob) == []
            retry(new, alice, bob, b"through the new replica", through_new)
            retry(old, alice, bob, b"through the new replica", through_new)
            retry(new, alice, bob, b"before the upgrade", before)
            assert inbox(old, bob) == inbox(new, bob) == []
            after_ack = send(new, alice, bob, b"after the acknowledgement")
            acknowledge_all(new, bob)
            retry(old, alice, bob, b"after the acknowledgement", after_ack)
            # The old replica restarts (a pod rescheduled mid-rollout) on the migrated schema and serves.
            assert old.stop() == 0
            old.start()
            restarted = send(old, alice, bob, b"old replica restarted")
            assert inbox(new, bob)[-1] == b"old replica restarted"
            # The rollout is over: no replica of the previous version is left. The contract step (the next
            # release's migration raises the floor to 9) switches this version to the compact rows; what the
            # previous version and the compatible mode wrote still answers.
            assert old.stop() == 0
            assert new.stop() == 0
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE schema_compat SET min_code_schema = 9")
            new.start()
            retry(new, alice, bob, b"old replica restarted", restarted)
            retry(new, alice, bob, b"through the new replica", through_new)
            compact = send(new, alice, bob, b"in the compact schema")
            assert inbox(new, bob) == [b"old replica restarted", b"in the compact schema"]
            acknowledge_all(new, bob)
            retry(new, alice, bob, b"in the compact schema", compact)
            assert inbox(new, bob) == []
            with psycopg.connect(url, autocommit=True) as conn:  # one pointer; both acknowledged rows tombstones
                assert conn.execute("SELECT count(*) FROM idempotency_refs").fetchone() == (1,)
                assert conn.execute("SELECT count(*) FROM inbox WHERE recipient_no < 0").fetchone() == (2,)
        finally:
            old.stop()
            if new is not None:
                assert new.stop() == 0


def test_a_replica_waits_for_a_migration_in_progress_and_says_why(tmp_path: Path) -> None:
    with fresh_database("tl_e2e") as url, psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s::bigint)", (MIGRATION_LOCK_KEY,))  # another replica migrating
        relay = RelayProcess(tmp_path / "relay", extra_args=["--database", url, "--name", NAME], env=QUIET)
        started: list[BaseException | None] = []
        thread = threading.Thread(target=lambda: started.append(_start(relay)))
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while "waiting for another replica to finish migrating" not in relay.logs():
                assert time.monotonic() < deadline, relay.logs()
                assert thread.is_alive(), relay.logs()
                time.sleep(0.05)
            assert not relay.url, "ready while the migration lock was held"
            holder.execute("SELECT pg_advisory_unlock(%s::bigint)", (MIGRATION_LOCK_KEY,))
            thread.join(timeout=60)
            assert started == [None], relay.logs()
            assert Http11(relay.url).get("/readyz").status == 200
        finally:
            thread.join(timeout=60)
            relay.stop()


def _start(relay: RelayProcess) -> BaseException | None:
    try:
        relay.start()
    except Exception as exc:
        return exc
    return None


def test_code_left_behind_by_a_contract_migration_refuses_to_start(tmp_path: Path) -> None:
    known = migrations()[-1][0]
    with fresh_database("tl_e2e") as url:
        relay = RelayProcess(tmp_path / "relay", extra_args=["--database", url, "--name", NAME], env=QUIET)
        relay.start()
        assert relay.stop() == 0
        with psycopg.connect(url, autocommit=True) as conn:  # what a newer version's contract migration leaves
            conn.execute("INSERT INTO schema_migrations (version, applied_at_ms) VALUES (%s, 0)", (known + 1,))
            conn.execute("UPDATE schema_compat SET min_code_schema = %s", (known + 1,))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tetherless_cli",
                "serve",
                "--data",
                str(relay.data_dir),
                "--listen",
                "127.0.0.1:0",
                "--database",
                url,
                "--name",
                NAME,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("tetherless: error:")]
        assert f"needs code that knows migration {known + 1} or newer; this relay knows up to {known}" in line
        with psycopg.connect(url, autocommit=True) as conn:  # an expand migration only: the same code runs on
            conn.execute("UPDATE schema_compat SET min_code_schema = %s", (known,))
        relay.start()
        try:
            assert f"the database schema is at migration {known + 1}, newer than this relay's {known}" in relay.logs()
        finally:
            relay.stop()


def _contract_release_recreate(old_code: Path, tmp_path: Path) -> None:
    """A contract release (the newest migration replaces tables the previous code uses) is upgraded by
    Recreate, as decision 0008 prescribes: the previous version's replicas stop, the new version migrates
    and serves. Nothing the previous version acknowledged is lost, and a retry of a send it acknowledged
    still answers as a duplicate (idempotency survives the migration)."""
    with fresh_database("tl_e2e") as url:
        old = old_relay(old_code, tmp_path / "old", url)
        old.start()
        try:
            alice, bob = register(Http11(old.url), "alice"), register(Http11(old.url), "bob")
            login(Http11(old.url), alice)
            login(Http11(old.url), bob)
            send(old, alice, bob, b"before the upgrade")
            send(old, alice, bob, b"also before the upgrade")
        finally:
            assert old.stop() == 0
        new = new_relay(tmp_path / "new", url, key_from=tmp_path / "old")
        new.start()
        try:
            assert "applied PostgreSQL migrations" in new.logs()
            login(Http11(new.url), alice)
            login(Http11(new.url), bob)
            body = {
                "envelopes": [
                    {
                        "recipient": bob.address,
                        "idempotency_key": b"k-before the upgrade",
                        "ciphertext": b"before the upgrade",
                    }
                ]
            }
            retry = Http11(new.url).msgpack("POST", "/v1/messages", body, alice.token)
            assert retry.status == 201, retry.body
            assert b"duplicate" in retry.body, retry.body
            send(new, alice, bob, b"after the upgrade")
            assert inbox(new, bob) == [b"before the upgrade", b"also before the upgrade", b"after the upgrade"]
        finally:
            assert new.stop() == 0
