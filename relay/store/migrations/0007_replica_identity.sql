-- One identity for every replica of a relay; one sender per federation peer
-- (docs/decisions/0008-rolling-upgrades.md, docs/operations.md "Replicas").
-- An expand-only migration: code that knows only 0001-0006 keeps running on it.

-- The relay name this database belongs to, written by the first start (one row).
CREATE TABLE relay_identity (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    relay_name      TEXT NOT NULL,
    bound_at_ms     INTEGER NOT NULL
);

-- Fingerprints (key ids) of the relay keys, never the keys: a database backup holds
-- no secret. status: 'current' (exactly one row) or 'retired'.
CREATE TABLE relay_key_ids (
    key_id          TEXT PRIMARY KEY,
    status          TEXT NOT NULL CHECK (status IN ('current', 'retired')),
    recorded_at_ms  INTEGER NOT NULL
);

-- Which replica sends a peer's outbox, until when (taken and renewed by a conditional upsert).
CREATE TABLE federation_leases (
    peer            TEXT PRIMARY KEY,
    holder          TEXT NOT NULL,
    expires_at_ms   INTEGER NOT NULL
) WITHOUT ROWID;

-- The oldest code that may run on this schema, as the highest migration number it
-- knows: a contract migration raises it; a replica knowing less refuses to start.
CREATE TABLE schema_compat (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    min_code_schema INTEGER NOT NULL
);
INSERT INTO schema_compat (id, min_code_schema) VALUES (1, 6);
