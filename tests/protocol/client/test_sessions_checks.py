"""Checks of protocol/client/sessions.py that mutation testing found unasserted (docs/security.md "Mutation
testing"): what a rollback recovery resets and keeps, legacy replay-cache rows, the in-memory store's delete and
the error that names the devices without prekeys."""

from __future__ import annotations

import pytest

from protocol import codec, prekeys
from protocol.client.sessions import (
    GRACE_MS,
    ROLLBACK_ID_JUMP,
    ROTATE_MS,
    T_META,
    T_PEER,
    T_STATE,
    MemoryStore,
    PrekeyMeta,
    PrekeysUnavailableError,
    SessionManager,
    _decode_transcript,
    forget_after_rollback,
)
from protocol.errors import ErrorCode
from protocol.payload import InvalidPayloadError
from tests.protocol.client.test_sessions import Clock, _entry, _keys, _pair, _seal, _sealed

_KINDS = (prekeys.X25519_SIGNED, prekeys.MLKEM_LAST_RESORT, prekeys.X25519_ONE_TIME, prekeys.MLKEM_ONE_TIME)


def test_forget_after_rollback_drops_sessions_and_moves_every_id_on() -> None:
    store = MemoryStore()
    store.put(T_STATE, b"s1", b"x")
    store.put(T_STATE, b"s2", b"x")
    store.put(T_PEER, "peer", b"x")
    meta = PrekeyMeta(next_id={prekeys.X25519_SIGNED: 5}, signed_prekey_id=4, signed_created_at_ms=99)
    store.put(T_META, "ids", codec.encode(meta))
    assert forget_after_rollback(store) == 3
    after = codec.decode(store.get(T_META, "ids") or b"", PrekeyMeta)
    assert after.next_id == {
        prekeys.X25519_SIGNED: 5 + ROLLBACK_ID_JUMP,
        prekeys.MLKEM_LAST_RESORT: 1 + ROLLBACK_ID_JUMP,
        prekeys.X25519_ONE_TIME: 1 + ROLLBACK_ID_JUMP,
        prekeys.MLKEM_ONE_TIME: 1 + ROLLBACK_ID_JUMP,
    }
    assert after.signed_created_at_ms == 0  # due for rotation at the next upload
    assert after.signed_prekey_id == 4  # its private stays: peers' session starts on it must open
    assert store.keys(T_STATE) == store.keys(T_PEER) == []


def test_forget_after_rollback_on_a_home_without_prekeys() -> None:
    store = MemoryStore()
    assert forget_after_rollback(store) == 0
    after = codec.decode(store.get(T_META, "ids") or b"", PrekeyMeta)
    assert after.next_id == dict.fromkeys(_KINDS, 1 + ROLLBACK_ID_JUMP)


def test_a_legacy_replay_cache_row_is_kept_longer() -> None:
    row = _decode_transcript((5_000).to_bytes(8, "big"))
    assert row.expires_at_ms == 5_000 + ROTATE_MS + GRACE_MS
    assert row.prekeys == []


def test_memory_store_delete_reports_what_it_removed() -> None:
    store = MemoryStore()
    assert store.delete("t", "k") is False  # no such table
    store.put("t", "k", b"v")
    assert store.delete("t", "other") is False  # no such row
    assert store.delete("t", "k") is True
    assert store.get("t", "k") is None


def test_prekeys_unavailable_names_every_device() -> None:
    err = PrekeysUnavailableError(["a.x@r", "b.x@r"])
    assert str(err) == "prekeys_unavailable: no prekey bundle for a.x@r, b.x@r"
    assert err.missing == ["a.x@r", "b.x@r"]


def test_a_device_without_one_time_prekeys_counts_zero_of_each_kind() -> None:
    manager = SessionManager(_keys("bob"), MemoryStore(), wall_clock=Clock())
    assert manager.one_time_privates() == {prekeys.X25519_ONE_TIME: 0, prekeys.MLKEM_ONE_TIME: 0}


def test_an_envelope_opened_with_another_devices_entry_says_so() -> None:
    alice, bob, relay = _pair(Clock())
    alice.establish(relay.claim(), _entry(bob.keys))
    sealed = _sealed(bob, _seal(alice, bob, "hello"))
    with pytest.raises(InvalidPayloadError) as err:
        bob.open(sealed, envelope_id=b"e" * 16, sender=_entry(bob.keys))
    assert (err.value.code, err.value.detail) == (
        ErrorCode.BAD_SIGNATURE,
        "sender entry does not match the sealed sender",
    )
