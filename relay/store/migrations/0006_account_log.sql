-- The account log (docs/account-log.md §7, docs/decisions/0005-account-log.md).
-- One encrypted, append-only log per account. Positions are dense per account
-- (D1): an append takes head + 1, head + 2, … inside the writer thread's
-- transaction. The relay stores ciphertext and the small visible header only.

-- One row per account, created by the account's first append (or retention change).
-- epoch / epoch_device_list_version / rekey_after_version drive the epoch rules (§5.4);
-- snapshot_position is the manifest of the newest complete snapshot (NULL: none).
CREATE TABLE log_heads (
    account_id                  TEXT PRIMARY KEY REFERENCES accounts(account_id),
    head                        INTEGER NOT NULL DEFAULT 0,
    horizon                     INTEGER NOT NULL DEFAULT 0,
    bytes                       INTEGER NOT NULL DEFAULT 0,
    epoch                       INTEGER NOT NULL DEFAULT 0,
    epoch_device_list_version   INTEGER NOT NULL DEFAULT 0,
    rekey_after_version         INTEGER NOT NULL DEFAULT 0,
    retention_days              INTEGER,
    retention_updated_at_ms     INTEGER NOT NULL DEFAULT 0,
    snapshot_position           INTEGER
) WITHOUT ROWID;

-- A rowid table on purpose: records reach 1 MiB and belong in overflow pages
-- behind a small key; rows arrive in global commit order (inserts touch the tail).
-- kind: 1 event, 2 state, 3 key, 4 snapshot_part, 5 snapshot.
CREATE TABLE log_records (
    account_id          TEXT NOT NULL,
    position            INTEGER NOT NULL,
    record_id           BLOB NOT NULL,
    kind                INTEGER NOT NULL,
    epoch               INTEGER NOT NULL,
    committed_at_ms     INTEGER NOT NULL,
    snapshot_id         BLOB,
    covers              INTEGER,
    parts               INTEGER,
    device_list_version INTEGER,
    size                INTEGER NOT NULL,
    ciphertext          BLOB NOT NULL
);
CREATE UNIQUE INDEX log_records_pos ON log_records(account_id, position);
CREATE UNIQUE INDEX log_records_id ON log_records(account_id, record_id);
CREATE INDEX log_records_snap ON log_records(account_id, snapshot_id) WHERE snapshot_id IS NOT NULL;
