"""The client SDK and the client CLI commands against a real relay process."""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio

from protocol import payload
from protocol.client.keystore import DeviceKeys
from protocol.client.localdb import LocalDB
from protocol.client.sdk import Outgoing, ReceivedMessage, RejectedMessage, RelayClient
from protocol.client.store import migrate
from protocol.errors import ErrorCode, RemoteError, TetherlessError
from protocol.ids import Address
from protocol.messages import OutboundEnvelope
from tests.protocol.client.test_http import FakeServer
from tests.relay_process import RelayProcess


@asynccontextmanager
async def new_device(relay: RelayProcess, name: str) -> AsyncIterator[RelayClient]:
    async with RelayClient.connect(relay.url) as client:
        await client.register(name)
        yield client


def keys_of(client: RelayClient) -> DeviceKeys:
    assert client.keys is not None
    return client.keys


async def test_register_send_fetch_ack(relay: RelayProcess) -> None:
    async with new_device(relay, "alice") as alice, new_device(relay, "bob") as bob:
        bob_address = keys_of(bob).address
        assert Address.parse(bob_address).relay == relay.name
        sent = await alice.send(bob_address, "hello bob")
        assert len(sent) == 1
        assert not sent[0].duplicate
        await alice.send(bob_address, b"\x00\xff", "application/octet-stream")

        batch = await bob.fetch()
        assert [type(i) for i in batch.items] == [ReceivedMessage, ReceivedMessage]
        first, second = batch.items
        assert isinstance(first, ReceivedMessage)
        assert isinstance(second, ReceivedMessage)
        assert (first.text, first.sender, first.id) == ("hello bob", keys_of(alice).address, sent[0].id)
        assert (second.body, second.text) == (b"\x00\xff", None)
        assert first.cursor < second.cursor == batch.next_cursor

        assert await bob.ack(up_to=first.cursor) == 1
        assert [i.cursor for i in (await bob.fetch()).items] == [second.cursor]
        assert await bob.ack(up_to=batch.next_cursor) == 1
        assert (await bob.fetch()).items == []


async def test_send_to_an_account_reaches_its_devices(relay: RelayProcess) -> None:
    async with new_device(relay, "alice") as alice, new_device(relay, "bob") as bob:
        account_address = keys_of(bob).address.split(".", 1)[1]
        sent = await alice.send(account_address, "to the account")
        assert [s.recipient for s in sent] == [keys_of(bob).address]
        (item,) = (await bob.fetch()).items
        assert isinstance(item, ReceivedMessage)
        assert item.text == "to the account"


async def test_retry_with_the_same_key_is_not_duplicated(relay: RelayProcess) -> None:
    async with new_device(relay, "alice") as alice, new_device(relay, "bob") as bob:
        envelope = OutboundEnvelope(recipient=keys_of(bob).address, idempotency_key=b"k" * 16, ciphertext=b"c" * 64)
        first = await alice.api.send_envelopes([envelope])
        again = await alice.api.send_envelopes([envelope])
        assert again.accepted[0].id == first.accepted[0].id
        assert again.accepted[0].duplicate
        assert len((await bob.fetch()).items) == 1


async def test_send_many_and_concurrent_sends_share_one_connection(relay: RelayProcess) -> None:
    async with new_device(relay, "alice") as alice, new_device(relay, "bob") as bob:
        bob_address = keys_of(bob).address
        sent = await alice.send_many([Outgoing(bob_address, f"batch {i}") for i in range(5)])
        assert len(sent) == 5
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(alice.send, bob_address, f"concurrent {i}")
        assert len(alice._connections) == 1
        texts = set()
        after = 0
        while True:
            batch = await bob.fetch(after=after, limit=7)
            texts |= {i.text for i in batch.items if isinstance(i, ReceivedMessage)}
            after = batch.next_cursor
            if not batch.more:
                break
        assert texts == {f"batch {i}" for i in range(5)} | {f"concurrent {i}" for i in range(20)}


