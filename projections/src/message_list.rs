//! The front end's message list: one row per message, the aggregate's fold plus copies of
//! the fields the list filters on.

use crate::event::StoredEvent;
use crate::subscription::{Projection, ProjectionError};
use async_trait::async_trait;
use messaging_domain::{Message, MessageData};
use sqlx::PgConnection;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

pub struct MessageList;

/// One message's row while a batch is applied.
struct Row {
    message: Message,
    last_sequence: i64,
    changed: bool,
}

async fn load(
    conn: &mut PgConnection,
    id: uuid::Uuid,
    event: &StoredEvent,
) -> Result<Row, ProjectionError> {
    let row: Option<(serde_json::Value, i64)> =
        sqlx::query_as("SELECT message, last_sequence FROM message_list WHERE message_id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(match row {
        Some((json, last_sequence)) => {
            let data: MessageData =
                serde_json::from_value(json).map_err(|e| ProjectionError::Payload {
                    position: event.global_position,
                    error: format!("stored message: {e}"),
                })?;
            Row {
                message: Message::from(data),
                last_sequence,
                changed: false,
            }
        }
        None => Row {
            message: Message::default(),
            last_sequence: 0,
            changed: false,
        },
    })
}

async fn store(conn: &mut PgConnection, id: uuid::Uuid, row: &Row) -> Result<(), ProjectionError> {
    let Some(d) = row.message.data() else {
        return Err(ProjectionError::Other(format!(
            "message {id}: its first event does not start a message"
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
           (message_id, service_id, channel, direction, state, profiles, message, \
            last_sequence, provider_message_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (message_id) DO UPDATE SET state = EXCLUDED.state, \
           profiles = EXCLUDED.profiles, message = EXCLUDED.message, \
           last_sequence = EXCLUDED.last_sequence, \
           provider_message_id = EXCLUDED.provider_message_id",
    )
    .bind(id)
    .bind(d.service_id.as_uuid())
    .bind(d.channel.as_str())
    .bind(d.direction.as_str())
    .bind(d.state.as_str())
    .bind(&profiles)
    .bind(json)
    .bind(row.last_sequence)
    .bind(d.provider_message_id.as_deref())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

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
        self.handle_batch(conn, std::slice::from_ref(event)).await
    }

    /// Each message's row is read once and written once per batch, however many of its
    /// events the batch holds (a thousand opens in one webhook batch, say).
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ProjectionError> {
        let mut rows: HashMap<uuid::Uuid, Row> = HashMap::new();
        let mut order = Vec::new();
        for event in events.iter().filter(|e| e.is_message()) {
            let id = event.message_uuid()?;
            let row = match rows.entry(id) {
                Entry::Occupied(row) => row.into_mut(),
                Entry::Vacant(slot) => {
                    order.push(id);
                    slot.insert(load(&mut *conn, id, event).await?)
                }
            };
            // Guarded by the event's sequence: applying an event twice changes nothing.
            if event.sequence <= row.last_sequence {
                continue;
            }
            row.message.apply_event(event.message_event()?);
            row.last_sequence = event.sequence;
            row.changed = true;
        }
        for id in order {
            if let Some(row) = rows.get(&id).filter(|r| r.changed) {
                store(&mut *conn, id, row).await?;
            }
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM message_list")
            .execute(conn)
            .await?;
        Ok(())
    }
}
