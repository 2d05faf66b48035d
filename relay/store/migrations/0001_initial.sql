-- Tetherless relay schema, version 1.
-- Only ciphertext and the routing metadata the relay needs are stored.

CREATE TABLE accounts (
    account_id      TEXT PRIMARY KEY,
    created_at_ms   INTEGER NOT NULL,
    list_version    INTEGER NOT NULL
) WITHOUT ROWID;

-- Every version of every account's signed device list (MessagePack of SignedDeviceList).
CREATE TABLE device_lists (
    account_id      TEXT NOT NULL REFERENCES accounts(account_id),
    version         INTEGER NOT NULL,
    signed          BLOB NOT NULL,
    stored_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (account_id, version)
) WITHOUT ROWID;

CREATE TABLE devices (
    device_id       TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts(account_id),
    sign_key        BLOB NOT NULL,
    box_key         BLOB NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    revoked_at_ms   INTEGER,
    queued          INTEGER NOT NULL DEFAULT 0   -- envelopes currently in the inbox (quota)
) WITHOUT ROWID;
CREATE INDEX devices_account ON devices(account_id);

CREATE TABLE challenges (
    nonce           BLOB PRIMARY KEY,
    device_id       TEXT NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    used_at_ms      INTEGER
) WITHOUT ROWID;

-- Bearer tokens are stored only as SHA-256 hashes.
CREATE TABLE sessions (
    token_hash      BLOB PRIMARY KEY,
    device_id       TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    revoked_at_ms   INTEGER
) WITHOUT ROWID;
CREATE INDEX sessions_device ON sessions(device_id);

-- The inbox: one append-ordered table for every device. ``seq`` is the cursor:
-- AUTOINCREMENT so that a cursor is never reused after the newest row is deleted.
CREATE TABLE envelopes (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient       TEXT NOT NULL,
    envelope_id     BLOB NOT NULL,
    sent_at_ms      INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    ciphertext      BLOB NOT NULL
);
CREATE INDEX envelopes_inbox ON envelopes(recipient, seq);
CREATE INDEX envelopes_expiry ON envelopes(expires_at_ms);

-- Idempotency: (submitting device, key) -> the original result. ``digest`` covers
-- recipient and ciphertext so a key reused for another envelope is detected.
CREATE TABLE idempotency (
    sender          TEXT NOT NULL,
    idem_key        BLOB NOT NULL,
    envelope_id     BLOB NOT NULL,
    digest          BLOB NOT NULL,
    sent_at_ms      INTEGER NOT NULL,
    forget_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (sender, idem_key)
) WITHOUT ROWID;
CREATE INDEX idempotency_forget ON idempotency(forget_at_ms);
