-- Tetherless relay schema, version 2, PostgreSQL flavour: federation (same tables as ../0002_federation.sql).

CREATE TABLE federation_outbox (
    seq             BIGSERIAL PRIMARY KEY,
    peer            TEXT NOT NULL,
    envelope_id     BYTEA NOT NULL,
    recipient       TEXT NOT NULL,   -- full address on the peer
    sent_at_ms      BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    ciphertext      BYTEA NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    not_before_ms   BIGINT NOT NULL DEFAULT 0   -- held back (the peer deferred it) until then
);
CREATE INDEX federation_outbox_peer ON federation_outbox(peer, seq);
CREATE INDEX federation_outbox_expiry ON federation_outbox(expires_at_ms);

CREATE TABLE federation_peers (
    peer                TEXT PRIMARY KEY,
    failures            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms  BIGINT NOT NULL DEFAULT 0,
    last_attempt_at_ms  BIGINT,
    last_success_at_ms  BIGINT,
    last_error          TEXT NOT NULL DEFAULT '',
    delivered           BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE federation_received (
    origin          TEXT NOT NULL,
    envelope_id     BYTEA NOT NULL,
    forget_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (origin, envelope_id)
);
CREATE INDEX federation_received_forget ON federation_received(forget_at_ms);

CREATE TABLE federation_nonces (
    origin          TEXT NOT NULL,
    nonce           TEXT NOT NULL,
    forget_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (origin, nonce)
);
CREATE INDEX federation_nonces_forget ON federation_nonces(forget_at_ms);
