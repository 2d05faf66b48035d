-- Tetherless relay schema, version 8: compact inbox and idempotency rows (issue 13, docs/performance.md P8).
-- contract: 8
-- A contract migration: the envelopes and idempotency tables are replaced, so code
-- that knows fewer than 8 migrations cannot run on this database any more.
--
-- Inbox rows name their recipient by a small integer (devices.device_no) instead
-- of the 32-character device id, in the row and in the inbox index; idempotency
-- rows are keyed by 12 bytes of SHA-256 of (sender, key), keep 8 bytes of the
-- envelope digest (enough to tell a reused key from a retry) and an hour bucket
-- instead of a millisecond forget time, so the forget index is small and expiry
-- deletes whole buckets.
-- Stored envelopes keep their seq (cursors stay valid) and live keys keep their
-- original result (a retry after the upgrade is still answered as a duplicate).

-- Devices are never deleted (revocation marks them), so a number is never reused.
ALTER TABLE devices ADD COLUMN device_no INTEGER;
UPDATE devices SET device_no = n.no
    FROM (SELECT device_id, row_number() OVER (ORDER BY created_at_ms, device_id) AS no FROM devices) AS n
    WHERE n.device_id = devices.device_id;
CREATE UNIQUE INDEX devices_no ON devices(device_no);
-- The code numbers the devices it inserts (Engine.next_device_no); a row written by hand
-- (an operator, a test) gets the next number here, as PostgreSQL's identity column gives one.
CREATE TRIGGER devices_number AFTER INSERT ON devices FOR EACH ROW WHEN NEW.device_no IS NULL
BEGIN
    UPDATE devices SET device_no = (SELECT coalesce(max(device_no), 0) + 1 FROM devices)
        WHERE device_id = NEW.device_id;
END;

CREATE TABLE inbox (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient_no    INTEGER NOT NULL,
    envelope_id     BLOB NOT NULL,
    sent_at_ms      INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    ciphertext      BLOB NOT NULL
);
INSERT INTO inbox (seq, recipient_no, envelope_id, sent_at_ms, expires_at_ms, ciphertext)
    SELECT e.seq, d.device_no, e.envelope_id, e.sent_at_ms, e.expires_at_ms, e.ciphertext
    FROM envelopes AS e JOIN devices AS d ON d.device_id = e.recipient ORDER BY e.seq;
-- A cursor is never reused: carry the old counter over (it is above every stored seq
-- when the newest envelopes were acknowledged).
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'inbox', 0 WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'inbox');
UPDATE sqlite_sequence
    SET seq = max(seq, coalesce((SELECT s.seq FROM sqlite_sequence AS s WHERE s.name = 'envelopes'), 0))
    WHERE name = 'inbox';
DROP TABLE envelopes;
CREATE INDEX inbox_recipient ON inbox(recipient_no, seq);
CREATE INDEX inbox_expiry ON inbox(expires_at_ms);
-- For operators and tests reading the database by hand: the old shape, at no storage cost.
CREATE VIEW envelopes AS
    SELECT i.seq, d.device_id AS recipient, i.envelope_id, i.sent_at_ms, i.expires_at_ms, i.ciphertext
    FROM inbox AS i JOIN devices AS d ON d.device_no = i.recipient_no;

-- hash of (sender, key) -> the original result (relay.store.inbox_rules.key_hash).
-- ``digest``: the first 8 bytes of the
-- envelope digest; ``forget_hour``: the forget time rounded up to the hour.
CREATE TABLE idempotency_keys (
    key_hash        BLOB PRIMARY KEY,
    envelope_id     BLOB NOT NULL,
    digest          BLOB NOT NULL,
    sent_at_ms      INTEGER NOT NULL,
    forget_hour     INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO idempotency_keys (key_hash, envelope_id, digest, sent_at_ms, forget_hour)
    SELECT tetherless_key_hash(i.sender, i.idem_key), i.envelope_id, substr(i.digest, 1, 8), i.sent_at_ms,
           (i.forget_at_ms + 3599999) / 3600000
    FROM idempotency AS i;
DROP TABLE idempotency;
CREATE INDEX idempotency_keys_forget ON idempotency_keys(forget_hour);
