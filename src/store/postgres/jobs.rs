//! The scheduler's `scheduled_sends` and the sender's `send_jobs`: row leases taken with
//! `FOR UPDATE SKIP LOCKED`, so any number of instances can work the same tables.

use crate::store::{PerService, ScheduledSend, SendJob, StoreError};
use chrono::{DateTime, Utc};
use messaging_domain::{MessageId, ServiceId};
use sqlx::PgPool;
use std::time::Duration;

pub(super) async fn lease_due_schedules(
    pool: &PgPool,
    limit: i64,
) -> Result<Vec<ScheduledSend>, StoreError> {
    // One short statement: the firings that follow run with no transaction open (an open
    // transaction older than the events they append would hold back every log reader).
    let due: Vec<(uuid::Uuid, DateTime<Utc>)> = sqlx::query_as(
        // `= ANY(ARRAY(..))`: the rows are then found by primary key. As a join, the
        // planner hashed the chosen rows and scanned the whole table for them (20 ms per
        // round with 100k scheduled).
        "UPDATE scheduled_sends s SET locked_until = now() + interval '30 seconds' \
         WHERE s.message_id = ANY(ARRAY( \
               SELECT message_id FROM scheduled_sends \
               WHERE publish_at <= now() \
                 AND (locked_until IS NULL OR locked_until < now()) \
               ORDER BY publish_at LIMIT $1 FOR UPDATE SKIP LOCKED)) \
         RETURNING s.message_id, s.publish_at",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(due
        .into_iter()
        .map(|(id, publish_at)| ScheduledSend {
            message_id: MessageId::from_uuid(id),
            publish_at,
        })
        .collect())
}

/// The firings' message ids and `publish_at`s, as two arrays for `unnest`.
fn columns(fired: &[ScheduledSend]) -> (Vec<uuid::Uuid>, Vec<DateTime<Utc>>) {
    fired
        .iter()
        .map(|f| (f.message_id.as_uuid(), f.publish_at))
        .unzip()
}

pub(super) async fn finish_schedules(
    pool: &PgPool,
    fired: &[ScheduledSend],
) -> Result<(), StoreError> {
    if fired.is_empty() {
        return Ok(());
    }
    let (ids, times) = columns(fired);
    sqlx::query(
        // The key condition finds the rows by primary key (see `DELETE_SCHEDULES` in the
        // delivery projection) whatever the planner estimates: a guard, as for the lease
        // above, whose join was planned as a scan of the schedule (this one was planned by key
        // in psql at 500 of 100k).
        "DELETE FROM scheduled_sends s \
         USING unnest($1::uuid[], $2::timestamptz[]) AS f(message_id, publish_at) \
         WHERE s.message_id = f.message_id AND s.publish_at = f.publish_at \
           AND s.message_id = ANY(ARRAY(SELECT unnest($1::uuid[])))",
    )
    .bind(&ids)
    .bind(&times)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn release_schedules(
    pool: &PgPool,
    fired: &[ScheduledSend],
) -> Result<(), StoreError> {
    if fired.is_empty() {
        return Ok(());
    }
    let (ids, times) = columns(fired);
    sqlx::query(
        "UPDATE scheduled_sends s SET locked_until = NULL \
         FROM unnest($1::uuid[], $2::timestamptz[]) AS f(message_id, publish_at) \
         WHERE s.message_id = f.message_id AND s.publish_at = f.publish_at \
           AND s.message_id = ANY(ARRAY(SELECT unnest($1::uuid[])))",
    )
    .bind(&ids)
    .bind(&times)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn next_schedule_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, StoreError> {
    // The connection first: this process's "now" is taken as close as it can be to the
    // database's, without the wait for a connection between them.
    let mut conn = pool.acquire().await?;
    Ok(sqlx::query_scalar(
        // The earliest unleased (or lease-expired) row's time, or the earliest lease
        // expiry: two index steps, not an aggregate over every row. Told in this process's
        // clock: the caller sleeps until it by its own clock, and leases by the database's,
        // so a skew between them made it wake early and spin (or sleep up to 5 s too long).
        "SELECT least( \
           (SELECT min(publish_at) FROM scheduled_sends \
            WHERE locked_until IS NULL OR locked_until < now()), \
           (SELECT min(locked_until) FROM scheduled_sends WHERE locked_until >= now())) \
         + ($1::timestamptz - now())",
    )
    .bind(crate::clock::now())
    .fetch_one(&mut *conn)
    .await?)
}

pub(super) async fn claim_send_jobs(
    pool: &PgPool,
    limit: i64,
    per_service: PerService,
    lease: Duration,
) -> Result<Vec<SendJob>, StoreError> {
    // The services with jobs, one index step each (a loose index scan); for each, its
    // earliest due unleased jobs, at most `per_service`; of those, the `limit` earliest; and
    // only those locked (checked again once locked), so a claim locks what it leases.
    // A lease also moves the job's due time to the lease's end, when it may be claimed again
    // (a sender that died mid-send): leased jobs then lie past `now()` in the
    // `(service_id, due_at)` index, and the next claim's range stops before them instead of
    // stepping over every job still being sent (an outcome deletes the job or sets its retry
    // time). Each service's share is `per_service.least`, or the round divided evenly among
    // the services with a job claimable now when that is more, up to `per_service.most`.
    // The round takes the services' shares in turns (each one's earliest job, then each one's
    // second, ...): the shares together may hold more than the round, and taking the earliest
    // due of them all would leave out a quiet service behind two busy ones.
    let jobs: Vec<(uuid::Uuid, uuid::Uuid, DateTime<Utc>)> = sqlx::query_as(
        "WITH RECURSIVE services AS ( \
           (SELECT service_id FROM send_jobs ORDER BY service_id LIMIT 1) \
           UNION ALL \
           SELECT (SELECT j.service_id FROM send_jobs j WHERE j.service_id > s.service_id \
                   ORDER BY j.service_id LIMIT 1) \
           FROM services s WHERE s.service_id IS NOT NULL \
         ), share AS ( \
           SELECT greatest($2, least(($1 + n - 1) / n, $4)) AS jobs \
           FROM (SELECT greatest(count(*), 1) AS n FROM services s \
                 WHERE s.service_id IS NOT NULL AND EXISTS ( \
                   SELECT 1 FROM send_jobs j WHERE j.service_id = s.service_id \
                     AND j.due_at <= now() \
                     AND (j.locked_until IS NULL OR j.locked_until < now()))) AS counted \
         ), candidates AS ( \
           SELECT picked.message_id FROM services s \
           CROSS JOIN LATERAL ( \
             SELECT j.message_id, j.due_at, row_number() OVER (ORDER BY j.due_at) AS turn \
             FROM send_jobs j \
             WHERE j.service_id = s.service_id AND j.due_at <= now() \
               AND (j.locked_until IS NULL OR j.locked_until < now()) \
             ORDER BY j.due_at LIMIT (SELECT jobs FROM share) \
           ) picked \
           WHERE s.service_id IS NOT NULL \
           ORDER BY picked.turn, picked.due_at LIMIT $1 \
         ), locked AS ( \
           SELECT message_id FROM send_jobs \
           WHERE message_id = ANY(ARRAY(SELECT message_id FROM candidates)) \
             AND due_at <= now() AND (locked_until IS NULL OR locked_until < now()) \
           FOR UPDATE SKIP LOCKED \
         ) \
         UPDATE send_jobs j SET locked_until = now() + $3 * interval '1 millisecond', \
             due_at = now() + $3 * interval '1 millisecond', claims = claims + 1 \
         WHERE j.message_id = ANY(ARRAY(SELECT message_id FROM locked)) \
         RETURNING j.message_id, j.service_id, j.locked_until",
    )
    .bind(limit)
    .bind(per_service.least)
    .bind(lease.as_millis() as f64)
    .bind(per_service.most)
    .fetch_all(pool)
    .await?;
    Ok(jobs
        .into_iter()
        .map(|(message_id, service_id, leased_until)| SendJob {
            message_id: MessageId::from_uuid(message_id),
            service_id: ServiceId::from_uuid(service_id),
            leased_until,
        })
        .collect())
}

pub(super) async fn next_send_job_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, StoreError> {
    let mut conn = pool.acquire().await?;
    Ok(sqlx::query_scalar(
        // Told in this process's clock (see `next_schedule_due`).
        "SELECT least( \
           (SELECT min(due_at) FROM send_jobs \
            WHERE locked_until IS NULL OR locked_until < now()), \
           (SELECT min(locked_until) FROM send_jobs WHERE locked_until >= now())) \
         + ($1::timestamptz - now())",
    )
    .bind(crate::clock::now())
    .fetch_one(&mut *conn)
    .await?)
}

pub(super) async fn release_send_job(
    pool: &PgPool,
    job: &SendJob,
    due_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE send_jobs SET locked_until = NULL, due_at = coalesce($3, now()) \
         WHERE message_id = $1 AND locked_until = $2",
    )
    .bind(job.message_id.as_uuid())
    .bind(job.leased_until)
    .bind(due_at)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn delete_send_job(pool: &PgPool, job: &SendJob) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM send_jobs WHERE message_id = $1 AND locked_until = $2")
        .bind(job.message_id.as_uuid())
        .bind(job.leased_until)
        .execute(pool)
        .await?;
    Ok(())
}
