//! The scheduler's and the sender's tables on SQLite. One process owns the file and every
//! write goes through the one writer connection, so an `UPDATE ... RETURNING` over the chosen
//! rows is the atomic lease that `FOR UPDATE SKIP LOCKED` gives on PostgreSQL.

use super::{later, SqlitePools};
use crate::store::{PerService, ScheduledSend, SendJob, StoreError};
use chrono::{DateTime, Utc};
use messaging_domain::{MessageId, ServiceId};
use std::time::Duration;

/// How long a fired schedule row stays leased (as on PostgreSQL).
const SCHEDULE_LEASE: Duration = Duration::from_secs(30);

pub(super) async fn lease_due_schedules(
    pools: &SqlitePools,
    limit: i64,
) -> Result<Vec<ScheduledSend>, StoreError> {
    let now = crate::clock::now();
    let due: Vec<(uuid::Uuid, DateTime<Utc>)> = sqlx::query_as(
        "UPDATE scheduled_sends SET locked_until = ?2 \
         WHERE message_id IN (SELECT message_id FROM scheduled_sends \
               WHERE publish_at <= ?1 AND (locked_until IS NULL OR locked_until < ?1) \
               ORDER BY publish_at LIMIT ?3) \
         RETURNING message_id, publish_at",
    )
    .bind(now)
    .bind(later(now, SCHEDULE_LEASE))
    .bind(limit)
    .fetch_all(&pools.write)
    .await?;
    Ok(due
        .into_iter()
        .map(|(id, publish_at)| ScheduledSend {
            message_id: MessageId::from_uuid(id),
            publish_at,
        })
        .collect())
}

