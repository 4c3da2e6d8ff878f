-- Push subscriptions for Automation: each keeps its own cursor into the state-change feed, so
-- a subscriber that is down receives everything, in order, when it returns.
CREATE TABLE subscriptions (
    id              uuid PRIMARY KEY,
    url             text NOT NULL,
    -- Write-only through the API: signs deliveries.
    secret          text NOT NULL,
    -- NULL means every state / channel.
    states          text[],
    channels        text[],
    -- The last feed position delivered (or passed over by the filters).
    cursor          bigint NOT NULL DEFAULT 0,
    delivered       bigint NOT NULL DEFAULT 0,
    failures        integer NOT NULL DEFAULT 0,
    last_error      text,
    last_attempt_at timestamptz,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_due ON subscriptions (next_attempt_at);
