"""Checks of protocol/client/sessions.py that mutation testing found unasserted (docs/security.md "Mutation
testing"): what a replay-cache row keeps alive and for how long, each half of the rollback check and the recovery
of a rolled-back home, the prekey upload's conditions and boundaries, the adopted enrolment prekeys, and every
refusal of ``open`` with its exact code and detail. Managers run over the in-memory store unless the check is
about the local database; times are set to the millisecond (``_at``) where a boundary is asserted."""

from __future__ import annotations

import copy
import hashlib
import hmac
import math
import os
from pathlib import Path

import msgspec
import pytest

from protocol import codec, prekeys
from protocol import session as sealed_v2
from protocol.client.keystore import Keystore
from protocol.client.localdb import DB_FILE, LocalDB, StateRolledBackError
from protocol.client.sessions import (
    DEFAULT_MAX_PREKEY_AGE_MS,
    ENROLMENT_PREKEYS_TABLE,
    GRACE_MS,
    LOW_WATER,
    ROLLBACK_ID_JUMP,
    ROTATE_MS,
    T_META,
    T_PEER,
    T_PREKEY,
    T_PROCESSED,
    T_STATE,
    T_TRANSCRIPT,
    TARGET_ONE_TIME,
    MemoryStore,
    PrekeyMeta,
    PrekeyPrivate,
    PrekeysUnavailableError,
    Processed,
    SessionManager,
    Transcript,
    _decode_transcript,
    forget_after_rollback,
    recover_home_from_rollback,
)
from protocol.client.store import GUARDED_SETS, ClientStore
from protocol.errors import ErrorCode, TetherlessError
from protocol.handshake import mlkem_public, x25519_public
from protocol.messages import PrekeyCounts, PrekeyUpload, SealedV2
from protocol.payload import InvalidPayloadError
from protocol.signing import digest
from tests.protocol.client.test_sessions import (
    Clock,
    FakeRelayPrekeys,
    _entry,
    _keys,
    _open,
    _pair,
    _seal,
    _sealed,
)

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


# -- the replay cache: what a row keeps alive, and for how long ------------------------------------------------


def _at(clock: Clock, ms: int) -> None:
    """Set ``clock`` so that ``SessionManager.now_ms()`` is exactly ``ms`` (``ms / 1000`` alone can round below)."""
    clock.now = math.nextafter(ms / 1000, math.inf)


def _transcript_rows(manager: SessionManager) -> list[Transcript]:
    rows = [manager.store.get(T_TRANSCRIPT, key) for key in manager.store.keys(T_TRANSCRIPT)]
    return [_decode_transcript(raw) for raw in rows if raw is not None]


def test_a_replay_cache_row_names_the_reusable_prekeys_it_used() -> None:
    clock = Clock()
    alice, bob, relay = _pair(clock)
    meta = codec.decode(bob.store.get(T_META, "ids") or b"", PrekeyMeta)
    spk, lr = f"{prekeys.X25519_SIGNED}/{meta.signed_prekey_id}", f"{prekeys.MLKEM_LAST_RESORT}/{meta.last_resort_id}"
    _at(clock, 1_700_000_000_000)
    alice.establish(relay.claim(one_time=False), _entry(bob.keys))  # the PQ last-resort key: reusable
    _open(bob, alice, _seal(alice, bob, "on the last-resort key"))
    (row,) = _transcript_rows(bob)
    assert row == Transcript(expires_at_ms=1_700_000_000_000 + bob.max_ttl_ms + GRACE_MS, prekeys=[spk, lr])
    # A start on one-time keys: their privates are deleted on use, only the signed prekey can open it again.
    carol = SessionManager(_keys("carol"), MemoryStore(), wall_clock=clock)
    carol.establish(relay.claim(), _entry(bob.keys))
    _open(bob, carol, _seal(carol, bob, "on one-time keys"))
    assert sorted(r.prekeys for r in _transcript_rows(bob)) == sorted([[spk, lr], [spk]])


def test_a_row_on_one_time_keys_stays_while_the_signed_prekey_exists() -> None:
    clock = Clock()
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(), _entry(bob.keys))
    first = _seal(alice, bob, "hello")
    _open(bob, alice, first)
    bob.store.delete(T_STATE, _sealed(bob, first).session_id)
    clock.now += (bob.max_ttl_ms + GRACE_MS) / 1000 + 86_400  # past its expiry; the signed prekey never rotated
    assert bob.prune() == 1  # the processed row only
    assert len(bob.store.keys(T_TRANSCRIPT)) == 1


