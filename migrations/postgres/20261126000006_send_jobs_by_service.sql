-- The sender claims each service's earliest due jobs: found through this index (skipping from
-- one service to the next, then walking that service's jobs by due time) instead of ranking
-- every due job of every service on every claim, which cost a sort of the whole backlog per
-- round of 64 (~500 sends/s with 100k due).
CREATE INDEX send_jobs_by_service ON send_jobs (service_id, due_at);
