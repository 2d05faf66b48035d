-- Tetherless relay schema, version 3: device lists format 2 and revocation (docs/crypto.md §3, §4).

-- The device-list version that added / removed each device. ``revoked_at_ms``
-- (version 1) is set in the same transaction as the version that removes it:
-- a revoked device cannot authenticate, its sessions are revoked and its inbox
-- is emptied; envelopes to it are refused (recipient_revoked).
ALTER TABLE devices ADD COLUMN added_in_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE devices ADD COLUMN revoked_in_version INTEGER;
