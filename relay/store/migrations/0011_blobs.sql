-- Tetherless relay schema, version 11: encrypted media blobs (docs/decisions/0014-media-blobs.md, docs/blobs.md).
-- An expand-only migration (docs/decisions/0008-rolling-upgrades.md D4): new tables only, so code that knows
-- 0001-0010 keeps running on it (it serves no blob routes and never reads these tables).
--
-- The database holds the truth about an upload; the storage backend (files or S3) only holds bytes. Bytes the
-- backend holds beyond upload_offset are garbage that the next append at upload_offset overwrites.

-- One tus upload. upload_id (32 lowercase hex, random) is also the storage key and, once the upload completed
-- without a deduplicating twin, the blob id. A finished upload keeps its row (blob_id set) until expires_at_ms
-- so HEAD answers it; an unfinished one counts its whole length against the account's quota.
CREATE TABLE blob_uploads (
    upload_id       TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    length          INTEGER NOT NULL,
    upload_offset   INTEGER NOT NULL DEFAULT 0,  -- committed: durable in storage
    sha256          BLOB,                        -- the digest declared at creation (Upload-Metadata), or NULL
    capability_hash BLOB,                        -- SHA-256 of the uploader's capability, or NULL
    storage_state   TEXT NOT NULL DEFAULT '',    -- the backend's opaque state at upload_offset
    lease_holder    TEXT NOT NULL DEFAULT '',    -- the PATCH appending now (random per request), until lease_until_ms
    lease_until_ms  INTEGER NOT NULL DEFAULT 0,
    created_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    blob_id         TEXT                         -- set when the upload became (or joined) a stored blob
) WITHOUT ROWID;
CREATE INDEX blob_uploads_account ON blob_uploads(account_id);
CREATE INDEX blob_uploads_expiry ON blob_uploads(expires_at_ms);

-- A stored blob. Deduplicated within one account only (the unique pair); never across accounts.
CREATE TABLE blobs (
    blob_id         TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL,
    sha256          BLOB NOT NULL,
    length          INTEGER NOT NULL,
    storage_key     TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    UNIQUE (account_id, sha256)
) WITHOUT ROWID;
CREATE INDEX blobs_expiry ON blobs(expires_at_ms);

-- Who may download without a token of the owning account: SHA-256 of each capability an upload declared.
CREATE TABLE blob_capabilities (
    blob_id         TEXT NOT NULL,
    capability_hash BLOB NOT NULL,
    PRIMARY KEY (blob_id, capability_hash)
) WITHOUT ROWID;

-- Storage objects whose rows are gone and whose bytes are still to be dropped (terminated, expired, deleted,
-- discarded or deduplicated): written in the transaction that drops the row, removed after the backend's
-- abort (storage_state not NULL: an unfinished upload) or delete (NULL: a completed object) succeeded, so a
-- crash in between leaves work for the collector, never an orphan.
CREATE TABLE blob_trash (
    storage_key     TEXT PRIMARY KEY,
    storage_state   TEXT,
    queued_at_ms    INTEGER NOT NULL
) WITHOUT ROWID;
