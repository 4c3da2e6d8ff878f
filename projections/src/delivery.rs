//! The schedule and the send queue, derived from the log: a scheduled message gets a
//! `scheduled_sends` row, a queued one a `send_jobs` row until its outcome is recorded.
//! NOTIFY `schedule` / `send_jobs` wake the workers at commit.

use crate::event::StoredEvent;
use crate::subscription::{Projection, ProjectionError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use messaging_domain::{Message, MessageEvent};
use sqlx::{PgConnection, Postgres};

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

/// What one event changes in the schedule and the send queue, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobChange {
    /// Adds or moves the message's `scheduled_sends` row (and frees its lease).
    Schedule {
        publish_at: DateTime<Utc>,
    },
    Unschedule,
    /// Adds the message's `send_jobs` row due at `due_at`, or makes it due then.
    Enqueue {
        due_at: DateTime<Utc>,
    },
    /// Makes an existing job due again at `retry_at`.
    Retry {
        retry_at: DateTime<Utc>,
    },
    Dequeue,
}

/// The changes an event makes to its message's rows (none for most), with the message's id.
pub(crate) fn job_changes(
    event: &StoredEvent,
) -> Result<(uuid::Uuid, Vec<JobChange>), ProjectionError> {
    use JobChange::*;
    if !event.is_message() {
        return Ok((uuid::Uuid::nil(), vec![]));
    }
    let id = event.message_uuid()?;
    let changes = match event.message_event()? {
        MessageEvent::MessageScheduled { publish_at, .. } => vec![Schedule { publish_at }],
        MessageEvent::MessageQueued { queued_at } => {
            vec![Unschedule, Enqueue { due_at: queued_at }]
        }
        MessageEvent::SendRetryRequested { requested_at } => vec![Enqueue {
            due_at: requested_at,
        }],
        MessageEvent::MessageCancelled { .. } => vec![Unschedule, Dequeue],
        MessageEvent::SendAttemptFailed {
            retry_at: Some(retry_at),
            ..
        } => vec![Retry { retry_at }],
        // An outcome is recorded: nothing left to send. An unknown outcome waits for a
        // person or a check, never for a blind retry.
        MessageEvent::MessageSent { .. }
        | MessageEvent::MessageFailed { .. }
        | MessageEvent::SendOutcomeUnknown { .. } => vec![Dequeue],
        _ => vec![],
    };
    Ok((id, changes))
}

/// A send job's copies of its message's service, channel and provider: they are in its first
/// event (`message` is the fold of that event).
pub(crate) struct JobOf {
    pub service_id: uuid::Uuid,
    pub channel: &'static str,
    pub provider: &'static str,
}

impl JobOf {
    pub(crate) fn new(id: uuid::Uuid, message: &Message) -> Result<Self, ProjectionError> {
        let Some(d) = message.data() else {
            return Err(ProjectionError::Other(format!(
                "queued message {id} has no first event"
            )));
        };
        Ok(Self {
            service_id: d.service_id.as_uuid(),
            channel: d.channel.as_str(),
            provider: d.provider.as_str(),
        })
    }
}

/// Adds a send job due at `due_at`.
async fn enqueue(
    conn: &mut PgConnection,
    event: &StoredEvent,
    id: uuid::Uuid,
    due_at: DateTime<Utc>,
) -> Result<(), ProjectionError> {
    let message = crate::event::load_message(&mut *conn, &event.aggregate_id, Some(1)).await?;
    let job = JobOf::new(id, &message)?;
    sqlx::query(
        "INSERT INTO send_jobs (message_id, service_id, channel, provider, due_at) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (message_id) DO UPDATE SET due_at = EXCLUDED.due_at, locked_until = NULL",
    )
    .bind(id)
    .bind(job.service_id)
    .bind(job.channel)
    .bind(job.provider)
    .bind(due_at)
    .execute(&mut *conn)
    .await?;
    notify(conn, "send_jobs").await
}

impl DeliveryJobs {
    pub const NAME: &'static str = "delivery";
}

#[async_trait]
impl Projection<Postgres> for DeliveryJobs {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            let (id, changes) = job_changes(event)?;
            for change in changes {
                match change {
                    JobChange::Schedule { publish_at } => {
                        sqlx::query(
                            "INSERT INTO scheduled_sends (message_id, publish_at) VALUES ($1, $2) \
                             ON CONFLICT (message_id) DO UPDATE SET \
                             publish_at = EXCLUDED.publish_at, locked_until = NULL",
                        )
                        .bind(id)
                        .bind(publish_at)
                        .execute(&mut *conn)
                        .await?;
                        notify(&mut *conn, "schedule").await?;
                    }
                    JobChange::Unschedule => unschedule(&mut *conn, id).await?,
                    JobChange::Enqueue { due_at } => enqueue(&mut *conn, event, id, due_at).await?,
                    JobChange::Retry { retry_at } => {
                        sqlx::query(
                            "UPDATE send_jobs SET due_at = $2, locked_until = NULL \
                             WHERE message_id = $1",
                        )
                        .bind(id)
                        .bind(retry_at)
                        .execute(&mut *conn)
                        .await?;
                        notify(&mut *conn, "send_jobs").await?;
                    }
                    JobChange::Dequeue => dequeue(&mut *conn, id).await?,
                }
            }
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
