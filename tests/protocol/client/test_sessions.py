"""SessionManager (protocol/client/sessions.py): prekeys, sessions, replays, persistence, without a relay.

Bundles are built from the manager's own uploads, as the relay would serve them; the
end-to-end behaviour over a real relay is in tests/e2e/test_sessions.py.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import msgspec
import nacl.public
import nacl.signing
import pytest

from protocol import codec, prekeys
from protocol import session as sealed_v2
from protocol.client.keystore import DeviceKeys
from protocol.client.localdb import LocalDB, StateRolledBackError, TamperedRowError
from protocol.client.sessions import (
    DEFAULT_MAX_PREKEY_AGE_MS,
    ENROLMENT_PREKEYS_TABLE,
    GRACE_MS,
    LOW_WATER,
    MAX_SESSIONS_PER_PEER,
    ROTATE_MS,
    T_PEER,
    T_PROCESSED,
    T_STATE,
    T_TRANSCRIPT,
    TARGET_ONE_TIME,
    MemoryStore,
    SessionManager,
    forget_after_rollback,
)
from protocol.device_list import device_entry
from protocol.errors import ErrorCode, TetherlessError
from protocol.ids import account_id_for, device_id_for
from protocol.messages import DeviceEntry, PrekeyBundle, PrekeyCounts, PrekeyUpload, SealedV2, SignedPrekey
from protocol.payload import InvalidPayloadError

RELAY = "relay.test"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _keys(name: str) -> DeviceKeys:
    signing = nacl.signing.SigningKey(hashlib.sha256(b"sign " + name.encode()).digest())
    sign_key = bytes(signing.verify_key)
    device, account = device_id_for(sign_key), account_id_for(sign_key)
    return DeviceKeys(
        signing_seed=bytes(signing),
        box_private_key=hashlib.sha256(b"box " + name.encode()).digest(),
        relay_url="http://relay.test",
        account_id=account,
        device_id=device,
        address=f"{device}.{account}@{RELAY}",
        device_name=name,
        list_format=2,
    )


def _entry(keys: DeviceKeys) -> DeviceEntry:
    box_key = bytes(nacl.public.PrivateKey(keys.box_private_key).public_key)
    return device_entry(keys.sign_public_key, box_key, added_at_ms=0)


class FakeRelayPrekeys:
    """What a relay keeps of one device's uploads, serving bundles like POST /v1/prekeys/claim."""

    def __init__(self, keys: DeviceKeys) -> None:
        self.keys = keys
        self.signed: SignedPrekey | None = None
        self.last_resort: SignedPrekey | None = None
        self.one_time: dict[str, list[SignedPrekey]] = {prekeys.X25519_ONE_TIME: [], prekeys.MLKEM_ONE_TIME: []}

    def put(self, upload: PrekeyUpload | None) -> PrekeyCounts:
        if upload is not None:
            self.signed = upload.signed_prekey or self.signed
            self.last_resort = upload.last_resort or self.last_resort
            for key in upload.one_time:
                self.one_time[key.kind].append(key)
        return self.counts()

    def counts(self) -> PrekeyCounts:
        return PrekeyCounts(
            x25519_one_time=len(self.one_time[prekeys.X25519_ONE_TIME]),
            mlkem_one_time=len(self.one_time[prekeys.MLKEM_ONE_TIME]),
            signed_prekey_id=self.signed.key_id if self.signed else None,
            last_resort_id=self.last_resort.key_id if self.last_resort else None,
        )

    def claim(self, *, one_time: bool = True) -> PrekeyBundle:
        assert self.signed is not None
        assert self.last_resort is not None
        pq = self.one_time[prekeys.MLKEM_ONE_TIME].pop(0) if one_time else self.last_resort
        otk = self.one_time[prekeys.X25519_ONE_TIME].pop(0) if one_time else None
        return PrekeyBundle(
            address=self.keys.address,
            identity_key=_entry(self.keys).box_key,
            signed_prekey=self.signed,
            pq_prekey=pq,
            one_time_prekey=otk,
        )


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _pair(clock: Clock) -> tuple[SessionManager, SessionManager, FakeRelayPrekeys]:
    alice = SessionManager(_keys("alice"), MemoryStore(), wall_clock=clock)
    bob = SessionManager(_keys("bob"), MemoryStore(), wall_clock=clock)
    relay = FakeRelayPrekeys(bob.keys)
    relay.put(bob.prekey_upload(None))
    return alice, bob, relay


def _seal(sender: SessionManager, to: SessionManager, text: str) -> bytes:
    return sender.seal(
        to.keys.address,
        sender_list_version=1,
        sent_at_ms=1,
        message_id=os.urandom(16),
        content_type="text/plain",
        body=text.encode(),
    )


