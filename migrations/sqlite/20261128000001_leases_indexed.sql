-- Leased schedule rows are few (the ones being fired right now): indexed apart, so "when is
-- the next row leasable" is two index steps instead of a scan of every scheduled message, as
-- on PostgreSQL. A send job's lease moves its due time, so `send_jobs_due` answers for it.
CREATE INDEX scheduled_sends_leased ON scheduled_sends (locked_until)
    WHERE locked_until IS NOT NULL;
