"""The value types `send` imports are msgspec Structs, and behave as the dataclasses they replaced did.

A dataclass costs 1.1-1.4 ms of CPU to create (its methods are generated as source and compiled); a Struct
0.035 ms (docs/performance.md, "CLI start-up, third round"). Deterministic: no timing, only what is created.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from protocol.client.engine.base import Context
from protocol.client.engine.engine import Status
from protocol.client.engine.epochs import LogView
from protocol.device_list import VerifiedChain
from protocol.ids import Address
from protocol.ratchet import _Work

# Standard library only, for `whoami` (protocol/client/identity.py): the one dataclass `send` may create.
ALLOWED = ["protocol.client.identity.PublicIdentity"]

LIST_DATACLASSES = """
import dataclasses, json, sys
import tetherless_cli.messages
found = sorted(
    f"{name}.{value.__qualname__}"
    for name, module in list(sys.modules.items())
    if name.split(".")[0] in ("protocol", "tetherless_cli")
    for value in vars(module).values()
    if isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == name
)
print(json.dumps(found))
"""


def test_the_modules_send_imports_create_no_dataclass_but_the_public_identity() -> None:
    done = subprocess.run([sys.executable, "-c", LIST_DATACLASSES], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == ALLOWED


def test_frozen_ones_compare_and_hash_by_value_and_refuse_assignment() -> None:
    a = Address(account="a" * 10, relay="relay.example", device="d" * 10)
    assert a == Address("a" * 10, "relay.example", "d" * 10)
    assert hash(a) == hash(Address("a" * 10, "relay.example", "d" * 10))
    assert a != Address("a" * 10, "relay.example")
    assert repr(a) == f"Address(account='{'a' * 10}', relay='relay.example', device='{'d' * 10}')"
    assert str(a) == f"{'d' * 10}.{'a' * 10}@relay.example"
    with pytest.raises(AttributeError):
        a.device = ""  # type: ignore[misc]


def test_defaults_and_default_factories_are_as_before() -> None:
    first = Context(None, None, None, None)  # type: ignore[arg-type]
    second = Context(None, None, None, None)  # type: ignore[arg-type]
    assert first.random_bytes is os.urandom
    assert first.wall_clock is time.time
    assert first.rng is not second.rng
    assert LogView().held_marks == {}
    assert LogView().held_marks is not LogView().held_marks
    assert VerifiedChain([], None, (1, b"")).removed_ids == frozenset()  # type: ignore[arg-type]
    assert Status().extra is not Status().extra


def test_the_mutable_ones_stay_mutable_and_unhashable() -> None:
    status = Status()
    status.state = "backoff"
    assert status == Status(state="backoff")
    with pytest.raises(TypeError):
        hash(status)
    work = _Work(None, b"", b"", b"", None, None, None, 0, 0, 0)  # type: ignore[arg-type]
    work.sent += 1
    assert work.sent == 1
    assert work.skipped == []
    assert work.skipped is not _Work(None, b"", b"", b"", None, None, None, 0, 0, 0).skipped  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        hash(work)