def _sealed(to: SessionManager, ciphertext: bytes) -> SealedV2:
    sealed = sealed_v2.parse_inner(sealed_v2.open_outer(ciphertext, to.keys.box_private_key))
    assert sealed is not None
    return sealed


def _open(to: SessionManager, sender: SessionManager, ciphertext: bytes, envelope_id: bytes | None = None) -> str:
    opened = to.open(_sealed(to, ciphertext), envelope_id=envelope_id or os.urandom(16), sender=_entry(sender.keys))
    return opened.body.decode()


def test_first_upload_then_nothing_then_top_up(clock: Clock) -> None:
    bob = SessionManager(_keys("bob"), MemoryStore(), wall_clock=clock)
    relay = FakeRelayPrekeys(bob.keys)
    first = bob.prekey_upload(None)
    assert first is not None
    assert first.signed_prekey is not None
    assert first.last_resort is not None
    assert len(first.one_time) == 2 * TARGET_ONE_TIME
    for key in [first.signed_prekey, first.last_resort, *first.one_time]:
        prekeys.verify_prekey(bob.keys.sign_public_key, bob.keys.device_id, key)
    counts = relay.put(first)
    assert bob.prekey_upload(counts) is None  # the relay holds everything
    # Claims drain the one-time keys below the low-water mark: top up to the target, fresh ids.
    for _ in range(TARGET_ONE_TIME - LOW_WATER + 1):
        relay.claim()
    top_up = bob.prekey_upload(relay.counts())
    assert top_up is not None
    assert top_up.signed_prekey is None
    assert top_up.last_resort is None
    assert len(top_up.one_time) == 2 * (TARGET_ONE_TIME - (LOW_WATER - 1))
    first_ids = {(k.kind, k.key_id) for k in first.one_time}
    assert not first_ids & {(k.kind, k.key_id) for k in top_up.one_time}  # ids never reused
    assert relay.put(top_up).x25519_one_time == TARGET_ONE_TIME


def test_signed_prekey_rotates_weekly_and_old_private_still_opens(clock: Clock) -> None:
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(), _entry(bob.keys))
    in_flight = _seal(alice, bob, "sent before the rotation")
    clock.now += ROTATE_MS / 1000
    rotated = bob.prekey_upload(relay.counts())
    assert rotated is not None
    assert rotated.signed_prekey is not None
    assert relay.signed is not None
    assert rotated.signed_prekey.key_id > relay.signed.key_id
    relay.put(rotated)
    assert _open(bob, alice, in_flight) == "sent before the rotation"  # the retired key is kept for a grace period


def test_a_linked_device_adopts_the_prekeys_it_offered(clock: Clock, tmp_path: Path) -> None:
    keys = _keys("laptop")
    db = LocalDB.open(tmp_path / "home", os.urandom(32))
    spk_private, pq_seed = os.urandom(32), os.urandom(64)
    signing = keys.signing_key
    now_ms = int(clock.now * 1000)
    from protocol.handshake import mlkem_public, x25519_public

    offered = {
        "signed_prekey": prekeys.sign_prekey(
            signing, keys.device_id, prekeys.X25519_SIGNED, 1, x25519_public(spk_private), now_ms
        ),
        "signed_prekey_private": spk_private,
        "pq_prekey": prekeys.sign_prekey(
            signing, keys.device_id, prekeys.MLKEM_LAST_RESORT, 1, mlkem_public(pq_seed), now_ms
        ),
        "pq_prekey_seed": pq_seed,
    }
    db.put(ENROLMENT_PREKEYS_TABLE, "bundle", msgspec.msgpack.encode(offered))
    manager = SessionManager(keys, db, wall_clock=clock)
    # The relay already holds the offered keys: only one-time keys are uploaded, ids continue after them.
    upload = manager.prekey_upload(
        PrekeyCounts(x25519_one_time=0, mlkem_one_time=0, signed_prekey_id=1, last_resort_id=1)
    )
    assert upload is not None
    assert upload.signed_prekey is None
    assert upload.last_resort is None
    db.close()