def test_prune_counts_and_boundaries() -> None:
    clock = Clock()
    manager = SessionManager(_keys("bob"), MemoryStore(), wall_clock=clock)
    now = 1_700_000_000_000
    _at(clock, now)
    processed = Processed(
        expires_at_ms=now,
        sender="s",
        sender_sign_key=b"k",
        recipient="r",
        sent_at_ms=1,
        message_id=b"m",
        content_type="text/plain",
        body=b"",
    )
    for key in (b"p1", b"p2"):
        manager.store.put(T_PROCESSED, key, codec.encode(processed))
    for key in (b"t1", b"t2"):
        manager.store.put_member(T_TRANSCRIPT, key, codec.encode(Transcript(expires_at_ms=now)))
    assert manager.prune() == 0  # expiring now is not expired yet
    _at(clock, now + 1)
    assert manager.prune() == 4
    assert manager.store.keys(T_PROCESSED) == manager.store.keys(T_TRANSCRIPT) == []


def test_a_replayed_session_start_is_refused_with_its_detail() -> None:
    clock = Clock()
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(one_time=False), _entry(bob.keys))
    first = _seal(alice, bob, "hello")
    _open(bob, alice, first)
    bob.store.delete(T_STATE, _sealed(bob, first).session_id)
    with pytest.raises(InvalidPayloadError) as err:
        _open(bob, alice, first)
    assert (err.value.code, err.value.detail) == (ErrorCode.MALFORMED_BODY, "a replayed session start")


# -- open's other refusals ---------------------------------------------------------------------------------------


def test_a_message_on_a_lost_session_is_refused_with_its_detail() -> None:
    clock = Clock()
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(), _entry(bob.keys))
    _open(bob, alice, _seal(alice, bob, "hello"))
    _open(alice, bob, _seal(bob, alice, "hi"))
    later = _seal(alice, bob, "after the reply")  # no prekey header any more
    sealed = _sealed(bob, later)
    assert sealed.kind == sealed_v2.KIND_MESSAGE
    bob.store.delete(T_STATE, sealed.session_id)
    with pytest.raises(InvalidPayloadError) as err:
        bob.open(sealed, envelope_id=b"e" * 16, sender=_entry(alice.keys))
    assert (err.value.code, err.value.detail) == (ErrorCode.MALFORMED_BODY, "no such session (lost state?)")


def _renamed(sealed: SealedV2, **fields: int) -> SealedV2:
    message = msgspec.structs.replace(sealed_v2.prekey_message(sealed), **fields)
    return msgspec.structs.replace(sealed, body=codec.encode(message))


def test_a_session_start_naming_unknown_prekeys_is_refused_with_its_detail() -> None:
    clock = Clock()
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(), _entry(bob.keys))
    sealed = _sealed(bob, _seal(alice, bob, "hello"))
    privates = bob.one_time_privates()
    for fields, detail in (
        ({"signed_prekey_id": 12345}, "the message names a prekey this device does not have"),
        ({"pq_prekey_id": 12345}, "the message names a prekey this device does not have"),
        ({"one_time_prekey_id": 12345}, "the one-time prekey was already used or is unknown"),
    ):
        with pytest.raises(InvalidPayloadError) as err:
            bob.open(_renamed(sealed, **fields), envelope_id=b"e" * 16, sender=_entry(alice.keys))
        assert (err.value.code, err.value.detail) == (ErrorCode.MALFORMED_BODY, detail)
    assert bob.one_time_privates() == privates
    assert bob.store.keys(T_STATE) == bob.store.keys(T_TRANSCRIPT) == []


def test_a_redelivered_envelope_gives_exactly_what_it_opened_to() -> None:
    clock = Clock()
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(), _entry(bob.keys))
    ciphertext = _seal(alice, bob, "hello")
    opened = bob.open(_sealed(bob, ciphertext), envelope_id=b"e" * 16, sender=_entry(alice.keys))
    assert bob.processed(b"e" * 16) == opened
    assert bob.processed(b"f" * 16) is None


