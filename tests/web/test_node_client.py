"""The TypeScript client (web/src/client) against a real relay and the real ``tetherless`` CLI, both ways.

A Node process runs web/test/interop/peer.ts (bundled for this session by conftest.py's ``node_peer_script``):
it creates a format-3 account over HTTP/1.1 (Node's fetch), logs in, publishes prekeys and sends to a CLI
account over a hybrid session with sealed sender v2; the CLI's ``sync`` shows the message; the CLI answers;
the Node client receives and decrypts it, and verifies the CLI account's chain. Needs node and npm: skipped
without them, a failure under ``CI=true`` (as tests/web/test_node_vectors.py). The Python SDK side, in this
process, and the other directions (device lists, log records, refusals): tests/web/test_differential.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_equal_devices import account_of, cli, init_device, ok, sync_texts
from tests.relay_process import RelayProcess
from tests.web.support import NodePeer


@pytest.fixture
def node_peer(node_peer_script: Path, tmp_path: Path) -> Iterator[NodePeer]:
    peer = NodePeer(node_peer_script, tmp_path / "node-peer.log")
    try:
        yield peer
    finally:
        peer.close()


def test_typescript_client_and_cli_exchange_messages_both_ways(
    relay: RelayProcess, node_peer: NodePeer, tmp_path: Path
) -> None:
    cli_home = tmp_path / "cli"
    cli_address = init_device(relay, cli_home)

    created = node_peer.must(cmd="create", relay=relay.url)
    node_address = created["address"]
    assert node_address.endswith(f"@{relay.name}")

    # Node → CLI: a session started from the CLI's claimed, verified prekeys; sealed sender v2. The CLI opens it
    # only after verifying the sender's chain: the format-3 genesis the TypeScript code built and signed.
    assert node_peer.must(cmd="send", to=cli_address, text="hello from node, 🌍")["envelopes"] == 1
    shown = sync_texts(cli_home)
    assert [(m["from"], m["text"]) for m in shown] == [(node_address, "hello from node, 🌍")]

    # CLI → Node, on the session the Node client started; then a second message on the same session.
    ok(cli(cli_home, "send", node_address, "--text", "hello back from the CLI"))
    ok(cli(cli_home, "sync"))
    got = node_peer.must(cmd="receive")
    assert got["refused"] == []
    assert [(m["sender"], m["text"], m["pair_seq"]) for m in got["messages"]] == [
        (cli_address, "hello back from the CLI", 1)
    ]
    # Acknowledged after the local commit: a second receive finds nothing new.
    assert node_peer.must(cmd="receive")["messages"] == []

    # Account addresses both ways (every device of the account but the sender): one device each here.
    assert node_peer.must(cmd="send", to=account_of(cli_address), text="second")["envelopes"] == 1
    assert [(m["from"], m["text"]) for m in sync_texts(cli_home)] == [(node_address, "second")]
    ok(cli(cli_home, "send", account_of(node_address), "--text", "to your account"))
    ok(cli(cli_home, "sync"))
    got = node_peer.must(cmd="receive")
    assert [(m["text"], m["pair_seq"]) for m in got["messages"]] == [("to your account", 2)]

    # The Node client verifies the CLI account's chain (format 3 from `device init`).
    verified = node_peer.must(cmd="chain", account=account_of(cli_address).split("@")[0])
    assert [d["kem_key"] for d in verified["devices"]] == [True]
