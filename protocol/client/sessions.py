"""A device's v2 sessions: prekeys, session state, sealing and opening (docs/crypto.md §7-§9, §14).

:class:`SessionManager` is the stateful side of :mod:`protocol.session` (which
is pure). It

- generates the device's signed prekey (SPK), PQ last-resort key and one-time
  prekeys (X25519 and ML-KEM-768), keeps their privates, and builds the
  ``PUT /v1/prekeys`` body (:meth:`SessionManager.prekey_upload`): everything
  at first, one-time keys back up to :data:`TARGET_ONE_TIME` when the relay
  holds fewer than :data:`LOW_WATER` of a kind, a new SPK and last-resort key
  every :data:`ROTATE_MS` (old privates kept ``max_ttl`` + 7 days);
- starts sessions from claimed bundles verified against the recipient's
  verified device list (:meth:`SessionManager.establish`), seals messages on
  them, and opens v2 envelopes (:meth:`SessionManager.open`), accepting a
  ``PrekeyMessage`` only when the named private keys exist, deleting one-time
  privates on first use and remembering transcript hashes (replay cache) for
  as long as a prekey private that could open the same handshake again exists
  (on disk a guarded set, crypto.md §13.3: a deleted row is tampering, never a
  replay let through);
- refuses served signed and last-resort prekeys older than
  ``max_prekey_age_ms`` (their signed ``created_at_ms``): a relay cannot keep
  serving a key the device retired long ago;
- keeps, per envelope id, what it opened ("processed" table), so a redelivered
  envelope gives the same message without a second decryption (P10; the
  message key is gone by then).

State lives in a :class:`KeyValueStore`: the client's :class:`~protocol.client.localdb.LocalDB`
(sealed rows, tables ``session_*``) or :class:`MemoryStore` (tests, devices
without a local database: lost on exit). Every change of one operation is
one store transaction, committed *before* the ciphertext leaves (§8.5).
Methods are synchronous and never await, so concurrent trio tasks see them
as atomic. Randomness comes from ``random_bytes`` (the OS CSPRNG by default).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Final, Protocol

import msgspec

from .. import codec, handshake, prekeys, session
from ..errors import ErrorCode, TetherlessError
from ..ids import Address
from ..messages import DeviceEntry, PrekeyBundle, PrekeyCounts, PrekeyKind, PrekeyUpload, SealedV2, SignedPrekey
from ..payload import InvalidPayloadError, Opened
from ..session import ResponderKeys, SessionState
from ..signing import digest
from .keystore import DeviceKeys, Keystore
from .localdb import LocalDB, StateRolledBackError
from .store import GUARDED_SETS, TRANSCRIPT_TABLE, ClientStore, migrate

TARGET_ONE_TIME: Final = 50
LOW_WATER: Final = 25
ROTATE_MS: Final = 7 * 86_400_000
GRACE_MS: Final = 7 * 86_400_000
MAX_SESSIONS_PER_PEER: Final = 5
DEFAULT_MAX_TTL_SECONDS: Final = 30 * 86_400
#: A served signed or last-resort prekey signed longer ago than this is refused (crypto.md §7.2): the device
#: rotates them every ROTATE_MS while it runs, so an older one means a device gone for weeks or a relay
#: serving a retired key whose private may have leaked since.
DEFAULT_MAX_PREKEY_AGE_MS: Final = 30 * 86_400_000
#: A legacy replay-cache row (8-byte expiry, no prekey names) is kept this much longer than its expiry: the
#: longest a signed prekey can stay unretired plus the grace of a retired one.
_LEGACY_TRANSCRIPT_EXTRA_MS: Final = ROTATE_MS + GRACE_MS

T_PREKEY: Final = "session_prekey"
T_META: Final = "session_meta"
T_STATE: Final = "session_state"
T_PEER: Final = "session_peer"
T_TRANSCRIPT: Final = TRANSCRIPT_TABLE  # a guarded set (crypto.md §13.3)
T_PROCESSED: Final = "session_processed"
TABLES: Final = (T_PREKEY, T_META, T_STATE, T_PEER, T_TRANSCRIPT, T_PROCESSED)

Key = str | bytes | int


class KeyValueStore(Protocol):
    """What the manager needs from a store; :class:`~protocol.client.localdb.LocalDB` has exactly this."""

    def put(self, table: str, key: Key, value: bytes) -> None: ...

    def get(self, table: str, key: Key) -> bytes | None: ...

    def delete(self, table: str, key: Key) -> bool: ...

    def keys(self, table: str) -> list[Key]: ...

    def transaction(self) -> AbstractContextManager[Any]: ...

    def put_member(self, table: str, key: Key, value: bytes) -> None: ...

    def delete_member(self, table: str, key: Key) -> bool: ...

    def check_members(self, table: str) -> None: ...


class MemoryStore:
    """An in-process :class:`KeyValueStore` (transactions roll back on an exception). Lost on exit."""

    def __init__(self) -> None:
        self._tables: dict[str, dict[Key, bytes]] = {}

    def put(self, table: str, key: Key, value: bytes) -> None:
        self._tables.setdefault(table, {})[key] = bytes(value)

    def get(self, table: str, key: Key) -> bytes | None:
        return self._tables.get(table, {}).get(key)

    def delete(self, table: str, key: Key) -> bool:
        return self._tables.get(table, {}).pop(key, None) is not None

    def keys(self, table: str) -> list[Key]:
        return sorted(self._tables.get(table, {}), key=repr)

    # Guarded sets (LocalDB.check_members) protect rows on disk; nothing outside this process can delete these.
    put_member = put
    delete_member = delete

    def check_members(self, table: str) -> None:
        """Nothing to check: in-process rows cannot be deleted behind the manager's back."""

    @contextlib.contextmanager
    def transaction(self) -> Iterator[MemoryStore]:
        saved = copy.deepcopy(self._tables)
        try:
            yield self
        except BaseException:
            self._tables = saved
            raise


