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
    let now = Utc::now();
    let rows: Vec<DueRow> = sqlx::query_as(
        "UPDATE subscriptions SET next_attempt_at = ?2 \
         WHERE id IN (SELECT id FROM subscriptions \
               WHERE next_attempt_at <= ?1 \
                 AND cursor < (SELECT COALESCE(MAX(position), 0) FROM state_changes) \
               ORDER BY next_attempt_at LIMIT ?3) \
         RETURNING id, url, secret, states, channels, cursor, failures",
    )
    .bind(now)
    .bind(later(now, lease))
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
        })
        .collect())
}

pub(super) async fn acknowledged(
    pools: &SqlitePools,
    id: uuid::Uuid,
    cursor: i64,
    delivered: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE subscriptions SET cursor = MAX(cursor, ?2), delivered = delivered + ?3, \
         failures = 0, last_error = NULL, next_attempt_at = ?4, \
         last_attempt_at = CASE WHEN ?3 > 0 THEN ?4 ELSE last_attempt_at END \
         WHERE id = ?1",
    )
    .bind(id)
    .bind(cursor)
    .bind(delivered)
    .bind(Utc::now())
    .execute(&pools.write)
    .await?;
    Ok(())
}

pub(super) async fn failed(
    pools: &SqlitePools,
    id: uuid::Uuid,
    failures: i32,
    reason: &str,
    retry_in: Duration,
) -> Result<(), StoreError> {
    let now = Utc::now();
    sqlx::query(
        "UPDATE subscriptions SET failures = ?2, last_error = ?3, last_attempt_at = ?4, \
         next_attempt_at = ?5 WHERE id = ?1",
    )
    .bind(id)
    .bind(failures)
    .bind(reason)
    .bind(now)
    .bind(later(now, retry_in))
    .execute(&pools.write)
    .await?;
    Ok(())
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
