"""The device-list part alone (protocol/client/engine/lists.py): the verified list is cached per part for
``DEVICE_LIST_REFRESH_SECONDS`` and fetched again on ``fresh``; a relay error is turned as the engine retries it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from protocol.client.engine.base import RetryError
from protocol.client.engine.lists import DEVICE_LIST_REFRESH_SECONDS
from protocol.errors import ErrorCode, RemoteError
from tests.support.engine_parts import Parts


def _serve_lists(parts: Parts) -> list[str]:
    fetched: list[str] = []

    async def device_chain(account_id: str) -> Any:
        fetched.append(account_id)
        version = len(fetched)
        return SimpleNamespace(devices=[f"device@{version}"], head=SimpleNamespace(version=version, format=2))

    parts.relay.device_chain = device_chain  # type: ignore[method-assign]
    return fetched


def test_the_list_is_reused_until_it_is_old_or_asked_fresh(tmp_path: Path) -> None:
    parts = Parts(tmp_path)
    fetched = _serve_lists(parts)
    assert parts.lists.cached_devices() is None

    async def main() -> None:
        assert (await parts.lists.current())[0] == 1
        assert (await parts.lists.current())[0] == 1  # cached
        assert parts.lists.list_format == 2
        assert parts.lists.cached_devices() == ["device@1"]
        assert (await parts.lists.current(fresh=True))[0] == 2
        await trio.sleep(DEVICE_LIST_REFRESH_SECONDS + 1)
        assert (await parts.lists.current())[0] == 3  # too old: fetched again

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert fetched == [parts.keys.account_id] * 3


def test_an_unavailable_relay_is_a_retry(tmp_path: Path) -> None:
    parts = Parts(tmp_path)

    async def device_chain(account_id: str) -> Any:
        raise RemoteError(ErrorCode.UNAVAILABLE, "later", http_status=503)

    parts.relay.device_chain = device_chain  # type: ignore[method-assign]
    with pytest.raises(RetryError, match="unavailable"):
        trio.run(parts.lists.current)
    assert parts.lists.cached_devices() is None
