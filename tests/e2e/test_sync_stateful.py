"""Hypothesis drives two accounts through sends, client and relay crashes and network faults (account-log.md §14.2).

Two accounts, A (A1, A2, A3) and B (B1, B2, B3), on one real relay process. Every
device runs ``tetherless sync --follow`` as a child process, talking to the
relay through its own fault proxy (tests/support/faultproxy.py). Rules:
send (enqueued in the device's local outbox, as ``tetherless send`` does
before its flush attempt), SIGKILL/SIGTERM of a device's engine, SIGKILL/SIGTERM
of the relay, and proxy faults (refuse, delay, a cut at an offset inside the
byte stream in either direction, blackhole), then heal.

After every step: no message twice on any device, and each sender's
``pair_seq`` increases in log order. At the end, with every fault healed:
every message sent is present exactly once on every device of both accounts,
in per-sender order, and nothing is left in any outbox or ``log_pending``.

CI-sized (slow tier of §14.2, few examples): ``TETHERLESS_STATEFUL_EXAMPLES``
raises the number of examples for a nightly run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protocol.client.store import ClientStore
from tests.e2e.offline_client import Follower, init_device, link_device, load, wait_until
from tests.relay_process import RelayProcess
from tests.support.faultproxy import Blackhole, Cut, Delay, PassPlan, Refuse, ScriptedPlan, ThreadedFaultProxy

# Three devices per account: the first creates it, the others are linked by it (link code + approval).
DEVICES = ("a1", "a2", "a3", "b1", "b2", "b3")
SETTLE_SECONDS = 90.0


def _account_of(device: str) -> str:
    return device[0]


class SyncMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.work = Path(tempfile.mkdtemp(prefix="tl-stateful-"))
        os.chmod(self.work, 0o700)
        self.relay = RelayProcess(self.work / "relay-data")
        self.proxies: dict[str, ThreadedFaultProxy] = {}
        self.followers: dict[str, Follower] = {}
        self.stores: dict[str, ClientStore] = {}
        self.addresses: dict[str, str] = {}
        self.sent: list[tuple[str, str, str]] = []  # (sender device, recipient account, text), in send order
        self.steps = 0

    @initialize()
    def setup(self) -> None:
        self.relay.start()
        for device in DEVICES:
            self.proxies[device] = ThreadedFaultProxy("127.0.0.1", self.relay.port).start()
        for first in ("a1", "b1"):
            self.addresses[first] = init_device(self.proxies[first].url, self.work / first, first)
        for second, first in (("a2", "a1"), ("a3", "a1"), ("b2", "b1"), ("b3", "b1")):
            self.addresses[second] = trio.run(
                link_device, self.proxies[second].url, self.work / first, self.work / second, second
            )
        for device in DEVICES:
            _, _, self.stores[device] = load(self.work / device)
            self.followers[device] = Follower(self.work / device, self.work, device)
            self.followers[device].start()
        for device in DEVICES:  # traffic in every example, even one without steps
            self.send(device, to_device=device.endswith("2"), count=1)
        self.steps = 0  # rules run (reported with TETHERLESS_STATEFUL_VERBOSE=1)

    def _proxy(self, device: str) -> ThreadedFaultProxy:
        return self.proxies[device]

    # -- rules -------------------------------------------------------------------------------------

    @rule(device=st.sampled_from(DEVICES), to_device=st.booleans(), count=st.integers(1, 3))
    def send(self, device: str, to_device: bool, count: int) -> None:
        self.steps += 1
        other = "b" if _account_of(device) == "a" else "a"
        target = self.addresses[other + "1"]
        recipient = target if to_device else target.split(".", 1)[1]  # a device address or the account address
        peer = target.split(".", 1)[1]
        store = self.stores[device]
        for _ in range(count):
            text = f"{device}->{recipient[:12]} #{len(self.sent)}"
            store.enqueue(recipient, "text/plain; charset=utf-8", text.encode(), peer=peer)
            # A device address reaches only that device; both accounts' logs still get the message.
            self.sent.append((device, other, text))
        time.sleep(0.1)

    @rule(device=st.sampled_from(DEVICES), hard=st.booleans())
    def restart_client(self, device: str, hard: bool) -> None:
        self.steps += 1
        self.followers[device].restart(hard=hard)

    @rule(hard=st.booleans())
    def restart_relay(self, hard: bool) -> None:
        self.steps += 1
        if hard:
            self.relay.kill()
        else:
            self.relay.stop()
        time.sleep(0.2)
        self.relay.start()

    @rule(
        device=st.sampled_from(DEVICES),
        mode=st.sampled_from(["refuse", "delay", "cut_up", "cut_down", "blackhole"]),
        offset=st.integers(1, 20_000),
        ms=st.integers(1, 300),
    )
    def cut(self, device: str, mode: str, offset: int, ms: int) -> None:
        self.steps += 1
        plan: ScriptedPlan
        if mode == "refuse":
            plan = ScriptedPlan({("accept", None): [(0, Refuse())]})
        elif mode == "delay":
            plan = ScriptedPlan({("down", None): [(0, Delay(ms))], ("up", None): [(0, Delay(ms))]})
        elif mode == "blackhole":
            plan = ScriptedPlan({("down", None): [(offset, Blackhole())]})
        else:
            plan = ScriptedPlan({("up" if mode == "cut_up" else "down", None): [(offset, Cut(offset))]})
        proxy = self._proxy(device)
        assert proxy.proxy is not None
        proxy.call(proxy.proxy.set_plan, plan)
        proxy.call(proxy.proxy.reset_all)
        time.sleep(0.3)

    @rule(device=st.sampled_from(DEVICES))
    def heal(self, device: str) -> None:
        proxy = self._proxy(device)
        assert proxy.proxy is not None
        proxy.call(proxy.proxy.set_plan, PassPlan())
        proxy.call(proxy.proxy.reset_all)

    @precondition(lambda self: len(self.sent) > 0)
    @rule()
    def pause(self) -> None:
        self.steps += 1
        time.sleep(0.5)  # let the engines work between faults

    # -- invariants ----------------------------------------------------------------------------------

    @invariant()
    def no_duplicates_and_per_sender_order(self) -> None:
        for device, store in self.stores.items():
            messages = store.history()
            texts = [m.text for m in messages]
            assert len(texts) == len(set(texts)), f"{device} holds a message twice"
            seqs: dict[str, list[int]] = defaultdict(list)
            for m in messages:
                if m.log_position is not None:
                    seqs[m.sender_device].append(m.pair_seq)
            for sender, values in seqs.items():
                assert values == sorted(values), f"{device}: {sender}'s messages out of order: {values}"

    @invariant()
    def every_enqueued_message_is_kept_by_its_sender(self) -> None:
        for device, store in self.stores.items():
            mine = {t for d, _, t in self.sent if d == device}
            held = {e.body.decode() for e in store.outbox(("queued", "sealed", "posted", "logged", "failed"))}
            assert mine <= held, f"{device} lost an enqueued message"

    # -- the end ---------------------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.stores:
                self._converge()
        finally:
            for follower in self.followers.values():
                follower.stop(hard=True)
            for proxy in self.proxies.values():
                proxy.close()
            for store in self.stores.values():
                store.db.close()
            self.relay.stop()
            shutil.rmtree(self.work, ignore_errors=True)

    def _converge(self) -> None:
        for device in DEVICES:
            self.heal(device)
        if self.relay.proc is None or self.relay.proc.poll() is not None:
            self.relay.start()
        for follower in self.followers.values():
            if not follower.running:
                follower.start()
        expected = [t for _, _, t in self.sent]

        def settled() -> bool:
            for store in self.stores.values():
                if store.outbox() or store.pending_count():
                    return False
                logged = [m for m in store.history() if m.log_position is not None]
                if len(logged) != len(expected):
                    return False
            return True

        wait_until(settled, SETTLE_SECONDS, "every device to hold every message", interval=0.5)
        if os.environ.get("TETHERLESS_STATEFUL_VERBOSE"):
            faults = {d: p.proxy.stats if p.proxy else {} for d, p in self.proxies.items()}
            print(
                f"\nsteps={self.steps} sent={len(expected)} "
                f"relay_starts={self.relay.logs().count('ready at')} faults={faults}"
            )
        order = {t: i for i, t in enumerate(expected)}
        for device, store in self.stores.items():
            messages = store.history()
            texts = [m.text for m in messages]
            assert len(texts) == len(expected) == len(set(texts)), device
            assert set(texts) == set(expected), device
            by_sender: dict[str, list[str]] = defaultdict(list)
            for m in messages:
                assert m.text is not None
                by_sender[m.sender_device].append(m.text)
            for sender_texts in by_sender.values():  # per-sender order = send order
                assert sender_texts == sorted(sender_texts, key=lambda t: order[t]), device
            assert not any(m.late for m in messages)
            assert [m.log_position for m in messages] == sorted(m.log_position or 0 for m in messages)


TestSyncStateful = SyncMachine.TestCase
TestSyncStateful.settings = settings(
    max_examples=int(os.environ.get("TETHERLESS_STATEFUL_EXAMPLES", "6")),
    stateful_step_count=int(os.environ.get("TETHERLESS_STATEFUL_STEPS", "20")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestSyncStateful = pytest.mark.slow(TestSyncStateful)