def test_skipped_message_keys_live_max_ttl_plus_a_day() -> None:
    """A message overtaken by a later one still opens until ``max_ttl`` + one day after it was skipped."""
    clock = Clock()
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(), _entry(bob.keys))
    first, second = _seal(alice, bob, "one"), _seal(alice, bob, "two")
    skipped_at = 1_700_000_000_000
    _at(clock, skipped_at)
    assert _open(bob, alice, second) == "two"
    store = bob.store
    assert isinstance(store, MemoryStore)
    saved = copy.deepcopy(store._tables)
    _at(clock, skipped_at + bob.max_ttl_ms + 86_400_000 - 1)
    assert _open(bob, alice, first) == "one"
    store._tables = saved
    _at(clock, skipped_at + bob.max_ttl_ms + 86_400_000)
    with pytest.raises(InvalidPayloadError) as err:
        _open(bob, alice, first)
    assert (err.value.code, err.value.detail) == (ErrorCode.MALFORMED_BODY, "message key already used or unknown")


def test_max_ttl_is_in_seconds() -> None:
    assert SessionManager(_keys("bob"), MemoryStore(), max_ttl_seconds=7).max_ttl_ms == 7_000


def test_sealing_without_a_session_names_the_peer() -> None:
    manager = SessionManager(_keys("alice"), MemoryStore(), wall_clock=Clock())
    with pytest.raises(LookupError) as err:
        _seal(manager, SessionManager(_keys("bob"), MemoryStore()), "x")
    assert str(err.value) == f"no session with {_keys('bob').address}"


# -- prekey uploads -----------------------------------------------------------------------------------------------


def _counts(relay: FakeRelayPrekeys, **fields: int | None) -> PrekeyCounts:
    return msgspec.structs.replace(relay.counts(), **fields)


def test_each_relay_prekey_id_alone_reveals_a_rollback() -> None:
    clock = Clock()
    _, bob, relay = _pair(clock)
    meta = codec.decode(bob.store.get(T_META, "ids") or b"", PrekeyMeta)
    for kind, field in ((prekeys.X25519_SIGNED, "signed_prekey_id"), (prekeys.MLKEM_LAST_RESORT, "last_resort_id")):
        unseen = meta.next_id[kind]
        with pytest.raises(StateRolledBackError) as err:
            bob.prekey_upload(_counts(relay, **{field: unseen}))
        assert str(err.value) == (
            f"the relay serves this device's {kind} prekey #{unseen}, newer than any this home remembers "
            "creating: it was restored from an older copy. " + StateRolledBackError.RECOVERY
        )
        assert bob.prekey_upload(_counts(relay, **{field: unseen - 1})) is None  # its newest id: no alarm


def test_a_relay_that_lost_our_signed_prekey_gets_the_same_keys_again() -> None:
    clock = Clock()
    _, bob, relay = _pair(clock)
    assert relay.signed is not None
    assert relay.last_resort is not None
    upload = bob.prekey_upload(_counts(relay, signed_prekey_id=None))
    assert upload == PrekeyUpload(signed_prekey=relay.signed, last_resort=relay.last_resort, one_time=[])
    upload = bob.prekey_upload(_counts(relay, last_resort_id=None))
    assert upload == PrekeyUpload(signed_prekey=None, last_resort=relay.last_resort, one_time=[])


def test_one_time_keys_are_topped_up_only_below_the_low_water_mark() -> None:
    clock = Clock()
    _, bob, relay = _pair(clock)
    for _ in range(TARGET_ONE_TIME - LOW_WATER):
        relay.claim()
    assert relay.counts().x25519_one_time == LOW_WATER
    assert bob.prekey_upload(relay.counts()) is None


def _dirty(manager: SessionManager) -> object:
    """``prekeys_dirty`` typed ``object``, so that mypy does not narrow it between asserts (it is a bool)."""
    return manager.prekeys_dirty


def test_prekeys_dirty_until_the_counts_were_checked() -> None:
    clock = Clock()
    alice = SessionManager(_keys("alice"), MemoryStore(), wall_clock=clock)
    bob = SessionManager(_keys("bob"), MemoryStore(), wall_clock=clock)
    assert _dirty(bob) is True  # a fresh manager has never compared with the relay
    relay = FakeRelayPrekeys(bob.keys)
    relay.put(bob.prekey_upload(None))
    assert _dirty(bob) is False
    assert bob.prekey_upload(relay.counts()) is None
    assert _dirty(bob) is False
    alice.establish(relay.claim(), _entry(bob.keys))
    _open(bob, alice, _seal(alice, bob, "uses a one-time key"))
    assert _dirty(bob) is True


