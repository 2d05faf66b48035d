-- Tetherless relay schema, version 9, PostgreSQL flavour (see ../0009_compact_idempotency.sql for the why).
-- Expand-only: replicas of the previous version keep serving from this database during a rolling
-- upgrade (they never read this table), and this version writes the 0008 rows they read until the
-- schema floor reaches 9 (docs/decisions/0009-compact-idempotency.md). The inbox_expiry index stays:
-- cursors are per device here, so there is no single cursor range per expiry hour.
CREATE TABLE idempotency_refs (
    key_hash        BYTEA PRIMARY KEY,
    recipient_no    BIGINT NOT NULL,
    seq             BIGINT NOT NULL
);
