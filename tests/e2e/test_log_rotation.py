"""Revoking a device rotates the account key: nothing new is written under a key the revoked device holds (§5.3)."""

from __future__ import annotations

from pathlib import Path

import trio

from protocol.client import devices
from protocol.client.sdk import RelayClient
from protocol.messages import LogPage
from tests.e2e.offline_client import cli, history, init_device, keystore, link_device, load, run_engine
from tests.relay_process import RelayProcess


def test_revocation_starts_a_new_epoch_that_the_revoked_device_never_gets(tmp_path: Path) -> None:
    relay = RelayProcess(tmp_path / "relay-data")
    relay.start()
    try:
        a1_home, a2_home, b_home = tmp_path / "a1", tmp_path / "a2", tmp_path / "b"
        init_device(relay.url, a1_home, "a1")
        bob = init_device(relay.url, b_home, "bob")
        a2 = trio.run(link_device, relay.url, a1_home, a2_home, "a2")
        assert cli(a1_home, "send", bob, "--text", "before").returncode == 0
        assert trio.run(run_engine, a1_home) == 0  # epoch 1, granted to A1 and A2; "before" logged
        assert trio.run(run_engine, a2_home) == 0
        _, _, a2_store = load(a2_home)
        assert a2_store.newest_epoch() == 1
        assert [m.text for m in a2_store.history()] == ["before"]

        async def revoke() -> None:
            async with RelayClient.connect(relay.url, keys=keystore(a1_home).load()) as client:
                await devices.revoke_device(client, a2.split(".", 1)[0])

        trio.run(revoke)
        assert cli(a1_home, "send", bob, "--text", "after").returncode == 0
        assert trio.run(run_engine, a1_home) == 0
        assert [m["text"] for m in history(a1_home)] == ["before", "after"]

        async def records() -> LogPage:
            async with RelayClient.connect(relay.url, keys=keystore(a1_home).load()) as client:
                page = await client.api.log_page(after=0)
                return page

        page = trio.run(records)
        kinds = [(r.kind, r.epoch) for r in page.records]
        assert ("key", 2) in kinds  # the rotation
        after_rotation = kinds[kinds.index(("key", 2)) + 1 :]
        assert after_rotation
        assert all(epoch == 2 for _, epoch in after_rotation)  # "after" went under the new key
        _, _, a1_store = load(a1_home)
        assert a1_store.granted(2) == a1_store.granted(1) - {a2.split(".", 1)[0]}
        # The revoked device cannot read on: the relay refuses it, and it holds no key for epoch 2.
        assert trio.run(run_engine, a2_home) == 4
        assert a2_store.epoch_key(2) is None
    finally:
        relay.stop()