def test_a_retired_private_is_kept_max_ttl_plus_grace() -> None:
    clock = Clock()
    _, bob, relay = _pair(clock)
    first = relay.signed
    assert first is not None
    row = f"{prekeys.X25519_SIGNED}/{first.key_id}"
    retired_at = first.created_at_ms + ROTATE_MS
    _at(clock, retired_at)
    relay.put(bob.prekey_upload(relay.counts()))  # rotation: the first signed prekey is retired now
    assert codec.decode(bob.store.get(T_PREKEY, row) or b"", PrekeyPrivate).retired_at_ms == retired_at
    _at(clock, retired_at + bob.max_ttl_ms + GRACE_MS)
    relay.put(bob.prekey_upload(relay.counts()))
    assert bob.store.get(T_PREKEY, row) is not None  # the last moment a message sealed to it may arrive
    _at(clock, retired_at + bob.max_ttl_ms + GRACE_MS + 1)
    relay.put(bob.prekey_upload(relay.counts()))
    assert bob.store.get(T_PREKEY, row) is None


def test_served_prekey_age_boundary_and_detail() -> None:
    clock = Clock()
    alice, bob, relay = _pair(clock)
    bundle = relay.claim(one_time=False)
    signed_at = bundle.signed_prekey.created_at_ms
    _at(clock, signed_at + DEFAULT_MAX_PREKEY_AGE_MS)
    alice.establish(bundle, _entry(bob.keys))  # exactly the maximum age: still accepted
    _at(clock, signed_at + 31 * 86_400_000)
    with pytest.raises(TetherlessError) as err:
        alice.establish(bundle, _entry(bob.keys))
    assert (err.value.code, err.value.detail) == (
        ErrorCode.PREKEY_INVALID,
        f"the relay served a {prekeys.X25519_SIGNED} prekey signed 31 days ago (at most 30): "
        "the device has not refreshed it",
    )


# -- a linked device's first prekeys --------------------------------------------------------------------------------


def _offer(manager: SessionManager, spk_id: int, lr_id: int, now_ms: int) -> None:
    """Store the enrolment bundle a linked device offered (``protocol.client.devices.EnrolmentPrekeys``)."""
    keys = manager.keys
    spk_private, pq_seed = os.urandom(32), os.urandom(64)
    offered = {
        "signed_prekey": prekeys.sign_prekey(
            keys.signing_key, keys.device_id, prekeys.X25519_SIGNED, spk_id, x25519_public(spk_private), now_ms
        ),
        "signed_prekey_private": spk_private,
        "pq_prekey": prekeys.sign_prekey(
            keys.signing_key, keys.device_id, prekeys.MLKEM_LAST_RESORT, lr_id, mlkem_public(pq_seed), now_ms
        ),
        "pq_prekey_seed": pq_seed,
    }
    manager.store.put(ENROLMENT_PREKEYS_TABLE, "bundle", msgspec.msgpack.encode(offered))


def test_adopted_prekeys_open_session_starts_and_ids_continue_after_them() -> None:
    clock = Clock()
    alice = SessionManager(_keys("alice"), MemoryStore(), wall_clock=clock)
    laptop = SessionManager(_keys("laptop"), MemoryStore(), wall_clock=clock)
    _offer(laptop, 7, 3, laptop.now_ms())
    relay = FakeRelayPrekeys(laptop.keys)
    relay.put(laptop.prekey_upload(_counts(relay, signed_prekey_id=7, last_resort_id=3)))
    meta = codec.decode(laptop.store.get(T_META, "ids") or b"", PrekeyMeta)
    assert (meta.signed_prekey_id, meta.last_resort_id) == (7, 3)
    assert meta.next_id == {
        prekeys.X25519_SIGNED: 8,
        prekeys.MLKEM_LAST_RESORT: 4,
        prekeys.X25519_ONE_TIME: 1 + TARGET_ONE_TIME,
        prekeys.MLKEM_ONE_TIME: 1 + TARGET_ONE_TIME,
    }
    # The relay serves the offered keys (as after enrolment): a session start on them opens.
    relay.signed = codec.decode(laptop.store.get(T_PREKEY, f"{prekeys.X25519_SIGNED}/7") or b"", PrekeyPrivate).signed
    relay.last_resort = codec.decode(
        laptop.store.get(T_PREKEY, f"{prekeys.MLKEM_LAST_RESORT}/3") or b"", PrekeyPrivate
    ).signed
    alice.establish(relay.claim(one_time=False), _entry(laptop.keys))
    assert _open(laptop, alice, _seal(alice, laptop, "to the new laptop")) == "to the new laptop"


