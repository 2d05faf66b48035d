"""Media blobs: tus uploads, stored blobs, capabilities and the storage trash (schema: migrations/0011_blobs.sql).

The database holds the truth about an upload (docs/decisions/0014-media-blobs.md D3): its committed offset
and the backend's opaque state. A creation holds the account's row (locked on PostgreSQL; SQLite's one writer
serialises anyway), so concurrent creations count the quota exactly and cannot both deduplicate onto, or both
insert, one digest. An append is guarded by a lease (a holder id and an expiry on the upload row) taken with a
conditional update: of two PATCHes of one upload, through any replicas, one appends and the other is refused.
Every row that drops storage (terminated, expired, deleted, discarded, deduplicated) puts the storage key in
``blob_trash`` in the same transaction; the service empties it after the backend dropped the bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple
from typing import Any

from protocol.errors import ErrorCode, TetherlessError

from ..base import BlobCollection, BlobRecord, BlobTrash, BlobUploadRecord, NewBlobUpload
from ..engine import Engine, clamp

_UPLOAD_COLUMNS = (
    "upload_id, account_id, device_id, length, upload_offset, sha256, capability_hash, storage_state,"
    " created_at_ms, expires_at_ms, blob_id"
)
_BLOB_COLUMNS = "blob_id, account_id, sha256, length, storage_key, created_at_ms, expires_at_ms"


def _upload(row: Sequence[Any]) -> BlobUploadRecord:
    return BlobUploadRecord(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        bytes(row[5]) if row[5] is not None else None,
        bytes(row[6]) if row[6] is not None else None,
        row[7],
        row[8],
        row[9],
        row[10],
    )


def _trash(conn: Any, e: Engine, key: str, state: str | None, now_ms: int) -> None:
    conn.execute(
        e.q(
            "INSERT INTO blob_trash (storage_key, storage_state, queued_at_ms) VALUES (?, ?, ?)"
            " ON CONFLICT (storage_key) DO NOTHING"
        ),
        (key, state, now_ms),
    )


def _add_capability(conn: Any, e: Engine, blob_id: str, capability_hash: bytes | None) -> None:
    if capability_hash is not None:
        conn.execute(
            e.q(
                "INSERT INTO blob_capabilities (blob_id, capability_hash) VALUES (?, ?)"
                " ON CONFLICT (blob_id, capability_hash) DO NOTHING"
            ),
            (blob_id, capability_hash),
        )


def usage(conn: Any, e: Engine, *, account_id: str) -> int:
    """Bytes the account holds: its stored blobs and the declared length of its unfinished uploads."""
    stored = conn.execute(e.q("SELECT coalesce(sum(length), 0) FROM blobs WHERE account_id = ?"), (account_id,))
    pending = conn.execute(
        e.q("SELECT coalesce(sum(length), 0) FROM blob_uploads WHERE account_id = ? AND blob_id IS NULL"),
        (account_id,),
    )
    return int(stored.fetchone()[0]) + int(pending.fetchone()[0])


def stored_bytes(conn: Any, e: Engine) -> int:
    return int(conn.execute("SELECT coalesce(sum(length), 0) FROM blobs").fetchone()[0])


def _existing_blob(conn: Any, e: Engine, account_id: str, sha256: bytes) -> str | None:
    row = conn.execute(
        e.q("SELECT blob_id FROM blobs WHERE account_id = ? AND sha256 = ?" + e.lock_rows), (account_id, sha256)
    ).fetchone()
    return str(row[0]) if row else None


def _join_blob(conn: Any, e: Engine, blob_id: str, capability_hash: bytes | None, blob_expires_at_ms: int) -> None:
    """A second upload of a stored digest: its capability may download the blob, which lives on as long as the
    newer reference needs."""
    _add_capability(conn, e, blob_id, capability_hash)
    conn.execute(
        e.q(f"UPDATE blobs SET expires_at_ms = {e.greatest}(expires_at_ms, ?) WHERE blob_id = ?"),
        (clamp(blob_expires_at_ms), blob_id),
    )


def create_upload(
    conn: Any, e: Engine, *, upload: NewBlobUpload, quota_bytes: int, blob_expires_at_ms: int
) -> BlobUploadRecord:
    """See ``BlobStore.create_blob_upload``."""
    conn.execute(e.q("SELECT account_id FROM accounts WHERE account_id = ?" + e.lock_rows), (upload.account_id,))
    existing = _existing_blob(conn, e, upload.account_id, upload.sha256) if upload.sha256 is not None else None
    offset = 0
    if existing is not None:
        _join_blob(conn, e, existing, upload.capability_hash, blob_expires_at_ms)
        offset = upload.length
    elif quota_bytes and usage(conn, e, account_id=upload.account_id) + upload.length > quota_bytes:
        raise TetherlessError(
            ErrorCode.BLOB_QUOTA_EXCEEDED, f"this upload would take the account above its {quota_bytes} bytes"
        )
    record = BlobUploadRecord(
        upload.upload_id,
        upload.account_id,
        upload.device_id,
        upload.length,
        offset,
        upload.sha256,
        upload.capability_hash,
        "",
        upload.created_at_ms,
        clamp(upload.expires_at_ms),
        existing,
    )
    # The record's fields are in _UPLOAD_COLUMNS order.
    conn.execute(e.q(f"INSERT INTO blob_uploads ({_UPLOAD_COLUMNS}) VALUES ({', '.join('?' * 11)})"), astuple(record))
    return record


def set_state(conn: Any, e: Engine, *, upload_id: str, state: str) -> None:
    conn.execute(
        e.q("UPDATE blob_uploads SET storage_state = ? WHERE upload_id = ? AND blob_id IS NULL"), (state, upload_id)
    )


def get_upload(conn: Any, e: Engine, *, upload_id: str, lock: bool = False) -> BlobUploadRecord | None:
    row = conn.execute(
        e.q(f"SELECT {_UPLOAD_COLUMNS} FROM blob_uploads WHERE upload_id = ?" + (e.lock_rows if lock else "")),
        (upload_id,),
    ).fetchone()
    return _upload(row) if row else None


def take_lease(conn: Any, e: Engine, *, upload_id: str, offset: int, holder: str, now_ms: int, until_ms: int) -> bool:
    """See ``BlobStore.lease_blob_upload``: one conditional update, so of racing PATCHes one wins."""
    changed: int = conn.execute(
        e.q(
            "UPDATE blob_uploads SET lease_holder = ?, lease_until_ms = ?"
            " WHERE upload_id = ? AND upload_offset = ? AND blob_id IS NULL"
            " AND (lease_holder = ? OR lease_until_ms <= ?)"
        ),
        (holder, clamp(until_ms), upload_id, offset, holder, clamp(now_ms)),
    ).rowcount
    return changed == 1


def release_lease(conn: Any, e: Engine, *, upload_id: str, holder: str) -> None:
    conn.execute(
        e.q("UPDATE blob_uploads SET lease_holder = '', lease_until_ms = 0 WHERE upload_id = ? AND lease_holder = ?"),
        (upload_id, holder),
    )


def commit_append(
    conn: Any, e: Engine, *, upload_id: str, holder: str, offset: int, new_offset: int, state: str
) -> bool:
    """See ``BlobStore.commit_blob_append``."""
    changed: int = conn.execute(
        e.q(
            "UPDATE blob_uploads SET upload_offset = ?, storage_state = ?, lease_holder = '', lease_until_ms = 0"
            " WHERE upload_id = ? AND upload_offset = ? AND lease_holder = ? AND blob_id IS NULL"
        ),
        (new_offset, state, upload_id, offset, holder),
    ).rowcount
    return changed == 1


def finish_upload(
    conn: Any, e: Engine, *, upload_id: str, sha256: bytes, blob_expires_at_ms: int, now_ms: int
) -> str | None:
    """See ``BlobStore.finish_blob_upload``."""
    upload = get_upload(conn, e, upload_id=upload_id, lock=True)
    if upload is None or upload.blob_id is not None or upload.offset != upload.length:
        return upload.blob_id if upload else None
    conn.execute(e.q("SELECT account_id FROM accounts WHERE account_id = ?" + e.lock_rows), (upload.account_id,))
    blob_id = _existing_blob(conn, e, upload.account_id, sha256)
    if blob_id is None:
        blob_id = upload.upload_id
        conn.execute(
            e.q(f"INSERT INTO blobs ({_BLOB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"),
            (blob_id, upload.account_id, sha256, upload.length, upload.upload_id, now_ms, clamp(blob_expires_at_ms)),
        )
        _add_capability(conn, e, blob_id, upload.capability_hash)
    else:  # the account stored these bytes meanwhile (or declared no digest): keep one copy
        _join_blob(conn, e, blob_id, upload.capability_hash, blob_expires_at_ms)
        _trash(conn, e, upload.upload_id, None, now_ms)
    conn.execute(
        e.q("UPDATE blob_uploads SET blob_id = ?, lease_holder = '', lease_until_ms = 0 WHERE upload_id = ?"),
        (blob_id, upload_id),
    )
    return blob_id


def discard_upload(conn: Any, e: Engine, *, upload_id: str, completed: bool, now_ms: int) -> bool:
    """See ``BlobStore.discard_blob_upload``."""
    upload = get_upload(conn, e, upload_id=upload_id, lock=True)
    if upload is None:
        return False
    conn.execute(e.q("DELETE FROM blob_uploads WHERE upload_id = ?"), (upload_id,))
    if upload.blob_id is None:
        _trash(conn, e, upload.upload_id, None if completed else upload.storage_state, now_ms)
    return True


def get_blob(conn: Any, e: Engine, *, blob_id: str) -> BlobRecord | None:
    row = conn.execute(e.q(f"SELECT {_BLOB_COLUMNS} FROM blobs WHERE blob_id = ?"), (blob_id,)).fetchone()
    if row is None:
        return None
    hashes = conn.execute(e.q("SELECT capability_hash FROM blob_capabilities WHERE blob_id = ?"), (blob_id,))
    return BlobRecord(
        row[0], row[1], bytes(row[2]), row[3], row[4], row[5], row[6], tuple(bytes(h[0]) for h in hashes.fetchall())
    )


def delete_blob(conn: Any, e: Engine, *, blob_id: str, account_id: str, now_ms: int) -> bool:
    """See ``BlobStore.delete_blob``."""
    row = conn.execute(
        e.q("SELECT storage_key FROM blobs WHERE blob_id = ? AND account_id = ?" + e.lock_rows), (blob_id, account_id)
    ).fetchone()
    if row is None:
        return False
    conn.execute(e.q("DELETE FROM blob_capabilities WHERE blob_id = ?"), (blob_id,))
    conn.execute(e.q("DELETE FROM blobs WHERE blob_id = ?"), (blob_id,))
    _trash(conn, e, row[0], None, now_ms)
    return True


def collect(conn: Any, e: Engine, *, now_ms: int, batch: int) -> BlobCollection:
    """See ``BlobStore.collect_blobs``. ``DELETE … RETURNING``: of replicas collecting at once, each row is
    deleted, counted and trashed by exactly one."""
    now_ms = clamp(now_ms)
    uploads = conn.execute(
        e.q(
            "DELETE FROM blob_uploads WHERE upload_id IN (SELECT upload_id FROM blob_uploads"
            " WHERE expires_at_ms <= ? ORDER BY expires_at_ms LIMIT ?) RETURNING upload_id, storage_state, blob_id"
        ),
        (now_ms, batch),
    ).fetchall()
    # A finished upload's bytes are its blob's (or went to the trash when it joined a twin): only its row goes.
    trash = [BlobTrash(upload_id, state) for upload_id, state, blob_id in uploads if blob_id is None]
    blobs = conn.execute(
        e.q(
            "DELETE FROM blobs WHERE blob_id IN (SELECT blob_id FROM blobs"
            " WHERE expires_at_ms <= ? ORDER BY expires_at_ms LIMIT ?) RETURNING blob_id, storage_key"
        ),
        (now_ms, batch),
    ).fetchall()
    e.execute_in(conn, "DELETE FROM blob_capabilities WHERE {one_of}", (), "blob_id", [r[0] for r in blobs], "text")
    trash += (BlobTrash(r[1], None) for r in blobs)
    for item in trash:
        _trash(conn, e, item.storage_key, item.storage_state, now_ms)
    return BlobCollection(
        uploads=sum(1 for r in uploads if r[2] is None),
        blobs=len(blobs),
        trash=tuple(trash),
        more=len(uploads) == batch or len(blobs) == batch,
    )


def trash(conn: Any, e: Engine, *, limit: int) -> list[BlobTrash]:
    rows = conn.execute(
        e.q("SELECT storage_key, storage_state FROM blob_trash ORDER BY queued_at_ms LIMIT ?"), (limit,)
    ).fetchall()
    return [BlobTrash(row[0], row[1]) for row in rows]


def forget_trash(conn: Any, e: Engine, *, keys: Sequence[str]) -> None:
    e.execute_in(conn, "DELETE FROM blob_trash WHERE {one_of}", (), "storage_key", list(keys), "text")
