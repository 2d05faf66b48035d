-- The account log, PostgreSQL flavour (same tables and columns as ../0006_account_log.sql).
-- Appends lock the account's log_heads row (SELECT … FOR UPDATE), so appenders to one
-- account commit in position order (docs/decisions/0005-account-log.md, D1).

CREATE TABLE log_heads (
    account_id                  TEXT PRIMARY KEY REFERENCES accounts(account_id),
    head                        BIGINT NOT NULL DEFAULT 0,
    horizon                     BIGINT NOT NULL DEFAULT 0,
    bytes                       BIGINT NOT NULL DEFAULT 0,
    epoch                       BIGINT NOT NULL DEFAULT 0,
    epoch_device_list_version   BIGINT NOT NULL DEFAULT 0,
    rekey_after_version         BIGINT NOT NULL DEFAULT 0,
    retention_days              INTEGER,
    retention_updated_at_ms     BIGINT NOT NULL DEFAULT 0,
    snapshot_position           BIGINT
);

-- kind: 1 event, 2 state, 3 key, 4 snapshot_part, 5 snapshot.
CREATE TABLE log_records (
    account_id          TEXT NOT NULL,
    position            BIGINT NOT NULL,
    record_id           BYTEA NOT NULL,
    kind                SMALLINT NOT NULL,
    epoch               BIGINT NOT NULL,
    committed_at_ms     BIGINT NOT NULL,
    snapshot_id         BYTEA,
    covers              BIGINT,
    parts               INTEGER,
    device_list_version BIGINT,
    size                INTEGER NOT NULL,
    ciphertext          BYTEA NOT NULL,
    PRIMARY KEY (account_id, position)
);
CREATE UNIQUE INDEX log_records_id ON log_records(account_id, record_id);
CREATE INDEX log_records_snap ON log_records(account_id, snapshot_id) WHERE snapshot_id IS NOT NULL;
