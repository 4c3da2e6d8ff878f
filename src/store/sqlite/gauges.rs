//! `/metrics` gauges on SQLite.

use super::SqlitePools;
use crate::store::{Gauges, StoreError};

pub(super) async fn read(pools: &SqlitePools) -> Result<Gauges, StoreError> {
    let projection_lag: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.name, (SELECT count(*) FROM events e \
           WHERE e.global_position > c.last_global_position) \
         FROM subscription_checkpoints c ORDER BY c.name",
    )
    .fetch_all(&pools.read)
    .await?;
    let (send_jobs_due, send_jobs, scheduled_sends, webhook_inbox_pending): (i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM send_jobs WHERE due_at <= ?1 \
                       AND (locked_until IS NULL OR locked_until < ?1)), \
                    (SELECT count(*) FROM send_jobs), \
                    (SELECT count(*) FROM scheduled_sends), \
                    (SELECT count(*) FROM webhook_inbox WHERE status = 'pending')",
        )
        .bind(crate::clock::now())
        .fetch_one(&pools.read)
        .await?;
    let push_lag: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT s.id, MAX((SELECT COALESCE(MAX(position), 0) FROM state_changes) - s.cursor, 0) \
         FROM subscriptions s ORDER BY s.id",
    )
    .fetch_all(&pools.read)
    .await?;
    Ok(Gauges {
        projection_lag,
        send_jobs_due,
        send_jobs,
        scheduled_sends,
        webhook_inbox_pending,
        push_lag,
    })
}