def test_conversation_and_redelivery_and_one_time_deletion(clock: Clock) -> None:
    alice, bob, relay = _pair(clock)
    bundle = relay.claim()
    alice.establish(bundle, _entry(bob.keys))
    first = _seal(alice, bob, "hello")
    before = bob.one_time_privates()
    envelope_id = os.urandom(16)
    assert _open(bob, alice, first, envelope_id) == "hello"
    after = bob.one_time_privates()
    assert after[prekeys.X25519_ONE_TIME] == before[prekeys.X25519_ONE_TIME] - 1
    assert after[prekeys.MLKEM_ONE_TIME] == before[prekeys.MLKEM_ONE_TIME] - 1
    assert bob.prekeys_dirty
    # The same envelope again: answered from the processed table, no decryption.
    cached = bob.processed(envelope_id)
    assert cached is not None
    assert cached.body == b"hello"
    # The same ciphertext under another envelope id (a replay): its key is gone.
    with pytest.raises(InvalidPayloadError):
        _open(bob, alice, first)
    reply = _seal(bob, alice, "hi")
    assert _open(alice, bob, reply) == "hi"
    again = _seal(alice, bob, "ratchet")
    assert _sealed(bob, again).kind == sealed_v2.KIND_MESSAGE
    assert _open(bob, alice, again) == "ratchet"


def test_replayed_session_start_is_rejected_after_the_session_is_gone(clock: Clock) -> None:
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(one_time=False), _entry(bob.keys))  # last-resort key, no OPK: no deletion on use
    first = _seal(alice, bob, "hello")
    assert _open(bob, alice, first) == "hello"
    sealed = _sealed(bob, first)
    bob.store.delete(T_STATE, sealed.session_id)  # the session is dropped later (trimmed, reset, …)
    with pytest.raises(InvalidPayloadError) as err:
        _open(bob, alice, first)
    assert err.value.code is ErrorCode.MALFORMED_BODY


def test_a_deleted_replay_cache_row_does_not_reopen_the_replay(clock: Clock, tmp_path: Path) -> None:
    """crypto.md §13.3: the replay cache is a guarded set. Deleting the row of an accepted session start (from
    the file, without the DEK) must not let the relay replay that start: the check refuses as tampering."""
    db = LocalDB.open(tmp_path / "bob", os.urandom(32))
    alice = SessionManager(_keys("alice"), MemoryStore(), wall_clock=clock)
    bob = SessionManager(_keys("bob"), db, wall_clock=clock)
    relay = FakeRelayPrekeys(bob.keys)
    relay.put(bob.prekey_upload(None))
    alice.establish(relay.claim(one_time=False), _entry(bob.keys))  # no one-time key: only the cache refuses
    first = _seal(alice, bob, "hello")
    assert _open(bob, alice, first) == "hello"
    sealed = _sealed(bob, first)
    db.delete(T_STATE, sealed.session_id)
    (transcript,) = db.keys(T_TRANSCRIPT)
    db.execute(f'DELETE FROM "{T_TRANSCRIPT}" WHERE key = ?', (transcript,))
    with pytest.raises(TamperedRowError, match=rf"local state tampered: {T_TRANSCRIPT} .* holds 0 rows where"):
        _open(bob, alice, first)
    assert db.get(T_STATE, sealed.session_id) is None  # nothing was accepted
    db.close()


def test_the_guarded_replay_cache_follows_prune_and_new_starts(clock: Clock, tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path / "bob", os.urandom(32))
    alice = SessionManager(_keys("alice"), MemoryStore(), wall_clock=clock)
    bob = SessionManager(_keys("bob"), db, wall_clock=clock)
    relay = FakeRelayPrekeys(bob.keys)
    relay.put(bob.prekey_upload(None))
    for text in ("one", "two"):
        alice.establish(relay.claim(), _entry(bob.keys))
        assert _open(bob, alice, _seal(alice, bob, text)) == text
    assert len(db.keys(T_TRANSCRIPT)) == 2
    relay.put(bob.prekey_upload(relay.counts()))
    clock.now += ROTATE_MS / 1000 + 1
    relay.put(bob.prekey_upload(relay.counts()))  # rotation
    clock.now += (bob.max_ttl_ms + 2 * GRACE_MS) / 1000 + 1
    relay.put(bob.prekey_upload(relay.counts()))  # prune removes both rows through the guard
    assert db.keys(T_TRANSCRIPT) == []
    db.check_members(T_TRANSCRIPT)
    alice.establish(relay.claim(), _entry(bob.keys))
    assert _open(bob, alice, _seal(alice, bob, "three")) == "three"
    db.check_members(T_TRANSCRIPT)
    db.close()