async def test_large_message_uses_flow_control(relay: RelayProcess) -> None:
    async with new_device(relay, "alice") as alice, new_device(relay, "bob") as bob:
        body = os.urandom(150 * 1024)  # pads to the 192 KiB bucket, under max_envelope_bytes
        await alice.send(keys_of(bob).address, body)
        (item,) = (await bob.fetch()).items
        assert isinstance(item, ReceivedMessage)
        assert item.body == body


async def test_unknown_recipient(relay: RelayProcess) -> None:
    async with new_device(relay, "alice") as alice, new_device(relay, "bob") as bob:
        stranger = f"{'a' * 32}.{keys_of(bob).account_id}@{relay.name}"
        with pytest.raises(TetherlessError) as info:
            await alice.send(stranger, "hi")
        assert info.value.code is ErrorCode.UNKNOWN_RECIPIENT
        with pytest.raises(RemoteError) as remote:
            await alice.send(f"{'a' * 32}.{'b' * 32}@{relay.name}", "hi")
        assert remote.value.code is ErrorCode.UNKNOWN_ACCOUNT


async def test_session_is_renewed_after_invalid_or_expired_token(relay: RelayProcess) -> None:
    async with new_device(relay, "alice") as alice, new_device(relay, "bob") as bob:
        await alice.send(keys_of(bob).address, "one")
        held = alice.api._token
        assert held is not None
        # The relay forgets/refuses the token: the client re-authenticates once and retries.
        alice.api._token = msgspec.structs.replace(held, token="garbage", renew_at_ms=2**62)
        await alice.send(keys_of(bob).address, "two")
        assert alice.api._token is not None
        assert alice.api._token.token not in ("garbage", held.token)
        # Close to expiry: renewed before the request leaves.
        before = alice.api._token.token
        alice.api._token = msgspec.structs.replace(alice.api._token, renew_at_ms=0)
        await alice.send(keys_of(bob).address, "three")
        assert alice.api._token.token != before
        assert len((await bob.fetch()).items) == 3


async def test_invalid_and_forged_messages_are_rejected_not_delivered(relay: RelayProcess) -> None:
    async with (
        new_device(relay, "alice") as alice,
        new_device(relay, "bob") as bob,
        new_device(relay, "mallory") as mallory,
    ):
        bob_keys, alice_keys, mallory_keys = keys_of(bob), keys_of(alice), keys_of(mallory)
        # Garbage ciphertext.
        garbage = OutboundEnvelope(recipient=bob_keys.address, idempotency_key=b"g" * 16, ciphertext=b"x" * 100)
        await mallory.api.send_envelopes([garbage])
        # Mallory's own device id, but claiming Alice's account.
        forged_sender = f"{mallory_keys.device_id}.{alice_keys.account_id}@{relay.name}"
        forged = payload.seal(
            signing_key=mallory_keys.signing_key,
            sender=forged_sender,
            recipient=bob_keys.address,
            recipient_box_key=bob_keys.box_public_key,
            sent_at_ms=1,
            message_id=b"f" * 16,
            content_type="text/plain",
            body=b"it is me, alice",
            ephemeral_private_key=os.urandom(32),
        )
        envelope = OutboundEnvelope(recipient=bob_keys.address, idempotency_key=b"f" * 16, ciphertext=forged)
        await mallory.api.send_envelopes([envelope])
        await alice.send(bob_keys.address, "genuine")

        items = (await bob.fetch()).items
        assert [type(i) for i in items] == [RejectedMessage, RejectedMessage, ReceivedMessage]
        assert isinstance(items[0], RejectedMessage)
        assert items[0].code is ErrorCode.MALFORMED_BODY
        assert isinstance(items[1], RejectedMessage)
        assert items[1].code is ErrorCode.BAD_SIGNATURE


