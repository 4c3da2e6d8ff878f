//! Push subscriptions' deliveries on SQLite.

use super::{later, SqlitePools};
use crate::store::{PushDue, StoreError};
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use std::time::Duration;

#[derive(sqlx::FromRow)]
struct DueRow {
    id: uuid::Uuid,
    url: String,
    secret: String,
    states: Option<Json<Vec<String>>>,
    channels: Option<Json<Vec<String>>>,
    cursor: i64,
    failures: i32,
}

pub(super) async fn lease(
    pools: &SqlitePools,
    lease: Duration,
    limit: i64,
) -> Result<Vec<PushDue>, StoreError> {
    let now = crate::clock::now();
    let until = later(now, lease);
    let rows: Vec<DueRow> = sqlx::query_as(
        "UPDATE subscriptions SET next_attempt_at = ?2 \
         WHERE id IN (SELECT id FROM subscriptions \
               WHERE next_attempt_at <= ?1 \
                 AND cursor < (SELECT COALESCE(MAX(position), 0) FROM state_changes) \
               ORDER BY next_attempt_at LIMIT ?3) \
         RETURNING id, url, secret, states, channels, cursor, failures",
    )
    .bind(now)
    .bind(until)
    .bind(limit)
    .fetch_all(&pools.write)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| PushDue {
            id: r.id,
            url: r.url,
            secret: r.secret,
            states: r.states.map(|Json(s)| s),
            channels: r.channels.map(|Json(c)| c),
            cursor: r.cursor,
            failures: r.failures,
            // Stored as the text of this very value, compared as that text below.
            leased_until: until,
        })
        .collect())
}

// Both record only while the lease is still the delivery's (see `lease`).
pub(super) async fn acknowledged(
    pools: &SqlitePools,
    leased: &PushDue,
    cursor: i64,
    delivered: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE subscriptions SET cursor = MAX(cursor, ?2), delivered = delivered + ?3, \
         failures = 0, last_error = NULL, next_attempt_at = ?4, \
         last_attempt_at = CASE WHEN ?3 > 0 THEN ?4 ELSE last_attempt_at END \
         WHERE id = ?1 AND next_attempt_at = ?5",
    )
    .bind(leased.id)
    .bind(cursor)
    .bind(delivered)
    .bind(crate::clock::now())
    .bind(leased.leased_until)
    .execute(&pools.write)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn failed(
    pools: &SqlitePools,
    leased: &PushDue,
    failures: i32,
    reason: &str,
    retry_in: Duration,
) -> Result<bool, StoreError> {
    let now = crate::clock::now();
    let done = sqlx::query(
        "UPDATE subscriptions SET failures = ?2, last_error = ?3, last_attempt_at = ?4, \
         next_attempt_at = ?5 WHERE id = ?1 AND next_attempt_at = ?6",
    )
    .bind(leased.id)
    .bind(failures)
    .bind(reason)
    .bind(now)
    .bind(later(now, retry_in))
    .bind(leased.leased_until)
    .execute(&pools.write)
    .await?;
    Ok(done.rows_affected() == 1)
}

pub(super) async fn next_due(pools: &SqlitePools) -> Result<Option<DateTime<Utc>>, StoreError> {
    let next: Option<String> = sqlx::query_scalar(
        "SELECT min(next_attempt_at) FROM subscriptions \
         WHERE cursor < (SELECT COALESCE(MAX(position), 0) FROM state_changes)",
    )
    .fetch_one(&pools.read)
    .await?;
    next.as_deref().map(super::parse_time).transpose()
}