class PrekeysUnavailableError(Exception):
    """Format-2 recipient devices without a usable prekey bundle (crypto.md §7.2: never a v1 fallback).

    ``missing`` lists their addresses. Nothing was sent; try again later.
    """

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"prekeys_unavailable: no prekey bundle for {', '.join(missing)}")
        self.missing = missing


# -- stored rows ----------------------------------------------------------------------------------


class PrekeyPrivate(msgspec.Struct, frozen=True, kw_only=True):
    """One prekey private (32-byte X25519 key or 64-byte ML-KEM seed) and its public, signed form."""

    kind: str
    key_id: int
    private: bytes
    signed: SignedPrekey
    retired_at_ms: int | None = None


class PrekeyMeta(msgspec.Struct, kw_only=True):
    """Key-id counters per kind (ids increase, never reused) and the current signed/last-resort ids."""

    next_id: dict[str, int] = msgspec.field(default_factory=dict)
    signed_prekey_id: int | None = None
    last_resort_id: int | None = None
    signed_created_at_ms: int = 0
    uploaded: bool = False


class PeerSessions(msgspec.Struct, kw_only=True):
    """Session ids with one peer device, preferred first (the one that last decrypted, else the newest)."""

    session_ids: list[bytes] = msgspec.field(default_factory=list)


class Processed(msgspec.Struct, frozen=True, kw_only=True):
    """What a processed v2 envelope opened to, kept until ``expires_at_ms`` (redeliveries, §8.5)."""

    expires_at_ms: int
    sender: str
    sender_sign_key: bytes
    recipient: str
    sent_at_ms: int
    message_id: bytes
    content_type: str
    body: bytes


class Transcript(msgspec.Struct, frozen=True, kw_only=True):
    """A replay-cache row (table ``session_transcript``, key = transcript hash of an accepted session start).

    ``prekeys``: the rows (``kind/id``) of the reusable prekeys the handshake used (signed and last-resort
    keys; one-time privates are deleted on use). The row outlives ``expires_at_ms`` while any of them still
    exists: a replay is only impossible once the handshake can no longer be recomputed.
    """

    expires_at_ms: int
    prekeys: list[str] = msgspec.field(default_factory=list)


def _decode_transcript(raw: bytes) -> Transcript:
    if len(raw) == 8:  # before prekey names were recorded: an expiry alone, kept longer (see the constant)
        return Transcript(expires_at_ms=int.from_bytes(raw, "big") + _LEGACY_TRANSCRIPT_EXTRA_MS)
    return codec.decode(raw, Transcript)


