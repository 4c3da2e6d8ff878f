//! The schedule and the send queue on SQLite: the changes of [`crate::delivery`], in SQLite's
//! SQL. Nothing is notified here: the subscription's `on_commit` wakes the workers.

use super::event::load_message;
use crate::delivery::{job_changes, JobChange, JobOf};
use crate::event::StoredEvent;
use crate::subscription::{Projection, ProjectionError};
use crate::DeliveryJobs;
use async_trait::async_trait;
use sqlx::{Sqlite, SqliteConnection};

#[async_trait]
impl Projection<Sqlite> for DeliveryJobs {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn gather(&self) -> std::time::Duration {
        Self::GATHER
    }

    async fn handle_batch(
        &self,
        conn: &mut SqliteConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            let (id, changes) = job_changes(event)?;
            for change in changes {
                match change {
                    JobChange::Schedule { publish_at } => {
                        sqlx::query(
                            "INSERT INTO scheduled_sends (message_id, publish_at) VALUES (?1, ?2) \
                             ON CONFLICT (message_id) DO UPDATE SET \
                             publish_at = excluded.publish_at, locked_until = NULL",
                        )
                        .bind(id)
                        .bind(publish_at)
                        .execute(&mut *conn)
                        .await?;
                    }
                    JobChange::Unschedule => {
                        sqlx::query("DELETE FROM scheduled_sends WHERE message_id = ?1")
                            .bind(id)
                            .execute(&mut *conn)
                            .await?;
                    }
                    JobChange::Enqueue { due_at } => {
                        let first = load_message(&mut *conn, &event.aggregate_id, Some(1)).await?;
                        let job = JobOf::new(id, &first)?;
                        sqlx::query(
                            "INSERT INTO send_jobs (message_id, service_id, channel, provider, \
                             due_at) VALUES (?1, ?2, ?3, ?4, ?5) \
                             ON CONFLICT (message_id) DO UPDATE SET due_at = excluded.due_at, \
                             locked_until = NULL",
                        )
                        .bind(id)
                        .bind(job.service_id)
                        .bind(job.channel)
                        .bind(job.provider)
                        .bind(due_at)
                        .execute(&mut *conn)
                        .await?;
                    }
                    JobChange::Retry { retry_at } => {
                        sqlx::query(
                            "UPDATE send_jobs SET due_at = ?2, locked_until = NULL \
                             WHERE message_id = ?1",
                        )
                        .bind(id)
                        .bind(retry_at)
                        .execute(&mut *conn)
                        .await?;
                    }
                    JobChange::Dequeue => {
                        sqlx::query("DELETE FROM send_jobs WHERE message_id = ?1")
                            .bind(id)
                            .execute(&mut *conn)
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut SqliteConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM scheduled_sends")
            .execute(&mut *conn)
            .await?;
        sqlx::query("DELETE FROM send_jobs").execute(conn).await?;
        Ok(())
    }
}
