"""Account keys: key records read and written, grants, rotation, keys from sessions, recovery backups
(docs/account-log.md §5, §5.7, §17; crypto.md §12)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import msgspec

from ... import codec, device_list, handshake, hybrid, log, recovery
from ...errors import ErrorCode, RemoteError, TetherlessError
from ...ids import Address
from ...messages import AppendRequest, DeviceEntry, LogRecord, LogRecordIn
from ..http import TransportError
from ..sdk import Outgoing, ReceivedMessage
from ..sessions import PrekeysUnavailableError
from ..store import ClientStore, EpochInfo
from .base import Context, LogRekeyError, Part, guarded, logger
from .lists import DeviceLists

# The recovery backup key this device backs up to (account-log.md §5.7): a sealed key-value table of state.db.
RECOVERY_BACKUP_TABLE: Final = "recovery_backup"
#: Per-writer counters in ``log_counters`` (account-log.md §4.6, §5.1 v3): highest ``writer_seq`` applied, and a
#: removed writer's close-out mark + 1 from the rotation that removed it.
HIGH_WATER: Final = "writer_hw:"
CLOSED: Final = "writer_closed:"
#: Scheduled rotation (account-log.md §5.3): a new epoch after this many records or this age, whichever first.
DEFAULT_ROTATE_AFTER_RECORDS: Final = 1000
DEFAULT_ROTATE_AFTER_SECONDS: Final = 7 * 86400.0
_REFUSED_CODES: Final = (ErrorCode.LOG_CONFLICT, ErrorCode.LOG_EPOCH_STALE, ErrorCode.LOG_REKEY_REQUIRED)


class AccountKeyMessage(msgspec.Struct, frozen=True):
    """The body of a ``tetherless/account-key`` session message (crypto.md §12): ``K[epoch]`` and the
    device-list version its key record names."""

    epoch: int
    key: bytes
    list_version: int


class RecoveryBackupNote(msgspec.Struct, frozen=True):
    """The recovery backup key this device backs epochs up to, and the newest epoch a backup to it covers."""

    x25519_public: bytes
    kem_public: bytes
    backed_up_epoch: int = 0

    @property
    def key_hash(self) -> bytes:
        return recovery.backup_key_hash(hybrid.HybridRecipient(self.x25519_public, self.kem_public))


def _backup_note(store: ClientStore) -> RecoveryBackupNote | None:
    return store.db.get_struct(RECOVERY_BACKUP_TABLE, "current", RecoveryBackupNote)


def remember_recovery_backup_key(
    store: ClientStore, recipient: hybrid.HybridRecipient, *, backed_up_epoch: int = 0
) -> None:
    """Remember the public recovery backup key (account-log.md §5.7): ``device init`` does it for the key it made,
    the engine for every verified backup to the key the current list commits to. Public keys only; the hash is
    checked against the list before each use. Keeps the higher ``backed_up_epoch`` for the same key. Idempotent."""
    note = RecoveryBackupNote(recipient.x25519_public, recipient.kem_public, backed_up_epoch)
    old = _backup_note(store)
    if old is not None and old.key_hash == note.key_hash:
        note = msgspec.structs.replace(note, backed_up_epoch=max(old.backed_up_epoch, backed_up_epoch))
    store.db.put_struct(RECOVERY_BACKUP_TABLE, "current", note)


class LogView(msgspec.Struct, frozen=True):
    """What the log reader found in its last pass, handed to the epoch decisions by the coordinator.

    ``blocked_on_key``: records wait for an epoch key this device does not hold; ``read_upto``: the last position
    paged (held records included; key records append at ``max(cursor, read_upto)``); ``held_marks``: removed
    writers' highest ``writer_seq`` read and waiting for the rotation (§5.1 v3)."""

    blocked_on_key: bool = False
    read_upto: int = 0
    held_marks: Mapping[str, int] = msgspec.field(default_factory=dict)