class _EnrolmentBundle(msgspec.Struct, frozen=True):
    """Mirror of ``protocol.client.devices.EnrolmentPrekeys`` (table ``device_enrolment_prekeys``, key ``"bundle"``):
    the signed prekey and PQ last-resort key a linked device offered, adopted as its first ones."""

    signed_prekey: SignedPrekey
    signed_prekey_private: bytes
    pq_prekey: SignedPrekey
    pq_prekey_seed: bytes


ENROLMENT_PREKEYS_TABLE: Final = "device_enrolment_prekeys"


def _prekey_row(kind: str, key_id: int) -> str:
    return f"{kind}/{key_id}"


class SessionManager:
    """The device's sessions and prekeys over a :class:`KeyValueStore`. See the module doc."""

    def __init__(
        self,
        keys: DeviceKeys,
        store: KeyValueStore,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        wall_clock: Callable[[], float] = time.time,
        max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
        max_prekey_age_ms: int = DEFAULT_MAX_PREKEY_AGE_MS,
    ) -> None:
        self.keys = keys
        self.store = store
        self._random = random_bytes
        self._clock = wall_clock
        self.max_ttl_ms = max_ttl_seconds * 1000
        self.max_prekey_age_ms = max_prekey_age_ms
        #: True when a one-time prekey was used since the last :meth:`prekey_upload` (time to check counts).
        self.prekeys_dirty = True
        # Rows of ``session_peer`` are keyed by a keyed hash of the peer's address, not the address: a stolen
        # disk shows how many peers, not who (crypto.md §13). The key comes from the device seed, so it
        # survives data-key rotations.
        self._row_key = digest("local-row-key", keys.signing_seed)
        if isinstance(store, LocalDB):
            migrate(store)  # the replay cache is a guarded set from schema 2 on
        self._migrate_peer_keys()

    def _peer_row(self, peer_address: str) -> bytes:
        return hmac.new(self._row_key, peer_address.encode("utf-8"), hashlib.sha256).digest()[:16]

    def _migrate_peer_keys(self) -> None:
        """Migration 1 of the session tables: ``session_peer`` rows keyed by address move to keyed-hash keys.
        Idempotent (only ``str`` keys are moved) and one transaction."""
        legacy = [key for key in self.store.keys(T_PEER) if isinstance(key, str)]
        if not legacy:
            return
        with self.store.transaction():
            for key in legacy:
                raw = self.store.get(T_PEER, key)
                if raw is not None:
                    self.store.put(T_PEER, self._peer_row(_canonical(key)), raw)
                self.store.delete(T_PEER, key)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- prekeys -------------------------------------------------------------------------------

    def _meta(self) -> PrekeyMeta:
        raw = self.store.get(T_META, "ids")
        return PrekeyMeta() if raw is None else codec.decode(raw, PrekeyMeta)

    def _new_prekey(self, meta: PrekeyMeta, kind: PrekeyKind, now_ms: int) -> PrekeyPrivate:
        key_id = meta.next_id.get(kind, 1)
        meta.next_id[kind] = key_id + 1
        if kind in (prekeys.X25519_SIGNED, prekeys.X25519_ONE_TIME):
            private = self._random(32)
            public = handshake.x25519_public(private)
        else:
            private = self._random(64)
            public = handshake.mlkem_public(private)
        signed = prekeys.sign_prekey(self.keys.signing_key, self.keys.device_id, kind, key_id, public, now_ms)
        row = PrekeyPrivate(kind=kind, key_id=key_id, private=private, signed=signed)
        self.store.put(T_PREKEY, _prekey_row(kind, key_id), codec.encode(row))
        return row

    def _load_prekey(self, kind: str, key_id: int) -> PrekeyPrivate | None:
        raw = self.store.get(T_PREKEY, _prekey_row(kind, key_id))
        return None if raw is None else codec.decode(raw, PrekeyPrivate)

    def prekey_upload(self, counts: PrekeyCounts | None) -> PrekeyUpload | None:
        """The ``PUT /v1/prekeys`` body this device needs now, or None (privates are stored first).

        ``counts`` is the relay's ``GET /v1/prekeys`` answer (None: assume it
        holds nothing). New signed and last-resort keys when the relay has none
        of ours or they are older than :data:`ROTATE_MS`; one-time keys of each
        kind up to :data:`TARGET_ONE_TIME` when fewer than :data:`LOW_WATER` are left.
        Retired privates past their grace period, and expired processed-envelope and replay-cache rows
        (:meth:`prune`), are deleted here: every sync publishes prekeys, so pruning needs no timer of its own.
        """
        now = self.now_ms()
        signed: SignedPrekey | None = None
        last_resort: SignedPrekey | None = None
        one_time: list[SignedPrekey] = []
        with self.store.transaction():
            meta = self._meta()
            relay_spk = counts.signed_prekey_id if counts else None
            relay_lr = counts.last_resort_id if counts else None
            _check_not_rolled_back(meta, relay_spk, relay_lr)
            if meta.signed_prekey_id is None:
                self._adopt_enrolment_prekeys(meta)
            rotate = now - meta.signed_created_at_ms >= ROTATE_MS
            if rotate or meta.signed_prekey_id is None or relay_spk != meta.signed_prekey_id:
                if rotate or meta.signed_prekey_id is None:
                    self._retire(meta, now)
                    meta.signed_prekey_id = self._new_prekey(meta, prekeys.X25519_SIGNED, now).key_id
                    meta.last_resort_id = self._new_prekey(meta, prekeys.MLKEM_LAST_RESORT, now).key_id
                    meta.signed_created_at_ms = now
                row = self._load_prekey(prekeys.X25519_SIGNED, meta.signed_prekey_id)
                assert row is not None
                signed = row.signed
            if signed is not None or relay_lr != meta.last_resort_id:
                assert meta.last_resort_id is not None
                row = self._load_prekey(prekeys.MLKEM_LAST_RESORT, meta.last_resort_id)
                assert row is not None
                last_resort = row.signed
            have = {
                prekeys.X25519_ONE_TIME: counts.x25519_one_time if counts else 0,
                prekeys.MLKEM_ONE_TIME: counts.mlkem_one_time if counts else 0,
            }
            for kind, left in have.items():
                if left < LOW_WATER:
                    one_time += [
                        self._new_prekey(meta, kind, now).signed  # type: ignore[arg-type]
                        for _ in range(TARGET_ONE_TIME - left)
                    ]
            self._prune_retired(now)
            self.store.put(T_META, "ids", codec.encode(meta))
        self.prune()
        self.prekeys_dirty = False
        if signed is None and last_resort is None and not one_time:
            return None
        return PrekeyUpload(signed_prekey=signed, last_resort=last_resort, one_time=one_time)

    def _adopt_enrolment_prekeys(self, meta: PrekeyMeta) -> None:
        """A device that joined with a link code already published these keys (crypto.md §5.2): keep them."""
        raw = self.store.get(ENROLMENT_PREKEYS_TABLE, "bundle")
        if raw is None:
            return
        bundle = msgspec.msgpack.decode(raw, type=_EnrolmentBundle)
        for signed, private in (
            (bundle.signed_prekey, bundle.signed_prekey_private),
            (bundle.pq_prekey, bundle.pq_prekey_seed),
        ):
            row = PrekeyPrivate(kind=signed.kind, key_id=signed.key_id, private=private, signed=signed)
            self.store.put(T_PREKEY, _prekey_row(signed.kind, signed.key_id), codec.encode(row))
            meta.next_id[signed.kind] = max(meta.next_id.get(signed.kind, 1), signed.key_id + 1)
        meta.signed_prekey_id = bundle.signed_prekey.key_id
        meta.last_resort_id = bundle.pq_prekey.key_id
        meta.signed_created_at_ms = bundle.signed_prekey.created_at_ms

    def _retire(self, meta: PrekeyMeta, now: int) -> None:
        for kind, key_id in (
            (prekeys.X25519_SIGNED, meta.signed_prekey_id),
            (prekeys.MLKEM_LAST_RESORT, meta.last_resort_id),
        ):
            if key_id is None:
                continue
            row = self._load_prekey(kind, key_id)
            if row is not None:
                retired = msgspec.structs.replace(row, retired_at_ms=now)
                self.store.put(T_PREKEY, _prekey_row(kind, key_id), codec.encode(retired))

    def _prune_retired(self, now: int) -> None:
        horizon = now - self.max_ttl_ms - GRACE_MS
        for key in self.store.keys(T_PREKEY):
            raw = self.store.get(T_PREKEY, key)
            if raw is None:
                continue
            row = codec.decode(raw, PrekeyPrivate)
            if row.retired_at_ms is not None and row.retired_at_ms < horizon:
                self.store.delete(T_PREKEY, key)

    # -- sessions --------------------------------------------------------------------------------

    def _peer(self, peer_address: str) -> PeerSessions:
        raw = self.store.get(T_PEER, self._peer_row(peer_address))
        return PeerSessions() if raw is None else codec.decode(raw, PeerSessions)

    def _load(self, session_id: bytes) -> SessionState | None:
        raw = self.store.get(T_STATE, session_id)
        return None if raw is None else codec.decode(raw, SessionState)

    def _prefer(self, peer_address: str, session_id: bytes) -> None:
        peer = self._peer(peer_address)
        ids = [session_id] + [s for s in peer.session_ids if s != session_id]
        for dropped in ids[MAX_SESSIONS_PER_PEER:]:
            self.store.delete(T_STATE, dropped)
        self.store.put(
            T_PEER, self._peer_row(peer_address), codec.encode(PeerSessions(session_ids=ids[:MAX_SESSIONS_PER_PEER]))
        )

    def current_session(self, peer_address: str) -> SessionState | None:
        """The session to send on with ``peer_address`` (a device address), if any."""
        for session_id in self._peer(_canonical(peer_address)).session_ids:
            state = self._load(session_id)
            if state is not None:
                return state
        return None

    def has_session(self, peer_address: str) -> bool:
        return self.current_session(peer_address) is not None

    def establish(self, bundle: PrekeyBundle, device: DeviceEntry) -> SessionState:
        """Start a session from a claimed ``bundle`` of ``device`` (an entry of its *verified* list).

        Raises ``prekey_invalid`` (``protocol.prekeys.verify_bundle``: a key
        the relay substituted, a wrong kind or length, a bad signature; and a
        signed or last-resort prekey signed more than ``max_prekey_age_ms``
        ago). Calls ML-KEM ``encapsulate`` (its own randomness) and stores the session.
        """
        prekeys.verify_bundle(bundle, device)
        self._check_prekey_age(bundle)
        ct, ss = handshake.encapsulate(bundle.pq_prekey.public_key)
        otk = bundle.one_time_prekey
        peer = handshake.PeerPrekeys(
            signed_prekey_id=bundle.signed_prekey.key_id,
            signed_prekey=bundle.signed_prekey.public_key,
            pq_prekey_id=bundle.pq_prekey.key_id,
            pq_last_resort=bundle.pq_prekey.kind == prekeys.MLKEM_LAST_RESORT,
            pq_prekey=bundle.pq_prekey.public_key,
            one_time_prekey_id=otk.key_id if otk else None,
            one_time_prekey=otk.public_key if otk else None,
        )
        state = session.start(
            own_address=self.keys.address,
            identity_private_key=self.keys.box_private_key,
            peer_address=bundle.address,
            peer_identity_key=device.box_key,
            prekeys=peer,
            ephemeral_private_key=self._random(32),
            ratchet_entropy=self._random(32),
            kem_ciphertext=ct,
            kem_shared_secret=ss,
            now_ms=self.now_ms(),
        )
        with self.store.transaction():
            self.store.put(T_STATE, state.session_id, codec.encode(state))
            self._prefer(state.peer_address, state.session_id)
        return state

    def _check_prekey_age(self, bundle: PrekeyBundle) -> None:
        # One-time keys are exempt: they sit on the relay until claimed, are used once, and their privates
        # are deleted on first use, so their age says nothing about reuse.
        oldest = self.now_ms() - self.max_prekey_age_ms
        for key in (bundle.signed_prekey, bundle.pq_prekey):
            if key.kind != prekeys.MLKEM_ONE_TIME and key.created_at_ms < oldest:
                days = (self.now_ms() - key.created_at_ms) // 86_400_000
                raise TetherlessError(
                    ErrorCode.PREKEY_INVALID,
                    f"the relay served a {key.kind} prekey signed {days} days ago "
                    f"(at most {self.max_prekey_age_ms // 86_400_000}): the device has not refreshed it",
                )

    def seal(
        self,
        peer_address: str,
        *,
        sender_list_version: int,
        sent_at_ms: int,
        message_id: bytes,
        content_type: str,
        body: bytes,
    ) -> bytes:
        """Encrypt one message on the current session with ``peer_address``; the new state is stored first.

        Raises ``LookupError`` when there is no session (call :meth:`establish`).
        """
        state = self.current_session(peer_address)
        if state is None:
            raise LookupError(f"no session with {peer_address}")
        new_state, ciphertext = session.seal(
            state,
            sender_list_version=sender_list_version,
            recipient_box_key=state.peer_identity_key,
            sent_at_ms=sent_at_ms,
            message_id=message_id,
            content_type=content_type,
            body=body,
            entropy=self._random(session.ENTROPY_BYTES),
        )
        self.store.put(T_STATE, new_state.session_id, codec.encode(new_state))
        return ciphertext

    # -- receiving -------------------------------------------------------------------------------

    def processed(self, envelope_id: bytes) -> Opened | None:
        """What envelope ``envelope_id`` opened to before (a redelivery), or None."""
        raw = self.store.get(T_PROCESSED, envelope_id)
        if raw is None:
            return None
        row = codec.decode(raw, Processed)
        return Opened(
            sender=row.sender,
            sender_sign_key=row.sender_sign_key,
            recipient=row.recipient,
            sent_at_ms=row.sent_at_ms,
            message_id=row.message_id,
            content_type=row.content_type,
            body=row.body,
        )

    def open(self, sealed: SealedV2, *, envelope_id: bytes, sender: DeviceEntry) -> Opened:
        """Decrypt a v2 envelope from ``sender`` (its entry in the sender account's *verified* list).

        Picks the session by (sender, ``session_id``) or, for a
        ``PrekeyMessage`` without one, runs the responder's handshake with the
        named private prekeys (unknown id or a transcript seen before →
        rejected). On success stores, in one transaction, the session, the
        deletion of one-time privates used, the transcript hash and the
        processed envelope. Raises ``InvalidPayloadError`` and stores nothing; for a session start,
        :class:`~protocol.client.localdb.TamperedRowError` when rows of the replay cache were deleted.
        """
        now = self.now_ms()
        peer_address = _canonical(sealed.sender)
        if Address.parse(peer_address).device != sender.device_id:
            raise InvalidPayloadError(ErrorCode.BAD_SIGNATURE, "sender entry does not match the sealed sender")
        entropy = self._random(32)
        ttl = self.max_ttl_ms + 86_400_000
        state = self._load(sealed.session_id)
        used: list[tuple[str, int]] = []
        message: session.PrekeyMessage | None = None
        if state is not None and state.peer_address == peer_address:
            new_state, content = session.decrypt(state, sealed, entropy=entropy, now_ms=now, skipped_ttl_ms=ttl)
        elif sealed.kind == session.KIND_PREKEY:
            message = session.prekey_message(sealed)
            keys, used = self._responder_keys(message)
            new_state, content = session.accept_prekey(
                own_address=self.keys.address,
                identity_private_key=self.keys.box_private_key,
                sealed=sealed,
                sender_identity_key=sender.box_key,
                keys=keys,
                entropy=entropy,
                now_ms=now,
                skipped_ttl_ms=ttl,
            )
            # The whole cache is checked first: a deleted row must not make a replay look new (crypto.md §13.3).
            self.store.check_members(T_TRANSCRIPT)
            if self.store.get(T_TRANSCRIPT, new_state.transcript_hash) is not None:
                raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "a replayed session start")
        else:
            raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "no such session (lost state?)")
        opened = Opened(
            sender=peer_address,
            sender_sign_key=sender.sign_key,
            recipient=content.recipient,
            sent_at_ms=content.sent_at_ms,
            message_id=content.message_id,
            content_type=content.content_type,
            body=content.body,
        )
        with self.store.transaction():
            self.store.put(T_STATE, new_state.session_id, codec.encode(new_state))
            self._prefer(peer_address, new_state.session_id)
            for kind, key_id in used:
                self.store.delete(T_PREKEY, _prekey_row(kind, key_id))
            if message is not None:  # a session start: remember it against replays (prune())
                reusable = [_prekey_row(prekeys.X25519_SIGNED, message.signed_prekey_id)]
                if message.pq_last_resort:
                    reusable.append(_prekey_row(prekeys.MLKEM_LAST_RESORT, message.pq_prekey_id))
                row = Transcript(expires_at_ms=now + self.max_ttl_ms + GRACE_MS, prekeys=reusable)
                self.store.put_member(T_TRANSCRIPT, new_state.transcript_hash, codec.encode(row))
            self.store.put(
                T_PROCESSED,
                envelope_id,
                codec.encode(
                    Processed(
                        expires_at_ms=now + self.max_ttl_ms,
                        sender=opened.sender,
                        sender_sign_key=opened.sender_sign_key,
                        recipient=opened.recipient,
                        sent_at_ms=opened.sent_at_ms,
                        message_id=opened.message_id,
                        content_type=opened.content_type,
                        body=opened.body,
                    )
                ),
            )
        if used:
            self.prekeys_dirty = True
        return opened

    def _responder_keys(self, message: session.PrekeyMessage) -> tuple[ResponderKeys, list[tuple[str, int]]]:
        spk = self._load_prekey(prekeys.X25519_SIGNED, message.signed_prekey_id)
        pq_kind = prekeys.MLKEM_LAST_RESORT if message.pq_last_resort else prekeys.MLKEM_ONE_TIME
        pq = self._load_prekey(pq_kind, message.pq_prekey_id)
        if spk is None or pq is None:
            raise InvalidPayloadError(ErrorCode.MALFORMED_BODY, "the message names a prekey this device does not have")
        used: list[tuple[str, int]] = []
        if not message.pq_last_resort:
            used.append((pq_kind, message.pq_prekey_id))
        otk_private: bytes | None = None
        if message.one_time_prekey_id is not None:
            otk = self._load_prekey(prekeys.X25519_ONE_TIME, message.one_time_prekey_id)
            if otk is None:
                raise InvalidPayloadError(
                    ErrorCode.MALFORMED_BODY, "the one-time prekey was already used or is unknown"
                )
            otk_private = otk.private
            used.append((prekeys.X25519_ONE_TIME, message.one_time_prekey_id))
        keys = ResponderKeys(signed_prekey_private=spk.private, pq_seed=pq.private, one_time_prekey_private=otk_private)
        return keys, used

    def prune(self) -> int:
        """Delete expired processed-envelope rows and transcript hashes; returns how many.

        A transcript hash stays while a signed or last-resort prekey private its handshake used exists,
        whatever its expiry (a replay of that session start would otherwise open again). Called by
        :meth:`prekey_upload`; idempotent; one transaction (nothing deleted if interrupted).
        """
        now = self.now_ms()
        removed = 0
        with self.store.transaction():
            for key in self.store.keys(T_PROCESSED):
                raw = self.store.get(T_PROCESSED, key)
                if raw is not None and codec.decode(raw, Processed).expires_at_ms < now:
                    removed += self.store.delete(T_PROCESSED, key)
            for key in self.store.keys(T_TRANSCRIPT):
                raw = self.store.get(T_TRANSCRIPT, key)
                if raw is None:
                    continue
                row = _decode_transcript(raw)
                if row.expires_at_ms < now and all(self.store.get(T_PREKEY, name) is None for name in row.prekeys):
                    removed += self.store.delete_member(T_TRANSCRIPT, key)
        return removed

    def one_time_privates(self) -> dict[str, int]:
        """How many one-time prekey privates this device holds, per kind (for tests and diagnostics)."""
        counts = {prekeys.X25519_ONE_TIME: 0, prekeys.MLKEM_ONE_TIME: 0}
        for key in self.store.keys(T_PREKEY):
            kind = str(key).split("/", 1)[0]
            if kind in counts:
                counts[kind] += 1
        return counts


