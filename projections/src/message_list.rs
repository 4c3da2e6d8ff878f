//! The front end's message list: one row per message, the aggregate's fold plus copies of
//! the fields the list filters on.

use crate::event::StoredEvent;
use crate::subscription::{Projection, ProjectionError};
use async_trait::async_trait;
use messaging_domain::{Message, MessageData};
use sqlx::PgConnection;
use std::collections::HashMap;

pub struct MessageList;

/// One message's row while a batch is applied.
struct Row {
    message: Message,
    last_sequence: i64,
    changed: bool,
}

/// The rows of these messages, in one query.
async fn load(
    conn: &mut PgConnection,
    ids: &[uuid::Uuid],
) -> Result<HashMap<uuid::Uuid, Row>, ProjectionError> {
    let found: Vec<(uuid::Uuid, serde_json::Value, i64)> = sqlx::query_as(
        "SELECT message_id, message, last_sequence FROM message_list WHERE message_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut rows: HashMap<uuid::Uuid, Row> = ids
        .iter()
        .map(|id| {
            let row = Row {
                message: Message::default(),
                last_sequence: 0,
                changed: false,
            };
            (*id, row)
        })
        .collect();
    for (id, json, last_sequence) in found {
        let data: MessageData = serde_json::from_value(json)
            .map_err(|e| ProjectionError::Other(format!("stored message {id}: {e}")))?;
        rows.insert(
            id,
            Row {
                message: Message::from(data),
                last_sequence,
                changed: false,
            },
        );
    }
    Ok(rows)
}

/// Writes the changed rows in one multi-row upsert.
async fn store(
    conn: &mut PgConnection,
    rows: &HashMap<uuid::Uuid, Row>,
) -> Result<(), ProjectionError> {
    let mut c = Columns::default();
    for (id, row) in rows.iter().filter(|(_, r)| r.changed) {
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
        c.id.push(*id);
        c.service_id.push(d.service_id.as_uuid());
        c.channel.push(d.channel.as_str());
        c.direction.push(d.direction.as_str());
        c.state.push(d.state.as_str());
        // Arrays of arrays do not unnest into rows: each row's profiles travel as one text.
        c.profiles.push(profiles.join(PROFILE_SEPARATOR));
        c.message
            .push(serde_json::to_value(d).map_err(|e| ProjectionError::Other(e.to_string()))?);
        c.last_sequence.push(row.last_sequence);
        c.provider_message_id.push(d.provider_message_id.clone());
    }
    if c.id.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO message_list \
           (message_id, service_id, channel, direction, state, profiles, message, \
            last_sequence, provider_message_id) \
         SELECT id, service_id, channel, direction, state, string_to_array(profiles, $10), \
                message, last_sequence, provider_message_id \
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], \
                     $7::jsonb[], $8::bigint[], $9::text[]) \
           AS r(id, service_id, channel, direction, state, profiles, message, last_sequence, \
                provider_message_id) \
         ON CONFLICT (message_id) DO UPDATE SET state = EXCLUDED.state, \
           profiles = EXCLUDED.profiles, message = EXCLUDED.message, \
           last_sequence = EXCLUDED.last_sequence, \
           provider_message_id = EXCLUDED.provider_message_id",
    )
    .bind(&c.id)
    .bind(&c.service_id)
    .bind(&c.channel)
    .bind(&c.direction)
    .bind(&c.state)
    .bind(&c.profiles)
    .bind(&c.message)
    .bind(&c.last_sequence)
    .bind(&c.provider_message_id)
    .bind(PROFILE_SEPARATOR)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Cannot appear in a username (a control character).
const PROFILE_SEPARATOR: &str = "\u{1f}";

#[derive(Default)]
struct Columns {
    id: Vec<uuid::Uuid>,
    service_id: Vec<uuid::Uuid>,
    channel: Vec<&'static str>,
    direction: Vec<&'static str>,
    state: Vec<&'static str>,
    profiles: Vec<String>,
    message: Vec<serde_json::Value>,
    last_sequence: Vec<i64>,
    provider_message_id: Vec<Option<String>>,
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
        let mut ids = std::collections::HashSet::new();
        for event in events.iter().filter(|e| e.is_message()) {
            ids.insert(event.message_uuid()?);
        }
        let ids: Vec<uuid::Uuid> = ids.into_iter().collect();
        let mut rows = load(&mut *conn, &ids).await?;
        for event in events.iter().filter(|e| e.is_message()) {
            let Some(row) = rows.get_mut(&event.message_uuid()?) else {
                continue;
            };
            // Guarded by the event's sequence: applying an event twice changes nothing.
            if event.sequence <= row.last_sequence {
                continue;
            }
            row.message.apply_event(event.message_event()?);
            row.last_sequence = event.sequence;
            row.changed = true;
        }
        store(conn, &rows).await
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), ProjectionError> {
        sqlx::query("DELETE FROM message_list")
            .execute(conn)
            .await?;
        Ok(())
    }
}
