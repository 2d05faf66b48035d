"""The device-list append rules: a pure function of the head and the stored credentials, no database."""

from __future__ import annotations

import pytest

from protocol.errors import ErrorCode, TetherlessError
from relay.store.base import CredentialUse, DeviceListUpdate, NewCredential
from relay.store.device_rules import ACTIVE, PENDING, CredentialRow, check_append, counter_ok

KEY = NewCredential(b"cred", b"public-key", "example.org")


def update(
    *, version: int = 3, added: tuple[NewCredential, ...] = (), uses: tuple[CredentialUse, ...] = ()
) -> DeviceListUpdate:
    return DeviceListUpdate("acct", version, b"signed", [], [], uses, added)


def code_of(head: int | None, stored: dict[bytes, CredentialRow], change: DeviceListUpdate) -> ErrorCode | None:
    try:
        check_append(head, stored, change)
    except TetherlessError as exc:
        return exc.code
    return None


@pytest.mark.parametrize(
    ("stored", "new", "ok"), [(0, 0, True), (0, 1, True), (5, 6, True), (5, 5, False), (5, 0, False), (1, 0, False)]
)
def test_sign_counters_must_increase_unless_the_authenticator_has_none(stored: int, new: int, ok: bool) -> None:
    assert counter_ok(stored, new) is ok


def test_the_version_must_be_built_on_the_head() -> None:
    assert code_of(None, {}, update()) is ErrorCode.UNKNOWN_ACCOUNT
    assert code_of(2, {}, update(version=3)) is None
    assert code_of(3, {}, update(version=3)) is ErrorCode.DEVICE_LIST_CONFLICT
    assert code_of(1, {}, update(version=3)) is ErrorCode.DEVICE_LIST_CONFLICT


def test_an_added_credential_must_be_pending_with_the_same_key_and_rp_id() -> None:
    pending = CredentialRow(b"public-key", "example.org", 0, PENDING)
    assert code_of(2, {b"cred": pending}, update(added=(KEY,))) is None
    for wrong in (
        CredentialRow(b"public-key", "example.org", 0, ACTIVE),
        CredentialRow(b"other-key", "example.org", 0, PENDING),
        CredentialRow(b"public-key", "evil.example", 0, PENDING),
    ):
        assert code_of(2, {b"cred": wrong}, update(added=(KEY,))) is ErrorCode.WEBAUTHN_INVALID
    assert code_of(2, {}, update(added=(KEY,))) is ErrorCode.WEBAUTHN_INVALID


def test_an_assertion_replaying_a_counter_is_refused() -> None:
    active = {b"cred": CredentialRow(b"public-key", "example.org", 7, ACTIVE)}
    use = CredentialUse(b"cred", b"public-key", "example.org", 7)
    assert code_of(2, active, update(uses=(use,))) is ErrorCode.WEBAUTHN_REPLAYED
    assert code_of(2, active, update(uses=(CredentialUse(b"cred", b"public-key", "example.org", 8),))) is None
