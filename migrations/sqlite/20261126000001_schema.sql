-- The embedded default's schema: the same tables as PostgreSQL's migrations, in SQLite's
-- types. UUIDs are 16-byte blobs, JSON and arrays are JSON text, times are RFC 3339 text in
-- UTC ("+00:00"), written by the service, so that text order is time order.

-- One writer at a time means commit order is position order: a reader can checkpoint the
-- position alone. AUTOINCREMENT never reuses a position; VACUUM keeps it (a declared
-- INTEGER PRIMARY KEY, unlike a bare rowid, is never renumbered).
CREATE TABLE events (
    global_position INTEGER PRIMARY KEY AUTOINCREMENT,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    TEXT    NOT NULL,
    sequence        INTEGER NOT NULL CHECK (sequence >= 0),
    event_type      TEXT    NOT NULL,
    event_version   TEXT    NOT NULL,
    payload         TEXT    NOT NULL,
    metadata        TEXT    NOT NULL,
    recorded_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    UNIQUE (aggregate_type, aggregate_id, sequence)
);

CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TABLE subscription_checkpoints (
    name                 TEXT    PRIMARY KEY,
    last_global_position INTEGER NOT NULL DEFAULT 0,
    events_handled       INTEGER NOT NULL DEFAULT 0,
    updated_at           TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);

CREATE TABLE services (
    id          BLOB PRIMARY KEY,
    channel     TEXT NOT NULL,
    provider    TEXT NOT NULL,
    name        TEXT NOT NULL,
    username    TEXT NOT NULL,
    credentials TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE idempotency_keys (
    key          TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    message_id   BLOB NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);

CREATE TABLE message_list (
    message_id          BLOB    PRIMARY KEY,
    service_id          BLOB    NOT NULL,
    channel             TEXT    NOT NULL,
    direction           TEXT    NOT NULL,
    state               TEXT    NOT NULL,
    -- JSON array of lower-cased usernames, sender and recipients.
    profiles            TEXT    NOT NULL,
    message             TEXT    NOT NULL,
    last_sequence       INTEGER NOT NULL,
    provider_message_id TEXT
);
CREATE INDEX message_list_service ON message_list (service_id, message_id DESC);
CREATE INDEX message_list_state ON message_list (state, message_id DESC);
CREATE INDEX message_list_provider_id ON message_list (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

CREATE TABLE state_changes (
    position        INTEGER PRIMARY KEY,
    message_id      BLOB    NOT NULL,
    channel         TEXT    NOT NULL,
    service_id      BLOB    NOT NULL,
    previous_state  TEXT,
    state           TEXT    NOT NULL,
    cause           TEXT    NOT NULL,
    occurred_at     TEXT    NOT NULL,
    recorded_at     TEXT    NOT NULL,
    event_position  INTEGER NOT NULL UNIQUE
);
CREATE INDEX state_changes_message ON state_changes (message_id, position);

CREATE TABLE scheduled_sends (
    message_id   BLOB PRIMARY KEY,
    publish_at   TEXT NOT NULL,
    locked_until TEXT
);
CREATE INDEX scheduled_sends_due ON scheduled_sends (publish_at);

CREATE TABLE send_jobs (
    message_id   BLOB    PRIMARY KEY,
    service_id   BLOB    NOT NULL,
    channel      TEXT    NOT NULL,
    provider     TEXT    NOT NULL,
    due_at       TEXT    NOT NULL,
    locked_until TEXT,
    claims       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX send_jobs_due ON send_jobs (due_at);

CREATE TABLE webhook_inbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    provider      TEXT    NOT NULL,
    event_id      TEXT    NOT NULL,
    message_id    BLOB,
    kind          TEXT    NOT NULL,
    occurred_at   TEXT    NOT NULL,
    payload       TEXT    NOT NULL,
    -- pending, applied, unmatched or malformed: see the PostgreSQL schema.
    status        TEXT    NOT NULL DEFAULT 'pending',
    reason        TEXT,
    waiting       INTEGER NOT NULL DEFAULT 0,
    waiting_after INTEGER,
    locked_until  TEXT,
    received_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    applied_at    TEXT,
    UNIQUE (provider, event_id)
);
CREATE INDEX webhook_inbox_pending ON webhook_inbox (message_id, occurred_at, id)
    WHERE status = 'pending';
CREATE INDEX webhook_inbox_problems ON webhook_inbox (id DESC)
    WHERE status IN ('unmatched', 'malformed');

CREATE TABLE subscriptions (
    id              BLOB    PRIMARY KEY,
    url             TEXT    NOT NULL,
    secret          TEXT    NOT NULL,
    -- JSON arrays; NULL means every state / channel.
    states          TEXT,
    channels        TEXT,
    cursor          INTEGER NOT NULL DEFAULT 0,
    delivered       INTEGER NOT NULL DEFAULT 0,
    failures        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_attempt_at TEXT,
    next_attempt_at TEXT    NOT NULL,
    created_at      TEXT    NOT NULL
);
CREATE INDEX subscriptions_due ON subscriptions (next_attempt_at);
