-- One identity for every replica; one sender per federation peer; the schema
-- compatibility floor. PostgreSQL flavour (same tables and columns as ../0007_replica_identity.sql).
-- An expand-only migration: code that knows only 0001-0006 keeps running on it.

CREATE TABLE relay_identity (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    relay_name      TEXT NOT NULL,
    bound_at_ms     BIGINT NOT NULL
);

CREATE TABLE relay_key_ids (
    key_id          TEXT PRIMARY KEY,
    status          TEXT NOT NULL CHECK (status IN ('current', 'retired')),
    recorded_at_ms  BIGINT NOT NULL
);

CREATE TABLE federation_leases (
    peer            TEXT PRIMARY KEY,
    holder          TEXT NOT NULL,
    expires_at_ms   BIGINT NOT NULL
);

CREATE TABLE schema_compat (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    min_code_schema INTEGER NOT NULL
);
INSERT INTO schema_compat (id, min_code_schema) VALUES (1, 6);