def test_unknown_prekey_and_wrong_sender_change_nothing(clock: Clock) -> None:
    alice, bob, relay = _pair(clock)
    mallory = SessionManager(_keys("mallory"), MemoryStore(), wall_clock=clock)
    bundle = relay.claim()
    forged = msgspec.structs.replace(bundle, signed_prekey=msgspec.structs.replace(bundle.signed_prekey, key_id=99))
    with pytest.raises(TetherlessError) as err:
        alice.establish(forged, _entry(bob.keys))  # the signature covers the id
    assert err.value.code is ErrorCode.PREKEY_INVALID
    alice.establish(bundle, _entry(bob.keys))
    ciphertext = _seal(alice, bob, "hello")
    snapshot = {t: {k: bob.store.get(t, k) for k in bob.store.keys(t)} for t in (T_STATE, T_PEER, T_PROCESSED)}
    privates = bob.one_time_privates()
    sealed = _sealed(bob, ciphertext)
    with pytest.raises(InvalidPayloadError) as bad:
        bob.open(sealed, envelope_id=b"e" * 16, sender=_entry(mallory.keys))  # entry of another device
    assert bad.value.code is ErrorCode.BAD_SIGNATURE
    assert {t: {k: bob.store.get(t, k) for k in bob.store.keys(t)} for t in (T_STATE, T_PEER, T_PROCESSED)} == snapshot
    assert bob.one_time_privates() == privates
    # A message naming a prekey id Bob never had.
    message = sealed_v2.prekey_message(sealed)
    renamed = msgspec.structs.replace(message, signed_prekey_id=12345)
    with pytest.raises(InvalidPayloadError):
        bob.open(
            msgspec.structs.replace(sealed, body=codec.encode(renamed)),
            envelope_id=b"f" * 16,
            sender=_entry(alice.keys),
        )
    assert _open(bob, alice, ciphertext) == "hello"  # the genuine one still opens


def test_at_most_five_sessions_per_peer_newest_preferred(clock: Clock) -> None:
    alice, bob, relay = _pair(clock)
    ids = []
    for _ in range(MAX_SESSIONS_PER_PEER + 2):
        ids.append(alice.establish(relay.claim(), _entry(bob.keys)).session_id)
    current = alice.current_session(bob.keys.address)
    assert current is not None
    assert current.session_id == ids[-1]
    assert len(alice.store.keys(T_STATE)) == MAX_SESSIONS_PER_PEER


def test_state_persists_in_the_local_database(clock: Clock, tmp_path: Path) -> None:
    dek = os.urandom(32)
    db = LocalDB.open(tmp_path / "bob", dek)
    alice = SessionManager(_keys("alice"), MemoryStore(), wall_clock=clock)
    bob = SessionManager(_keys("bob"), db, wall_clock=clock)
    relay = FakeRelayPrekeys(bob.keys)
    relay.put(bob.prekey_upload(None))
    alice.establish(relay.claim(), _entry(bob.keys))
    first = "the first message " + os.urandom(8).hex()
    assert _open(bob, alice, _seal(alice, bob, first)) == first
    db.close()
    reopened = LocalDB.open(tmp_path / "bob", dek)
    bob_again = SessionManager(bob.keys, reopened, wall_clock=clock)
    assert bob_again.prekey_upload(relay.counts()) is None  # same keys, nothing new to publish
    assert _open(bob_again, alice, _seal(alice, bob, "two")) == "two"
    assert first.encode() not in (tmp_path / "bob" / "state.db").read_bytes()
    reopened.close()


def test_memory_store_transactions_roll_back() -> None:
    store = MemoryStore()
    store.put("session_x", "a", b"1")

    def failing() -> None:
        with store.transaction():
            store.put("session_x", "a", b"2")
            store.put("session_x", "b", b"3")
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        failing()
    assert store.get("session_x", "a") == b"1"
    assert store.get("session_x", "b") is None


def test_prune_drops_expired_processed_rows(clock: Clock) -> None:
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(), _entry(bob.keys))
    _open(bob, alice, _seal(alice, bob, "x"), b"p" * 16)
    assert bob.prune() == 0
    clock.now += bob.max_ttl_ms / 1000 + 1
    assert bob.prune() == 1
    assert bob.processed(b"p" * 16) is None


def test_prekey_upload_prunes_expired_rows(clock: Clock) -> None:
    """Pruning is scheduled: every prekey maintenance (each sync) runs it, no caller has to remember."""
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(), _entry(bob.keys))
    _open(bob, alice, _seal(alice, bob, "x"), b"p" * 16)
    clock.now += bob.max_ttl_ms / 1000 + 1
    bob.prekey_upload(relay.counts())
    assert bob.processed(b"p" * 16) is None


