"""The sync engine's parts without processes (docs/decisions/0011-sync-engine-parts.md): real keys and a real
``ClientStore`` on a temporary home, and a relay that answers from lists the test fills (the parts' ``Relay`` port)."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from protocol import device_list, log
from protocol.client.engine.base import Context, Report
from protocol.client.engine.epochs import Epochs
from protocol.client.engine.lists import DeviceLists
from protocol.client.engine.pending import HoldBack
from protocol.client.keystore import DeviceKeys
from protocol.client.localdb import LocalDB
from protocol.client.sdk import InboxBatch, InboxItem, ReceivedMessage
from protocol.client.store import ClientStore
from protocol.messages import LogPage, LogRetention

RELAY = "relay.test"
ACCOUNT = "a" * 32
DEVICE = "d" * 32
SENDER = f"{'f' * 32}.{'b' * 32}@{RELAY}"


def device_keys(account_id: str = ACCOUNT, device_id: str = DEVICE) -> DeviceKeys:
    """A format-2 device of ``account_id`` with random keys; its relay URL leads nowhere."""
    return DeviceKeys(
        signing_seed=os.urandom(32),
        box_private_key=os.urandom(32),
        relay_url="http://127.0.0.1:1",
        account_id=account_id,
        device_id=device_id,
        address=f"{device_id}.{account_id}@{RELAY}",
        device_name="test",
        list_format=2,
    )


def client_store(home: Path) -> ClientStore:
    return ClientStore(LocalDB.open(home, os.urandom(32)))


def received(cursor: int, pair_seq: int, text: str = "hi", *, sender: str = SENDER) -> ReceivedMessage:
    """An inbox item from ``sender``: a framed text with its ``pair_seq`` (§9)."""
    return ReceivedMessage(
        cursor=cursor,
        id=os.urandom(16),
        sender=sender,
        content_type=log.FRAME_CONTENT_TYPE,
        body=log.frame_message(pair_seq, "text/plain", text.encode()),
        sent_at_ms=1_000 + cursor,
        relay_sent_at_ms=2_000 + cursor,
        message_id=os.urandom(16),
    )


class FakeRelay:
    """The parts' relay port: inbox pages and log pages come from what the test queued; calls are recorded."""

    def __init__(self) -> None:
        self.connection: object | None = object()
        self.sessions = None
        self.cipher = None
        self.inbox_pages: list[InboxBatch] = []
        self.log_pages: list[LogPage] = []
        self.acks: list[int] = []
        self.calls: list[tuple[str, Any]] = []

    def reconnect(self) -> None:
        self.connection = object()

    def queue_inbox(self, items: Iterable[InboxItem], next_cursor: int, *, more: bool = False) -> None:
        self.inbox_pages.append(InboxBatch(items=list(items), next_cursor=next_cursor, more=more))

    async def inbox_page(self, after: int) -> InboxBatch:
        self.calls.append(("inbox_page", after))
        return self.inbox_pages.pop(0) if self.inbox_pages else InboxBatch(items=[], next_cursor=after, more=False)

    async def ack(self, up_to: int) -> None:
        self.acks.append(up_to)

    async def log_page(self, after: int, limit: int) -> LogPage:
        self.calls.append(("log_page", (after, limit)))
        if limit == 0 or not self.log_pages:
            return LogPage(records=[], next_after=after, head=after, horizon=0, more=False)
        return self.log_pages.pop(0)

    async def retention(self) -> LogRetention:
        return LogRetention(mode="forever")

    async def device_chain(self, account_id: str) -> device_list.VerifiedChain:
        raise AssertionError("no device list in this test")


class Parts:
    """The lower parts every upper part is built on, over one store and one fake relay."""

    def __init__(self, home: Path, *, wall_clock: Callable[[], float] | None = None) -> None:
        self.keys = device_keys()
        self.store = client_store(home)
        self.relay = FakeRelay()
        self.report = Report()
        self.ctx = Context(
            self.keys,
            self.store,
            self.relay,  # type: ignore[arg-type]
            self.report,
            random_bytes=random.Random(1).randbytes,
            wall_clock=wall_clock or (lambda: 1_700_000_000.0),
            rng=random.Random(7),
        )
        self.lists = DeviceLists(self.ctx)
        self.holdback = HoldBack(self.ctx, holdback_seconds=3600.0)
        self.epochs = Epochs(self.ctx, self.lists)