#: How far :func:`forget_after_rollback` moves the prekey ids on: past any id the lost future could have used.
ROLLBACK_ID_JUMP: Final = 1_000_000


def _check_not_rolled_back(meta: PrekeyMeta, relay_spk: int | None, relay_lr: int | None) -> None:
    """The relay holds a signed or last-resort prekey with an id this device never allocated: the local
    state is older than keys it published (crypto.md §13.2). A lying relay can only cause a false alarm."""
    for kind, relay_id in ((prekeys.X25519_SIGNED, relay_spk), (prekeys.MLKEM_LAST_RESORT, relay_lr)):
        if relay_id is not None and relay_id >= meta.next_id.get(kind, 1) and meta.signed_prekey_id is not None:
            raise StateRolledBackError(
                f"the relay serves this device's {kind} prekey #{relay_id}, newer than any this home remembers "
                f"creating: it was restored from an older copy. " + StateRolledBackError.RECOVERY
            )


def forget_after_rollback(store: KeyValueStore) -> int:
    """Make a restored home safe to send from again (crypto.md §13.2): drop every session (their ratchet
    keys may have been used after the copy was taken); move prekey ids past any the lost future could have
    used and force new signed and last-resort keys at the next upload.

    One-time prekey privates stay: the relay still serves their public halves (uploads only add), and
    peers' session starts on them must open. The cost, written down in crypto.md §13.2: a session start the
    lost future already accepted could be replayed once by the relay (the replay cache was rolled back too).
    Peers get new session starts on the next message each way. Idempotent; one transaction. Returns how
    many rows were deleted.
    """
    removed = 0
    with store.transaction():
        for table in (T_STATE, T_PEER):
            for key in store.keys(table):
                removed += store.delete(table, key)
        raw = store.get(T_META, "ids")
        meta = PrekeyMeta() if raw is None else codec.decode(raw, PrekeyMeta)
        for kind in (prekeys.X25519_SIGNED, prekeys.MLKEM_LAST_RESORT, prekeys.X25519_ONE_TIME, prekeys.MLKEM_ONE_TIME):
            meta.next_id[kind] = meta.next_id.get(kind, 1) + ROLLBACK_ID_JUMP
        meta.signed_created_at_ms = 0  # due for rotation: new ids, new keys
        store.put(T_META, "ids", codec.encode(meta))
    return removed


