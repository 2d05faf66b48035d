"""A device with sessions refuses version-1 payloads from format-2 senders (issue 12 point 5; crypto.md §14).

Over a real relay: the sender is a genuine format-2 device that sends a v1 sealed box (what a thief of its
long-term keys, or an old client, could still produce); the recipient must refuse it, and keep opening v1
from format-1 accounts (tests/e2e/test_sessions.py) and v2 from the same sender.
"""

from __future__ import annotations

from protocol.client.sdk import ReceivedMessage, RejectedMessage, RelayClient
from protocol.client.sessions import MemoryStore
from protocol.device_list import FORMAT_2
from protocol.errors import ErrorCode
from tests.relay_process import RelayProcess


async def test_v1_payload_from_a_format2_account_is_refused(relay: RelayProcess) -> None:
    async with RelayClient.connect(relay.url) as alice, RelayClient.connect(relay.url) as bob:
        await alice.register("alice", list_format=FORMAT_2)
        await bob.register("bob", list_format=FORMAT_2)
        await bob.enable_sessions(MemoryStore())
        assert alice.keys is not None
        assert bob.keys is not None
        # Alice has no sessions enabled: her client seals a v1 box (no forward secrecy) to Bob.
        await alice.send(bob.keys.address, "downgraded")
        (item,) = (await bob.fetch()).items
        assert isinstance(item, RejectedMessage)
        assert item.code is ErrorCode.MALFORMED_BODY
        assert "version-1 payload from a format-2 account" in item.detail
        # The same sender over sessions is fine: one bad message never blocks the next.
        await alice.enable_sessions(MemoryStore())
        await alice.send(bob.keys.address, "over a session")
        items = (await bob.fetch(after=item.cursor)).items
        assert [m.text for m in items if isinstance(m, ReceivedMessage)] == ["over a session"]
