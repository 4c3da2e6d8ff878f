//! The state-change feed for Automation: one item per state change, with the state before and
//! after. Positions are assigned here, by the one active feed projector, in log order: they
//! only grow, an item never appears behind a position already served, and a rebuild numbers
//! the items the same way.

use crate::event::{load_message, StoredEvent};
use crate::subscription::{Projection, ProjectionError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgConnection;

pub struct StateChangeFeed;

/// One feed item, as the API serves it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow, PartialEq)]
pub struct FeedItem {
    pub position: i64,
    pub message_id: uuid::Uuid,
    pub channel: String,
    pub service_id: uuid::Uuid,
    pub previous_state: Option<String>,
    pub state: String,
    pub cause: String,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

#[async_trait]
impl Projection for StateChangeFeed {
    fn name(&self) -> &'static str {
        "state_changes"
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        if !event.is_message() {
            return Ok(());
        }
        // The state before this event is the fold of the events before it: the log is the
        // only source, so this projection depends on no other.
        let mut message =
            load_message(&mut *conn, &event.aggregate_id, Some(event.sequence - 1)).await?;
        let before = message.state();
        let payload = event.message_event()?;
        let cause = payload.type_name();
        let occurred_at = payload.occurred_at();
        message.apply_event(payload);
        let (Some(d), after) = (message.data(), message.state()) else {
            return Ok(());
        };
        if after == before {
            return Ok(());
        }
        let position: i64 = sqlx::query_scalar(
            "INSERT INTO state_changes (position, message_id, channel, service_id, previous_state, \
               state, cause, occurred_at, recorded_at, event_position) \
             SELECT COALESCE(MAX(position), 0) + 1, $1, $2, $3, $4, $5, $6, $7, $8, $9 \
               FROM state_changes \
             ON CONFLICT (event_position) DO NOTHING RETURNING position",
        )
        .bind(d.id.as_uuid())
        .bind(d.channel.as_str())
        .bind(d.service_id.as_uuid())
        .bind(before.map(|s| s.as_str()))
        .bind(d.state.as_str())
        .bind(cause)
        .bind(occurred_at)
        .bind(event.recorded_at)
        .bind(event.global_position)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or_default();
        if position > 0 {
            sqlx::query("SELECT pg_notify('state_changes', $1)")
                .bind(position.to_string())
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM state_changes")
            .execute(conn)
            .await?;
        Ok(())
    }
}