pub(super) async fn finish_schedules(
    pools: &SqlitePools,
    fired: &[ScheduledSend],
) -> Result<(), StoreError> {
    let mut tx = pools.write.begin().await?;
    for f in fired {
        sqlx::query("DELETE FROM scheduled_sends WHERE message_id = ?1 AND publish_at = ?2")
            .bind(f.message_id.as_uuid())
            .bind(f.publish_at)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn release_schedules(
    pools: &SqlitePools,
    fired: &[ScheduledSend],
) -> Result<(), StoreError> {
    let mut tx = pools.write.begin().await?;
    for f in fired {
        sqlx::query(
            "UPDATE scheduled_sends SET locked_until = NULL \
             WHERE message_id = ?1 AND publish_at = ?2",
        )
        .bind(f.message_id.as_uuid())
        .bind(f.publish_at)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// When the scheduler should look again: the earliest unleased (or lease-expired) row's time,
/// or the earliest lease's expiry. Two index walks that stop at their first row (the time's
/// index, and the partial index of the few leased rows), not a scan of every scheduled
/// message. (The aggregate `min` skips a side that found nothing; the two-argument one would
/// answer NULL.)
pub(super) const NEXT_SCHEDULE_DUE: &str = "SELECT min(t) FROM ( \
       SELECT (SELECT publish_at FROM scheduled_sends \
               WHERE locked_until IS NULL OR locked_until < ?1 \
               ORDER BY publish_at LIMIT 1) AS t \
       UNION ALL \
       SELECT (SELECT locked_until FROM scheduled_sends WHERE locked_until >= ?1 \
               ORDER BY locked_until LIMIT 1))";

/// When the sender should look again. A claim moves a job's due time to its lease's end (and
/// an outcome clears the lease), so the earliest due time is already the answer, leased or
/// not: one step of the due-time index.
pub(super) const NEXT_SEND_JOB_DUE: &str = "SELECT min(due_at) FROM send_jobs";

pub(super) async fn next_schedule_due(
    pools: &SqlitePools,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let next: Option<String> = sqlx::query_scalar(NEXT_SCHEDULE_DUE)
        .bind(crate::clock::now())
        .fetch_one(&pools.read)
        .await?;
    next.as_deref().map(super::parse_time).transpose()
}

/// Claims due jobs: `?1` now, `?2` the lease's end (also the job's due time, as on
/// PostgreSQL), `?3` jobs per service at least, `?4` jobs in all, `?5` jobs per service at
/// most (a service's share is `?3`, or `?4` divided evenly among the services with a job
/// claimable now when that is more, up to `?5`). The round takes the shares in turns (each
/// service's earliest, then each one's second, ...), so a quiet service is not left out behind
/// two busy ones; the window that numbers the turns runs over the shares alone. The services are found by
/// skipping from one to the next through `send_jobs_by_service`, and each one's earliest due
/// jobs read from the same index: ranking every due job of every service (a window over the
/// whole backlog, sorted twice) cost 150 ms a round with 100k due.
pub(super) const CLAIM_SEND_JOBS: &str = "\
    UPDATE send_jobs SET locked_until = ?2, due_at = ?2, claims = claims + 1 \
    WHERE message_id IN ( \
      WITH RECURSIVE services(service_id) AS ( \
        SELECT (SELECT service_id FROM send_jobs ORDER BY service_id LIMIT 1) \
        UNION ALL \
        SELECT (SELECT j.service_id FROM send_jobs j WHERE j.service_id > s.service_id \
                ORDER BY j.service_id LIMIT 1) \
        FROM services s WHERE s.service_id IS NOT NULL), \
      share(jobs) AS ( \
        SELECT max(?3, min((?4 + n - 1) / n, ?5)) \
        FROM (SELECT max(count(*), 1) AS n FROM services s \
              WHERE s.service_id IS NOT NULL AND EXISTS ( \
                SELECT 1 FROM send_jobs p WHERE p.service_id = s.service_id AND p.due_at <= ?1 \
                  AND (p.locked_until IS NULL OR p.locked_until < ?1)))) \
      SELECT message_id FROM ( \
        SELECT j.message_id, j.due_at, \
               row_number() OVER (PARTITION BY j.service_id ORDER BY j.due_at) AS turn \
        FROM services s CROSS JOIN send_jobs j \
        WHERE s.service_id IS NOT NULL \
          AND j.message_id IN (SELECT p.message_id FROM send_jobs p \
                WHERE p.service_id = s.service_id AND p.due_at <= ?1 \
                  AND (p.locked_until IS NULL OR p.locked_until < ?1) \
                ORDER BY p.due_at LIMIT (SELECT jobs FROM share))) \
      ORDER BY turn, due_at LIMIT ?4) \
    RETURNING message_id, service_id";

pub(super) async fn claim_send_jobs(
    pools: &SqlitePools,
    limit: i64,
    per_service: PerService,
    lease: Duration,
) -> Result<Vec<SendJob>, StoreError> {
    let now = crate::clock::now();
    let until = later(now, lease);
    let jobs: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(CLAIM_SEND_JOBS)
        .bind(now)
        .bind(until)
        .bind(per_service.least)
        .bind(limit)
        .bind(per_service.most)
        .fetch_all(&pools.write)
        .await?;
    Ok(jobs
        .into_iter()
        .map(|(message_id, service_id)| SendJob {
            message_id: MessageId::from_uuid(message_id),
            service_id: ServiceId::from_uuid(service_id),
            leased_until: until,
        })
        .collect())
}

pub(super) async fn next_send_job_due(
    pools: &SqlitePools,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let next: Option<String> = sqlx::query_scalar(NEXT_SEND_JOB_DUE)
        .fetch_one(&pools.read)
        .await?;
    next.as_deref().map(super::parse_time).transpose()
}

pub(super) async fn release_send_job(
    pools: &SqlitePools,
    job: &SendJob,
    due_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE send_jobs SET locked_until = NULL, due_at = ?3 \
         WHERE message_id = ?1 AND locked_until = ?2",
    )
    .bind(job.message_id.as_uuid())
    .bind(job.leased_until)
    .bind(due_at.unwrap_or_else(crate::clock::now))
    .execute(&pools.write)
    .await?;
    Ok(())
}

pub(super) async fn delete_send_job(pools: &SqlitePools, job: &SendJob) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM send_jobs WHERE message_id = ?1 AND locked_until = ?2")
        .bind(job.message_id.as_uuid())
        .bind(job.leased_until)
        .execute(&pools.write)
        .await?;
    Ok(())
}
