-- Tetherless relay schema, version 10: federation outbox rows that failed for good (issue 14 point 3,
-- docs/federation.md §5 "Outcomes").
-- An expand-only migration: code that knows only 0001-0009 keeps running on it (it ignores both columns and
-- would send failed rows again, which the receiver refuses or deduplicates as before).
--
-- A row whose destination's name does not exist (EAI_NONAME / EAI_NODATA) or that the peer refused for good
-- (peer_forbidden, wrong_destination, no federation endpoint, a per-envelope "rejected") is no longer sent:
-- failed_at_ms > 0 and failure says why. It stays, shown by `admin federation`, until its TTL expires or
-- `admin federation retry` makes it queued again.
ALTER TABLE federation_outbox ADD COLUMN failed_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE federation_outbox ADD COLUMN failure TEXT NOT NULL DEFAULT '';
