-- The webhook applier leases the oldest pending facts (`ORDER BY occurred_at, id LIMIT 500`):
-- read in that order from this index and stopped at the round's 500, instead of every pending
-- fact read through an index by message and sorted each round (with 40k pending: 40-75 ms a
-- lease, its sort spilled to disk as it carried each fact's payload; 1-2 ms for the read now).
-- No statement reads pending facts by message. As on SQLite since 20261129000002.
-- The new index is built first (writes to the inbox wait for the build, as for any index made
-- here; reads go on), and the old one dropped only then: its lock, which stops reads too, is
-- held for the rest of this short transaction only.
CREATE INDEX webhook_inbox_pending_by_time ON webhook_inbox (occurred_at, id) WHERE status = 'pending';
DROP INDEX webhook_inbox_pending;
ALTER INDEX webhook_inbox_pending_by_time RENAME TO webhook_inbox_pending;
