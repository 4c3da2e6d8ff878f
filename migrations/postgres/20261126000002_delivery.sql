-- The schedule and the send queue: data derived from the log by the `delivery` subscription,
-- never an in-memory timer that a restart forgets.

-- One row per scheduled message. The scheduler claims due rows and queues the message with
-- the publish_at it fired for, so a reschedule racing the firing wins.
CREATE TABLE scheduled_sends (
    message_id   uuid PRIMARY KEY,
    publish_at   timestamptz NOT NULL,
    -- Leased by the scheduler instance firing it (no transaction is held open meanwhile).
    locked_until timestamptz
);
CREATE INDEX scheduled_sends_due ON scheduled_sends (publish_at);

-- One row per queued message until its outcome is recorded. Workers claim due rows with
-- FOR UPDATE SKIP LOCKED and hold a lease while they call the provider; a crashed worker's
-- lease expires and the job is recovered.
CREATE TABLE send_jobs (
    message_id   uuid PRIMARY KEY,
    service_id   uuid NOT NULL,
    channel      text NOT NULL,
    provider     text NOT NULL,
    due_at       timestamptz NOT NULL,
    locked_until timestamptz,
    claims       integer NOT NULL DEFAULT 0
);
CREATE INDEX send_jobs_due ON send_jobs (due_at);
