-- A message's fold through a sequence, so that deciding a command on a message with a long
-- history (an email whose thousands of recipients open and click it: one event per fact) reads
-- the snapshot and the events after it, not every event since the compose. A cache over the
-- log, which stays the only truth: a row may be deleted at any time, and one of another
-- `fold_version` (see `Message::FOLD_VERSION`) is ignored.
CREATE TABLE message_snapshots (
    aggregate_id text PRIMARY KEY,
    sequence     bigint NOT NULL,
    fold_version integer NOT NULL,
    -- The serialized `Message` (JSON text: read back whole, never queried inside).
    fold         text NOT NULL,
    taken_at     timestamptz NOT NULL DEFAULT now()
);
