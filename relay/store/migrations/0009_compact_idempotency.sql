-- Tetherless relay schema, version 9: idempotency keys as pointers, tombstones, expiry by cursor range
-- (issue 13 point 5, docs/decisions/0009-compact-idempotency.md, docs/performance.md P8).
-- contract: 9
-- A contract migration on SQLite only: one process serves the file, so no replica of the previous
-- version can share it, and the code switches to the compact inbox at once (relay/store/sql/inbox.py).
-- The PostgreSQL flavour is expand-only (rolling upgrades).
--
-- A key claimed by an envelope in a local inbox points at the inbox row, which holds the original
-- result (id, sent time) and, once acknowledged, a tombstone with the ciphertext's digest. The 0008
-- rows stay for keys of envelopes sent to other relays and until the keys written before this
-- migration are forgotten (their bucket is swept as before).
CREATE TABLE idempotency_refs (
    key_hash        BLOB PRIMARY KEY,
    recipient_no    INTEGER NOT NULL,
    seq             INTEGER NOT NULL
) WITHOUT ROWID;

-- Inbox cursors are one append-ordered sequence here: (expiry hour -> first and last cursor) finds the
-- expired rows by cursor range, without an index entry per envelope.
CREATE TABLE inbox_expiry_buckets (
    expiry_hour     INTEGER PRIMARY KEY,
    first_seq       INTEGER NOT NULL,
    last_seq        INTEGER NOT NULL
);
INSERT INTO inbox_expiry_buckets (expiry_hour, first_seq, last_seq)
    SELECT (expires_at_ms + 3599999) / 3600000, min(seq), max(seq) FROM inbox GROUP BY 1;
DROP INDEX inbox_expiry;
-- The rowid (seq) is the implicit last column of every index: (recipient_no) alone serves
-- "recipient_no = ? AND seq > ? ORDER BY seq" with an entry 4 bytes smaller.
DROP INDEX inbox_recipient;
CREATE INDEX inbox_recipient ON inbox(recipient_no);
