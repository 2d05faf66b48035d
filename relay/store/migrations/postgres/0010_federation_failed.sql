-- Tetherless relay schema, version 10, PostgreSQL flavour (see ../0010_federation_failed.sql for the why):
-- the same two columns. Expand-only; a constant default adds them without rewriting the table.
ALTER TABLE federation_outbox ADD COLUMN failed_at_ms BIGINT NOT NULL DEFAULT 0;
ALTER TABLE federation_outbox ADD COLUMN failure TEXT NOT NULL DEFAULT '';
