//! The gauges `/metrics` reads at scrape time: three queries, no transaction.

use crate::store::{Gauges, StoreError};
use sqlx::PgPool;

pub(super) async fn read(pool: &PgPool) -> Result<Gauges, StoreError> {
    let projection_lag: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.name, (SELECT count(*) FROM events e \
           WHERE (e.transaction_id, e.global_position) \
               > (c.last_transaction_id, c.last_global_position)) \
         FROM subscription_checkpoints c ORDER BY c.name",
    )
    .fetch_all(pool)
    .await?;

    let (send_jobs_due, send_jobs, scheduled_sends, webhook_inbox_pending): (i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM send_jobs WHERE due_at <= now() \
                       AND (locked_until IS NULL OR locked_until < now())), \
                    (SELECT count(*) FROM send_jobs), \
                    (SELECT count(*) FROM scheduled_sends), \
                    (SELECT count(*) FROM webhook_inbox WHERE status = 'pending')",
        )
        .fetch_one(pool)
        .await?;

    let push_lag: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
        "SELECT s.id, GREATEST((SELECT COALESCE(MAX(position), 0) FROM state_changes) - s.cursor, 0) \
         FROM subscriptions s ORDER BY s.id",
    )
    .fetch_all(pool)
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
