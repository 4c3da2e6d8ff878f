//! The front end's message list: one row per message, the aggregate's fold plus copies of
//! the fields the list filters on.

use crate::event::StoredEvent;
use crate::subscription::{Projection, ProjectionError};
use async_trait::async_trait;
use messaging_domain::{Message, MessageData};
use sqlx::PgConnection;

pub struct MessageList;

#[async_trait]
impl Projection for MessageList {
    fn name(&self) -> &'static str {
        "message_list"
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        event: &StoredEvent,
    ) -> Result<(), ProjectionError> {
        if !event.is_message() {
            return Ok(());
        }
        let id = uuid::Uuid::parse_str(&event.aggregate_id)
            .map_err(|e| ProjectionError::Other(format!("message id: {e}")))?;
        let row: Option<(serde_json::Value, i64)> =
            sqlx::query_as("SELECT message, last_sequence FROM message_list WHERE message_id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
        let mut message = match row {
            // Guarded by the event's sequence: applying an event twice changes nothing.
            Some((_, last)) if last >= event.sequence => return Ok(()),
            Some((json, _)) => {
                let data: MessageData =
                    serde_json::from_value(json).map_err(|e| ProjectionError::Payload {
                        position: event.global_position,
                        error: format!("stored message: {e}"),
                    })?;
                Message::from(data)
            }
            None => Message::default(),
        };
        message.apply_event(event.message_event()?);
        let Some(d) = message.data() else {
            return Err(ProjectionError::Other(format!(
                "event {} at position {} does not start a message",
                event.event_type, event.global_position
            )));
        };
        let mut profiles: Vec<String> = std::iter::once(&d.from)
            .chain(d.to.iter())
            .map(|p| p.username.to_lowercase())
            .collect();
        profiles.sort();
        profiles.dedup();
        let json = serde_json::to_value(d).map_err(|e| ProjectionError::Other(e.to_string()))?;
        sqlx::query(
            "INSERT INTO message_list \
               (message_id, service_id, channel, direction, state, profiles, message, last_sequence) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (message_id) DO UPDATE SET state = EXCLUDED.state, \
               profiles = EXCLUDED.profiles, message = EXCLUDED.message, \
               last_sequence = EXCLUDED.last_sequence",
        )
        .bind(id)
        .bind(d.service_id.as_uuid())
        .bind(d.channel.as_str())
        .bind(d.direction.as_str())
        .bind(d.state.as_str())
        .bind(&profiles)
        .bind(json)
        .bind(event.sequence)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM message_list")
            .execute(conn)
            .await?;
        Ok(())
    }
}
