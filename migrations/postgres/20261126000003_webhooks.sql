-- Provider webhooks land here first, in the request's own transaction, before we answer 2xx:
-- a durable inbox. The applier then records each fact on its message, in the provider's time
-- order; a fact for a message we do not know yet stays `pending` until the message appears.
-- The unique key drops provider re-sends (SendGrid sends the same event several times).
CREATE TABLE webhook_inbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider    text NOT NULL,
    event_id    text NOT NULL,
    -- Our message the fact is about, when the payload names one.
    message_id  uuid,
    kind        text NOT NULL,
    occurred_at timestamptz NOT NULL,
    payload     jsonb NOT NULL,
    -- pending: to apply; applied; unmatched: names no message of ours; malformed: unreadable.
    status      text NOT NULL DEFAULT 'pending',
    reason      text,
    -- The message was unknown, or could not take the fact yet, when last tried: retried once
    -- the message appears in the message list (or changes past `waiting_after`, its last
    -- sequence then).
    waiting       boolean NOT NULL DEFAULT false,
    waiting_after bigint,
    -- Leased by an applier while it applies the fact (no transaction is held open meanwhile).
    locked_until  timestamptz,
    received_at timestamptz NOT NULL DEFAULT now(),
    applied_at  timestamptz,
    UNIQUE (provider, event_id)
);
CREATE INDEX webhook_inbox_pending ON webhook_inbox (message_id, occurred_at, id) WHERE status = 'pending';
CREATE INDEX webhook_inbox_problems ON webhook_inbox (id DESC) WHERE status IN ('unmatched', 'malformed');

-- Wake the applier at commit.
CREATE FUNCTION webhook_inbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('webhook_inbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER webhook_inbox_inserted AFTER INSERT ON webhook_inbox
    FOR EACH STATEMENT EXECUTE FUNCTION webhook_inbox_notify();

-- Replies name our sent posts by the provider's id: look messages up by it.
ALTER TABLE message_list ADD COLUMN provider_message_id text;
CREATE INDEX message_list_provider_id ON message_list (provider_message_id)
    WHERE provider_message_id IS NOT NULL;
