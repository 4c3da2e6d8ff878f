//! The state-change feed for Automation: one item per state change, with the state before and
//! after. Positions are assigned here, by the one active feed projector, in log order: they
//! only grow, an item never appears behind a position already served, and a rebuild numbers
//! the items the same way.

use crate::event::{load_message, StoredEvent};
use crate::subscription::{Projection, ProjectionError};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use messaging_domain::Message;
use serde::Serialize;
use sqlx::PgConnection;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

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
        self.handle_batch(conn, std::slice::from_ref(event)).await
    }

    /// Items are numbered in log order. The state before an event is the fold of the events
    /// before it (the log is this projection's only source, so it depends on no other), loaded
    /// once per message per batch and then carried forward.
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let mut messages: HashMap<String, Message> = HashMap::new();
        let mut next: Option<i64> = None;
        for event in events.iter().filter(|e| e.is_message()) {
            let message = match messages.entry(event.aggregate_id.clone()) {
                Entry::Occupied(m) => m.into_mut(),
                Entry::Vacant(slot) => slot.insert(
                    load_message(&mut *conn, &event.aggregate_id, Some(event.sequence - 1)).await?,
                ),
            };
            let before = message.state();
            let payload = event.message_event()?;
            let cause = payload.type_name();
            let occurred_at = payload.occurred_at();
            message.apply_event(payload);
            let (Some(d), after) = (message.data(), message.state()) else {
                continue;
            };
            if after == before {
                continue;
            }
            let position = match next {
                Some(p) => p,
                None => {
                    sqlx::query_scalar::<_, i64>(
                        "SELECT COALESCE(MAX(position), 0) + 1 FROM state_changes",
                    )
                    .fetch_one(&mut *conn)
                    .await?
                }
            };
            let inserted = sqlx::query(
                "INSERT INTO state_changes (position, message_id, channel, service_id, \
                   previous_state, state, cause, occurred_at, recorded_at, event_position) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (event_position) DO NOTHING",
            )
            .bind(position)
            .bind(d.id.as_uuid())
            .bind(d.channel.as_str())
            .bind(d.service_id.as_uuid())
            .bind(before.map(|s| s.as_str()))
            .bind(d.state.as_str())
            .bind(cause)
            .bind(occurred_at)
            .bind(event.recorded_at)
            .bind(event.global_position)
            .execute(&mut *conn)
            .await?
            .rows_affected();
            next = Some(position + i64::try_from(inserted).unwrap_or(0));
        }
        if next.is_some() {
            sqlx::query("SELECT pg_notify('state_changes', '')")
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
