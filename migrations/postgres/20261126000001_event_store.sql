-- The event store. postgres-es reads and writes the first seven columns; the rest have
-- defaults it never sees:
--   global_position  a total order of inserts, for tie-breaking and checkpoints;
--   transaction_id   the inserting transaction (xid8), so that readers tail the log safely:
--                    positions become visible out of commit order, transaction ids below the
--                    oldest running one never will again (DESIGN.md, "Tailing the log safely");
--   recorded_at      when we stored the fact.
CREATE TABLE events (
    aggregate_type  text   NOT NULL,
    aggregate_id    text   NOT NULL,
    sequence        bigint NOT NULL CHECK (sequence >= 0),
    event_type      text   NOT NULL,
    event_version   text   NOT NULL,
    payload         json   NOT NULL,
    metadata        json   NOT NULL,
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    transaction_id  xid8   NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_tail ON events (transaction_id, global_position);

-- Events are facts: never updated, never deleted.
CREATE FUNCTION events_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();

-- No NOTIFY trigger here: a NOTIFY in the appending transaction takes a global lock at its
-- commit and serialised the writers (measured: twice the single-client command rate without
-- it). The store sends one coalesced NOTIFY `events` after its commits instead.

-- postgres-es needs the snapshots table to exist in its SQL, though event-store mode never
-- uses it (snapshot mode double-applies events in cqrs-es 0.5.0).
CREATE TABLE snapshots (
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          json   NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- One row per durable subscription: where it has read to, updated in the same transaction as
-- the projection's writes, and locked by the one instance processing it.
CREATE TABLE subscription_checkpoints (
    name                 text PRIMARY KEY,
    last_transaction_id  xid8   NOT NULL DEFAULT '0',
    last_global_position bigint NOT NULL DEFAULT 0,
    events_handled       bigint NOT NULL DEFAULT 0,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- Connected accounts. Credentials are write-only through the API.
CREATE TABLE services (
    id          uuid PRIMARY KEY,
    channel     text NOT NULL,
    provider    text NOT NULL,
    name        text NOT NULL,
    username    text NOT NULL,
    credentials jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Idempotency-Key for compose: the key, a hash of the request, and the message it made.
CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    request_hash text NOT NULL,
    message_id   uuid NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Read model: the front end's message list. `message` is the aggregate's fold, the other
-- columns are copies for filtering.
CREATE TABLE message_list (
    message_id    uuid PRIMARY KEY,
    service_id    uuid NOT NULL,
    channel       text NOT NULL,
    direction     text NOT NULL,
    state         text NOT NULL,
    profiles      text[] NOT NULL,
    message       jsonb NOT NULL,
    last_sequence bigint NOT NULL
);
CREATE INDEX message_list_service ON message_list (service_id, message_id DESC);
CREATE INDEX message_list_state ON message_list (state, message_id DESC);
CREATE INDEX message_list_profiles ON message_list USING gin (profiles);

-- Read model: the state-change feed for Automation. Positions are assigned by the one active
-- feed projector in log order, so they only grow and a rebuild numbers them the same way.
CREATE TABLE state_changes (
    position        bigint PRIMARY KEY,
    message_id      uuid NOT NULL,
    channel         text NOT NULL,
    service_id      uuid NOT NULL,
    previous_state  text,
    state           text NOT NULL,
    cause           text NOT NULL,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL,
    event_position  bigint NOT NULL UNIQUE
);
CREATE INDEX state_changes_message ON state_changes (message_id, position);
