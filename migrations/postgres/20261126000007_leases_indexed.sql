-- Leased rows are few (the ones being fired or sent right now): indexed apart, so "when is
-- the next row leasable" is two index steps (the earliest unleased due time, the earliest
-- lease expiry) instead of an aggregate over every scheduled message and queued job (14 ms
-- per scheduler round with 100k scheduled).
CREATE INDEX scheduled_sends_leased ON scheduled_sends (locked_until) WHERE locked_until IS NOT NULL;
CREATE INDEX send_jobs_leased ON send_jobs (locked_until) WHERE locked_until IS NOT NULL;