def test_adoption_never_moves_an_id_counter_back() -> None:
    """A home recovered from a rollback before its first upload keeps the jump past the lost future's ids."""
    clock = Clock()
    laptop = SessionManager(_keys("laptop"), MemoryStore(), wall_clock=clock)
    _offer(laptop, 1, 1, laptop.now_ms())
    forget_after_rollback(laptop.store)
    laptop.prekey_upload(_counts(FakeRelayPrekeys(laptop.keys), signed_prekey_id=1, last_resort_id=1))
    meta = codec.decode(laptop.store.get(T_META, "ids") or b"", PrekeyMeta)
    assert meta.next_id[prekeys.X25519_SIGNED] == meta.next_id[prekeys.MLKEM_LAST_RESORT] == 1 + ROLLBACK_ID_JUMP


# -- rows and keys ----------------------------------------------------------------------------------------------------


def test_peer_rows_are_a_keyed_hash_of_the_address_under_the_device_seed() -> None:
    """The on-disk key of ``session_peer`` (crypto.md §13): other row keys would lose every peer's sessions."""
    clock = Clock()
    alice, bob, relay = _pair(clock)
    carol = SessionManager(_keys("carol"), MemoryStore(), wall_clock=clock)
    carol_relay = FakeRelayPrekeys(carol.keys)
    carol_relay.put(carol.prekey_upload(None))
    alice.establish(relay.claim(), _entry(bob.keys))
    alice.establish(carol_relay.claim(), _entry(carol.keys))
    row_key = digest("local-row-key", alice.keys.signing_seed)
    expected = {hmac.new(row_key, peer.keys.address.encode(), hashlib.sha256).digest()[:16] for peer in (bob, carol)}
    assert set(alice.store.keys(T_PEER)) == expected
    assert len(expected) == 2


def test_memory_store_lists_keys_of_mixed_types() -> None:
    """``session_peer`` holds address keys (str) and hashed keys (bytes) until the migration: listing must work."""
    store = MemoryStore()
    for key in ("legacy", b"\x00hashed", 3):
        store.put("t", key, b"v")
    assert sorted(map(repr, store.keys("t"))) == sorted(map(repr, ["legacy", b"\x00hashed", 3]))


# -- `tetherless sync --recover-rollback` -----------------------------------------------------------------------------


def test_recovering_a_rolled_back_home_forgets_sessions_and_moves_every_counter_on(tmp_path: Path) -> None:
    """crypto.md §13.2-§13.3: an old ``state.db`` put back (with a replay-cache row deleted from it) is refused;
    the recovery accepts it, drops every session, moves the prekey ids and ``writer_seq`` on and the guarded
    sets are trusted as they are."""
    home, clock = tmp_path / "home", Clock()
    keys = _keys("bob")
    keystore = Keystore(home, passphrase="correct horse")
    keystore.create(keys)
    db = keystore.local_db()
    alice = SessionManager(_keys("alice"), MemoryStore(), wall_clock=clock)
    bob = SessionManager(keys, db, wall_clock=clock)
    relay = FakeRelayPrekeys(keys)
    relay.put(bob.prekey_upload(None))
    alice.establish(relay.claim(one_time=False), _entry(keys))
    _open(bob, alice, _seal(alice, bob, "hello"))
    with ClientStore(db).transaction():
        ClientStore(db).advance_counter("writer_seq", 5)
    keystore.close()
    saved = (home / DB_FILE).read_bytes()
    later = Keystore(home, passphrase="correct horse")
    later.local_db()  # the keystore's generation moves past the saved copy's
    later.close()
    (home / DB_FILE).write_bytes(saved)
    restored = LocalDB.open(home, later.unlock().dek)
    (transcript,) = restored.keys(T_TRANSCRIPT)
    restored.execute(f'DELETE FROM "{T_TRANSCRIPT}" WHERE key = ?', (transcript,))
    restored.close()
    with pytest.raises(StateRolledBackError):
        Keystore(home, passphrase="correct horse").local_db()

    recover_home_from_rollback(Keystore(home, passphrase="correct horse"))

    reopened = Keystore(home, passphrase="correct horse")
    db = reopened.local_db()  # the generation was accepted
    assert db.keys(T_STATE) == db.keys(T_PEER) == []
    meta = codec.decode(db.get(T_META, "ids") or b"", PrekeyMeta)
    assert meta.next_id[prekeys.X25519_SIGNED] == 2 + ROLLBACK_ID_JUMP
    assert meta.signed_created_at_ms == 0
    assert ClientStore(db).counter("writer_seq") == 5 + ROLLBACK_ID_JUMP
    for table in GUARDED_SETS:
        db.check_members(table)  # accepted as they are now
    reopened.close()