class Epochs(Part):
    """The account's epoch keys on this device: which key records it trusts, when it writes one (epoch 1, a
    rotation, a grant), the keys that arrive through sessions, and the recovery backups.

    Owns: the rotation thresholds, :attr:`rekey_needed` (a 409 says a key record must be read or written before
    anything more is appended; the log appender sets it too), the counters that stop it spinning on refusals,
    :attr:`recovery` (the keys derived from the recovery secret, only while a command that holds it runs — init,
    recovery-key, link --recovery-key; never stored) and :attr:`recovered_epochs`."""

    def __init__(
        self,
        ctx: Context,
        lists: DeviceLists,
        *,
        rotate_after_records: int = DEFAULT_ROTATE_AFTER_RECORDS,
        rotate_after_seconds: float = DEFAULT_ROTATE_AFTER_SECONDS,
    ) -> None:
        super().__init__(ctx)
        self._lists = lists
        # At least one record and one second: a rotation must never make its own epoch due at once.
        self.rotate_after_records = max(1, rotate_after_records)
        self.rotate_after_seconds = max(1.0, rotate_after_seconds)
        self.rekey_needed = False
        self._stale_epochs = 0
        self._backup_conflicts = 0
        self.recovery: recovery.RecoveryKeys | None = None
        self.recovered_epochs: set[int] = set()

    # -- reading key records -------------------------------------------------------------------------

    async def verified_key_record(self, record: LogRecord) -> tuple[log.AnyKeyRecord, list[DeviceEntry]]:
        """Decode a ``key`` record and check it against the verified list of its ``device_list_version`` (§5.1).

        Judged against the list in force when it was written: its creator may be revoked since. A v1 rotation
        (it wraps the previous key) and a v2 rotation must grant exactly that list's (grant-receiving) devices;
        epoch-1 v1 and grant-only records a subset. Raises :class:`~protocol.log.InvalidRecordError`, and
        ``RetryError`` / ``RevokedError`` when the list cannot be fetched. Reads only.
        """
        key_record = log.decode_any_key_record(record.ciphertext)
        version = key_record.body.device_list_version
        if record.device_list_version is not None and record.device_list_version != version:
            raise log.InvalidRecordError(
                ErrorCode.BAD_SIGNATURE, "key record names another device list version than its header"
            )
        devices = await self._lists.at(version)
        if devices is None:
            raise log.InvalidRecordError(
                ErrorCode.BAD_SIGNATURE, f"key record names device list version {version}, which does not exist"
            )
        account_id = self._keys.account_id
        if isinstance(key_record, log.KeyEpochRecordV2):
            log.verify_key_record_v2(key_record, account_id=account_id, epoch=record.epoch, devices=devices)
        else:
            log.verify_key_record(
                key_record,
                account_id=account_id,
                epoch=record.epoch,
                devices=devices,
                grant_only=not key_record.body.prev_key_wrap,
            )
        return key_record, devices

    def granted_keys(self, key_record: log.AnyKeyRecord) -> dict[int, bytes]:
        """The epoch keys a verified key record grants this device (empty: none, or through a session). Pure."""
        keys = self._keys
        if isinstance(key_record, log.KeyEpochRecordV2):
            found = log.unwrap_grant_v2(
                key_record, device_id=keys.device_id, box_private_key=keys.box_private_key, kem_seed=keys.kem_seed
            )
            return found or {}
        key = log.unwrap_grant(key_record, device_id=keys.device_id, box_private_key=keys.box_private_key)
        return {} if key is None else {key_record.body.epoch: key}

    async def apply_keys(self, records: list[LogRecord]) -> None:
        """Apply verified key records: grants, commitments, this device's keys and each epoch's facts (§5.4).

        A record that does not verify is refused (counted, reported) and skipped; so is a rotation that
        names an older device-list version than the epoch before it (§5.4 "clients enforce"). Recovery backups
        (§5.7) among them are checked and noted. Raises ``RetryError`` / ``RevokedError``; each record is applied
        in its own transaction (a cancellation keeps those before it). Idempotent.
        """
        store = self._store
        for record in records:
            if (backup := log.decode_recovery_backup(record.ciphertext)) is not None:
                await self._apply_recovery_backup(record, backup)
                continue
            try:
                key_record, devices = await self.verified_key_record(record)
                keys = self.granted_keys(key_record)
                body = key_record.body
                creates = record.epoch == 1 or (
                    key_record.body.rotation
                    if isinstance(key_record, log.KeyEpochRecordV2)
                    else bool(key_record.body.prev_key_wrap)
                )
                previous = store.epoch_info(record.epoch - 1)
                if creates and previous is not None and body.device_list_version < previous.list_version:
                    raise log.InvalidRecordError(
                        ErrorCode.BAD_SIGNATURE, "key record names an older device list than the epoch before it"
                    )
            except TetherlessError as exc:
                self._report.refuse(record, exc)
                continue
            fmt = 2 if isinstance(key_record, log.KeyEpochRecordV2) else 1
            by_id = {d.device_id: d for d in devices}
            granted = [g.device_id for g in body.grants]
            with store.transaction():
                store.add_grants(record.epoch, granted)
                if isinstance(key_record, log.KeyEpochRecordV2):
                    for c in key_record.body.commitments:
                        store.put_commitment(c.epoch, c.commitment)
                    for mark in key_record.closed:  # v3: the first rotation that removed a writer closes it
                        if not store.counter(CLOSED + mark.device_id):
                            store.advance_counter(CLOSED + mark.device_id, mark.last_seq + 1)
                else:
                    store.put_commitment(record.epoch, key_record.body.key_commitment)
                info = store.epoch_info(record.epoch)
                writers = {g: by_id[g].sign_key for g in granted}
                if info is None and creates:
                    info = EpochInfo(
                        epoch=record.epoch,
                        record_format=fmt,
                        position=record.position,
                        list_version=body.device_list_version,
                        created_at_ms=body.created_at_ms,
                        writers=writers,
                    )
                elif info is not None:
                    info = msgspec.structs.replace(info, writers={**info.writers, **writers})
                if info is not None:
                    store.put_epoch_info(info)
                offered = store.session_key(record.epoch)
                if offered is not None:  # a key that came through a session, checked against the record now
                    store.drop_session_key(record.epoch)
                    if record.epoch not in keys and self._matches_commitment(record.epoch, offered):
                        keys[record.epoch] = offered
                for epoch, key in sorted(keys.items()):
                    if epoch == record.epoch or self._matches_commitment(epoch, key):
                        store.put_epoch_key(epoch, key, record.record_id)
                if fmt == 1 and record.epoch in keys:
                    self._unwrap_chain(record.epoch, keys[record.epoch], body, record.record_id)

    def _unwrap_chain(self, epoch: int, key: bytes, body: Any, record_id: bytes) -> None:
        """Legacy v1 epochs: ``K[n]`` unwraps ``K[n-1]`` … through ``prev_key_wrap`` (v2 epochs are independent)."""
        wrap, current = body.prev_key_wrap, key
        while wrap and epoch > 1 and self._store.epoch_key(epoch - 1) is None:
            current = log.unwrap_previous_key(current, wrap, account_id=self._keys.account_id, epoch=epoch)
            epoch -= 1
            self._store.put_epoch_key(epoch, current, record_id)
            wrap = b""  # older wraps are in older key records, applied as they are read

    def _matches_commitment(self, epoch: int, key: bytes) -> bool:
        return log.key_commitment(self._keys.account_id, epoch, key) == self._store.commitment(epoch)

    # -- writing key records -------------------------------------------------------------------------

    async def ensure_epoch(self, view: LogView) -> bool:
        """Create epoch 1 when the log has no key record; rotate when the newest epoch may no longer be written
        under (:meth:`rotation_reason`: a removed device holds it, the account moves to v2 key records, or the
        schedule is due); else grant every epoch key this device holds to grant-receiving devices without one.

        Format-2+ accounts write v2 key records (hybrid grants, independent epoch keys, §5.1 v2); a format-1
        account keeps v1 records (it has no post-quantum channel at all). ``view``: what the log reader found.
        Returns True when the log changed or must be read again (a ``409`` on the append: someone else wrote
        first or a revocation is pending). Raises ``RetryError`` / ``RevokedError`` / :class:`LogRekeyError`
        (after 3 refusals in a row). Idempotent in effect: it decides again from what was read. Cancellation: an
        append whose answer was lost is seen by the next read (a key record with expected_head cannot land twice).
        """
        store = self._store
        if view.blocked_on_key and store.key_epochs_seen() > 0:
            return False  # waiting for a device that holds the key to grant it
        epoch = store.key_epochs_seen()
        version, devices = await self._lists.current(fresh=epoch == 0 or self.rekey_needed)
        self.rekey_needed = False
        v2 = self._lists.list_format >= device_list.FORMAT_2
        receiving = [d for d in devices if not v2 or device_list.receives_account_key_grants(d)]
        if epoch == 0:
            return await self._write_key_record(
                1, {1: self._random_bytes(log.KEY_BYTES)}, version, receiving, v2, read_upto=view.read_upto
            )
        held = store.epoch_key(epoch)
        if held is None:
            return False
        granted = store.granted(epoch)
        missing = [d for d in receiving if d.device_id not in granted]
        # A new device gets every epoch this device holds in one grant, so it can read the whole history (§5.5).
        history = {e: k for e in range(1, epoch + 1) if (k := store.epoch_key(e)) is not None}
        if self.rotation_reason(epoch, devices) is not None:
            # A device that joined since ``epoch`` was created would otherwise get only the new epoch: the
            # rotation then carries the older keys too (to every device it grants; they check commitments).
            older = history if v2 and missing else {}
            return await self._write_key_record(
                epoch + 1,
                {**older, epoch + 1: self._random_bytes(log.KEY_BYTES)},
                version,
                receiving,
                v2,
                read_upto=view.read_upto,
                closed=self._close_out_marks(devices, view.held_marks) if v2 else None,
            )
        if not missing:
            return False
        if not v2:
            return await self._write_key_record(epoch, {epoch: held}, version, missing, v2, read_upto=view.read_upto)
        return await self._write_key_record(epoch, history, version, missing, v2, read_upto=view.read_upto)

    def _close_out_marks(self, devices: list[DeviceEntry], held_marks: Mapping[str, int]) -> dict[str, int]:
        """What a rotation commits to (account-log.md §5.1 v3): for each writer of a known epoch that is no longer
        in the verified list ``devices`` and not closed yet, the highest ``writer_seq`` of its records before the
        rotation (applied, or read and waiting for this rotation). Readers refuse its records beyond the mark,
        wherever the relay places them."""
        store = self._store
        present = {d.device_id for d in devices}
        writers = {w for info in store.epoch_infos() for w in info.writers}
        return {
            w: max(store.counter(HIGH_WATER + w), held_marks.get(w, 0))
            for w in sorted(writers - present)
            if not store.counter(CLOSED + w)
        }

    def history_granted(self, device_id: str) -> bool:
        """Whether ``device_id`` is named by a grant of the newest epoch this device knows (account-log.md §5.5).

        A grant-only or rotation record names every device it hands the keys to (a format-2 entry without an
        ML-KEM key with an empty wrap: its keys travel through its session), so after :meth:`ensure_epoch`
        wrote one, this is what an approver checks before reporting the new device's history as granted.
        """
        epoch = self._store.key_epochs_seen()
        return epoch > 0 and device_id in self._store.granted(epoch)

    def rotation_reason(self, epoch: int, devices: list[DeviceEntry]) -> str | None:
        """Why nothing more may be written under ``epoch`` (None: it may). Pure over the store and ``devices``.

        - a device that was granted ``epoch`` is not in the verified list ``devices`` any more (a revocation:
          every device of an epoch's list version is granted, so this is also "the epoch's list version
          predates the latest revocation of a device that holds it");
        - the account's list is format 2 or later and ``epoch`` is a legacy (v1 key record) epoch;
        - the schedule: ``rotate_after_records`` records or ``rotate_after_seconds`` since it was created.
        """
        store = self._store
        present = {d.device_id for d in devices}
        removed = store.granted(epoch) - present
        if removed:
            return f"epoch {epoch} was granted to {len(removed)} device(s) no longer in the device list"
        info = store.epoch_info(epoch)
        if self._lists.list_format >= device_list.FORMAT_2 and (info is None or info.record_format < 2):
            return f"epoch {epoch} uses legacy (v1) key grants"
        if info is None:
            return None
        if store.counter(f"epoch_records:{epoch}") >= self.rotate_after_records:
            return f"epoch {epoch} reached {self.rotate_after_records} records"
        if self._wall_clock() * 1000 - info.created_at_ms >= self.rotate_after_seconds * 1000:
            return f"epoch {epoch} is older than {self.rotate_after_seconds:g} s"
        return None

    async def _write_key_record(
        self,
        epoch: int,
        keys: dict[int, bytes],
        version: int,
        devices: list[DeviceEntry],
        v2: bool,
        *,
        read_upto: int,
        closed: dict[str, int] | None = None,
    ) -> bool:
        """Append one key record (``expected_head`` = the cursor, or ``read_upto`` past records held back)
        granting ``keys`` to ``devices``.

        ``epoch`` not yet held here: a new epoch (epoch 1 or a rotation) with the fresh key ``keys[epoch]``,
        granted to exactly ``devices`` (this device among them). Otherwise a grant-only record. v2 grants
        wrap to each device's ML-KEM and X25519 keys; a device without an ML-KEM key gets the keys through
        its v2 session only (never a classical sealed box). ``closed``: the removed writers' close-out marks a
        rotation commits to (a v3 record when not empty). Raises :class:`LogRekeyError` after 3 refusals in a row.
        """
        store, me = self._store, self._keys
        creating = store.epoch_key(epoch) is None
        created_at_ms = int(self._wall_clock() * 1000)
        if v2:
            randomness = []
            for device in devices:
                if device.kem_key:
                    kem_ct, kem_ss = handshake.encapsulate(device.kem_key)
                    randomness.append((self._random_bytes(32), kem_ct, kem_ss))
            ciphertext = log.make_key_record_v2(
                me.signing_key,
                account_id=me.account_id,
                creator_device=me.device_id,
                epoch=epoch,
                keys=keys,
                rotation=creating,
                device_list_version=version,
                devices=devices,
                created_at_ms=created_at_ms,
                wrap_randomness=randomness,
                closed=closed,
            )
        else:
            previous = store.epoch_key(epoch - 1) if creating and epoch > 1 else None
            ciphertext = log.make_key_record(
                me.signing_key,
                account_id=me.account_id,
                creator_device=me.device_id,
                epoch=epoch,
                key=keys[epoch],
                device_list_version=version,
                devices=devices,
                created_at_ms=created_at_ms,
                ephemeral_keys=[self._random_bytes(32) for _ in devices],
                previous_key=previous,
                wrap_nonce=self._random_bytes(log.NONCE_BYTES) if previous is not None else b"",
            )
        record_id = self._random_bytes(16)
        request = AppendRequest(
            records=[
                LogRecordIn(
                    record_id=record_id,
                    kind="key",
                    epoch=epoch,
                    ciphertext=ciphertext,
                    device_list_version=version,
                )
            ],
            expected_head=max(store.cursor("log"), read_upto),
        )
        try:
            response = await guarded(self._relay.log_append(request))
        except RemoteError as exc:
            if exc.code in _REFUSED_CODES:
                # Someone else wrote first, or a revocation we have not seen yet needs a new epoch:
                # read the log and the device list again, then decide again; never spin on it.
                self.rekey_needed = True
                self._stale_epochs += 1
                if self._stale_epochs > 3:
                    self._stale_epochs = 0
                    raise LogRekeyError(
                        f"the relay answered {exc.code.value} to the key record for epoch {epoch}"
                    ) from exc
                return True
            raise
        self._stale_epochs = 0
        if creating:  # a new epoch we created; the record grants it to us too
            with store.transaction():
                store.put_epoch_key(epoch, keys[epoch], b"")
                store.add_grants(epoch, [d.device_id for d in devices])
                store.put_commitment(epoch, log.key_commitment(me.account_id, epoch, keys[epoch]))
                store.put_epoch_info(
                    EpochInfo(
                        epoch=epoch,
                        record_format=2 if v2 else 1,
                        position=response.results[0].position,
                        list_version=version,
                        created_at_ms=created_at_ms,
                        writers={d.device_id: d.sign_key for d in devices},
                    )
                )
        for e, key in sorted(keys.items()):
            session_only = [d for d in devices if not (v2 and d.kem_key)]
            await self._send_account_key(e, key, version, session_only)
        return True

    # -- keys through sessions (crypto.md §12) --------------------------------------------------------

    def account_key_received(self, item: ReceivedMessage) -> None:
        """A ``tetherless/account-key`` session message (crypto.md §12): an epoch key from a sibling device.

        Accepted only from a current device of this account (the SDK verified the sender against the
        verified list) and only if it matches the ``key_commitment`` of that epoch's verified key record;
        when the record is not read yet, the key waits in ``log_session_keys`` for it (:meth:`apply_keys`).
        Never shown, never logged; a refused one is counted (``Report.rejected``). Local only; idempotent.
        """
        store = self._store
        try:
            if Address.parse(item.sender).account != self._keys.account_id:
                raise ValueError("from another account")
            grant = codec.decode(item.body, AccountKeyMessage)
            if grant.epoch < 1 or len(grant.key) != log.KEY_BYTES:
                raise ValueError("malformed")
        except (ValueError, TetherlessError) as exc:
            logger.warning("ignoring an account-key message from %s: %s", item.sender, exc)
            self._report.rejected += 1
            return
        commitment = store.commitment(grant.epoch)
        if commitment is None:
            store.offer_session_key(grant.epoch, grant.key)
        elif log.key_commitment(self._keys.account_id, grant.epoch, grant.key) == commitment:
            store.put_epoch_key(grant.epoch, grant.key, b"session")
        else:
            logger.warning("ignoring an account-key message from %s: key does not match its commitment", item.sender)
            self._report.rejected += 1

    async def _send_account_key(self, epoch: int, key: bytes, version: int, devices: list[DeviceEntry]) -> None:
        """Send ``K[epoch]`` to the account's other ``devices`` through their sessions (crypto.md §12).

        Best effort: the key record's grants in the log stay the durable path (account-log.md §17), so a
        device without prekeys, an unreachable relay or an expired envelope loses nothing.
        """
        if self._relay.sessions is None:
            return
        me = self._keys
        body = codec.encode(AccountKeyMessage(epoch=epoch, key=key, list_version=version))
        relay = Address.parse(me.address).relay
        for device in devices:
            if device.device_id == me.device_id:
                continue
            address = str(Address(account=me.account_id, relay=relay, device=device.device_id))
            try:
                await self._relay.send_many([Outgoing(address, body, log.ACCOUNT_KEY_CONTENT_TYPE)])
            except (TetherlessError, TransportError, PrekeysUnavailableError) as exc:
                logger.info("account key %d not sent to %s through a session: %s", epoch, address, exc)

    # -- recovery backup (account-log.md §5.7) ---------------------------------------------------------

    async def _apply_recovery_backup(self, record: LogRecord, backup: log.RecoveryBackupRecord) -> None:
        """Check a recovery backup record; note it when it backs up to the current list's recovery key; open it
        when this engine holds that recovery key (a device enrolled by the recovery key alone).

        A backup that does not verify is refused like a key record (counted, reported, skipped): a writer that is
        not a role-``device`` entry of its list version, a key the list does not commit to, a list version older
        than its epoch's, or an epoch older than one created before it (a removed device's late backup).
        """
        store, account_id = self._store, self._keys.account_id
        body = backup.backup
        try:
            version = body.device_list_version
            devices = await self._lists.at(version)
            committed = await guarded(self._relay.recovery_backup_hash_at(account_id, version))
            if devices is None or committed is None:
                raise log.InvalidRecordError(
                    ErrorCode.BAD_SIGNATURE,
                    f"recovery backup names device list version {version}, which does not exist",
                )
            info = store.epoch_info(record.epoch)
            if info is None:
                raise log.InvalidRecordError(ErrorCode.BAD_SIGNATURE, "recovery backup for an epoch with no key record")
            newer = store.epoch_info(record.epoch + 1)
            if newer is not None and newer.position < record.position:
                raise log.InvalidRecordError(
                    ErrorCode.LOG_EPOCH_STALE, f"recovery backup under epoch {record.epoch} after a newer epoch"
                )
            log.verify_recovery_backup(
                backup,
                account_id=account_id,
                epoch=record.epoch,
                devices=devices,
                backup_key_hash=committed,
                epoch_list_version=info.list_version,
            )
            opened: dict[int, bytes] = {}
            if self.recovery is not None and committed == self._recovery_hash():
                opened = log.open_recovery_backup(backup, self.recovery)
        except TetherlessError as exc:
            self._report.refuse(record, exc)
            return
        current, _ = await self._lists.current()
        current_hash = await guarded(self._relay.recovery_backup_hash_at(account_id, current))
        with store.transaction():
            for epoch, key in sorted(opened.items()):
                if store.epoch_key(epoch) is None and self._matches_commitment(epoch, key):
                    store.put_epoch_key(epoch, key, record.record_id)
                    self.recovered_epochs.add(epoch)
            if committed == current_hash:
                remember_recovery_backup_key(store, body.recipient, backed_up_epoch=record.epoch)

    def backed_up_epoch(self, key_hash: bytes) -> int:
        """The newest epoch a verified backup in the log wraps to the recovery key with hash ``key_hash`` (0: none
        known to this device)."""
        note = _backup_note(self._store)
        return note.backed_up_epoch if note is not None and note.key_hash == key_hash else 0

    def _recovery_hash(self) -> bytes:
        assert self.recovery is not None
        return recovery.backup_key_hash(recovery.backup_recipient(self.recovery))

    async def ensure_recovery_backup(self, view: LogView) -> bool:
        """Back the newest epoch's key (with every older key this device holds) up to the recovery key the current
        list commits to, unless a verified backup of that epoch to that key is in the log (account-log.md §5.7).

        The backup public keys come from the recovery keys this part holds (``device recovery-key``, ``device
        link --recovery-key``), else from the ones remembered by ``device init`` or from the newest verified
        backup record (:func:`remember_recovery_backup_key`); when the list commits to a key this device does not
        know (a replacement whose backup failed) nothing can be written and ``sync`` says so once. Idempotent (a
        deterministic record id); returns True when it appended or must read again. Raises what the relay calls
        raise (``RetryError`` for transport failures). Cancellation: an append whose answer was lost is
        found again by its record id on the next run.
        """
        store, me = self._store, self._keys
        epoch = store.key_epochs_seen()
        if self._lists.list_format < device_list.FORMAT_2 or epoch == 0 or view.blocked_on_key:
            return False
        if store.epoch_key(epoch) is None:
            return False
        version, devices = await self._lists.current()
        wanted = await guarded(self._relay.recovery_backup_hash_at(me.account_id, version))
        own = next((d for d in devices if d.device_id == me.device_id), None)
        if not wanted or own is None or own.role != device_list.ROLE_DEVICE:
            return False
        if self.backed_up_epoch(wanted) >= epoch:
            return False
        recipient = self._backup_recipient(wanted)
        if recipient is None:
            line = (
                "recovery backup: the device list's recovery key has no backup record, so epoch "
                f"{epoch} is not backed up; run `tetherless device recovery-key` to make a new recovery key"
            )
            self._report.warn("recovery_backup_missing", line)
            return False
        held = {e: k for e in range(1, epoch + 1) if (k := store.epoch_key(e)) is not None}
        kem_ct, kem_ss = handshake.encapsulate(recipient.kem_public)
        ciphertext = log.make_recovery_backup(
            me.signing_key,
            account_id=me.account_id,
            writer_device=me.device_id,
            epoch=epoch,
            keys=held,
            device_list_version=version,
            recipient=recipient,
            created_at_ms=int(self._wall_clock() * 1000),
            ephemeral_private_key=self._random_bytes(32),
            kem_ciphertext=kem_ct,
            kem_shared_secret=kem_ss,
        )
        record = LogRecordIn(
            record_id=log.recovery_backup_id(me.account_id, epoch, wanted),
            kind="key",
            epoch=epoch,
            ciphertext=ciphertext,
            device_list_version=version,
        )
        # The relay takes key-kind records only at the head this device has read (account-log.md §3.2).
        request = AppendRequest(records=[record], expected_head=max(store.cursor("log"), view.read_upto))
        try:
            await guarded(self._relay.log_append(request))
        except RemoteError as exc:
            if exc.code not in _REFUSED_CODES:
                raise
            # Someone appended first, or a newer epoch exists or is due: read (and rotate), then decide again;
            # never spin on it: after three refusals in a row the next sync tries again.
            self._backup_conflicts += 1
            if self._backup_conflicts > 3:
                self._backup_conflicts = 0
                self._report.warn(
                    "recovery_backup_not_written",
                    f"recovery backup of epoch {epoch} not written: the relay answered {exc.code.value}",
                )
                return False
            return True
        self._backup_conflicts = 0
        with store.transaction():
            remember_recovery_backup_key(store, recipient, backed_up_epoch=epoch)
        return True

    def _backup_recipient(self, wanted: bytes) -> hybrid.HybridRecipient | None:
        """The recovery backup public keys whose hash is ``wanted``: derived from the recovery keys this part
        holds, or remembered from ``device init`` / a verified backup record; never keys of another hash."""
        if self.recovery is not None and self._recovery_hash() == wanted:
            return recovery.backup_recipient(self.recovery)
        note = _backup_note(self._store)
        if note is None or note.key_hash != wanted:
            return None
        return hybrid.HybridRecipient(x25519_public=note.x25519_public, kem_public=note.kem_public)


__all__ = [
    "DEFAULT_ROTATE_AFTER_RECORDS",
    "DEFAULT_ROTATE_AFTER_SECONDS",
    "RECOVERY_BACKUP_TABLE",
    "AccountKeyMessage",
    "Epochs",
    "LogView",
    "RecoveryBackupNote",
    "remember_recovery_backup_key",
]
