"""``tetherless migrate --to postgresql://…``: a personal relay moves to PostgreSQL; devices carry on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from protocol import codec
from protocol.messages import InboxPage, SendResponse
from tests.e2e.http11 import Http11, Peer, login, register
from tests.relay.store.postgres_db import fresh_database
from tests.relay_process import RelayProcess

NAME = "migrate.test"
ROOT = Path(__file__).resolve().parents[2]


def send(client: Http11, sender: Peer, recipient: Peer, text: bytes) -> None:
    body = {"envelopes": [{"recipient": recipient.address, "idempotency_key": b"k-" + text, "ciphertext": text}]}
    assert client.msgpack("POST", "/v1/messages", body, sender.token).status == 201


def page(client: Http11, peer: Peer, after: int) -> InboxPage:
    answer = client.get(f"/v1/inbox?after={after}", peer.token, codec.MSGPACK)
    assert answer.status == 200, answer.body
    return codec.decode(answer.body, InboxPage)


def migrate(data: Path, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "migrate", "--data", str(data), "--to", url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_sqlite_relay_migrates_to_postgres_and_devices_carry_on(tmp_path: Path) -> None:
    data = tmp_path / "personal"
    personal = RelayProcess(data, extra_args=["--name", NAME])
    personal.start()
    client = Http11(personal.url)
    well_known = client.get("/.well-known/tetherless").json()
    alice, bob, carol = (register(client, n) for n in ("alice", "bob", "carol"))
    for peer in (alice, bob, carol):
        login(client, peer)
    for i in range(6):
        send(client, alice, bob, b"to-bob-%d" % i)
    for i in range(3):
        send(client, alice, carol, b"to-carol-%d" % i)
    before = page(client, bob, 0).envelopes
    # Bob acknowledged two and has read up to the fourth; Carol acknowledged everything.
    assert client.msgpack("POST", "/v1/inbox/ack", {"up_to": before[1].cursor}, bob.token).status == 200
    bob_cursor = before[3].cursor
    carol_cursor = page(client, carol, 0).next_cursor
    assert client.msgpack("POST", "/v1/inbox/ack", {"up_to": carol_cursor}, carol.token).status == 200
    assert personal.stop() == 0

    with fresh_database("tl_migrate") as url:
        done = migrate(data, url)
        assert done.returncode == 0, done.stderr
        assert "tetherless:***@" in done.stdout
        assert ":tetherless@" not in done.stdout + done.stderr
        table_lines = [line.split() for line in done.stdout.splitlines() if line.startswith("  ")]
        rows = {cells[0]: int(cells[1]) for cells in table_lines if cells[1].isdigit()}
        assert rows["accounts"] == 3
        assert rows["devices"] == 3
        assert rows["inbox"] == 9  # 4 unread + 5 tombstones of acknowledged envelopes (migration 0009)
        assert rows["sessions"] == 3
        assert rows["idempotency_keys"] == 0  # local envelopes' keys are pointers since 0009
        assert rows["idempotency_refs"] == 9

        again = migrate(data, url)
        assert again.returncode == 1
        assert "not empty" in again.stderr

        # An organisation replica: its own data directory holding the same relay key.
        replica_data = tmp_path / "replica"
        replica_data.mkdir(mode=0o700)
        shutil.copy2(data / "relay.key", replica_data / "relay.key")
        replica = RelayProcess(replica_data, extra_args=["--name", NAME, "--database", url])
        replica.start()
        try:
            client = Http11(replica.url)
            assert client.get("/.well-known/tetherless").json() == well_known
            # Bob's token and cursor still work: the two unread envelopes come next, with the same cursors.
            rest = page(client, bob, bob_cursor)
            assert [e.ciphertext for e in rest.envelopes] == [b"to-bob-4", b"to-bob-5"]
            assert [e.cursor for e in rest.envelopes] == [e.cursor for e in before[4:]]
            assert [e.ciphertext for e in page(client, bob, 0).envelopes] == [b"to-bob-%d" % i for i in (2, 3, 4, 5)]
            # New envelopes sort after every cursor handed out before, even for an emptied inbox.
            send(client, alice, carol, b"after-migration-carol")
            assert [e.ciphertext for e in page(client, carol, carol_cursor).envelopes] == [b"after-migration-carol"]
            send(client, alice, bob, b"after-migration")
            rest = page(client, bob, bob_cursor)
            assert [e.ciphertext for e in rest.envelopes] == [b"to-bob-4", b"to-bob-5", b"after-migration"]
            # A retried pre-migration send is recognised as a duplicate.
            body = {
                "envelopes": [{"recipient": bob.address, "idempotency_key": b"k-to-bob-5", "ciphertext": b"to-bob-5"}]
            }
            answer = client.msgpack("POST", "/v1/messages", body, alice.token)
            assert answer.status == 201
            assert codec.decode(answer.body, SendResponse).accepted[0].duplicate
            # Delivered once: acknowledging everything empties the inbox.
            assert client.msgpack("POST", "/v1/inbox/ack", {"up_to": rest.next_cursor}, bob.token).status == 200
            assert page(client, bob, 0).envelopes == []
        finally:
            assert replica.stop() == 0
