-- Tetherless relay schema, version 5, PostgreSQL flavour: prekeys and enrolment offers
-- (docs/crypto.md §5, §7). Same tables and columns as ../0005_prekeys_enrolment.sql.

-- Public prekeys as uploaded (signed by the device; the relay checked the signature).
-- A device has at most one ``x25519-signed`` and one ``mlkem768-last-resort`` row
-- (an upload replaces it) and up to 200 one-time rows per one-time kind; a served
-- one-time row is deleted in the claim's transaction.
CREATE TABLE prekeys (
    device_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    key_id          BIGINT NOT NULL,
    public_key      BYTEA NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    signature       BYTEA NOT NULL,
    PRIMARY KEY (device_id, kind, key_id)
);

-- Highest key id ever uploaded per (device, kind): ids only increase, so an id is never reused
-- (also after its row was served and deleted).
CREATE TABLE prekey_ids (
    device_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    max_key_id      BIGINT NOT NULL,
    PRIMARY KEY (device_id, kind)
);

-- One-time keys served per (claiming account, target device), remembered for the limit's window.
CREATE TABLE prekey_claims (
    claimer_account TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    claimed_at_ms   BIGINT NOT NULL,
    forget_at_ms    BIGINT NOT NULL
);
CREATE INDEX prekey_claims_pair ON prekey_claims(claimer_account, device_id, kind);
CREATE INDEX prekey_claims_forget ON prekey_claims(forget_at_ms);

-- Enrolment offers under their 10-byte lookup id (the link code's capability), with the
-- approving device's proposal once posted. Kept until ``forget_at_ms`` (expiry + one TTL)
-- so that late calls are answered enrolment_expired rather than enrolment_unknown.
CREATE TABLE enrolments (
    lookup_id       BYTEA PRIMARY KEY,
    offer           BYTEA NOT NULL,      -- MessagePack EnrolmentOffer
    created_at_ms   BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    forget_at_ms    BIGINT NOT NULL,
    proposal        BYTEA,               -- MessagePack EnrolmentProposal
    proposer_device TEXT,
    proposed_at_ms  BIGINT
);
CREATE INDEX enrolments_forget ON enrolments(forget_at_ms);
