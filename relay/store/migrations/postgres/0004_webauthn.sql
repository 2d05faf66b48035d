-- Tetherless relay schema, version 4, PostgreSQL flavour (same tables and columns as ../0004_webauthn.sql).

CREATE TABLE webauthn_credentials (
    account_id          TEXT NOT NULL REFERENCES accounts(account_id),
    credential_id       BYTEA NOT NULL,
    public_key          BYTEA NOT NULL,
    rp_id               TEXT NOT NULL,
    sign_count          BIGINT NOT NULL,
    status              TEXT NOT NULL,
    registered_by       TEXT NOT NULL,
    registered_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (account_id, credential_id)
);

CREATE TABLE webauthn_registrations (
    challenge           BYTEA PRIMARY KEY,
    account_id          TEXT NOT NULL,
    device_id           TEXT NOT NULL,
    expires_at_ms       BIGINT NOT NULL,
    used_at_ms          BIGINT
);
CREATE INDEX webauthn_registrations_expiry ON webauthn_registrations(expires_at_ms);
CREATE INDEX webauthn_registrations_device ON webauthn_registrations(device_id);