def recover_home_from_rollback(keystore: Keystore) -> None:
    """``tetherless sync --recover-rollback``: accept this home's (older) state after
    :class:`~protocol.client.localdb.StateRolledBackError` and make it safe to send from: the generation
    counter moves past both sides (:meth:`Keystore.recover_from_rollback`), every session and one-time
    prekey private goes (:func:`forget_after_rollback`), and this device's log-record counter moves past
    any value the lost future used, so its own later records in the log read as history again.

    The same recovery follows :class:`~protocol.client.localdb.TamperedRowError` for a deleted row of a
    guarded set (crypto.md §13.3): the replay cache and the device-list marks are accepted as they are.

    What the lost future did is not undone: messages it sent and received come back from the account
    log at the next sync; envelopes acknowledged then and never logged are gone. Idempotent in effect.
    Raises the errors of :meth:`Keystore.unlock`.
    """
    db = keystore.recover_from_rollback()
    forget_after_rollback(db)
    store = ClientStore(db)
    with store.transaction():
        store.advance_counter("writer_seq", ROLLBACK_ID_JUMP)
        # Accept the guarded sets as they are now (crypto.md §13.3): a replay-cache row that was deleted lets
        # that one session start be replayed once, a deleted device-list mark means the next list of that
        # account is trusted as first seen. The user asked for this recovery; without it the checks refuse.
        for table in GUARDED_SETS:
            db.guard_set(table)


def _canonical(address: str) -> str:
    return str(Address.parse(address))


__all__ = [
    "LOW_WATER",
    "TABLES",
    "TARGET_ONE_TIME",
    "KeyValueStore",
    "MemoryStore",
    "PrekeysUnavailableError",
    "SessionManager",
    "forget_after_rollback",
    "recover_home_from_rollback",
]