def test_replay_cache_outlives_its_expiry_while_the_prekey_exists(clock: Clock) -> None:
    """A session start on the last-resort key stays refused as long as the keys that open it exist."""
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(one_time=False), _entry(bob.keys))
    first = _seal(alice, bob, "hello")
    assert _open(bob, alice, first) == "hello"
    sealed = _sealed(bob, first)
    bob.store.delete(T_STATE, sealed.session_id)
    # Far past the transcript's own expiry, with the signed and last-resort privates never rotated away
    # (the device did not publish new ones: its relay was unreachable).
    clock.now += (bob.max_ttl_ms + GRACE_MS) / 1000 + 86_400
    bob.prune()
    assert len(bob.store.keys(T_TRANSCRIPT)) == 1
    with pytest.raises(InvalidPayloadError, match="replayed session start"):
        _open(bob, alice, first)
    # Once the prekeys rotate out and their grace passes, nothing can open the replay; the row goes too.
    relay.put(bob.prekey_upload(relay.counts()))  # rotation (older than a week): the old keys are retired
    clock.now += (bob.max_ttl_ms + GRACE_MS) / 1000 + 1
    relay.put(bob.prekey_upload(relay.counts()))
    assert bob.store.keys(T_TRANSCRIPT) == []
    with pytest.raises(InvalidPayloadError, match="does not have"):
        _open(bob, alice, first)


def test_served_prekeys_older_than_the_maximum_age_are_refused(clock: Clock) -> None:
    alice, bob, relay = _pair(clock)
    old_bundle = relay.claim(one_time=False)
    clock.now += DEFAULT_MAX_PREKEY_AGE_MS / 1000 + 1  # Bob never came back to rotate them
    with pytest.raises(TetherlessError, match="signed 30 days ago") as err:
        alice.establish(old_bundle, _entry(bob.keys))
    assert err.value.code is ErrorCode.PREKEY_INVALID
    assert not alice.has_session(bob.keys.address)
    relay.put(bob.prekey_upload(relay.counts()))  # Bob is back: fresh keys, and sessions start again
    alice.establish(relay.claim(), _entry(bob.keys))
    assert _open(bob, alice, _seal(alice, bob, "back")) == "back"


def test_a_restored_store_is_caught_by_the_relays_newer_prekey_ids(clock: Clock) -> None:
    alice, bob, relay = _pair(clock)
    alice.establish(relay.claim(), _entry(bob.keys))
    _open(bob, alice, _seal(alice, bob, "hello"))
    store = bob.store
    assert isinstance(store, MemoryStore)
    saved = copy.deepcopy(store._tables)
    clock.now += ROTATE_MS / 1000 + 1
    relay.put(bob.prekey_upload(relay.counts()))  # a week later: new signed and last-resort keys published
    store._tables = saved  # the old copy is put back
    with pytest.raises(StateRolledBackError, match="newer than any this home remembers"):
        bob.prekey_upload(relay.counts())
    # The recovery: no session survives, and new keys get ids past everything the relay has seen.
    assert forget_after_rollback(store) > 0
    assert store.keys(T_STATE) == []
    upload = bob.prekey_upload(relay.counts())
    assert upload is not None
    assert upload.signed_prekey is not None
    assert relay.signed is not None
    assert upload.signed_prekey.key_id > relay.signed.key_id
    relay.put(upload)
    alice.establish(relay.claim(), _entry(bob.keys))
    assert _open(bob, alice, _seal(alice, bob, "again")) == "again"


def test_peer_rows_are_keyed_hashes_and_legacy_rows_migrate(clock: Clock, tmp_path: Path) -> None:
    db = LocalDB.open(tmp_path / "alice", os.urandom(32))
    alice = SessionManager(_keys("alice"), db, wall_clock=clock)
    bob = SessionManager(_keys("bob"), MemoryStore(), wall_clock=clock)
    relay = FakeRelayPrekeys(bob.keys)
    relay.put(bob.prekey_upload(None))
    state = alice.establish(relay.claim(), _entry(bob.keys))
    (key,) = db.keys(T_PEER)
    assert isinstance(key, bytes)
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "alice").iterdir() if p.name.startswith("state.db"))
    assert bob.keys.address.encode() not in on_disk
    # A home written before the migration: the row keyed by the peer's address, as the code stored it then.
    raw = db.get(T_PEER, key)
    assert raw is not None
    db.delete(T_PEER, key)
    db.put(T_PEER, bob.keys.address, raw)
    migrated = SessionManager(alice.keys, db, wall_clock=clock)
    assert db.keys(T_PEER) == [key]
    current = migrated.current_session(bob.keys.address)
    assert current is not None
    assert current.session_id == state.session_id
    assert _open(bob, migrated, _seal(migrated, bob, "after the migration")) == "after the migration"
    db.close()
