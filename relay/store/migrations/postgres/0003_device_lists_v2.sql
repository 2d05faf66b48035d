-- Tetherless relay schema, version 3, PostgreSQL flavour (same as ../0003_device_lists_v2.sql).

ALTER TABLE devices ADD COLUMN added_in_version INTEGER NOT NULL DEFAULT 1;
ALTER TABLE devices ADD COLUMN revoked_in_version INTEGER;
