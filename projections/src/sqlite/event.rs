//! Events as read back from the SQLite store.

use crate::event::{fold, fold_into, messages_before, StoredEvent};
use crate::subscription::ProjectionError;
use messaging_domain::Message;
use sqlx::SqliteConnection;
use std::collections::HashMap;

/// The columns a reader selects, in [`StoredEvent`]'s shape. SQLite has no transaction ids:
/// commit order is position order, so every event reads as transaction 0.
pub const EVENT_COLUMNS: &str = "global_position, '0' AS transaction_id, aggregate_type, \
     aggregate_id, sequence, event_type, event_version, payload, recorded_at";

/// Every event of one message up to and including `up_to` (all when `None`), in order.
pub async fn message_events(
    conn: &mut SqliteConnection,
    message_id: &str,
    up_to: Option<i64>,
) -> Result<Vec<StoredEvent>, ProjectionError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND (?3 IS NULL OR sequence <= ?3) \
         ORDER BY sequence"
    );
    Ok(sqlx::query_as::<_, StoredEvent>(&sql)
        .bind(Message::TYPE_NAME)
        .bind(message_id)
        .bind(up_to)
        .fetch_all(conn)
        .await?)
}

/// The message as folded from its events up to `up_to`.
pub async fn load_message(
    conn: &mut SqliteConnection,
    message_id: &str,
    up_to: Option<i64>,
) -> Result<Message, ProjectionError> {
    fold(message_events(conn, message_id, up_to).await?)
}

/// For each `(message id, sequence)`, the message folded from its events before that
/// sequence: one query for a whole batch instead of one per message. The wanted pairs travel
/// as one JSON parameter, however many there are.
pub async fn load_messages_before(
    conn: &mut SqliteConnection,
    wanted: &[(String, i64)],
) -> Result<HashMap<String, Message>, ProjectionError> {
    let (mut messages, any_before) = messages_before(wanted);
    if !any_before {
        return Ok(messages);
    }
    let wanted_json =
        serde_json::to_string(wanted).map_err(|e| ProjectionError::Other(e.to_string()))?;
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM json_each(?2) AS wanted \
         JOIN events ON aggregate_type = ?1 \
           AND aggregate_id = json_extract(wanted.value, '$[0]') \
           AND sequence < json_extract(wanted.value, '$[1]') \
         ORDER BY aggregate_id, sequence"
    );
    let events: Vec<StoredEvent> = sqlx::query_as(&sql)
        .bind(Message::TYPE_NAME)
        .bind(wanted_json)
        .fetch_all(conn)
        .await?;
    fold_into(&mut messages, events)?;
    Ok(messages)
}
