"""What a command of the SDK does not ask the relay again (issue 14 point 2): the prekey check and the relay's
document kept in the home. Local rules, no relay process; the same against a real relay:
tests/e2e/test_client_sdk.py::test_a_later_client_of_the_same_home_reuses_its_token_prekey_check_and_relay_document.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from protocol.client.localdb import LocalDB
from protocol.client.sdk import (
    PREKEY_CHECK_SECONDS,
    WELL_KNOWN_CACHE_SECONDS,
    PrekeyCheck,
    RelayClient,
    prekey_check_due,
)
from protocol.client.sessions import LOW_WATER
from protocol.messages import Limits, PrekeyCounts, WellKnown

NOW_MS = 1_800_000_000_000
FULL = PrekeyCounts(x25519_one_time=50, mlkem_one_time=50, signed_prekey_id=3, last_resort_id=4)


def _check(counts: PrekeyCounts = FULL, *, age_ms: int = 0, meta: bytes = b"meta") -> PrekeyCheck:
    return PrekeyCheck(counts=counts, checked_at_ms=NOW_MS - age_ms, meta=meta)


def test_a_recent_check_with_enough_prekeys_is_trusted() -> None:
    assert not prekey_check_due(_check(), b"meta", NOW_MS)
    assert not prekey_check_due(_check(age_ms=int(PREKEY_CHECK_SECONDS * 1000) - 1), b"meta", NOW_MS)


@pytest.mark.parametrize(
    ("last", "meta"),
    [
        (None, b"meta"),  # never checked
        (_check(), None),  # no local prekeys yet
        (_check(meta=b"before the rollback recovery"), b"meta"),  # the local prekeys changed since
        (_check(age_ms=int(PREKEY_CHECK_SECONDS * 1000)), b"meta"),  # too old
        (_check(age_ms=-1), b"meta"),  # from the future: the clock moved back
        (
            _check(
                PrekeyCounts(x25519_one_time=LOW_WATER - 1, mlkem_one_time=50, signed_prekey_id=3, last_resort_id=4)
            ),
            b"meta",
        ),
        (
            _check(
                PrekeyCounts(x25519_one_time=50, mlkem_one_time=LOW_WATER - 1, signed_prekey_id=3, last_resort_id=4)
            ),
            b"meta",
        ),
        (_check(PrekeyCounts(x25519_one_time=50, mlkem_one_time=50, last_resort_id=4)), b"meta"),
        (_check(PrekeyCounts(x25519_one_time=50, mlkem_one_time=50, signed_prekey_id=3)), b"meta"),
    ],
)
def test_the_relay_is_asked_again(last: PrekeyCheck | None, meta: bytes | None) -> None:
    assert prekey_check_due(last, meta, NOW_MS)


def _document(max_envelope_bytes: int) -> WellKnown:
    limits = Limits(
        max_body_bytes=1,
        max_batch_envelopes=1,
        max_envelope_bytes=max_envelope_bytes,
        max_inbox_envelopes=1,
        default_ttl_seconds=1,
        max_ttl_seconds=1,
        max_page_envelopes=1,
        session_ttl_seconds=1,
        challenge_ttl_seconds=1,
    )
    return WellKnown(relay="relay.test", relay_key=b"k" * 32, api_versions=["v1"], limits=limits)


async def test_the_relays_document_is_kept_in_the_home_for_a_bounded_time(tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path / "home", b"k" * 32)
    asked: list[int] = []

    async def read_with(now_ms: int, url: str = "http://relay.test") -> WellKnown:
        async with trio.open_nursery() as nursery:
            client = RelayClient(nursery, url, local_db=db, wall_clock=lambda: now_ms / 1000)

            async def well_known() -> WellKnown:
                asked.append(now_ms)
                return _document(len(asked))

            client.api.well_known = well_known  # type: ignore[method-assign]
            return await client.well_known()

    assert (await read_with(NOW_MS)).limits.max_envelope_bytes == 1
    later = NOW_MS + int(WELL_KNOWN_CACHE_SECONDS * 1000) - 1
    assert (await read_with(later)).limits.max_envelope_bytes == 1  # another command, within the bound: no request
    assert (await read_with(NOW_MS + int(WELL_KNOWN_CACHE_SECONDS * 1000))).limits.max_envelope_bytes == 2
    assert (await read_with(NOW_MS - 1)).limits.max_envelope_bytes == 3  # clock moved back: not trusted
    assert (await read_with(NOW_MS, "http://other.test")).limits.max_envelope_bytes == 4  # per relay URL
    assert len(asked) == 4
    db.close()
