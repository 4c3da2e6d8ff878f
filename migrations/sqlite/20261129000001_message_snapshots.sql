-- A message's fold through a sequence, so that deciding a command on a message with a long
-- history (an email whose thousands of recipients open and click it: one event per fact) reads
-- the snapshot and the events after it, not every event since the compose (as on PostgreSQL).
-- A cache over the log, which stays the only truth: a row may be deleted at any time, and one
-- of another `fold_version` (see `Message::FOLD_VERSION`) is ignored.
CREATE TABLE message_snapshots (
    aggregate_id TEXT    PRIMARY KEY,
    sequence     INTEGER NOT NULL,
    fold_version INTEGER NOT NULL,
    -- The serialized `Message` (JSON text: read back whole, never queried inside).
    fold         TEXT    NOT NULL,
    taken_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
