-- Tetherless relay schema, version 4: WebAuthn credentials and registrations (docs/crypto.md §6).

-- Credentials of an account: ``pending`` after POST /v1/webauthn/register/complete,
-- ``active`` once a device-list version lists it. ``sign_count`` is the highest
-- signature counter seen; it never goes down (webauthn_replayed otherwise).
-- A version that removes a credential deletes its row (and so its counter).
CREATE TABLE webauthn_credentials (
    account_id          TEXT NOT NULL REFERENCES accounts(account_id),
    credential_id       BLOB NOT NULL,
    public_key          BLOB NOT NULL,     -- COSE_Key
    rp_id               TEXT NOT NULL,
    sign_count          INTEGER NOT NULL,
    status              TEXT NOT NULL,     -- 'pending' or 'active'
    registered_by       TEXT NOT NULL,     -- device id ('' when first seen in a list)
    registered_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (account_id, credential_id)
) WITHOUT ROWID;

-- Registration ceremonies begun (POST /v1/webauthn/register/begin): single use,
-- bound to the account and device, expiring like auth challenges.
CREATE TABLE webauthn_registrations (
    challenge           BLOB PRIMARY KEY,
    account_id          TEXT NOT NULL,
    device_id           TEXT NOT NULL,
    expires_at_ms       INTEGER NOT NULL,
    used_at_ms          INTEGER
) WITHOUT ROWID;
CREATE INDEX webauthn_registrations_expiry ON webauthn_registrations(expires_at_ms);
CREATE INDEX webauthn_registrations_device ON webauthn_registrations(device_id);