async def test_stream_delivers_live_and_resumes_after_a_relay_restart(relay: RelayProcess) -> None:
    async with new_device(relay, "alice") as alice, new_device(relay, "bob") as bob:
        bob_address = keys_of(bob).address
        await alice.send(bob_address, "before")
        received: list[str] = []
        got = trio.Event()
        live_seen = trio.Event()
        expected = 3

        async def follow() -> None:
            async with bob.stream(idle_timeout_seconds=5) as inbox:
                async for item in inbox:
                    assert isinstance(item, ReceivedMessage)
                    assert item.text is not None
                    received.append(item.text)
                    await bob.ack(up_to=item.cursor)
                    if len(received) == 2:
                        live_seen.set()
                    if len(received) == expected:
                        got.set()
                        return

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(follow)
                await alice.send(bob_address, "live")
                await live_seen.wait()
                # The relay goes away and comes back on the same port.
                await trio.to_thread.run_sync(relay.stop)
                await trio.to_thread.run_sync(relay.start)
                await alice.send(bob_address, "after restart")
                await got.wait()
        assert received == ["before", "live", "after restart"]
        assert (await bob.fetch()).items == []


# -- the CLI ----------------------------------------------------------------------------


def cli(home: Path, *args: str, stdin: bytes | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_round_trip(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    init = cli(alice_home, "device", "init", "--relay", relay.url, "--name", "alice")
    assert init.returncode == 0, init.stderr
    alice_address = init.stdout.strip()
    Address.parse(alice_address)
    assert cli(alice_home, "whoami").stdout.strip() == alice_address
    assert oct(alice_home.stat().st_mode & 0o777) == "0o700"

    bob_address = cli(bob_home, "device", "init", "--relay", relay.url).stdout.strip()
    sent = cli(alice_home, "send", bob_address, "--text", "hi bob")
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.strip()  # the message id (docs/cli.md "Message ids")
    assert len(base64.b32decode(message_id.upper() + "======")) == 16
    assert cli(alice_home, "send", bob_address, stdin=b"line one\nline two\n").returncode == 0

    synced = cli(bob_home, "sync", "--json")
    assert synced.returncode == 0, synced.stderr
    records = [json.loads(line) for line in synced.stdout.splitlines()]
    assert [r["text"] for r in records] == ["hi bob", "line one\nline two"]
    assert records[0]["from"] == alice_address
    assert records[0]["message_id"] == message_id
    assert records[0]["sent_at"].endswith("Z")
    assert records[0]["cursor"] < records[1]["cursor"]
    # Acknowledged: a second sync prints nothing.
    assert cli(bob_home, "sync").stdout == ""

    cli(alice_home, "send", bob_address, "--text", "plain")
    plain = cli(bob_home, "sync").stdout
    assert plain.startswith("[20")
    assert plain.rstrip().endswith(f"] {alice_address}: plain")


def test_cli_errors_are_one_line(relay: RelayProcess, tmp_path: Path) -> None:
    missing = cli(tmp_path / "nobody", "whoami")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert "device init" in missing.stderr

    home = tmp_path / "alice"
    cli(home, "device", "init", "--relay", relay.url)
    bad_address = cli(home, "send", "not-an-address", "--text", "x")
    assert bad_address.returncode == 2
    assert bad_address.stderr.startswith("tetherless: error: ")
    unknown = cli(home, "send", f"{'a' * 32}.{'b' * 32}@{relay.name}", "--text", "x")
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("tetherless: error: unknown_account: ")
    assert unknown.stderr.count("\n") == 1
    refused = cli(tmp_path / "other", "device", "init", "--relay", "http://127.0.0.1:1")
    assert refused.returncode == 1
    assert "connection refused" in refused.stderr
    assert "Traceback" not in refused.stderr + unknown.stderr + bad_address.stderr


def test_cli_sync_follow_until_sigint(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    cli(alice_home, "device", "init", "--relay", relay.url)
    bob_address = cli(bob_home, "device", "init", "--relay", relay.url).stdout.strip()
    cli(alice_home, "send", bob_address, "--text", "queued")
    follower = subprocess.Popen(
        [sys.executable, "-m", "tetherless_cli", "--home", str(bob_home), "sync", "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["text"] == "queued"
        cli(alice_home, "send", bob_address, "--text", "live")
        assert json.loads(follower.stdout.readline())["text"] == "live"
        time.sleep(0.3)  # let the ack of "live" go out
        follower.send_signal(signal.SIGINT)
        assert follower.wait(timeout=15) == 0
        assert follower.stderr is not None
        assert follower.stderr.read() == ""
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        for stream in (follower.stdout, follower.stderr):
            if stream is not None:
                stream.close()
    assert cli(bob_home, "sync").stdout == ""


async def test_a_later_client_of_the_same_home_reuses_its_token_prekey_check_and_relay_document(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """What makes a second ``send`` of one home cheap (docs/performance.md "CLI start-up"): no challenge and
    session, no prekey check, no ``/.well-known`` — only the two device lists and the POST."""
    db = LocalDB.open(tmp_path / "alice", b"k" * 32)
    migrate(db)
    async with new_device(relay, "bob") as bob:
        await bob.enable_sessions()
        async with RelayClient.connect(relay.url, local_db=db) as first:
            keys = await first.register("alice")
            await first.enable_sessions()
            await first.well_known()
            await first.send(keys_of(bob).address, "one")
            assert first.api.requests_sent > 3
            token = first.api.session_expires_at_ms
        async with RelayClient.connect(relay.url, keys=keys, local_db=db) as second:
            await second.enable_sessions()
            await second.well_known()
            await second.send(keys_of(bob).address, "two")
            assert second.api.session_expires_at_ms == token  # the stored token, not a new session
            assert second.api.requests_sent == 3  # bob's chain, alice's own chain, POST /v1/messages
        assert [i.text for i in (await bob.fetch()).items if isinstance(i, ReceivedMessage)] == ["one", "two"]
    db.close()


async def _answer(server: FakeServer, stream_id: int, status: int, content_type: str, body: bytes) -> None:
    server.h2.send_headers(stream_id, [(":status", str(status)), ("content-type", content_type)])
    server.h2.send_data(stream_id, body, end_stream=True)
    await server.flush()


@pytest.mark.parametrize(
    ("status", "content_type", "body", "expected"),
    [
        (201, "text/html", b"<html>welcome</html>", "unsupported_media_type: the relay answered POST /v1/accounts"),
        (
            201,
            "application/vnd.msgpack",
            msgspec.msgpack.encode({"x25519_one_time": 1, "mlkem_one_time": 2}),
            "invalid_field: the relay's answer to POST /v1/accounts is not a AccountCreated",
        ),
        (201, "application/json", b"{not json", "malformed_body: the relay's answer to POST /v1/accounts"),
    ],
)
async def test_a_relay_answering_another_type_or_shape_gets_one_clear_line(
    tmp_path: Path, status: int, content_type: str, body: bytes, expected: str
) -> None:
    """A malicious relay (or a proxy in front of it) answers a route with a body of another media type or shape:
    the real CLI says so in one line naming the route, exit 1, no traceback, nothing written as if it worked."""

    async def handler(server: FakeServer, stream_id: int, headers: list[tuple[str, str]], _: bytes) -> None:
        await _answer(server, stream_id, status, content_type, body)

    async def serve(stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            await FakeServer(stream, handler).run(nursery)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        env = {**os.environ, "TETHERLESS_PASSPHRASE": "correct horse battery staple", "TETHERLESS_INSECURE_KDF": "1"}
        home = tmp_path / "home"
        command = [sys.executable, "-m", "tetherless_cli", "--home", str(home), "device", "init"]
        done = await trio.run_process(
            [*command, "--relay", f"http://127.0.0.1:{port}", "--no-recovery-key"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        nursery.cancel_scope.cancel()
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"tetherless: error: {expected}"), lines
    assert not (home / "keystore.tlk").exists()
