//! Push deliveries: subscriptions leased with `FOR UPDATE SKIP LOCKED` in one short
//! statement, so no transaction stays open while a subscriber is called.

use crate::store::{PushDue, StoreError};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::time::Duration;

#[derive(sqlx::FromRow)]
struct DueRow {
    id: uuid::Uuid,
    url: String,
    secret: String,
    states: Option<Vec<String>>,
    channels: Option<Vec<String>>,
    cursor: i64,
    failures: i32,
    next_attempt_at: DateTime<Utc>,
}

pub(super) async fn lease(
    pool: &PgPool,
    lease: Duration,
    limit: i64,
) -> Result<Vec<PushDue>, StoreError> {
    let rows: Vec<DueRow> = sqlx::query_as(
        "UPDATE subscriptions s SET next_attempt_at = now() + $1 * interval '1 millisecond' \
         FROM (SELECT id FROM subscriptions \
               WHERE next_attempt_at <= now() \
                 AND cursor < (SELECT COALESCE(MAX(position), 0) FROM state_changes) \
               ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) due \
         WHERE s.id = due.id \
         RETURNING s.id, s.url, s.secret, s.states, s.channels, s.cursor, s.failures, \
                   s.next_attempt_at",
    )
    .bind(lease.as_millis() as f64)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| PushDue {
            id: r.id,
            url: r.url,
            secret: r.secret,
            states: r.states,
            channels: r.channels,
            cursor: r.cursor,
            failures: r.failures,
            leased_until: r.next_attempt_at,
        })
        .collect())
}

// Both record only while the lease is still the delivery's: `next_attempt_at` is the token
// the lease returned (a timestamptz round-trips exactly).
pub(super) async fn acknowledged(
    pool: &PgPool,
    leased: &PushDue,
    cursor: i64,
    delivered: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE subscriptions SET cursor = GREATEST(cursor, $2), delivered = delivered + $3, \
         failures = 0, last_error = NULL, next_attempt_at = now(), \
         last_attempt_at = CASE WHEN $3 > 0 THEN now() ELSE last_attempt_at END \
         WHERE id = $1 AND next_attempt_at = $4",
    )
    .bind(leased.id)
    .bind(cursor)
    .bind(delivered)
    .bind(leased.leased_until)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn failed(
    pool: &PgPool,
    leased: &PushDue,
    failures: i32,
    reason: &str,
    retry_in: Duration,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE subscriptions SET failures = $2, last_error = $3, last_attempt_at = now(), \
         next_attempt_at = now() + $4 * interval '1 millisecond' \
         WHERE id = $1 AND next_attempt_at = $5",
    )
    .bind(leased.id)
    .bind(failures)
    .bind(reason)
    .bind(retry_in.as_millis() as f64)
    .bind(leased.leased_until)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, StoreError> {
    let mut conn = pool.acquire().await?;
    Ok(sqlx::query_scalar(
        // Told in this process's clock (see `jobs::next_schedule_due`).
        "SELECT min(next_attempt_at) + ($1::timestamptz - now()) FROM subscriptions \
         WHERE cursor < (SELECT COALESCE(MAX(position), 0) FROM state_changes)",
    )
    .bind(crate::clock::now())
    .fetch_one(&mut *conn)
    .await?)
}
