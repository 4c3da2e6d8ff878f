-- The webhook applier leases the oldest pending facts (`ORDER BY occurred_at, id LIMIT 500`):
-- read in that order from this index and stopped at the round's 500, instead of every pending
-- fact read through an index by message and sorted each round (with 40k pending: 40-75 ms a
-- lease, its sort spilled to disk as it carried each fact's payload; 1-2 ms for the read now).
-- No statement reads pending facts by message. As on SQLite since 20261129000002.
DROP INDEX webhook_inbox_pending;
CREATE INDEX webhook_inbox_pending ON webhook_inbox (occurred_at, id) WHERE status = 'pending';
