-- Tetherless relay schema, version 11, PostgreSQL flavour: encrypted media blobs (see ../0011_blobs.sql for the
-- why of every column). Same tables and columns; expand-only.
CREATE TABLE blob_uploads (
    upload_id       TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    length          BIGINT NOT NULL,
    upload_offset   BIGINT NOT NULL DEFAULT 0,
    sha256          BYTEA,
    capability_hash BYTEA,
    storage_state   TEXT NOT NULL DEFAULT '',
    lease_holder    TEXT NOT NULL DEFAULT '',
    lease_until_ms  BIGINT NOT NULL DEFAULT 0,
    created_at_ms   BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    blob_id         TEXT
);
CREATE INDEX blob_uploads_account ON blob_uploads(account_id);
CREATE INDEX blob_uploads_expiry ON blob_uploads(expires_at_ms);

CREATE TABLE blobs (
    blob_id         TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL,
    sha256          BYTEA NOT NULL,
    length          BIGINT NOT NULL,
    storage_key     TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    UNIQUE (account_id, sha256)
);
CREATE INDEX blobs_expiry ON blobs(expires_at_ms);

CREATE TABLE blob_capabilities (
    blob_id         TEXT NOT NULL,
    capability_hash BYTEA NOT NULL,
    PRIMARY KEY (blob_id, capability_hash)
);

CREATE TABLE blob_trash (
    storage_key     TEXT PRIMARY KEY,
    storage_state   TEXT,
    queued_at_ms    BIGINT NOT NULL
);
