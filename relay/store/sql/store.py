"""Every :class:`relay.store.base.Store` method, written once over the topic modules of this package.

A backend subclasses :class:`SQLStore` and supplies the engine, how a write
runs (:meth:`SQLStore._write`: one transaction, durably committed before it
returns), how a read runs (:meth:`SQLStore._read`, and :meth:`SQLStore._snapshot`
for reads of several statements that must see one state), and the wake-up
listener (:meth:`SQLStore._watch`). Method contracts (what is raised,
idempotence, cancellation) are on the ``Store`` protocols in ``base.py``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import trio

from ..base import (
    BlobCollection,
    BlobRecord,
    BlobTrash,
    BlobUploadRecord,
    ChallengeOutcome,
    ClaimedBundle,
    ConsumedChallenge,
    DeviceListCommitted,
    DeviceListHead,
    DeviceListUpdate,
    DeviceRecord,
    DeviceStreamState,
    EnrolmentRecord,
    ExpiryReport,
    InboxRecord,
    LogAppendOutcome,
    LogPageRecord,
    LogRetentionRecord,
    LogSnapshotInfo,
    LogSweepReport,
    NewBlobUpload,
    NewCredential,
    NewEnvelope,
    NewLogRecord,
    OutboxRecord,
    PeerState,
    PrekeyState,
    ReceivedEnvelope,
    ReceivedOutcome,
    SessionRecord,
    StoredCredential,
    StoredEnvelope,
    StoredPrekey,
)
from ..engine import INBOX_CHANNEL, LOG_CHANNEL, REVOCATION_CHANNEL, Engine, clamp
from . import accounts, auth, blobs, devices, federation, identity, inbox, log
from . import prekeys as _prekeys  # the name "prekeys" is a parameter of put_prekeys

T = TypeVar("T")
Operation = Callable[[Any], T]


def expire(conn: Any, e: Engine, *, now_ms: int) -> ExpiryReport:
    """Everything past its expiry, every topic, in one transaction (see ``Store.expire``)."""
    now_ms = clamp(now_ms)
    envelopes, keys = inbox.expire_inbox(conn, e, now_ms)
    challenges, sessions = auth.expire_auth(conn, e, now_ms)
    federated = federation.expire_federation(conn, e, now_ms)
    challenges += devices.expire_devices(conn, e, now_ms)  # WebAuthn registration ceremonies
    enrolments = _prekeys.expire_prekeys_and_enrolments(conn, e, now_ms)
    return ExpiryReport(envelopes, challenges, sessions, keys, federated, enrolments=enrolments)


class SQLStore(abc.ABC):
    """The ``Store`` methods over a backend's transactions; see the module docstring.

    Abstract: a backend (``SQLiteStore``, ``PostgresStore``) supplies the five hooks below; a class that
    misses one cannot be instantiated."""

    engine: Engine
    # Whether the database is at the compact inbox schema floor (sql/inbox.py); set by the backend at open.
    compact_inbox: bool = False

    # -- what a backend supplies ------------------------------------------------------------

    @abc.abstractmethod
    async def _write(self, fn: Operation[T]) -> T:
        """Run ``fn(conn)`` in one write transaction; return after the commit. Raises what ``fn`` raises (then
        nothing of it is stored) or ``StoreUnavailableError``."""

    @abc.abstractmethod
    async def _read(self, fn: Operation[T]) -> T:
        """Run ``fn(conn)`` on a reader connection (no write)."""

    @abc.abstractmethod
    async def _snapshot(self, fn: Operation[T]) -> T:
        """Run ``fn(conn)`` in one read transaction: every statement sees the same committed state."""

    @abc.abstractmethod
    async def _watch(
        self,
        channel: str,
        notify: Callable[[str], None],
        task_status: trio.TaskStatus[None],
        listening: Callable[[bool], None] | None = None,
    ) -> None:
        """Call ``notify(payload)`` in the trio thread for every wake-up on ``channel`` until cancelled;
        ``listening`` as in ``Store.watch_session_revocations``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close every connection; idempotent."""

    def _op(self, fn: Callable[..., T], /, **arguments: Any) -> Operation[T]:
        return partial(fn, e=self.engine, **arguments)

    # -- accounts and devices ---------------------------------------------------------------

    async def create_account(
        self, account_id: str, device: DeviceRecord, signed_device_list: bytes, now_ms: int
    ) -> None:
        await self._write(
            self._op(
                accounts.create_account,
                account_id=account_id,
                device=device,
                signed_device_list=signed_device_list,
                now_ms=now_ms,
            )
        )

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        return await self._read(self._op(accounts.get_device, device_id=device_id))

    async def get_device_lists(self, account_id: str) -> list[bytes] | None:
        return await self._read(self._op(accounts.get_device_lists, account_id=account_id))

    # -- authentication ---------------------------------------------------------------------

    async def put_challenge(self, nonce: bytes, device_id: str, expires_at_ms: int) -> None:
        await self._write(self._op(auth.put_challenge, nonce=nonce, device_id=device_id, expires_at_ms=expires_at_ms))

    async def consume_challenge(self, nonce: bytes, device_id: str, now_ms: int) -> ConsumedChallenge:
        return await self._write(self._op(auth.consume_challenge, nonce=nonce, device_id=device_id, now_ms=now_ms))

    async def create_session(
        self, token_hash: bytes, device_id: str, account_id: str, created_at_ms: int, expires_at_ms: int
    ) -> None:
        await self._write(
            self._op(
                auth.create_session,
                token_hash=token_hash,
                device_id=device_id,
                account_id=account_id,
                created_at_ms=created_at_ms,
                expires_at_ms=expires_at_ms,
            )
        )

    async def get_session(self, token_hash: bytes) -> SessionRecord | None:
        return await self._read(self._op(auth.get_session, token_hash=token_hash))

    async def revoke_sessions(self, device_id: str, token_hash: bytes | None, now_ms: int) -> int:
        return await self._write(
            self._op(auth.revoke_sessions, device_id=device_id, token_hash=token_hash, now_ms=now_ms)
        )

    async def watch_session_revocations(
        self,
        notify: Callable[[str], None],
        listening: Callable[[bool], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._watch(REVOCATION_CHANNEL, notify, task_status, listening)

    # -- inboxes ----------------------------------------------------------------------------

    async def store_envelopes(
        self, sender_device: str, envelopes: Sequence[NewEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[StoredEnvelope]:
        if not envelopes:
            return []
        return await self._write(
            self._op(
                inbox.store_envelopes,
                sender_device=sender_device,
                envelopes=envelopes,
                now_ms=now_ms,
                max_inbox=max_inbox,
                forget_at_ms=forget_at_ms,
                compact=self.compact_inbox,
            )
        )

    async def read_inbox(self, device_id: str, after: int, limit: int, now_ms: int) -> list[InboxRecord]:
        return await self._read(
            self._op(inbox.read_inbox, device_id=device_id, after=after, limit=limit, now_ms=now_ms)
        )

    async def acknowledge(self, device_id: str, up_to: int | None, envelope_ids: Sequence[bytes]) -> int:
        return await self._write(
            self._op(
                inbox.acknowledge,
                device_id=device_id,
                up_to=up_to,
                envelope_ids=envelope_ids,
                compact=self.compact_inbox,
            )
        )

    async def expire(self, now_ms: int) -> ExpiryReport:
        return await self._write(self._op(expire, now_ms=now_ms))

    async def bind_identity(
        self, relay_name: str | None, effective_name: str, key_id: str, retired_key_ids: Sequence[str], now_ms: int
    ) -> list[str]:
        return await self._write(
            self._op(
                identity.bind_identity,
                relay_name=relay_name,
                effective_name=effective_name,
                key_id=key_id,
                retired_key_ids=list(retired_key_ids),
                now_ms=now_ms,
            )
        )

    async def watch_inbox_commits(
        self, notify: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self._watch(INBOX_CHANNEL, notify, task_status)

    # -- federation -------------------------------------------------------------------------

    async def federation_due_peers(self, now_ms: int) -> list[PeerState]:
        return await self._read(self._op(federation.due_peers, now_ms=now_ms))

    async def federation_outbox_batch(self, peer: str, now_ms: int, limit: int) -> list[OutboxRecord]:
        return await self._read(self._op(federation.outbox_batch, peer=peer, now_ms=now_ms, limit=limit))

    async def federation_outbox_settle(
        self, peer: str, done: Sequence[int], deferred: Sequence[int], deferred_until_ms: int, now_ms: int
    ) -> None:
        await self._write(
            self._op(
                federation.outbox_settle,
                peer=peer,
                done=done,
                deferred=deferred,
                deferred_until_ms=deferred_until_ms,
                now_ms=now_ms,
            )
        )

    async def federation_peer_failed(
        self, peer: str, error: str, failures: int, next_attempt_at_ms: int, now_ms: int
    ) -> None:
        await self._write(
            self._op(
                federation.peer_failed,
                peer=peer,
                error=error,
                failures=failures,
                next_attempt_at_ms=next_attempt_at_ms,
                now_ms=now_ms,
            )
        )

    async def federation_outbox_fail(self, peer: str, seqs: Sequence[int], reason: str, now_ms: int) -> None:
        await self._write(self._op(federation.outbox_fail, peer=peer, seqs=seqs, reason=reason, now_ms=now_ms))

    async def federation_peer_states(self) -> list[PeerState]:
        return await self._snapshot(self._op(federation.peer_states))

    async def federation_retry_now(self, peer: str | None) -> int:
        return await self._write(self._op(federation.retry_now, peer=peer))

    async def federation_take_lease(self, peer: str, holder: str, now_ms: int, lease_ms: int) -> bool:
        return await self._write(
            self._op(federation.take_lease, peer=peer, holder=holder, now_ms=now_ms, lease_ms=lease_ms)
        )

    async def federation_release_leases(self, holder: str) -> None:
        await self._write(self._op(federation.release_leases, holder=holder))

    async def federation_remember_nonce(self, origin: str, nonce: str, forget_at_ms: int) -> bool:
        return await self._write(
            self._op(federation.remember_nonce, origin=origin, nonce=nonce, forget_at_ms=forget_at_ms)
        )

    async def federation_store_received(
        self, origin: str, envelopes: Sequence[ReceivedEnvelope], now_ms: int, max_inbox: int, forget_at_ms: int
    ) -> list[tuple[ReceivedOutcome, str]]:
        return await self._write(
            self._op(
                federation.store_received,
                origin=origin,
                envelopes=envelopes,
                now_ms=now_ms,
                max_inbox=max_inbox,
                forget_at_ms=forget_at_ms,
            )
        )

    # -- device lists v2, revocation, WebAuthn -------------------------------------------------

    async def get_device_list_head(self, account_id: str) -> DeviceListHead | None:
        return await self._snapshot(self._op(devices.device_list_head, account_id=account_id))

    async def append_device_list(self, update: DeviceListUpdate, now_ms: int) -> DeviceListCommitted:
        return await self._write(self._op(devices.append_device_list, update=update, now_ms=now_ms))

    async def device_stream_state(self, device_id: str) -> DeviceStreamState | None:
        return await self._read(self._op(devices.device_stream_state, device_id=device_id))

    async def put_webauthn_registration(
        self, challenge: bytes, account_id: str, device_id: str, expires_at_ms: int
    ) -> None:
        await self._write(
            self._op(
                devices.put_registration,
                challenge=challenge,
                account_id=account_id,
                device_id=device_id,
                expires_at_ms=expires_at_ms,
            )
        )

    async def consume_webauthn_registration(
        self, challenge: bytes, account_id: str, device_id: str, now_ms: int
    ) -> ChallengeOutcome:
        return await self._write(
            self._op(
                devices.consume_registration,
                challenge=challenge,
                account_id=account_id,
                device_id=device_id,
                now_ms=now_ms,
            )
        )

    async def put_webauthn_credential(
        self, account_id: str, device_id: str, credential: NewCredential, sign_count: int, now_ms: int
    ) -> None:
        await self._write(
            self._op(
                devices.put_credential,
                account_id=account_id,
                device_id=device_id,
                credential=credential,
                sign_count=sign_count,
                now_ms=now_ms,
            )
        )

    async def get_webauthn_credentials(self, account_id: str) -> list[StoredCredential]:
        return await self._read(self._op(devices.credentials, account_id=account_id))

    # -- prekeys and enrolment -----------------------------------------------------------------

    async def put_prekeys(self, device_id: str, prekeys: Sequence[StoredPrekey], max_one_time: int) -> PrekeyState:
        return await self._write(
            self._op(_prekeys.put_prekeys, device_id=device_id, prekeys=prekeys, max_one_time=max_one_time)
        )

    async def get_prekey_state(self, device_id: str) -> PrekeyState:
        return await self._read(self._op(_prekeys.prekey_state, device_id=device_id))

    async def claim_prekeys(
        self,
        claimer_account: str,
        targets: Sequence[tuple[str, str]],
        now_ms: int,
        one_time_limit: int,
        window_ms: int,
    ) -> list[ClaimedBundle | None]:
        return await self._write(
            self._op(
                _prekeys.claim_prekeys,
                claimer_account=claimer_account,
                targets=targets,
                now_ms=now_ms,
                one_time_limit=one_time_limit,
                window_ms=window_ms,
            )
        )

    async def delete_device_prekeys(self, device_id: str) -> int:
        return await self._write(self._op(_prekeys.delete_device_prekeys, device_id=device_id))

    async def create_enrolment(
        self, lookup_id: bytes, offer: bytes, created_at_ms: int, expires_at_ms: int, forget_at_ms: int
    ) -> None:
        await self._write(
            self._op(
                _prekeys.create_enrolment,
                lookup_id=lookup_id,
                offer=offer,
                created_at_ms=created_at_ms,
                expires_at_ms=expires_at_ms,
                forget_at_ms=forget_at_ms,
            )
        )

    async def get_enrolment(self, lookup_id: bytes) -> EnrolmentRecord | None:
        return await self._read(self._op(_prekeys.get_enrolment, lookup_id=lookup_id))

    async def put_enrolment_proposal(
        self, lookup_id: bytes, proposal: bytes, proposer_device: str, now_ms: int
    ) -> EnrolmentRecord:
        return await self._write(
            self._op(
                _prekeys.put_enrolment_proposal,
                lookup_id=lookup_id,
                proposal=proposal,
                proposer_device=proposer_device,
                now_ms=now_ms,
            )
        )

    # -- account log ---------------------------------------------------------------------------

    async def append_log(
        self,
        account_id: str,
        records: Sequence[NewLogRecord],
        expected_head: int | None,
        now_ms: int,
        max_bytes: int,
    ) -> LogAppendOutcome:
        return await self._write(
            self._op(
                log.append,
                account_id=account_id,
                records=records,
                expected_head=expected_head,
                now_ms=now_ms,
                max_bytes=max_bytes,
            )
        )

    async def read_log(
        self, account_id: str, after: int, limit: int, max_bytes: int, full_parts: bool
    ) -> LogPageRecord:
        return await self._snapshot(
            self._op(
                log.read, account_id=account_id, after=after, limit=limit, max_bytes=max_bytes, full_parts=full_parts
            )
        )

    async def log_snapshot(self, account_id: str) -> LogSnapshotInfo | None:
        return await self._snapshot(self._op(log.snapshot, account_id=account_id))

    async def read_snapshot_parts(
        self, account_id: str, snapshot_id: bytes, after: int, limit: int, max_bytes: int
    ) -> LogPageRecord:
        return await self._snapshot(
            self._op(
                log.snapshot_parts,
                account_id=account_id,
                snapshot_id=snapshot_id,
                after=after,
                limit=limit,
                max_bytes=max_bytes,
            )
        )

    async def get_log_retention(self, account_id: str) -> LogRetentionRecord:
        return await self._read(self._op(log.get_retention, account_id=account_id))

    async def set_log_retention(self, account_id: str, days: int | None, now_ms: int) -> LogRetentionRecord:
        return await self._write(self._op(log.set_retention, account_id=account_id, days=days, now_ms=now_ms))

    async def sweep_log(self, now_ms: int, batch: int) -> LogSweepReport:
        deleted, emptied, more = 0, 0, False
        # One transaction per account: a sweep never holds the writer (or a row lock) for long.
        for account_id in await self._read(self._op(log.sweep_accounts)):
            report = await self._write(self._op(log.sweep_account, account_id=account_id, now_ms=now_ms, batch=batch))
            deleted, emptied, more = deleted + report.deleted, emptied + report.emptied, more or report.more
        return LogSweepReport(deleted, emptied, more)

    async def note_revocation(self, account_id: str, device_list_version: int) -> None:
        await self._write(self._op(log.note_revocation, account_id=account_id, device_list_version=device_list_version))

    async def watch_log_commits(
        self, notify: Callable[[str], None], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self._watch(LOG_CHANNEL, notify, task_status)

    # -- media blobs ---------------------------------------------------------------------------

    async def create_blob_upload(
        self, upload: NewBlobUpload, quota_bytes: int, blob_expires_at_ms: int
    ) -> BlobUploadRecord:
        return await self._write(
            self._op(blobs.create_upload, upload=upload, quota_bytes=quota_bytes, blob_expires_at_ms=blob_expires_at_ms)
        )

    async def set_blob_upload_state(self, upload_id: str, state: str) -> None:
        await self._write(self._op(blobs.set_state, upload_id=upload_id, state=state))

    async def get_blob_upload(self, upload_id: str) -> BlobUploadRecord | None:
        return await self._read(self._op(blobs.get_upload, upload_id=upload_id))

    async def lease_blob_upload(self, upload_id: str, offset: int, holder: str, now_ms: int, until_ms: int) -> bool:
        return await self._write(
            self._op(
                blobs.take_lease, upload_id=upload_id, offset=offset, holder=holder, now_ms=now_ms, until_ms=until_ms
            )
        )

    async def release_blob_lease(self, upload_id: str, holder: str) -> None:
        await self._write(self._op(blobs.release_lease, upload_id=upload_id, holder=holder))

    async def commit_blob_append(self, upload_id: str, holder: str, offset: int, new_offset: int, state: str) -> bool:
        return await self._write(
            self._op(
                blobs.commit_append,
                upload_id=upload_id,
                holder=holder,
                offset=offset,
                new_offset=new_offset,
                state=state,
            )
        )

    async def finish_blob_upload(
        self, upload_id: str, sha256: bytes, blob_expires_at_ms: int, now_ms: int
    ) -> str | None:
        return await self._write(
            self._op(
                blobs.finish_upload,
                upload_id=upload_id,
                sha256=sha256,
                blob_expires_at_ms=blob_expires_at_ms,
                now_ms=now_ms,
            )
        )

    async def discard_blob_upload(self, upload_id: str, completed: bool, now_ms: int) -> bool:
        return await self._write(
            self._op(blobs.discard_upload, upload_id=upload_id, completed=completed, now_ms=now_ms)
        )

    async def get_blob(self, blob_id: str) -> BlobRecord | None:
        return await self._snapshot(self._op(blobs.get_blob, blob_id=blob_id))

    async def delete_blob(self, blob_id: str, account_id: str, now_ms: int) -> bool:
        return await self._write(self._op(blobs.delete_blob, blob_id=blob_id, account_id=account_id, now_ms=now_ms))

    async def collect_blobs(self, now_ms: int, batch: int) -> BlobCollection:
        return await self._write(self._op(blobs.collect, now_ms=now_ms, batch=batch))

    async def blob_trash(self, limit: int) -> list[BlobTrash]:
        return await self._read(self._op(blobs.trash, limit=limit))

    async def forget_blob_trash(self, storage_keys: Sequence[str]) -> None:
        await self._write(self._op(blobs.forget_trash, keys=storage_keys))

    async def blob_usage(self, account_id: str) -> int:
        return await self._snapshot(self._op(blobs.usage, account_id=account_id))

    async def blob_stored_bytes(self) -> int:
        return await self._read(self._op(blobs.stored_bytes))
