-- Tetherless relay schema, version 1, PostgreSQL flavour (same tables and
-- columns as ../0001_initial.sql, plus ``devices.last_seq``).
-- Only ciphertext and the routing metadata the relay needs are stored.

CREATE TABLE accounts (
    account_id      TEXT PRIMARY KEY,
    created_at_ms   BIGINT NOT NULL,
    list_version    INTEGER NOT NULL
);

-- Every version of every account's signed device list (MessagePack of SignedDeviceList).
CREATE TABLE device_lists (
    account_id      TEXT NOT NULL REFERENCES accounts(account_id),
    version         INTEGER NOT NULL,
    signed          BYTEA NOT NULL,
    stored_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (account_id, version)
);

-- ``last_seq`` is the inbox's cursor counter: a sender takes the next values
-- under this row's lock, so writers to one inbox commit in cursor order
-- (docs/decisions/0003-postgres-cursors.md). It never goes down.
CREATE TABLE devices (
    device_id       TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts(account_id),
    sign_key        BYTEA NOT NULL,
    box_key         BYTEA NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    revoked_at_ms   BIGINT,
    queued          INTEGER NOT NULL DEFAULT 0,  -- envelopes currently in the inbox (quota)
    last_seq        BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX devices_account ON devices(account_id);

CREATE TABLE challenges (
    nonce           BYTEA PRIMARY KEY,
    device_id       TEXT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    used_at_ms      BIGINT
);

-- Bearer tokens are stored only as SHA-256 hashes.
CREATE TABLE sessions (
    token_hash      BYTEA PRIMARY KEY,
    device_id       TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    revoked_at_ms   BIGINT
);
CREATE INDEX sessions_device ON sessions(device_id);

-- The inbox: ``seq`` is the cursor, per recipient.
CREATE TABLE envelopes (
    recipient       TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    envelope_id     BYTEA NOT NULL,
    sent_at_ms      BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    ciphertext      BYTEA NOT NULL,
    PRIMARY KEY (recipient, seq)
);
CREATE INDEX envelopes_expiry ON envelopes(expires_at_ms);

-- Idempotency: (submitting device, key) -> the original result. The primary
-- key is what makes concurrent identical retries on different replicas safe.
CREATE TABLE idempotency (
    sender          TEXT NOT NULL,
    idem_key        BYTEA NOT NULL,
    envelope_id     BYTEA NOT NULL,
    digest          BYTEA NOT NULL,
    sent_at_ms      BIGINT NOT NULL,
    forget_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (sender, idem_key)
);
CREATE INDEX idempotency_forget ON idempotency(forget_at_ms);
