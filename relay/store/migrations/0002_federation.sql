-- Tetherless relay schema, version 2: federation (docs/federation.md).

-- The durable per-peer outbox: envelopes for recipients on other relays, written
-- in the same transaction as the rest of their POST /v1/messages batch and
-- deleted once the peer has answered for them (or when they expire).
CREATE TABLE federation_outbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    peer            TEXT NOT NULL,
    envelope_id     BLOB NOT NULL,
    recipient       TEXT NOT NULL,   -- full address on the peer
    sent_at_ms      INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    ciphertext      BLOB NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    not_before_ms   INTEGER NOT NULL DEFAULT 0   -- held back (the peer deferred it) until then
);
CREATE INDEX federation_outbox_peer ON federation_outbox(peer, seq);
CREATE INDEX federation_outbox_expiry ON federation_outbox(expires_at_ms);

-- Delivery state per peer: exponential backoff after failures, for the worker and the admin.
CREATE TABLE federation_peers (
    peer                TEXT PRIMARY KEY,
    failures            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms  INTEGER NOT NULL DEFAULT 0,
    last_attempt_at_ms  INTEGER,
    last_success_at_ms  INTEGER,
    last_error          TEXT NOT NULL DEFAULT '',
    delivered           INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Receiving side: (origin relay, origin envelope id) of every envelope stored, so
-- that a peer's retries never duplicate; kept until the envelope would expire.
CREATE TABLE federation_received (
    origin          TEXT NOT NULL,
    envelope_id     BLOB NOT NULL,
    forget_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (origin, envelope_id)
) WITHOUT ROWID;
CREATE INDEX federation_received_forget ON federation_received(forget_at_ms);

-- Signature nonces seen per origin, kept while the signature could still be fresh (replay protection).
CREATE TABLE federation_nonces (
    origin          TEXT NOT NULL,
    nonce           TEXT NOT NULL,
    forget_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (origin, nonce)
) WITHOUT ROWID;
CREATE INDEX federation_nonces_forget ON federation_nonces(forget_at_ms);
