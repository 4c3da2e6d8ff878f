//! The schedule and the send queue, derived from the log: a scheduled message gets a
//! `scheduled_sends` row, a queued one a `send_jobs` row until its outcome is recorded.
//! NOTIFY `schedule` / `send_jobs` wake the workers at commit.

use crate::event::StoredEvent;
use crate::subscription::{Projection, ProjectionError};
use async_trait::async_trait;
use messaging_domain::MessageEvent;
use sqlx::PgConnection;

pub struct DeliveryJobs;

async fn notify(conn: &mut PgConnection, channel: &str) -> Result<(), ProjectionError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(channel)
        .execute(conn)
        .await?;
    Ok(())
}

async fn unschedule(conn: &mut PgConnection, id: uuid::Uuid) -> Result<(), ProjectionError> {
    sqlx::query("DELETE FROM scheduled_sends WHERE message_id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

async fn dequeue(conn: &mut PgConnection, id: uuid::Uuid) -> Result<(), ProjectionError> {
    sqlx::query("DELETE FROM send_jobs WHERE message_id = $1")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Adds a send job due at `due_at`. The job needs the message's service and channel: they are
/// in its first event.
async fn enqueue(
    conn: &mut PgConnection,
    event: &StoredEvent,
    id: uuid::Uuid,
    due_at: chrono::DateTime<chrono::Utc>,
) -> Result<(), ProjectionError> {
    let message = crate::event::load_message(&mut *conn, &event.aggregate_id, Some(1)).await?;
    let Some(d) = message.data() else {
        return Err(ProjectionError::Other(format!(
            "queued message {id} has no first event"
        )));
    };
    sqlx::query(
        "INSERT INTO send_jobs (message_id, service_id, channel, provider, due_at) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (message_id) DO UPDATE SET due_at = EXCLUDED.due_at, locked_until = NULL",
    )
    .bind(id)
    .bind(d.service_id.as_uuid())
    .bind(d.channel.as_str())
    .bind(d.provider.as_str())
    .bind(due_at)
    .execute(&mut *conn)
    .await?;
    notify(conn, "send_jobs").await
}

#[async_trait]
impl Projection for DeliveryJobs {
    fn name(&self) -> &'static str {
        "delivery"
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        if !event.is_message() {
            return Ok(());
        }
        let id = event.message_uuid()?;
        match event.message_event()? {
            MessageEvent::MessageScheduled { publish_at, .. } => {
                sqlx::query(
                    "INSERT INTO scheduled_sends (message_id, publish_at) VALUES ($1, $2) \
                     ON CONFLICT (message_id) DO UPDATE SET publish_at = EXCLUDED.publish_at, \
                     locked_until = NULL",
                )
                .bind(id)
                .bind(publish_at)
                .execute(&mut *conn)
                .await?;
                notify(conn, "schedule").await?;
            }
            MessageEvent::MessageQueued { queued_at } => {
                unschedule(&mut *conn, id).await?;
                enqueue(conn, event, id, queued_at).await?;
            }
            MessageEvent::SendRetryRequested { requested_at } => {
                enqueue(conn, event, id, requested_at).await?;
            }
            MessageEvent::MessageCancelled { .. } => {
                unschedule(&mut *conn, id).await?;
                dequeue(conn, id).await?;
            }
            MessageEvent::SendAttemptFailed {
                retry_at: Some(retry_at),
                ..
            } => {
                sqlx::query(
                    "UPDATE send_jobs SET due_at = $2, locked_until = NULL WHERE message_id = $1",
                )
                .bind(id)
                .bind(retry_at)
                .execute(&mut *conn)
                .await?;
                notify(conn, "send_jobs").await?;
            }
            // An outcome is recorded: nothing left to send. An unknown outcome waits for a
            // person or a check, never for a blind retry.
            MessageEvent::MessageSent { .. }
            | MessageEvent::MessageFailed { .. }
            | MessageEvent::SendOutcomeUnknown { .. } => dequeue(conn, id).await?,
            _ => {}
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM scheduled_sends")
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM send_jobs").execute(conn).await?;
        Ok(())
    }
}
